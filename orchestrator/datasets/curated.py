"""The ``curated`` dataset: freeze-align's concept-balanced subset as a data stage.

A spec refers to it like any dataset, so ``method`` and ``per_concept`` can be
search dimensions::

    train: {dataset: curated, split: train, options: {
              pool: {dataset: synthetic, options: {size: 20000}},
              prototypes: {from: prompts}, method: concept_balanced, per_concept: 200}}

Options:

* ``pool``: the caption pool, a paired dataset reference ``{dataset, split
  (default: the split asked for), options}`` (or just a dataset name);
* ``prototypes``: a file (``.npz`` / ``.npy``, see
  :func:`trials.curation.load_prototypes`); or ``{from: images, per_concept:
  K}``: the paper's recipe (Fig. 2), per concept (a class of the pool) the
  mean of the L2-normalised embeddings of its first K images in pool order
  (fewer where the class has fewer), in the caption encoder's space: for a
  synthetic pool the images' semantic latent (as ``embed: semantic`` for
  captions), for a real pool ``image_features``, an ``.npy`` [n_images, D] of
  the pool's images embedded into the caption space (e.g. CLIP's image tower
  when captions are embedded by CLIP's text tower), row i = image row i of the
  pool, whose labels choose the images; or ``{from: prompts}`` (default): the
  mean of the pool's class prompts embedded by ``embed``, a LABELLED FALLBACK
  for the image prototypes;
* ``method``: ``concept_balanced`` (the paper) or ``random``: the control, a
  uniformly random subset of the same size as the concept-balanced one;
* ``per_concept`` (2,000), ``max`` (50,000), ``faithful`` (False: exact float
  scores, ties by sample id; True: the official int8 quirks), ``batch``
  (4,096, the scoring block), ``seed`` (of ``random``);
* ``embed``: the caption embedding seam. ``"auto"`` (default) is
  ``"features"`` when ``caption_features`` is given, else ``"semantic"`` for a
  synthetic pool. ``"semantic"``: the semantic latent part of the synthetic
  caption inputs. ``"features"``: ``caption_features``, a ``.npy`` [n_texts, D]
  of the caption encoder's cached features, row i = caption row i of the pool:
  what a real run plugs in. From Python, a callable ``embed(inputs) -> [n, D]``
  carrying an ``identity`` attribute (JSON-able; it is part of the cache key);
* ``image_features``: see ``prototypes``;
* ``cache_dir``: where selections are cached (default
  ``$STRUCTURE_SWEEP_CACHE`` or ``~/.cache/structure-sweep``, + ``/curated``).

A selection is content-keyed (the pool's fingerprint, the prototypes' hash or
recipe, the embedding, method and parameters) and written atomically, so a
second load reuses it without scoring anything. The split's rows are the
selected caption rows in pool order; :func:`curated_selection` also gives the
(sample id, concept, score) rows and the per-concept counts for a report.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

import numpy as np

from orchestrator.datasets.base import DatasetError, Split, fingerprint, load_split, register_dataset
from orchestrator.datasets.files import ImageFiles, LazyImages, files_identity, require
from orchestrator.datasets.synthetic import synthetic as synthetic_factory
from orchestrator.durable import atomic_write_bytes
from orchestrator.keys import content_key
from trials import curation

CURATED_VERSION = 1  # bump when the meaning of a cached selection changes
METHODS = ("concept_balanced", "random")
NAME = "curated"
LAYOUT = """expected prototypes as a file: an .npz with arrays 'prototypes' [C, D] and 'names' [C],
or an .npy [C, D] with optional names in <same name>.txt (one a line); or {from: prompts};
or {from: images, per_concept: K} (a synthetic pool, or image_features and a labelled pool);
caption_features: an .npy [n_texts, D], row i = caption row i of the pool;
image_features: an .npy [n_images, D] in the caption space, row i = image row i of the pool."""


@dataclass
class CuratedSelection:
    """A selection as cached: rows in assignment order (``random``: concept -1)."""

    ids: np.ndarray
    concepts: np.ndarray
    scores: np.ndarray
    counts: np.ndarray  # [C] per concept (all zero for random)
    names: list[str]
    key: str
    cached: bool = False  # read from the cache (no scoring) rather than computed now


@dataclass
class Stage:
    """What one curation reads: the pool, the embedding and the prototypes."""

    pool: Split
    pool_ref: dict
    embed: Optional[Callable]
    features: Optional[Path]
    embed_identity: Any
    prototypes: Any
    images: Optional[Path] = None  # image_features, for prototypes {from: images}


@register_dataset(NAME, kind="paired")
def curated(split: str, *, pool: Any, prototypes: Any = None, method: str = "concept_balanced",
            per_concept: int = 2000, max: int = 50_000, faithful: bool = False, batch: int = 4096,
            seed: int = 0, embed: Any = "auto", caption_features: Optional[str] = None,
            image_features: Optional[str] = None, cache_dir: Optional[str] = None) -> Split:
    """The selected caption rows of the pool as a paired Split (module docstring)."""
    stage = build_stage(split, pool, prototypes, embed, caption_features, image_features)
    selection = curated_selection(stage, method=method, config=_config(per_concept, max, faithful, batch),
                                  seed=seed, cache_dir=cache_dir)
    return subset_split(stage.pool, selection)


def bound_options(split: str, options: dict) -> dict:
    """Every option of :func:`curated` for ``options`` (defaults filled in), as it reads them."""
    try:
        bound = inspect.signature(curated).bind(split, **options)
    except TypeError as err:
        raise DatasetError(f"dataset {NAME!r}: {err}") from err
    bound.apply_defaults()
    return bound.arguments


def _config(per_concept, max, faithful, batch) -> curation.CurationConfig:
    try:
        return curation.CurationConfig(per_concept=per_concept, max=max, faithful=faithful, batch=batch)
    except ValueError as err:
        raise DatasetError(f"dataset {NAME!r}: {err}") from err


# --- the stage's inputs ----------------------------------------------------------


def build_stage(split: str, pool: Any, prototypes: Any, embed: Any, caption_features: Optional[str],
                image_features: Optional[str] = None) -> Stage:
    ref = _pool_ref(pool, split)
    pool_split = load_split(ref["dataset"], ref["split"], ref["options"])
    features = require(NAME, caption_features, LAYOUT, "caption_features") if caption_features else None
    images = require(NAME, image_features, LAYOUT, "image_features") if image_features else None
    fn, identity = _embedding(embed, ref, features)
    return Stage(pool_split, ref, fn, features, identity, prototypes or {"from": "prompts"}, images)


def _pool_ref(pool: Any, split: str) -> dict:
    if isinstance(pool, str):
        pool = {"dataset": pool}
    if not isinstance(pool, dict) or "dataset" not in pool:
        raise DatasetError(f"dataset {NAME!r}: option 'pool' must name a dataset "
                           f"({{dataset, split, options}}), not {pool!r}")
    unknown = set(pool) - {"dataset", "split", "options"}
    if unknown:
        raise DatasetError(f"dataset {NAME!r}: unknown pool keys {sorted(unknown)}")
    return {"dataset": pool["dataset"], "split": pool.get("split", split), "options": dict(pool.get("options") or {})}


def _embedding(embed: Any, ref: dict, features: Optional[Path]) -> tuple[Optional[Callable], Any]:
    """(callable on caption inputs or None for feature rows, its cache identity)."""
    if embed == "auto":
        embed = "features" if features else "semantic" if ref["dataset"] == "synthetic" else None
    if embed == "features":
        if features is None:
            raise DatasetError(f"dataset {NAME!r}: embed 'features' needs the option caption_features.\n{LAYOUT}")
        return None, ["features", files_identity(NAME, [features], features.parent, LAYOUT)]
    if embed == "semantic":
        return _synthetic_semantic(ref)
    if callable(embed) and hasattr(embed, "identity"):
        return embed, ["callable", embed.identity]
    raise DatasetError(f"dataset {NAME!r}: no caption embedding for pool {ref['dataset']!r} (embed={embed!r}); "
                       "give caption_features (the caption encoder's cached features, an .npy "
                       "[n_texts, D]) or, from Python, a callable with an 'identity' attribute")


def _synthetic_semantic(ref: dict) -> tuple[Callable, Any]:
    """The semantic latent ``z`` of synthetic inputs ``[z, noise]`` (the first
    ``latent_dim`` columns): the space both synthetic encoders are built on."""
    if ref["dataset"] != "synthetic":
        raise DatasetError(f"dataset {NAME!r}: embed 'semantic' is for a synthetic pool, not {ref['dataset']!r}")
    default = inspect.signature(synthetic_factory).parameters["latent_dim"].default
    width = int(ref["options"].get("latent_dim", default))
    return (lambda inputs: np.asarray(inputs)[:, :width]), ["semantic", width]


def caption_parts(stage: Stage, batch: int) -> Iterator[curation.Part]:
    """The pool's caption rows as (row ids, embeddings), ``batch`` rows at a time."""
    texts = stage.pool.inputs("texts")
    rows = np.load(stage.features, mmap_mode="r", allow_pickle=False) if stage.features else None
    if rows is not None:
        _check_rows(rows, len(texts), "caption_features", "captions")
    for start in range(0, len(texts), batch):
        stop = min(start + batch, len(texts))
        vectors = rows[start:stop] if rows is not None else stage.embed(texts[start:stop])
        yield np.arange(start, stop), np.asarray(vectors, dtype=np.float32)


def _check_rows(rows: np.ndarray, n: int, option: str, unit: str) -> None:
    if len(rows) != n:
        raise DatasetError(f"dataset {NAME!r}: {option} has {len(rows)} rows, the pool {n} {unit}.\n{LAYOUT}")


def caption_vectors(stage: Stage, ids: np.ndarray) -> np.ndarray:
    """[len(ids), D] the caption embeddings of pool rows ``ids`` (what scoring saw)."""
    ids = np.asarray(ids, dtype=np.int64)
    if stage.features is not None:
        return np.asarray(np.load(stage.features, mmap_mode="r", allow_pickle=False)[ids], dtype=np.float32)
    return np.asarray(stage.embed(_take(stage.pool.inputs("texts"), ids)), dtype=np.float32)


def prototype_identity(stage: Stage) -> Any:
    """A file's content hash, or the recipe of built prototypes (whose inputs,
    the pool and the embedding, are in the key too): no embedding on a hit."""
    if isinstance(stage.prototypes, dict):
        recipe = prototype_recipe(stage.prototypes)
        if recipe == "prompts":
            return ["prompts"]
        return ["images", stage.prototypes["per_concept"], _image_embedding(stage)[1]]
    array, names = _prototype_file(stage)
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    return ["file", list(array.shape), digest, names]


def _prototype_file(stage: Stage) -> tuple[np.ndarray, list[str]]:
    path = require(NAME, stage.prototypes, LAYOUT, "prototypes")
    try:
        return curation.load_prototypes(path)
    except (ValueError, KeyError, OSError) as err:
        raise DatasetError(f"dataset {NAME!r}: {err}\n{LAYOUT}") from err


def prototype_recipe(prototypes: dict) -> str:
    """``prompts`` or ``images``, with the recipe's keys checked."""
    if prototypes == {"from": "prompts"}:
        return "prompts"
    k = prototypes.get("per_concept")
    if (prototypes.get("from") == "images" and set(prototypes) == {"from", "per_concept"}
            and isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        return "images"
    raise DatasetError(f"dataset {NAME!r}: prototypes must be a file, {{from: images, per_concept: K}} "
                       f"(K >= 1) or {{from: prompts}}, not {prototypes!r}")


def _image_embedding(stage: Stage) -> tuple[Callable, Any]:
    """The pool's images in the caption space: ``image_features`` rows, or a synthetic
    pool's semantic latent (the same columns ``embed: semantic`` takes of captions)."""
    if stage.images is not None:
        identity = files_identity(NAME, [stage.images], stage.images.parent, LAYOUT)
        rows = lambda index: np.load(stage.images, mmap_mode="r", allow_pickle=False)[index]  # noqa: E731
        return rows, ["image_features", identity]
    if stage.pool_ref["dataset"] == "synthetic":
        semantic, identity = _synthetic_semantic(stage.pool_ref)
        return (lambda index: semantic(np.asarray(stage.pool.images)[index])), identity
    raise DatasetError(f"dataset {NAME!r}: prototypes {{from: images}} on pool {stage.pool_ref['dataset']!r} "
                       f"need image_features.\n{LAYOUT}")


def image_prototypes(stage: Stage) -> tuple[np.ndarray, list[str]]:
    """Per class of the pool, the mean of the normalised embeddings of its first K images."""
    pool, k = stage.pool, stage.prototypes["per_concept"]
    if pool.labels is None or not pool.class_names:
        raise DatasetError(f"dataset {NAME!r}: prototypes {{from: images}} need a pool whose images have "
                           "class labels (they choose the images of each concept)")
    rows_of, _ = _image_embedding(stage)
    labels = np.asarray(pool.labels)
    if stage.images is not None:
        _check_rows(np.load(stage.images, mmap_mode="r", allow_pickle=False), len(labels), "image_features", "images")
    chosen = [np.flatnonzero(labels == c)[:k] for c in range(len(pool.class_names))]
    empty = [pool.class_names[c] for c, rows in enumerate(chosen) if not len(rows)]
    if empty:
        raise DatasetError(f"dataset {NAME!r}: no image of concept(s) {empty} in the pool to build "
                           "their prototypes from")
    groups = [np.asarray(rows_of(rows), dtype=np.float32) for rows in chosen]
    return curation.prototypes_from_embeddings(groups), list(pool.class_names)


def load_stage_prototypes(stage: Stage) -> tuple[np.ndarray, list[str]]:
    """The prototypes [C, D] and concept names (built from images or prompts if asked)."""
    if not isinstance(stage.prototypes, dict):
        return _prototype_file(stage)
    if prototype_recipe(stage.prototypes) == "images":
        return image_prototypes(stage)
    pool = stage.pool
    if not pool.prompts or stage.embed is None:
        raise DatasetError(f"dataset {NAME!r}: prototypes {{from: prompts}} need a pool with class prompts "
                           f"and an embedding of inputs (not caption_features); give a file.\n{LAYOUT}")
    groups = [np.asarray(stage.embed(per_class)) for per_class in pool.prompts]
    return curation.prototypes_from_embeddings(groups), list(pool.class_names)


# --- the selection, cached -------------------------------------------------------


def cache_root(cache_dir: Optional[str]) -> Path:
    """Under the sweep's cache root (orchestrator.feature_store.default_cache_dir)."""
    from orchestrator.feature_store import default_cache_dir

    return Path(cache_dir or default_cache_dir()).expanduser() / NAME


def selection_key(stage: Stage, config: curation.CurationConfig) -> str:
    return content_key({"stage": NAME, "version": CURATED_VERSION, "pool": stage.pool.fingerprint,
                        "prototypes": prototype_identity(stage), "embed": stage.embed_identity,
                        "method": "concept_balanced", "config": asdict(config)}, 32)


def curated_selection(stage: Stage, *, method: str, config: curation.CurationConfig, seed: int = 0,
                      cache_dir: Optional[str] = None) -> CuratedSelection:
    """The concept-balanced selection (computed once, then read from the cache),
    or the random control of the same size."""
    if method not in METHODS:
        raise DatasetError(f"dataset {NAME!r}: method must be one of {list(METHODS)}, not {method!r}")
    balanced = _cached(stage, config, cache_root(cache_dir))
    if method == "concept_balanced":
        return balanced
    return _random(balanced, len(stage.pool.inputs("texts")), seed)


def _random(balanced: CuratedSelection, n_pool: int, seed: int) -> CuratedSelection:
    """The control: cheap to redraw, so not cached; keyed by its source and seed."""
    ids = curation.random_control(np.arange(n_pool), len(balanced.ids), seed)
    return CuratedSelection(ids=ids, concepts=np.full(len(ids), -1), scores=np.full(len(ids), np.nan),
                            counts=np.zeros_like(balanced.counts), names=balanced.names,
                            key=content_key(["random", balanced.key, seed], 32))


def _cached(stage: Stage, config: curation.CurationConfig, root: Path) -> CuratedSelection:
    key = selection_key(stage, config)
    path = root / f"{key}.npz"
    cached = _read(path, key)
    if cached is not None:
        return cached
    prototypes, names = load_stage_prototypes(stage)
    try:
        found = curation.curate(caption_parts(stage, config.batch), prototypes, config)
    except ValueError as err:
        raise DatasetError(f"dataset {NAME!r}: {err}") from err
    selection = CuratedSelection(found.ids, found.concepts, found.scores, found.counts, names, key)
    _write(path, selection, found.order)
    return selection


def _write(path: Path, selection: CuratedSelection, order: np.ndarray) -> None:
    """One .npz, written atomically: a reader sees no file or the whole one."""
    buffer = io.BytesIO()
    np.savez(buffer, ids=selection.ids, concepts=selection.concepts, scores=selection.scores,
             counts=selection.counts, names=np.asarray(selection.names, dtype=str), order=order)
    atomic_write_bytes(path, buffer.getvalue())


def _read(path: Path, key: str) -> Optional[CuratedSelection]:
    """The cached selection, or None if absent or unreadable (then it is rebuilt, never used)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return CuratedSelection(ids=data["ids"], concepts=data["concepts"], scores=data["scores"],
                                    counts=data["counts"], names=[str(n) for n in data["names"]], key=key,
                                    cached=True)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None


# --- the subset as a Split -------------------------------------------------------


def subset_split(pool: Split, selection: CuratedSelection) -> Split:
    """The selected caption rows, in pool order, with the images they show."""
    rows = np.sort(selection.ids)
    pairing = np.asarray(pool.text_to_image)[rows]
    images, text_to_image = np.unique(pairing, return_inverse=True)
    labels = None if pool.labels is None else np.asarray(pool.labels)[images]
    return Split(images=_take(pool.images, images), texts=_take(pool.texts, rows),
                 text_to_image=text_to_image.astype(np.int64), labels=labels,
                 class_names=pool.class_names, prompts=pool.prompts,
                 fingerprint=fingerprint(NAME, CURATED_VERSION, selection.key))


def _take(items: Sequence, index: np.ndarray) -> Sequence:
    """``items[index]`` that keeps lazy image sequences lazy."""
    if isinstance(items, np.ndarray):
        return items[index]
    if isinstance(items, ImageFiles):
        return ImageFiles([items.paths[i] for i in index])
    if isinstance(items, LazyImages):
        return LazyImages(len(index), lambda i: items[int(index[i])])
    return [items[i] for i in index]
