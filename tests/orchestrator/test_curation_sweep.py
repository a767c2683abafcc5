"""A curated dataset trained through a real sweep on a local Ray cluster (freeze-align §3.2),
with the curation ``method`` and ``per_concept`` as search dimensions (``train_data``).

One sweep trains the concept-balanced subset, the equal-size random control and a smaller
balanced subset: each training split is selected once, extracted once per encoder, and
labelled on its trials' rows; a re-run plans nothing new and scores nothing again.
"""

import copy

import yaml

from dashboards import data as D
from dashboards.report import build_sections
from orchestrator.driver import run_sweep
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

POOL = {"dataset": "synthetic", "options": {"size": 400, "n_classes": 4}}


def _spec(root, tiny):
    tiny["data"]["train"] = {"dataset": "curated", "split": "train", "options": {
        "pool": POOL, "per_concept": 20, "max": 60, "batch": 64, "method": "concept_balanced",
        "cache_dir": str(root / "cache")}}
    tiny["search"] = [
        {"name": "method", "layers": [[1, 2]], "seed": [0, 1],
         "train_data": {"method": ["concept_balanced", "random"]}},
        {"name": "smaller", "layers": [[1, 2]], "seed": 0, "train_data": {"per_concept": 10}}]
    tiny["training"]["epochs"] = 2
    file = root / "curated.yaml"
    file.write_text(yaml.safe_dump({**tiny, "name": "curated", "output_dir": str(root / "run"),
                                    "cache_dir": str(root / "cache")}))
    return load_spec(file)


def _curation_lines(lines):
    return [line.strip() for line in lines if line.strip().startswith("curated train/")]


def test_curation_method_and_size_are_search_dimensions(ray_cluster, tmp_path, tiny):
    spec = _spec(tmp_path, copy.deepcopy(tiny))
    lines = []
    first = run_sweep(spec, log=lines.append)
    assert (first.planned, first.finished, first.failed) == (5, 5, 0)
    curation = _curation_lines(lines)
    assert [line.split(":")[0] for line in curation] == [
        "curated train/curated", "curated train/curated[method=random]",
        "curated train/curated[per_concept=10]"]
    assert "80 of 400 captions, training on concept_balanced" in curation[0]
    assert "training on random" in curation[1] and "40 of 400 captions" in curation[2]
    # each training split extracted once per encoder (the random control's is its own split)
    for split in ("curated", "curated[method=random]", "curated[per_concept=10]"):
        assert sum(f"features train/{split}/" in line for line in lines) == 2, split

    trials = ResultsStore(spec.run_dir).query("trials").set_index("fingerprint")
    assert (trials["status"] == "done").all() and trials.index.is_unique
    by_split = trials.groupby("train_data")["n_train_used"].agg(["count", "max"])
    assert by_split.to_dict("index") == {"": {"count": 2, "max": 80}, "method=random": {"count": 2, "max": 80},
                                         "per_concept=10": {"count": 1, "max": 40}}
    coverage = ResultsStore(spec.run_dir).query("curation")
    assert sorted(coverage.groupby("dataset")["curated"].sum().items()) == [
        ("curated", 80), ("curated[per_concept=10]", 40)]  # the control's coverage is the balanced one's row

    run = D.load_run(spec.run_dir)
    assert "curation" in [s.key for s in build_sections(run)]
    methods = {m.partition(" [") for m in D.with_methods(run.trials, {})["method"]}
    assert len({prefix for prefix, _, _ in methods}) == 1  # one method per training split, told apart
    assert {split for _, _, split in methods} == {"data.train]", "method=random]", "per_concept=10]"}

    lines = []
    again = run_sweep(spec, log=lines.append)
    assert (again.skipped, again.finished, again.features_computed) == (5, 0, 0)
    assert all("selection cached" in line and "coverage stored" in line for line in _curation_lines(lines))
    assert len(ResultsStore(spec.run_dir).query("curation")) == 8  # no duplicate rows
    cached = sorted(p.name for p in (tmp_path / "cache" / "curated").iterdir())
    assert len(cached) == 2 and all(c.endswith(".npz") for c in cached)  # per_concept 20 and 10, scored once
