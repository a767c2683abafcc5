"""Which layer pairs to train, from a layer-similarity score matrix (METHOD.md §6.1, §6.3).

``select_layers(scores, rule)`` re-implements ``AlignmentTrainer.compute_layer_alignment``
of the official code without pandas:

* ``scores`` is the [Li, Lj] matrix of ``similarity.layer_similarity`` (image layer
  i, text layer j) WITHOUT the concatenation row/column: the trainer drops every
  pair containing −1 before selecting. Pair order = row-major (i outer, j inner),
  the order of the official score table.
* Returned pairs are non-negative ``(i, j)`` indices into the layer lists. Where the
  official code writes (−1, −1) ("last layer of each model") this returns
  ``(Li − 1, Lj − 1)``.

Rules (``SELECTION_RULES``):

* ``"best"`` (``best_only``, the default of every config): the highest-scoring
  pair of the ``"bins"`` list, i.e. the global maximum (with a single bin, the
  code's list lacks the maximum: see ``_best``).
* ``"last"`` (``last_only``): the last layer pair.
* ``"bins"`` (neither flag): ``n_bins`` quantile bins of the scores (``pd.qcut``,
  duplicate edges dropped), one random pair per bin (``random_state=seed``), sorted
  by score descending; the first is replaced by the global maximum and the last
  by the global minimum; the last-layer pair is appended; duplicates are dropped.
* ``"last_k"`` (``n_last_layers=k``): every pair among the last k layers of each
  model, ordered by i descending, then j descending.

Ties: the code's pandas ``sort_values`` is an unstable quicksort, so its choice
among equal scores is unspecified. Here ties break as a stable sort would: the
maximum is the first in row-major order (also ``compute_score``'s strict ``>``
rule) and the minimum the last.

Randomness uses local ``numpy.random.RandomState(seed)`` objects, as pandas does
for ``sample(random_state=seed)``, so the global RNGs are never touched.
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import numpy as np
import torch

Pair = tuple[int, int]
ScoreMatrix = Union[torch.Tensor, np.ndarray]
N_SELECTION_SAMPLES = 5000  # layer_selection.n_samples of every config (§6.1)


def sample_rows(n_total: int, n_samples: int = N_SELECTION_SAMPLES, seed: int = 0) -> np.ndarray:
    """Rows to score layers on (§6.1): ``min(n_samples, n_total)`` distinct rows.

    Same draw as the official ``np.random.choice(n_total, m, replace=False)`` made
    right after ``np.random.seed(seed)``, but from a local RandomState.
    """
    return np.random.RandomState(seed).choice(n_total, min(n_samples, n_total), replace=False)


def quantile_bins(values: np.ndarray, n_bins: int) -> np.ndarray:
    """``pd.qcut(values, n_bins, labels=False, duplicates="drop")`` as int labels (−1 = no bin).

    Quantiles are linear-interpolated (pandas rounds quantile levels that are not
    exact in binary up by one ulp); intervals are right-closed, the lowest edge included.
    """
    levels = np.linspace(0, 1, n_bins + 1)
    inexact = n_bins * levels != np.arange(n_bins + 1)
    levels[inexact] = np.nextafter(levels[inexact], 1)
    edges = np.quantile(values, levels)
    unique = np.unique(edges)
    if len(unique) < len(edges) and len(edges) != 2:
        edges = unique
    ids = np.searchsorted(edges, values, side="left")
    ids[values == edges[0]] = 1
    labels = ids - 1
    labels[(ids == 0) | (ids == len(edges))] = -1
    return labels


def _to_matrix(scores: ScoreMatrix) -> np.ndarray:
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    matrix = np.asarray(scores, dtype=np.float64)
    if matrix.ndim != 2 or matrix.size == 0:
        raise ValueError(f"scores must be a non-empty [Li, Lj] matrix, got shape {matrix.shape}")
    if not np.isfinite(matrix).all():
        raise ValueError("scores must be finite (drop the concatenation row/column and NaNs first)")
    return matrix


def _first_max(flat: np.ndarray) -> int:
    return int(np.argmax(flat))  # numpy returns the first occurrence


def _last_min(flat: np.ndarray) -> int:
    return flat.size - 1 - int(np.argmin(flat[::-1]))


def _best(matrix: np.ndarray, n_bins: int, seed: int, **_) -> list[int]:
    """The top-scoring pair of the "bins" list, as the code's ``best_only`` does.

    That is the global maximum whenever there are >= 2 bins; with a single bin the
    code's list holds only the global minimum and the last pair (quirk kept).
    """
    flat = matrix.ravel()
    picks = _bins(matrix, n_bins=n_bins, seed=seed)
    return [max(picks, key=lambda r: flat[r])]  # max() keeps the first of equal scores


def _last(matrix: np.ndarray, **_) -> list[int]:
    return [matrix.size - 1]


def _sample_one(rows: np.ndarray, seed: int) -> int:
    """``group.sample(n=1, random_state=seed)``: a fresh RandomState(seed) for every bin."""
    return int(rows[np.random.RandomState(seed).choice(len(rows), size=1, replace=False)[0]])


def _bins(matrix: np.ndarray, n_bins: int, seed: int, **_) -> list[int]:
    flat = matrix.ravel()
    labels = quantile_bins(flat, n_bins)
    if (labels < 0).all():  # all scores equal: pandas leaves every row unbinned and the code fails
        labels = np.zeros_like(labels)
    picks = [_sample_one(np.flatnonzero(labels == b), seed) for b in np.unique(labels[labels >= 0])]
    picks.sort(key=lambda r: -flat[r])  # bins hold disjoint score ranges: no ties here
    picks[0] = _first_max(flat)
    picks[-1] = _last_min(flat)  # with a single bin this overwrites the maximum, as in the code
    picks.append(flat.size - 1)  # the last-layer pair is always trained
    return list(dict.fromkeys(picks))


def _last_k(matrix: np.ndarray, k: Optional[int], **_) -> list[int]:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"rule 'last_k' needs k, an integer >= 1; got k={k!r}")
    li, lj = matrix.shape
    return [i * lj + j for i in range(li - 1, max(li - k, 0) - 1, -1) for j in range(lj - 1, max(lj - k, 0) - 1, -1)]


SELECTION_RULES: dict[str, Callable[..., list[int]]] = {
    "best": _best,
    "last": _last,
    "bins": _bins,
    "last_k": _last_k,
}


def select_layers(
    scores: ScoreMatrix,
    rule: str = "best",
    *,
    n_bins: int = 5,
    seed: int = 0,
    k: Optional[int] = None,
) -> list[Pair]:
    """Layer pairs ``(i, j)`` to train, in the official training order (§6.3; see module doc).

    ``scores``: [Li, Lj] tensor or array, higher = more similar, no concatenation entries.
    ``n_bins`` and ``seed`` apply to ``"bins"`` (``n_score_bins`` and ``random_state``),
    ``k`` to ``"last_k"`` (``n_last_layers``).
    """
    if rule not in SELECTION_RULES:
        raise ValueError(f"rule={rule!r} is not supported; allowed values: {', '.join(map(repr, SELECTION_RULES))}")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r} is not supported; allowed values: an integer >= 1")
    matrix = _to_matrix(scores)
    flat_pairs = SELECTION_RULES[rule](matrix, n_bins=n_bins, seed=seed, k=k)
    return [(int(r // matrix.shape[1]), int(r % matrix.shape[1])) for r in flat_pairs]
