"""The curated-data stage of a sweep: each ``curated`` dataset's selection, made once, and its coverage.

Before any encoder runs, the driver makes the concept-balanced selection of
every ``curated`` dataset the spec reads (:mod:`orchestrator.datasets.curated`:
content-keyed and cached, so the encoder actors loading the split find it and
a re-run scores nothing) and stores its per-concept coverage in the run's
``curation`` table (columns: ``orchestrator.schema.CURATION_COLUMNS``): the
concept-balanced subset against the equal-size random control, counted by
assignment and by nearest prototype (freeze-align §3.2: balance is the point).
Rows already stored are not recomputed or written again.
"""

from __future__ import annotations

import time
from dataclasses import asdict

from orchestrator.datasets.curated import (
    NAME,
    bound_options,
    build_stage,
    caption_vectors,
    curated_selection,
    load_stage_prototypes,
    prototype_recipe,
)
from orchestrator.results import ResultsStore
from orchestrator.train_data import train_refs
from trials.curation import CurationConfig, nearest_counts


def curated_refs(spec) -> list[tuple[str, object]]:
    """(role, DatasetRef) of every ``curated`` dataset the spec reads: the data block's, and
    the training split of each ``train_data`` variant (``curated[per_concept=500]``)."""
    data = spec.data
    refs = [("train", ref) for _, ref in train_refs(spec)] + [("val", data.val)]
    refs += [(f"retrieval/{r.name}", r) for r in data.retrieval]
    unpaired = getattr(data, "unpaired", None)
    refs += [(f"unpaired/{role}", getattr(unpaired, role)) for role in ("image", "text")
             if unpaired is not None and getattr(unpaired, role) is not None]
    return [(role, ref) for role, ref in refs if ref.dataset == NAME]


def record_curation(spec, results: ResultsStore | None, log=print) -> None:
    """Make (or find) every curated selection of ``spec`` and store its coverage rows."""
    stored = set()
    if results is not None:
        have = results.query("curation", columns=["row_key"])
        stored = set(have["row_key"]) if "row_key" in have else set()
    for role, ref in curated_refs(spec):
        rows, line = coverage_rows(role, ref, stored)
        log(f"  curated {role}/{ref.name}: {line}")
        if results is not None and rows:
            results.write("curation", rows)
            stored |= {r["row_key"] for r in rows}


def coverage_rows(role: str, ref, stored: set) -> tuple[list[dict], str]:
    """The ``curation`` rows of one curated dataset (none when ``stored`` has them) and a log line."""
    options = bound_options(ref.split, dict(ref.options))
    stage = build_stage(options["split"], options["pool"], options["prototypes"], options["embed"],
                        options["caption_features"], options["image_features"])
    config = CurationConfig(options["per_concept"], options["max"], options["faithful"], options["batch"])
    started = time.perf_counter()
    balanced = curated_selection(stage, method="concept_balanced", config=config,
                                 cache_dir=options["cache_dir"])
    control = curated_selection(stage, method="random", config=config, seed=options["seed"],
                                cache_dir=options["cache_dir"])
    line = (f"selection cached ({balanced.key})" if balanced.cached else
            f"selection computed in {time.perf_counter() - started:.1f}s ({balanced.key})")
    line += f", {len(balanced.ids)} of {len(stage.pool.inputs('texts'))} captions, training on {options['method']}"
    keys = [_row_key(balanced.key, control.key, c) for c in range(len(balanced.counts))]
    if all(k in stored for k in keys):
        return [], line + "; coverage stored"
    prototypes, names = load_stage_prototypes(stage)
    nearest = {"curated_nearest": nearest_counts(caption_vectors(stage, balanced.ids), prototypes),
               "random_nearest": nearest_counts(caption_vectors(stage, control.ids), prototypes)}
    common = {"dataset": ref.name, "role": role, "method": options["method"],
              "selection_key": balanced.key, "control_key": control.key,
              "pool": f"{stage.pool_ref['dataset']}/{stage.pool_ref['split']}",
              "n_pool": len(stage.pool.inputs("texts")), "prototypes": _prototype_kind(stage.prototypes),
              **{k: v for k, v in asdict(config).items() if k != "batch"},
              "n_selected": len(balanced.ids), "written_at": time.time()}
    rows = [{"row_key": key, **common, "concept": c, "concept_name": names[c],
             "curated": int(balanced.counts[c]),
             **{column: int(counts[c]) for column, counts in nearest.items()}}
            for c, key in enumerate(keys)]
    return rows, line + "; coverage computed"


def _row_key(selection_key: str, control_key: str, concept: int) -> str:
    return f"{selection_key}/{control_key}/{concept}"


def _prototype_kind(prototypes) -> str:
    return prototype_recipe(prototypes) if isinstance(prototypes, dict) else "file"
