"""The ``mixture`` dataset: paired rows from several sources, each cut to a size.

The paper's "scaling up" (pairs of a second source added to COCO) and
"train-test distribution shift" (a few in-domain pairs mixed into COCO)
train on such a concatenation (METHOD.md §9)::

    train: {dataset: mixture, split: train, options: {seed: 0, sources: [
              {dataset: coco, split: train, options: {root: ..., year: 2014}},
              {dataset: pairs, options: {path: laion.parquet}, size: 720000}]}}

Options:

* ``sources``: a list of ``{dataset, split (default: the split asked for),
  options, size}``. ``size``: caption rows (pairs) taken from that source:
  ``null`` / ``"all"`` (default) keeps every row, an integer a seeded random
  subset of that many. A digit string counts as an integer, so a step size
  can come from the environment (``size: "${INDOMAIN_SIZE:-1000}"``; spec
  variables are always substituted as text). A size above the source's rows
  is an error: the split would be smaller than the spec says.
* ``seed``: the subsets' seed. Source ``i`` draws from
  ``default_rng([seed, i])`` and keeps the first ``size`` rows of one
  permutation, so a smaller size is a subset of a larger one (the rows added
  between two steps are exactly the new ones), as the official
  ``randperm(N)[:n]`` subsampling nests.

Rows keep their source order, sources follow each other; each caption points
at its own source's image, re-indexed into the concatenated image list. A
source's class labels do not carry over (the sources' class spaces differ):
a mixture is paired data. Its fingerprint hashes every source's fingerprint,
its size and the seed, so any change of a source or a size is a new split.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from orchestrator.datasets.base import (
    DATASETS,
    DatasetError,
    DatasetOptionError,
    Split,
    SplitIndex,
    fingerprint,
    load_split,
    register_dataset,
    split_index,
)
from orchestrator.datasets.curated import _take  # one home for a lazy-preserving row take
from orchestrator.datasets.files import ImageFiles, LazyImages

MIXTURE_VERSION = 1  # bump when the rows a (sources, seed) selects change
SOURCE_KEYS = ("dataset", "split", "options", "size")


@dataclass(frozen=True)
class Source:
    """One parsed entry of ``sources``; ``size`` None: every row."""

    dataset: str
    split: str
    options: dict
    size: Optional[int]


def parse_sources(sources: Any, split: str) -> list[Source]:
    """The ``sources`` option as :class:`Source` objects; DatasetOptionError naming
    the entry and key otherwise (validation points the spec at it)."""
    if not isinstance(sources, list) or not sources:
        raise DatasetOptionError("dataset 'mixture': option 'sources' must be a non-empty list of "
                                 "{dataset, split, options, size}", "options.sources")
    return [_parse_source(entry, i, split) for i, entry in enumerate(sources)]


def _parse_source(entry: Any, i: int, split: str) -> Source:
    where = f"options.sources[{i}]"
    if not isinstance(entry, dict) or "dataset" not in entry:
        raise DatasetOptionError(f"dataset 'mixture': source {i} must be a mapping with a 'dataset' "
                                 f"key, not {entry!r}", where)
    unknown = sorted(set(entry) - set(SOURCE_KEYS))
    if unknown:
        raise DatasetOptionError(f"dataset 'mixture': source {i} has unknown keys {unknown}; "
                                 f"allowed: {', '.join(SOURCE_KEYS)}", f"{where}.{unknown[0]}")
    if entry["dataset"] not in DATASETS.names():
        raise DatasetOptionError(f"dataset 'mixture': source {i} names unknown dataset "
                                 f"{entry['dataset']!r}; registered: {', '.join(DATASETS.names())}",
                                 f"{where}.dataset")
    options = entry.get("options") or {}
    if not isinstance(options, dict):
        raise DatasetOptionError(f"dataset 'mixture': source {i} options must be a mapping", f"{where}.options")
    return Source(entry["dataset"], str(entry.get("split", split)), dict(options),
                  _size(entry.get("size"), f"{where}.size"))


def _size(value: Any, where: str) -> Optional[int]:
    """None for every row; an int >= 0 (a digit string from ``${VAR}`` too)."""
    if value is None or value == "all":
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DatasetOptionError(f"dataset 'mixture': size must be an integer >= 0, null or 'all', "
                                 f"got {value!r}", where)
    return value


def subset_rows(n_rows: int, size: Optional[int], seed: int, index: int) -> np.ndarray:
    """Sorted row indices a source keeps (module docstring: nested across sizes)."""
    if size is None:
        return np.arange(n_rows)
    if size > n_rows:
        raise DatasetError(f"dataset 'mixture': source {index} has {n_rows} pairs, fewer than its "
                           f"size {size}; lower the size or use 'all'")
    order = np.random.default_rng([seed, index]).permutation(n_rows)
    return np.sort(order[:size])


# --- validation ------------------------------------------------------------------------


def mixture_index(split: str, options: dict, count: bool) -> SplitIndex:
    """Every source's paths and sizes checked; with ``count``, the mixture's pairs
    (the sum of each size, or of each source's pairs where it keeps all)."""
    parsed = parse_sources(options.get("sources"), split)
    total, unknown = 0, []
    for i, source in enumerate(parsed):
        pairs = _source_pairs(source, i, count)
        if pairs is not None and source.size is not None and source.size > pairs:
            raise DatasetOptionError(f"dataset 'mixture': source {i} ({source.dataset}/{source.split}) "
                                     f"has {pairs} pairs, fewer than its size {source.size}",
                                     f"options.sources[{i}].size")
        kept = source.size if source.size is not None else pairs
        if kept is None:
            unknown.append(f"{i} ({source.dataset})")
        else:
            total += kept
    if unknown:
        return SplitIndex(None, f"unknown until run: the pairs of source(s) {', '.join(unknown)}")
    return SplitIndex(total, f"sum of {len(parsed)} source size(s)")


def _source_pairs(source: Source, i: int, count: bool) -> Optional[int]:
    """The source's pairs (None: unknown); its option errors keyed under the source."""
    try:
        return split_index(source.dataset, source.split, source.options, count=count).pairs
    except DatasetOptionError as err:
        raise DatasetOptionError(f"mixture source {i}: {err}", f"options.sources[{i}].{err.key}") from None


# --- the split -----------------------------------------------------------------------


@dataclass
class _Part:
    """One source's kept rows: its images (indices into the source), caption rows
    and each row's image as an index into ``images``."""

    split: Split
    images: np.ndarray
    rows: np.ndarray
    text_to_image: np.ndarray


def _part(source: Source, index: int, seed: int) -> _Part:
    split = load_split(source.dataset, source.split, source.options)
    rows = subset_rows(len(split.text_to_image), source.size, seed, index)
    images, local = np.unique(np.asarray(split.text_to_image)[rows], return_inverse=True)
    return _Part(split, images, rows, local.astype(np.int64).reshape(-1))


@register_dataset("mixture", kind="paired", index=mixture_index)
def mixture(split: str, *, sources: Any, seed: int = 0) -> Split:
    """The concatenated, size-cut sources as one paired Split (module docstring)."""
    parsed = parse_sources(sources, split)
    parts = [_part(source, i, seed) for i, source in enumerate(parsed)]
    offsets = np.cumsum([0] + [len(p.images) for p in parts[:-1]])
    pairing = np.concatenate([p.text_to_image + off for p, off in zip(parts, offsets)])
    if not len(pairing):
        raise DatasetError("dataset 'mixture': every source has size 0: the split has no pairs")
    identity = [[s.dataset, p.split.fingerprint, s.size] for s, p in zip(parsed, parts)]
    return Split(images=concat_images([_take(p.split.images, p.images) for p in parts]),
                 texts=_concat([_take(p.split.texts, p.rows) for p in parts]),
                 text_to_image=pairing.astype(np.int64),
                 fingerprint=fingerprint("mixture", MIXTURE_VERSION, seed, identity))


def concat_images(parts: list[Sequence]) -> Sequence:
    """Image files stay files (paths), arrays stay one array; a mix of kinds
    is a lazy chain that loads an image from its own part when asked."""
    if all(isinstance(p, ImageFiles) for p in parts):
        return ImageFiles([path for p in parts for path in p.paths])
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    starts = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def load(i: int) -> Any:
        k = bisect.bisect_right(starts, i) - 1
        return parts[k][i - starts[k]]
    return LazyImages(starts[-1], load)


def _concat(parts: list[Sequence]) -> Sequence:
    """Caption inputs: one array if every part is one (synthetic), else a list."""
    if all(isinstance(p, np.ndarray) for p in parts):
        return np.concatenate(parts)
    return [t for p in parts for t in p]
