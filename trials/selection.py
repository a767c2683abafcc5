"""Layer rules: which layer pairs to train, from a layer-similarity score matrix
(METHOD.md §6.1, §6.3). The one home of the rule grammar (:func:`parse_rule`,
:class:`LayerRule`: spec validation, presets, planning and the report use it).

``select_layers(scores, rule)`` re-implements ``AlignmentTrainer.compute_layer_alignment``
of the official code without pandas:

* ``scores`` is the [Li, Lj] matrix of ``similarity.layer_similarity`` (image layer
  i, text layer j) WITHOUT the concatenation row/column: the trainer drops every
  pair containing −1 before selecting. Pair order = row-major (i outer, j inner),
  the order of the official score table.
* Returned pairs are non-negative ``(i, j)`` indices into the layer lists. Where the
  official code writes (−1, −1) ("last layer of each model") this returns
  ``(Li − 1, Lj − 1)``.

Official rules (spec spelling, official flag):

* ``"similar"`` (``best_only``, the default of every config): the highest-scoring
  pair of the ``"bins"`` list, i.e. the global maximum (with a single bin, the
  code's list lacks the maximum: see ``_best``).
* ``"last"`` (``last_only``): the last layer pair.
* ``"bins"`` / ``"binsN"`` (neither flag): ``n_bins`` quantile bins of the scores (``pd.qcut``,
  duplicate edges dropped), one random pair per bin (``random_state=seed``), sorted
  by score descending; the first is replaced by the global maximum and the last
  by the global minimum; the last-layer pair is appended; duplicates are dropped.
* ``"lastK"`` (``n_last_layers=K``): every pair among the last k layers of each
  model, ordered by i descending, then j descending.

Ours: ``"all"`` (every pair), ``"topK"`` (the K most similar) and ``[i, j]``.

Ties: the code's pandas ``sort_values`` is an unstable quicksort, so its choice
among equal scores is unspecified. Here ties break as a stable sort would: the
maximum is the first in row-major order (also ``compute_score``'s strict ``>``
rule) and the minimum the last.

Randomness uses local ``numpy.random.RandomState(seed)`` objects, as pandas does
for ``sample(random_state=seed)``, so the global RNGs are never touched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import numpy as np

Pair = tuple[int, int]
ScoreMatrix = Any  # a [Li, Lj] numpy array or torch tensor
N_SELECTION_SAMPLES = 5000  # layer_selection.n_samples of every config (§6.1)


def sample_rows(n_total: int, n_samples: int = N_SELECTION_SAMPLES, seed: int = 0) -> np.ndarray:
    """Rows to score layers on (§6.1): ``min(n_samples, n_total)`` distinct rows.

    Same draw as the official ``np.random.choice(n_total, m, replace=False)`` made
    right after ``np.random.seed(seed)``, but from a local RandomState.
    """
    return np.random.RandomState(seed).choice(n_total, min(n_samples, n_total), replace=False)


def selection_rows(train_rows: Any, n_samples: int = N_SELECTION_SAMPLES, seed: int = 0) -> np.ndarray:
    """The rows a trial's own layer selection scores: ``min(n_samples, N)`` of its N rows.

    The official order of operations (§5.1, §6.1): subsample the training pairs
    first (``train_rows``, e.g. ``trials.trial.subsample(n_total, n_train, seed)``),
    then draw the selection sample from the subsample with the same seed; the
    result indexes the full split, in draw order.
    """
    train_rows = np.asarray(train_rows)
    return train_rows[sample_rows(len(train_rows), n_samples, seed)]


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
    if hasattr(scores, "detach"):  # a torch tensor (this module itself never imports torch)
        scores = scores.detach().cpu().double().numpy()
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


_OFFICIAL: dict[str, Callable[..., list[int]]] = {
    "similar": _best,
    "last": _last,
    "bins": _bins,
    "last_k": _last_k,
}


# --- layer rules: the one grammar of specs, presets, planning and the report ------------

DEFAULT_BINS = 5  # n_score_bins of every official config
RULE_FORMS = ("all | last | similar | topK (e.g. top3) | lastK (e.g. last2) | bins | binsN "
              "(e.g. bins3) | [image_layer, text_layer]")
LEGACY_NAMES = {"best": "similar"}  # spelling of specs written before 0.2 (resume reads them)


@dataclass(frozen=True)
class LayerRule:
    """Which layer pairs a trial trains.

    ``kind``: ``all`` (every pair), ``last`` (the last pair), ``similar`` (the
    most similar pair, the official ``best_only``), ``top`` (the ``k`` most
    similar), ``last_k`` (every pair among the last ``k`` layers, the official
    ``n_last_layers``), ``bins`` (one pair per similarity quantile bin, ``k``
    bins, the official default list) or ``pair`` (an explicit ``pair``).
    """

    kind: str
    k: int = 0
    pair: Optional[Pair] = None

    def __str__(self) -> str:
        if self.kind == "pair":
            return f"[{self.pair[0]}, {self.pair[1]}]"
        if self.kind == "bins":
            return "bins" if self.k == DEFAULT_BINS else f"bins{self.k}"
        return {"top": f"top{self.k}", "last_k": f"last{self.k}"}.get(self.kind, self.kind)

    @property
    def needs_similarity(self) -> bool:
        return self.kind in ("similar", "top", "bins")

    def count(self, num_layers: Optional[tuple[int, int]]) -> tuple[int, bool]:
        """(pairs this rule names, whether exact): ``bins`` counts its upper bound."""
        if self.kind in ("all", "last_k"):
            if num_layers is None:
                raise ValueError(f"counting {self} layer pairs needs the encoders' layer counts")
            li, lj = num_layers
            return (li * lj, True) if self.kind == "all" else (min(self.k, li) * min(self.k, lj), True)
        if self.kind == "bins":
            return self.k + 1, False
        return (self.k, True) if self.kind == "top" else (1, True)

    def resolve(self, scores: ScoreMatrix, *, seed: int = 0) -> list[Pair]:
        """The pairs this rule names on a [Li, Lj] similarity matrix, in training order."""
        return select_layers(scores, self, seed=seed)


def is_layer_pair(value: Any) -> bool:
    """``[i, j]``: exactly two ints (a list of rules such as ``[similar, last]`` is not)."""
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value))


def _suffix(text: str, prefix: str) -> int:
    rest = text[len(prefix):] if text.startswith(prefix) else ""
    return int(rest) if rest.isdigit() and int(rest) > 0 else 0


def parse_rule(value: Any) -> LayerRule:
    """A :class:`LayerRule` from its spelling (see ``RULE_FORMS``); ValueError otherwise."""
    if isinstance(value, LayerRule):
        return value
    if is_layer_pair(value):
        return LayerRule("pair", pair=(int(value[0]), int(value[1])))
    if isinstance(value, str):
        value = LEGACY_NAMES.get(value, value)
        if value in ("all", "last", "similar"):
            return LayerRule(value)
        if value == "bins":
            return LayerRule("bins", DEFAULT_BINS)
        for prefix, kind in (("top", "top"), ("last", "last_k"), ("bins", "bins")):
            if _suffix(value, prefix):
                return LayerRule(kind, _suffix(value, prefix))
    raise ValueError(f"{value!r} is not a layer rule; expected {RULE_FORMS}")


def select_layers(scores: ScoreMatrix, rule: Union[str, LayerRule, Pair] = "similar", *,
                  seed: int = 0, n_bins: int = DEFAULT_BINS) -> list[Pair]:
    """Layer pairs ``(i, j)`` a rule names, in the official training order (§6.3).

    ``scores``: [Li, Lj] array or tensor, higher = more similar, no concatenation
    entries. ``seed`` is the bins' ``random_state``; ``n_bins`` the number of
    score bins behind ``similar`` (the official ``best_only`` picks the top of the
    bins list; a ``binsN`` rule sets its own). ``topK`` is ours: the K most
    similar pairs, ties in row-major order.
    """
    rule = parse_rule(rule)
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins={n_bins!r} is not supported; allowed values: an integer >= 1")
    matrix = _to_matrix(scores)
    li, lj = matrix.shape
    if rule.kind == "pair":
        i, j = rule.pair
        if not (-li <= i < li and -lj <= j < lj):
            raise ValueError(f"layer pair {list(rule.pair)} is out of range for {li} image "
                             f"and {lj} text layers")
        return [(i % li, j % lj)]
    if rule.kind == "all":
        flat = list(range(matrix.size))
    elif rule.kind == "top":
        flat = [int(o) for o in np.argsort(-matrix, axis=None, kind="stable")[: rule.k]]
    else:
        bins = rule.k if rule.kind == "bins" else n_bins
        flat = _OFFICIAL[rule.kind](matrix, n_bins=bins, seed=seed, k=rule.k)
    return [(int(r // lj), int(r % lj)) for r in flat]
