"""Concept-balanced data curation (freeze-align §3.2, Fig. 2), numpy only.

A caption pool and C concept prototypes become a training subset:

1. every caption is scored against every prototype (cosine similarity in the
   caption encoder's space); the pool is STREAMED in blocks of ``batch``
   captions, so memory is bounded by ``(max + batch) x C`` scores;
2. each concept keeps a running top-``max`` list (default 50,000) of
   (score, sample id);
3. concepts are ordered by the score of their ``max``-th best caption,
   ascending: the concept whose tail is weakest (hardest to fill) picks first;
4. in that order each concept takes up to ``per_concept`` (default 2,000) of
   its top captions not taken by an earlier concept (global de-duplication).

The result is (sample id, concept, score) rows, each sample at most once, and
per-concept counts. The official code is ``collection/scores_new.py`` (score +
int8 quantisation), ``sort_samples.py`` (running top lists) and
``collect_fast.py`` (greedy assignment) of github.com/mayug/freeze-align.

Scores, two modes:

* exact (the default, ours): float32 cosine scores; equal scores break by
  sample id, smaller first, so the result is a pure function of the pool.
* ``faithful=True``: the official int8 pipeline, quirks included
  (:func:`quantise_faithful`; ranking uses the dequantised ``q / 128``), and
  the official candidate list of ``max - 1`` entries per concept
  (``collect_fast.py`` slices ``[:max_amount - 1]``). The official tie order
  is whatever ``torch.sort`` / ``np.argsort`` give (unspecified); here ties
  still break by sample id (lists) and by concept index (concept order).
  The official scores are fp16 matmuls; here they are float32.

Blocks are cut at fixed positions of the stream (rows ``[k*batch, (k+1)*batch)``),
whatever parts the caller streams in, so the faithful mode's batch-wide quirk
and the floating-point scores are the same for any partition of the pool.

The prototypes: :func:`load_prototypes` (a file) or
:func:`prototypes_from_embeddings` (the mean of the normalised embeddings of a
few images, or of prompts, per concept).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

FAITHFUL_LOW, FAITHFUL_HIGH = -0.3, 0.4  # the official clipping bounds (scores_new.py)
Part = tuple[np.ndarray, np.ndarray]  # (sample ids [B] int, caption embeddings [B, D])


@dataclass(frozen=True)
class CurationConfig:
    """The knobs of one curation; ``batch`` is the scoring block (the official
    "batch file" of 4,096 captions, the unit of the faithful clipping quirk)."""

    per_concept: int = 2000
    max: int = 50_000
    faithful: bool = False
    batch: int = 4096

    def __post_init__(self):
        for name in ("per_concept", "max", "batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"curation {name} must be a positive integer, not {value!r}")
        if not isinstance(self.faithful, bool):
            raise ValueError(f"curation faithful must be true or false, not {self.faithful!r}")
        if self.faithful and self.max < 2:
            raise ValueError("faithful curation needs max >= 2 (its candidate lists hold max - 1)")


@dataclass
class Selection:
    """The curated subset: one row per selected sample, in assignment order."""

    ids: np.ndarray  # [S] sample ids, each at most once
    concepts: np.ndarray  # [S] concept index of each row
    scores: np.ndarray  # [S] its score for that concept (q / 128 in faithful mode)
    counts: np.ndarray  # [C] rows per concept
    order: np.ndarray  # [C] the order in which concepts picked (weakest tail first)


# --- scoring ---------------------------------------------------------------------


def normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length; zero rows stay zero (they score 0, not NaN)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def cosine_scores(embeddings: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """[B, C] cosine similarity of each caption with each concept prototype."""
    return normalise(embeddings) @ normalise(prototypes).T


def quantise_faithful(scores: np.ndarray) -> np.ndarray:
    """One block of scores as the official ``float_to_int`` stores them (int8).

    Exactly, for a block ``s`` (all captions x concepts of one batch file):

    * batch-wide clipping bug: the code writes ``x[x.max() > 0.4] = 0.4``, where
      the index is ONE boolean for the whole block, not a per-score mask. So if
      any score of the block exceeds 0.4, EVERY score of the block becomes 0.4;
      otherwise, if any score is below -0.3, every score becomes -0.3. Scores
      are never clipped one by one.
    * scaling: ``u = (s + 0.3) / 0.7`` in [0, 1], ``q = trunc((2u - 1) * 128)``
      in [-128, 128] (``.to(torch.int8)`` truncates toward zero);
    * int8 wrap-around: 128 does not fit int8 and wraps to -128, so a score of
      exactly 0.4 (and a whole clipped-high block) lands at the BOTTOM of every
      list; a block clipped low lands there too (-0.3 maps to -128).

    So one outlier caption above 0.4 drops its whole batch file from every
    concept's list. Computed in float64 on the given scores.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.size and s.max() > FAITHFUL_HIGH:
        s = np.full_like(s, FAITHFUL_HIGH)
    elif s.size and s.min() < FAITHFUL_LOW:
        s = np.full_like(s, FAITHFUL_LOW)
    u = (s - FAITHFUL_LOW) / (FAITHFUL_HIGH - FAITHFUL_LOW)
    q = np.trunc((2 * u - 1) * 128).astype(np.int64)
    return ((q + 128) % 256 - 128).astype(np.int8)


def block_scores(embeddings: np.ndarray, prototypes: np.ndarray, faithful: bool) -> np.ndarray:
    """The ranking scores of one block: cosine, or the faithful ``int8 / 128``."""
    scores = cosine_scores(embeddings, prototypes)
    if faithful:
        return quantise_faithful(scores).astype(np.float32) / 128
    return scores


def rechunk(parts: Iterable[Part], batch: int) -> Iterator[Part]:
    """Parts of any sizes re-cut into blocks of exactly ``batch`` rows (the last
    may be shorter), at fixed positions of the stream. Holds at most one
    block plus one part in memory."""
    ids_buf, emb_buf, held = [], [], 0
    for ids, emb in parts:
        ids_buf.append(np.asarray(ids, dtype=np.int64))
        emb_buf.append(np.asarray(emb))
        held += len(ids_buf[-1])
        while held >= batch:
            ids, emb = np.concatenate(ids_buf), np.concatenate(emb_buf)
            yield ids[:batch], emb[:batch]
            ids_buf, emb_buf, held = [ids[batch:]], [emb[batch:]], held - batch
    if held:
        yield np.concatenate(ids_buf), np.concatenate(emb_buf)


# --- running top lists -----------------------------------------------------------


class TopLists:
    """Per concept, the ``max`` best (score, id) seen so far: score descending,
    equal scores by id ascending (so any merge order gives the same lists)."""

    def __init__(self, n_concepts: int, max: int):
        self.max = max
        self.scores = np.empty((0, n_concepts), dtype=np.float32)
        self.ids = np.empty((0, n_concepts), dtype=np.int64)

    def update(self, ids: np.ndarray, scores: np.ndarray) -> None:
        """Merge one block: ``ids`` [B], ``scores`` [B, C]."""
        all_scores = np.concatenate([self.scores, scores.astype(np.float32)])
        block_ids = np.broadcast_to(np.asarray(ids, dtype=np.int64)[:, None], scores.shape)
        all_ids = np.concatenate([self.ids, block_ids])
        keep = np.lexsort((all_ids, -all_scores), axis=0)[: self.max]  # last key sorts first
        self.scores = np.take_along_axis(all_scores, keep, axis=0)
        self.ids = np.take_along_axis(all_ids, keep, axis=0)


def top_lists(parts: Iterable[Part], prototypes: np.ndarray, config: CurationConfig) -> TopLists:
    """Stream the pool through the scorer into per-concept top-``max`` lists."""
    prototypes = np.asarray(prototypes, dtype=np.float32)
    lists = TopLists(len(prototypes), config.max)
    for ids, emb in rechunk(parts, config.batch):
        lists.update(ids, block_scores(emb, prototypes, config.faithful))
    if not len(lists.ids):
        raise ValueError("the caption pool is empty")
    return lists


# --- greedy assignment -----------------------------------------------------------


def concept_order(lists: TopLists) -> np.ndarray:
    """Concepts by the score of their ``max``-th best caption, ascending (ties
    by concept index). A pool smaller than ``max`` has no ``max``-th caption:
    its weakest kept one stands in (the official code would fail there)."""
    tail = lists.scores[min(lists.max, len(lists.scores)) - 1]
    return np.argsort(tail, kind="stable")


def greedy_assign(lists: TopLists, per_concept: int, candidates: Optional[int] = None) -> Selection:
    """Weakest tail first, each concept takes up to ``per_concept`` of its top
    ``candidates`` (default: the whole list) not taken by an earlier concept."""
    order = concept_order(lists)
    ids = lists.ids[: candidates or len(lists.ids)]
    unique, dense = np.unique(ids, return_inverse=True)
    dense = dense.reshape(ids.shape)
    taken = np.zeros(len(unique), dtype=bool)
    picked = []
    for c in order:
        rows = np.flatnonzero(~taken[dense[:, c]])[:per_concept]
        if len(np.unique(dense[rows, c])) < len(rows):
            raise ValueError("the caption pool repeats a sample id; ids must be unique")
        taken[dense[rows, c]] = True
        picked.append((ids[rows, c], np.full(len(rows), c), lists.scores[rows, c]))
    return _selection(picked, order, lists.ids.shape[1])


def _selection(picked: list, order: np.ndarray, n_concepts: int) -> Selection:
    ids, concepts, scores = (np.concatenate(column) for column in zip(*picked))
    concepts = concepts.astype(np.int64)
    return Selection(ids=ids, concepts=concepts, scores=scores,
                     counts=np.bincount(concepts, minlength=n_concepts), order=order)


def curate(parts: Iterable[Part], prototypes: np.ndarray, config: CurationConfig = CurationConfig()) -> Selection:
    """The whole stage: stream, keep top lists, assign (see the module docstring)."""
    lists = top_lists(parts, prototypes, config)
    candidates = config.max - 1 if config.faithful else None  # the official [:max_amount - 1]
    return greedy_assign(lists, config.per_concept, candidates)


def nearest_counts(embeddings: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """[C] how many of ``embeddings`` have each concept as their nearest prototype
    (highest cosine, ties to the lower index): the one rule by which the report
    counts a subset's coverage, curated or random alike."""
    prototypes = np.asarray(prototypes, dtype=np.float32)
    embeddings = np.asarray(embeddings, dtype=np.float32).reshape(-1, prototypes.shape[1])
    nearest = cosine_scores(embeddings, prototypes).argmax(axis=1)
    return np.bincount(nearest, minlength=len(prototypes))


def random_control(ids: np.ndarray, size: int, seed: int = 0) -> np.ndarray:
    """The control: ``size`` ids drawn uniformly without replacement, in pool order."""
    ids = np.asarray(ids, dtype=np.int64)
    if size > len(ids):
        raise ValueError(f"a random subset of {size} from a pool of {len(ids)}")
    return np.sort(np.random.default_rng(seed).choice(ids, size, replace=False))


# --- prototypes ------------------------------------------------------------------


def prototypes_from_embeddings(groups: Sequence[np.ndarray]) -> np.ndarray:
    """[C, D]: per concept, the mean of its examples' normalised embeddings
    (a few images per concept in the paper; prompt embeddings as a fallback)."""
    if not len(groups) or any(len(g) == 0 for g in groups):
        raise ValueError("every concept needs at least one embedding")
    return np.stack([normalise(g).mean(axis=0) for g in groups])


def load_prototypes(path: str | Path, names: Optional[Sequence[str]] = None) -> tuple[np.ndarray, list[str]]:
    """Prototypes [C, D] and concept names from a file.

    ``.npz``: arrays ``prototypes`` [C, D] and optionally ``names`` [C].
    ``.npy``: the [C, D] array; names from ``<path without .npy>.txt`` (one a
    line) if that file exists. Without names: ``"concept <i>"``. ``names``
    given here win over the file's.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            array = data["prototypes"]
            stored = [str(n) for n in data["names"]] if "names" in data else None
    else:
        array = np.load(path, allow_pickle=False)
        sidecar = path.with_suffix(".txt")
        stored = sidecar.read_text().splitlines() if sidecar.exists() else None
    if array.ndim != 2 or not len(array):
        raise ValueError(f"prototypes in {path} must be a [C, D] array, not shape {array.shape}")
    names = list(names or stored or [f"concept {i}" for i in range(len(array))])
    if len(names) != len(array):
        raise ValueError(f"{len(names)} concept names for {len(array)} prototypes in {path}")
    return array.astype(np.float32), names
