"""Representation-similarity metrics and all-layer-pairs scoring (METHOD.md §6).

Two layers of API:

* per-pair metrics on the rows as given (the caller normalises): ``mutual_knn``,
  ``cycle_knn``, ``cka``, ``unbiased_cka``, ``cknna``. They follow the
  platonic-rep / STRUCTURE code (§6) line by line and return 0-d tensors;
* ``layer_similarity``: one metric over every (image layer, text layer) pair at
  once. Each layer's kNN index set or Gram matrix is computed ONCE and the pairs
  are combined from those, instead of recomputing both sides for every pair as
  the official ``compute_score`` does.

``METRICS`` is the one registry of metrics by name (``trials.registry.Registry``). kNN sets are computed in
the input dtype (so neighbours are those the official float32 code finds);
kernel sums (CKA, CKNNA) are accumulated in float64 for accuracy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from trials.registry import Registry

Layers = Union[torch.Tensor, Sequence[torch.Tensor]]
CKA_EPS = 1e-6  # the +1e-6 in platonic-rep's CKA denominators (§6)
_DIAG_FILL = -1e8  # compute_nearest_neighbors masks self-similarity with this (§6)

# --- choice of k (§6 "Choice of k") -----------------------------------------------------------

TOPK_RULES: dict[str, Callable[[int], int]] = {
    "sqrt": lambda n: math.ceil(math.sqrt(n)),
    "sturges": lambda n: math.ceil(math.log2(n) + 1),
    # Python float power on purpose: 64 ** (1/3) = 3.9999999999999996, so rice(64) = 8
    "rice": lambda n: math.ceil(2 * n ** (1 / 3)),
}


def topk_from_rule(n: int, rule: Union[int, str]) -> int:
    """k for n samples (§6): "rice" ⌈2n^{1/3}⌉, "sqrt" ⌈√n⌉, "sturges" ⌈log₂n + 1⌉, or an int as given.

    An integer may also come as a string of digits (e.g. "10" from a YAML/CLI value).
    """
    if isinstance(rule, str) and rule.strip().isdigit():
        rule = int(rule)
    if isinstance(rule, int) and not isinstance(rule, bool):
        if rule < 1:
            raise ValueError(f"k={rule} is not supported; allowed values: an integer >= 1 or one of {sorted(TOPK_RULES)}")
        return rule
    if rule not in TOPK_RULES:
        raise ValueError(f"k={rule!r} is not supported; allowed values: an integer >= 1 or one of {sorted(TOPK_RULES)}")
    return TOPK_RULES[rule](n)


def selection_k(metric: str, k: Union[int, str], n: int) -> Optional[int]:
    """The k a metric scores ``n`` rows with: ``k``'s rule at ``n`` (an integer as given),
    clipped to ``n − 1`` (a row has n − 1 neighbours); None for a metric without k.

    ValueError when ``n`` rows are too few for the metric (kNN: 2, CKNNA and the
    unbiased CKA: 4 rows), naming the metric and ``n``.
    """
    spec = METRICS.get(metric)
    smallest = max(spec.min_k + 1 if spec.uses_k else 2, 4 if metric in ("cknna", "unbiased_cka") else 2)
    if n < smallest:
        raise ValueError(f"layer similarity {metric!r} needs at least {smallest} rows, got {n}")
    return min(topk_from_rule(n, k), n - 1) if spec.uses_k else None


# --- shared building blocks -------------------------------------------------------------------


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise ValueError(f"expected two [N, D] tensors, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y must have the same number of rows, got {x.shape[0]} and {y.shape[0]}")


def _check_k(k: int, n: int, minimum: int = 1) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or not minimum <= k <= n - 1:
        raise ValueError(f"k={k!r} is not supported for n={n} rows; allowed values: an integer in [{minimum}, {n - 1}]")


def knn_indices(feats: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] indices of each row's k largest inner products, self excluded (§6 mutual kNN)."""
    gram = feats @ feats.T
    gram.fill_diagonal_(_DIAG_FILL)
    return gram.topk(k, dim=1).indices


def _knn_mask(indices: torch.Tensor) -> torch.Tensor:
    """Boolean [N, N] membership matrix: mask[i, j] is True iff j is a neighbour of i."""
    n = indices.shape[0]
    return torch.zeros(n, n, dtype=torch.bool, device=indices.device).scatter_(1, indices, True)


def _linear_kernel(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return x @ x.T


def _rbf_kernel(x: torch.Tensor, sigma: float) -> torch.Tensor:
    x = x.double()
    return torch.exp(-torch.cdist(x, x) ** 2 / (2 * sigma**2))


def _kernel(x: torch.Tensor, kernel: str, sigma: float) -> torch.Tensor:
    if kernel == "linear":
        return _linear_kernel(x)
    if kernel == "rbf":
        return _rbf_kernel(x, sigma)
    raise ValueError(f"kernel={kernel!r} is not supported; allowed values: 'linear', 'rbf'")


def hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """tr(K H L H), H = I − 11ᵀ/n; the 1/(n−1)² factor cancels in CKA (§6)."""
    h = torch.eye(k.shape[0], dtype=k.dtype, device=k.device) - 1 / k.shape[0]
    return torch.trace(k @ h @ l @ h)


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC on zero-diagonal K̃, L̃ (§6 ``unbiased_cka``)."""
    m = k.shape[0]
    kt, lt = k.clone().fill_diagonal_(0), l.clone().fill_diagonal_(0)
    value = (kt * lt.T).sum() + kt.sum() * lt.sum() / ((m - 1) * (m - 2)) - 2 * (kt @ lt).sum() / (m - 2)
    return value / (m * (m - 3))


# --- per-pair metrics (§6) ----------------------------------------------------------------------


def mutual_knn(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over rows of |N_x(i) ∩ N_y(i)| / k (§6 mutual kNN)."""
    _check_pair(x, y)
    _check_k(k, x.shape[0])
    both = _knn_mask(knn_indices(x, k)) & _knn_mask(knn_indices(y, k))
    return both.sum(1).double().mean() / k


def cycle_knn(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Fraction of rows i found among the x-neighbours of i's y-neighbours (§6 ``cycle_knn``)."""
    _check_pair(x, y)
    _check_k(k, x.shape[0])
    knn_x, knn_y = knn_indices(x, k), knn_indices(y, k)
    cycled = knn_x[knn_y]  # [N, k, k]
    rows = torch.arange(x.shape[0], device=x.device).view(-1, 1, 1)
    return (cycled == rows).flatten(1).any(1).double().mean()


def cka(x: torch.Tensor, y: torch.Tensor, *, kernel: str = "linear", sigma: float = 1.0,
        eps: float = CKA_EPS) -> torch.Tensor:
    """Biased CKA, HSIC_b(K,L)/(√(HSIC_b(K,K)·HSIC_b(L,L)) + eps) (§6).

    ``kernel="rbf"`` uses exp(−‖·‖²/(2σ²)). ``eps=0`` is freeze-align's ``linear_CKA`` (§10.1).
    """
    _check_pair(x, y)
    k_mat, l_mat = _kernel(x, kernel, sigma), _kernel(y, kernel, sigma)
    return hsic_biased(k_mat, l_mat) / (torch.sqrt(hsic_biased(k_mat, k_mat) * hsic_biased(l_mat, l_mat)) + eps)


def unbiased_cka(x: torch.Tensor, y: torch.Tensor, *, kernel: str = "linear", sigma: float = 1.0) -> torch.Tensor:
    """CKA with the unbiased HSIC estimator (§6 ``unbiased_cka``); needs N >= 4."""
    _check_pair(x, y)
    _check_unbiased_rows(x.shape[0])
    k_mat, l_mat = _kernel(x, kernel, sigma), _kernel(y, kernel, sigma)
    denom = torch.sqrt(hsic_unbiased(k_mat, k_mat) * hsic_unbiased(l_mat, l_mat)) + CKA_EPS
    return hsic_unbiased(k_mat, l_mat) / denom


def _check_unbiased_rows(n: int) -> None:
    if n < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 rows, got {n}")


def _cknna_mask(gram: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k neighbours of each row with the diagonal excluded (unbiased CKNNA), as a bool mask."""
    return _knn_mask(gram.clone().fill_diagonal_(float("-inf")).topk(k, dim=1).indices)


def cknna(x: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """CKNNA (§6): unbiased HSIC of the Gram matrices masked to the intersection of top-k sets."""
    _check_pair(x, y)
    _check_k(k, x.shape[0], minimum=2)
    _check_unbiased_rows(x.shape[0])
    gram_x, gram_y = x @ x.T, y @ y.T
    mask_x, mask_y = _cknna_mask(gram_x, k), _cknna_mask(gram_y, k)
    kx, ly = gram_x.double(), gram_y.double()
    both = mask_x & mask_y
    sim_kl = hsic_unbiased(both * kx, both * ly)
    sim_kk, sim_ll = hsic_unbiased(mask_x * kx, mask_x * kx), hsic_unbiased(mask_y * ly, mask_y * ly)
    return sim_kl / (torch.sqrt(sim_kk * sim_ll) + CKA_EPS)


# --- all layer pairs at once ------------------------------------------------------------------


def _mutual_knn_all(xs, ys, k) -> torch.Tensor:
    """score[a, b] = Σ_i |N_a(i) ∩ N_b(i)| / (n k); each layer's kNN set computed once."""
    n = xs[0].shape[0]
    knn_x = torch.stack([knn_indices(x, k) for x in xs])  # [Lx, n, k]
    rows = torch.arange(n, device=knn_x.device).view(1, n, 1)
    scores = torch.empty(len(xs), len(ys), dtype=torch.float64, device=knn_x.device)
    for b, y in enumerate(ys):
        member_b = _knn_mask(knn_indices(y, k))
        scores[:, b] = member_b[rows, knn_x].flatten(1).sum(1).double() / (n * k)
    return scores


def _cycle_knn_all(xs, ys, k) -> torch.Tensor:
    """score[a, b] = mean_i [∃ j ∈ N_b(i): i ∈ N_a(j)]; each layer's kNN set computed once."""
    n = xs[0].shape[0]
    knn_y = torch.stack([knn_indices(y, k) for y in ys])  # [Ly, n, k]
    rows = torch.arange(n, device=knn_y.device).view(1, n, 1)
    scores = torch.empty(len(xs), len(ys), dtype=torch.float64, device=knn_y.device)
    for a, x in enumerate(xs):
        is_neighbour_of = _knn_mask(knn_indices(x, k)).T  # [i, j]: i ∈ N_a(j)
        scores[a] = is_neighbour_of[rows, knn_y].any(-1).double().mean(-1)
    return scores


@dataclass
class _HsicTerms:
    """What the HSIC of one layer contributes to any pair: flattened matrix, row sums, total."""

    flat: torch.Tensor
    row_sums: torch.Tensor
    total: torch.Tensor


def _hsic_terms(gram: torch.Tensor, unbiased: bool) -> _HsicTerms:
    """Biased: the doubly centred Gram HKH (HSIC_b = ⟨HKH, HLH⟩). Unbiased: K̃ and its sums."""
    if unbiased:
        mat = gram.clone().fill_diagonal_(0)
    else:
        mat = gram - gram.mean(0, keepdim=True) - gram.mean(1, keepdim=True) + gram.mean()
    return _HsicTerms(mat.flatten(), mat.sum(1), mat.sum())


def _hsic_combine(a: _HsicTerms, b: _HsicTerms, dot: torch.Tensor, unbiased: bool, m: int) -> torch.Tensor:
    """HSIC from ⟨A, B⟩_F and the sums; the unbiased form uses Σ(K̃L̃) = rowsum(K̃)·rowsum(L̃)."""
    if not unbiased:
        return dot
    cross = b.row_sums @ a.row_sums  # b may hold a stack of layers: [Ly, n] @ [n]
    return (dot + a.total * b.total / ((m - 1) * (m - 2)) - 2 * cross / (m - 2)) / (m * (m - 3))


def _cka_all(xs, ys, unbiased: bool, eps: float = CKA_EPS) -> torch.Tensor:
    """CKA for all pairs from each layer's Gram matrix, computed once (linear kernel);
    ``eps`` in the denominator (0: freeze-align's ``linear_CKA``)."""
    m = xs[0].shape[0]
    if unbiased:
        _check_unbiased_rows(m)
    ty = [_hsic_terms(_linear_kernel(y), unbiased) for y in ys]
    self_y = torch.stack([_hsic_combine(t, t, t.flat @ t.flat, unbiased, m) for t in ty])
    stack_y = _HsicTerms(torch.stack([t.flat for t in ty]), torch.stack([t.row_sums for t in ty]),
                         torch.stack([t.total for t in ty]))
    del ty  # the stack holds the only copy of the y-side Grams from here on
    rows = []
    for x in xs:
        tx = _hsic_terms(_linear_kernel(x), unbiased)
        self_x = _hsic_combine(tx, tx, tx.flat @ tx.flat, unbiased, m)
        hsic = _hsic_combine(tx, stack_y, stack_y.flat @ tx.flat, unbiased, m)
        rows.append(hsic / (torch.sqrt(self_x * self_y) + eps))
    return torch.stack(rows)


def _masked_hsic_u(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """hsic_unbiased for (possibly asymmetric) masked Grams in O(n²): Σ(ÃB̃) = colsum(Ã)·rowsum(B̃)."""
    m = a.shape[0]
    at, bt = a.clone().fill_diagonal_(0), b.clone().fill_diagonal_(0)
    value = (at * bt.T).sum() + at.sum() * bt.sum() / ((m - 1) * (m - 2)) - 2 * (at.sum(0) @ bt.sum(1)) / (m - 2)
    return value / (m * (m - 3))


def _cknna_all(xs, ys, k) -> torch.Tensor:
    """CKNNA for all pairs: Gram matrices and top-k masks once per layer, then O(n²) per pair."""
    _check_unbiased_rows(xs[0].shape[0])

    def layer_terms(f):
        gram = f @ f.T
        mask = _cknna_mask(gram, k)
        gram = gram.double()
        return gram, mask, _masked_hsic_u(mask * gram, mask * gram)

    tx, ty = [layer_terms(x) for x in xs], [layer_terms(y) for y in ys]
    scores = torch.empty(len(xs), len(ys), dtype=torch.float64, device=xs[0].device)
    for a, (kx, mx, sx) in enumerate(tx):
        for b, (ly, my, sy) in enumerate(ty):
            both = mx & my
            scores[a, b] = _masked_hsic_u(both * kx, both * ly) / (torch.sqrt(sx * sy) + CKA_EPS)
    return scores


@dataclass(frozen=True)
class Metric:
    """A registered metric: its per-pair function, its all-pairs function, and whether it takes k."""

    pair: Callable[..., torch.Tensor]
    all_pairs: Callable[..., torch.Tensor]
    uses_k: bool
    min_k: int = 1


METRICS: Registry[Metric] = Registry("metric")
METRICS.register("mutual_knn", Metric(mutual_knn, _mutual_knn_all, uses_k=True))
METRICS.register("cycle_knn", Metric(cycle_knn, _cycle_knn_all, uses_k=True))
METRICS.register("cka", Metric(cka, lambda xs, ys, eps=CKA_EPS: _cka_all(xs, ys, False, eps), uses_k=False))
METRICS.register("unbiased_cka", Metric(unbiased_cka, lambda xs, ys, eps=CKA_EPS: _cka_all(xs, ys, True, eps),
                                        uses_k=False))
METRICS.register("cknna", Metric(cknna, _cknna_all, uses_k=True, min_k=2))


def as_layer_list(layers: Layers, name: str = "layers") -> list[torch.Tensor]:
    """[L, N, D] tensor or a sequence of [N, D_l] tensors -> list of [N, D_l], checked."""
    if isinstance(layers, torch.Tensor):
        if layers.ndim != 3:
            raise ValueError(f"{name} must be [L, N, D] or a list of [N, D]; got shape {tuple(layers.shape)}")
        layers = list(layers.unbind(0))
    layers = list(layers)
    if not layers or any(not isinstance(t, torch.Tensor) or t.ndim != 2 for t in layers):
        raise ValueError(f"{name} must be a non-empty [L, N, D] tensor or list of [N, D] tensors")
    if len({t.shape[0] for t in layers}) != 1:
        raise ValueError(f"all {name} must have the same number of rows N, got {[t.shape[0] for t in layers]}")
    return layers


def _prepare_layers(layers: list[torch.Tensor], normalize: bool, include_concat: bool) -> list[torch.Tensor]:
    """Optionally append the concatenation of all layers (official index −1), then L2-normalise rows."""
    if include_concat:  # concat raw features first, normalise the whole row after, like the code
        layers = layers + [torch.cat(layers, dim=1)]
    return [F.normalize(t, p=2, dim=-1) for t in layers] if normalize else layers


def layer_similarity(
    x_layers: Layers,
    y_layers: Layers,
    metric: str = "mutual_knn",
    k: Union[int, str] = "rice",
    normalize: bool = True,
    include_concat: bool = False,
    eps: float = CKA_EPS,
) -> torch.Tensor:
    """metric(x layer a, y layer b) for every pair, as a float64 [Lx, Ly] tensor (§6.2).

    ``x_layers``/``y_layers``: [L, N, D] tensors or lists of [N, D_l] (same N, paired rows).
    ``k`` (kNN metrics only): an int or a rule of ``topk_from_rule`` applied to N.
    ``normalize`` L2-normalises each layer's rows first (every official config).
    ``include_concat`` appends the official "−1" entry, all layers concatenated along
    the feature axis, as the LAST row/column: the result is [Lx+1, Ly+1] and
    Python index −1 means the concatenation, as in the official code.
    ``eps``: the CKA metrics' denominator term (1e-6 as the official code; 0 is
    freeze-align's ``linear_CKA``); the kNN metrics have none.

    Memory: kNN metrics hold one [N, N] bool mask at a time; CKA holds the Ly
    y-side Gram matrices in float64 (Ly·N²·8 bytes, 5 GB for 25 layers at N=5000).
    """
    spec = METRICS.get(metric)
    xs, ys = as_layer_list(x_layers, "x_layers"), as_layer_list(y_layers, "y_layers")
    n = xs[0].shape[0]
    if ys[0].shape[0] != n:
        raise ValueError(f"x_layers and y_layers must have the same number of rows, got {n} and {ys[0].shape[0]}")
    xs, ys = _prepare_layers(xs, normalize, include_concat), _prepare_layers(ys, normalize, include_concat)
    if not spec.uses_k:
        return spec.all_pairs(xs, ys, eps=eps)
    k_value = topk_from_rule(n, k)
    _check_k(k_value, n, minimum=spec.min_k)
    return spec.all_pairs(xs, ys, k_value)
