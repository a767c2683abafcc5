"""Alignment heads: one registry keyed by name (METHOD.md §4).

``build_head(name, in_dim, out_dim, **options)`` builds the head of one
modality; ``list_heads()`` names them. Registered heads:

- ``linear``: the official ``LinearAlignmentLayer``, an affine map (§4.1).
- ``res_low_rank``: the official ``ResLowRankHead`` used by every "MLP" config
  (§4.3). With ``gate_init=0`` (all configs) its residual branch never trains,
  so it is exactly the bias-free linear map ``x -> P x``; reproduced on purpose.
- ``mlp``: ours. A plain MLP whose hidden layers really train, shaped like the
  official (unused) ``MLPAlignmentLayer`` (§4.2).
- ``csa``: the CSA map ``x -> (x - mean) W`` (§4.4). It is fitted in closed
  form by :func:`fit_csa`, not by gradient descent, so it is listed by
  ``list_heads()`` but not built by ``build_head``; its options are
  :func:`fit_csa`'s. ``check_head_options`` checks any head's options
  without building it.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from trials.losses import safe_normalize, structure_regularizer

_HEADS: dict[str, Callable[..., nn.Module]] = {}


def register_head(name: str):
    """Decorator: register a head class/factory ``(in_dim, out_dim, **options)``."""

    def decorate(builder):
        if name in _HEADS:
            raise ValueError(f"head {name!r} is already registered")
        _HEADS[name] = builder
        return builder

    return decorate


# Heads fitted in closed form rather than trained; their options are the keyword
# options of the fitting function (filled in below the fitting code).
CLOSED_FORM_HEADS: dict[str, Callable] = {}


def list_heads(*, trainable_only: bool = False) -> list[str]:
    """Names of the heads, sorted: the trainable ones and (unless ``trainable_only``) ``csa``."""
    return sorted(_HEADS if trainable_only else {**_HEADS, **CLOSED_FORM_HEADS})


def check_head_options(name: str, options: dict) -> None:
    """ValueError unless ``name`` is a head and ``options`` are all options it accepts.

    Checks names only (values are checked when the head is built or fitted);
    builds nothing. For ``csa`` the options are :func:`fit_csa`'s, less ``seed``
    (a trial passes its own).
    """
    if name in CLOSED_FORM_HEADS:
        params = inspect.signature(CLOSED_FORM_HEADS[name]).parameters
        allowed = [p for p, v in params.items() if v.kind is v.KEYWORD_ONLY and p != "seed"]
        _report_unknown(name, options, allowed)
        return
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}")
    _check_options(name, _HEADS[name], options)


def build_head(name: str, in_dim: int, out_dim: int, *, seed: int | None = None,
               **options) -> nn.Module:
    """Build head ``name`` mapping ``in_dim -> out_dim``.

    ``seed`` makes the initialisation deterministic without touching the
    global RNG (it runs under ``torch.random.fork_rng``). Unknown names or
    options raise ValueError listing what is allowed.
    """
    if name in CLOSED_FORM_HEADS:
        raise ValueError(f"head {name!r} is fitted in closed form: use trials.heads.fit_csa")
    if name not in _HEADS:
        raise ValueError(f"unknown head {name!r}; registered heads: {', '.join(list_heads())}")
    builder = _HEADS[name]
    _check_options(name, builder, options)
    if seed is None:
        return builder(in_dim, out_dim, **options)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(in_dim, out_dim, **options)


def _check_options(name: str, builder, options: dict) -> None:
    _report_unknown(name, options, list(inspect.signature(builder).parameters)[2:])


def _report_unknown(name: str, options: dict, allowed: list) -> None:
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"head {name!r} has no option(s) {unknown}; allowed: {allowed}")


# --------------------------------------------------------------------------- linear


@register_head("linear")
class LinearHead(nn.Linear):
    """``x -> W x + b`` with PyTorch's default init (§4.1, ``LinearAlignmentLayer``)."""

    def __init__(self, in_dim: int, out_dim: int, bias: bool = True):
        super().__init__(in_dim, out_dim, bias=bias)


# --------------------------------------------------------------------- res_low_rank


@register_head("res_low_rank")
class ResLowRankHead(nn.Module):
    """``z = P x + sigmoid(logit_a) * W2 Dropout(GELU(W1 x))`` (§4.3).

    P and W1: orthogonal init, no bias; W2: zeros. ``gate_init=0`` sets the
    gate logit to -inf exactly as the official code does, so alpha, its
    gradient and the gradients of W1 and W2 are all 0 for ever: the head is
    the linear map ``P x``. Pass ``0 < gate_init < 1`` for a trainable gate.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int | None = None,
                 dropout_p: float = 0.1, gate_init: float = 0.0):
        super().__init__()
        rank = rank or max(8, out_dim // 4)
        self.P = nn.Linear(in_dim, out_dim, bias=False)
        self.W1 = nn.Linear(in_dim, rank, bias=False)
        self.W2 = nn.Linear(rank, out_dim, bias=False)
        nn.init.orthogonal_(self.P.weight)
        nn.init.orthogonal_(self.W1.weight)
        nn.init.zeros_(self.W2.weight)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(dropout_p)
        # -inf, not a large negative number: that is what makes the official gate stuck
        logit = -math.inf if gate_init == 0.0 else math.log(gate_init / (1 - gate_init))
        self.logit_alpha = nn.Parameter(torch.tensor(logit))

    @property
    def alpha(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_alpha)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = self.W2(self.dropout(self.act(self.W1(x))))
        return self.P(x) + self.alpha * delta


# ------------------------------------------------------------------------------ mlp


@register_head("mlp")
class MLPHead(nn.Sequential):
    """Ours: ``Linear(in->h)``, then (num_layers-1) x [act, Dropout, ``Linear``], last to ``out``.

    Same shape as the official, unused ``MLPAlignmentLayer`` (§4.2; h = out,
    ReLU, no dropout by default), offered because the official "MLP" head
    (``res_low_rank``) never trains its hidden layer.
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None,
                 num_layers: int = 2, activation: str = "relu", dropout_p: float = 0.0):
        if num_layers < 1:
            raise ValueError("mlp head needs num_layers >= 1")
        acts = {"relu": nn.ReLU, "gelu": nn.GELU}
        if activation not in acts:
            raise ValueError(f"mlp activation must be one of {sorted(acts)}, got {activation!r}")
        hidden = hidden_dim or out_dim
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = [nn.Linear(dims[0], dims[1])]
        for d_in, d_out in zip(dims[1:-1], dims[2:]):
            layers += [acts[activation](), nn.Dropout(dropout_p), nn.Linear(d_in, d_out)]
        super().__init__(*layers)


# ------------------------------------------------------------------------------ csa


@dataclass
class CSAFit:
    """A fitted CSA: per-view means and projections, float64 (§4.4, §11).

    ``rho`` holds the textbook canonical correlations of the training data,
    most correlated first (of the closed-form fit; the optional R_S refinement
    changes the directions but not ``rho``). ``weight_x``/``weight_y`` carry
    cca_zoo's scaling (§4.4), which matters only for the refinement's Adam.
    """

    mean_x: torch.Tensor
    mean_y: torch.Tensor
    weight_x: torch.Tensor
    weight_y: torch.Tensor
    rho: torch.Tensor
    n_train: int
    structure_corr_coeff: torch.Tensor  # STRUCTURE's logged, unused corr_coeff (§4.4)

    def transform_x(self, x: torch.Tensor) -> torch.Tensor:
        """Canonical coordinates of view-1 rows, in ``x``'s dtype and device."""
        return _project(x, self.mean_x, self.weight_x)

    def transform_y(self, y: torch.Tensor) -> torch.Tensor:
        """Canonical coordinates of view-2 rows, in ``y``'s dtype and device."""
        return _project(y, self.mean_y, self.weight_y)

    @property
    def mmda_corr_coeff(self) -> torch.Tensor:
        """MMDA's ``corr_coeff = diag(Z1'Z2)/n``, which equals ``rho * n/(n-1)`` (§11)."""
        return self.rho * self.n_train / (self.n_train - 1)

    def similarity(self, zx: torch.Tensor, zy: torch.Tensor, weighting: str = "none",
                   dim: int | None = None) -> torch.Tensor:
        """[n_x, n_y] similarities of canonical coordinates (first ``dim`` of them).

        ``"none"``: plain cosine, what STRUCTURE evaluates with. ``"mmda"``: the
        original CSA score ``sum_k c_k x_k y_k`` of L2-normalised coordinates
        with MMDA's ``c = rho n/(n-1)`` (§11). ``"rho"``: the same with textbook ρ.
        """
        weights = {"none": None, "mmda": self.mmda_corr_coeff, "rho": self.rho}
        if weighting not in weights:
            raise ValueError(f"weighting must be one of {sorted(weights)}, got {weighting!r}")
        dim = dim or zx.shape[1]
        zx = nn.functional.normalize(zx[:, :dim], dim=1)
        zy = nn.functional.normalize(zy[:, :dim], dim=1)
        if weights[weighting] is not None:
            zx = zx * weights[weighting][:dim].to(zx)
        return zx @ zy.T


def _project(x, mean: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    dtype = x.dtype if x.is_floating_point() else torch.float64
    x = x.to(dtype)
    return (x - mean.to(x)) @ weight.to(x)


# --------------------------------------------------------------- CSA closed form


def fit_csa(x_train, y_train, dim: int, *, refine: bool = False, lambda_rs: float = 10.0,
            lambda_cca: float = 1e-2, levels: int = 1, tau: float = 0.2,
            refine_epochs: int = 10, lr: float = 5e-4, batch_size: int | None = 4096,
            whiten: bool = False, seed: int = 0) -> CSAFit:
    """Fit CSA as STRUCTURE does (§4.4): centre, closed-form CCA, optional R_S refinement.

    The CCA is textbook (whitening + SVD, float64, PCA-style rank handling),
    rescaled to cca_zoo's weights. ``refine=True`` runs the ``CCA_RS``
    refinement (defaults: the ``csa_structure_*`` configs; ``levels`` is L;
    ``seed`` orders the mini-batches). Runs on ``x_train``'s device.

    ``whiten=False`` is the faithful default: the official whitening step
    (§4.4 step 3) is a silent no-op. It writes ``W @= M`` on a loop variable,
    and ``torch.Tensor`` has no ``__imatmul__``, so Python rebinds the name
    and the stored weights stay unwhitened; the stored refined case matches
    only without whitening. ``whiten=True`` applies what the code intended.
    """
    x = torch.as_tensor(x_train).to(torch.float64)
    y = torch.as_tensor(y_train).to(device=x.device, dtype=torch.float64)
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    wx, wy, rho = canonical_weights(xc, yc, dim)
    if refine and lambda_rs > 0 and refine_epochs > 0:
        opts = dict(lambda_rs=lambda_rs, lambda_cca=lambda_cca, levels=levels, tau=tau,
                    epochs=refine_epochs, lr=lr, batch_size=batch_size, seed=seed)
        wx, wy = _refine(xc, yc, wx, wy, whiten=whiten, **opts)
    corr = _structure_corr(xc @ wx, yc @ wy)
    return CSAFit(mean_x, mean_y, wx, wy, rho, x.shape[0], corr)


CLOSED_FORM_HEADS["csa"] = fit_csa


def canonical_weights(xc: torch.Tensor, yc: torch.Tensor, dim: int):
    """cca_zoo-scaled CCA weights [dx, dim], [dy, dim] and textbook ρ [dim].

    Textbook weights give canonical variates of unit variance (divisor n-1);
    cca_zoo's are larger by sqrt(n/(n-1)) (view 1) and (n/(n-1))^1.5 (view 2)
    (§4.4). Cosine similarities do not see this; the refinement's Adam does.
    """
    n = xc.shape[0]
    hx, hy = _orthonormaliser(xc), _orthonormaliser(yc)
    if dim > min(hx.shape[1], hy.shape[1]):
        raise ValueError(f"CSA dim {dim} exceeds the data rank "
                         f"({hx.shape[1]}, {hy.shape[1]}) of the training views")
    # xc @ hx has orthonormal columns: the SVD of their cross product is the CCA
    u, s, vh = torch.linalg.svd((xc @ hx).T @ (yc @ hy))
    ratio = n / (n - 1)
    wx = hx @ u[:, :dim] * math.sqrt(n - 1) * math.sqrt(ratio)
    wy = hy @ vh.T[:, :dim] * math.sqrt(n - 1) * ratio ** 1.5
    return wx, wy, s[:dim].clamp(max=1.0)


def _orthonormaliser(xc: torch.Tensor) -> torch.Tensor:
    """[d, r] map H with ``(xc @ H)`` orthonormal, dropping null directions (PCA pre-step)."""
    evals, evecs = torch.linalg.eigh(xc.T @ xc)
    keep = evals > evals.max() * max(xc.shape) * torch.finfo(xc.dtype).eps
    return evecs[:, keep] / evals[keep].sqrt()


def _structure_corr(zx: torch.Tensor, zy: torch.Tensor) -> torch.Tensor:
    """``|diag(norm(Z1)' norm(Z2))| / n`` as STRUCTURE logs it (never used, §4.4)."""
    zx, zy = nn.functional.normalize(zx, dim=1), nn.functional.normalize(zy, dim=1)
    return (zx * zy).sum(0).abs() / zx.shape[0]


def _refine(xc, yc, wx, wy, *, lambda_rs, lambda_cca, levels, tau, epochs, lr,
            batch_size, seed, whiten):
    """The ``CCA_RS`` refinement (§4.4 steps 2-3), float32 Adam as the official code."""
    xs = [xc.to(torch.float32), yc.to(torch.float32)]
    ws = [nn.Parameter(w.to(torch.float32)) for w in (wx, wy)]
    opt = torch.optim.Adam(ws, lr=lr)
    gen = torch.Generator(device=xc.device).manual_seed(seed)
    n = xs[0].shape[0]
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=gen, device=xc.device).split(batch_size or n):
            loss = _refine_loss(xs[0][idx], xs[1][idx], ws, lambda_rs, lambda_cca, levels, tau)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        ws = [_whitened(x, w) if whiten else w.detach() for x, w in zip(xs, ws)]
    return ws[0].to(torch.float64), ws[1].to(torch.float64)


def _refine_loss(bx, by, ws, lambda_rs, lambda_cca, levels, tau):
    """``λ_rs ½[R_S(X1,Ẑ1)+R_S(X2,Ẑ2)] − λ_cca Σ(Ẑ1⊙Ẑ2)/k`` with R_S's own defaults (§4.4)."""
    zx, zy = safe_normalize(bx @ ws[0]), safe_normalize(by @ ws[1])
    reg = dict(levels=levels, temperature=tau, weighting="inverse")
    r_s = (structure_regularizer(bx, zx, **reg) + structure_regularizer(by, zy, **reg)) / 2
    return lambda_rs * r_s - lambda_cca * (zx * zy).sum() / zx.shape[1]


def _whitened(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``W C^{-1/2}`` with ``C = W'X'XW/n`` (symmetric inverse square root, §4.4 step 3)."""
    c = (w.T @ x.T @ x @ w) / x.shape[0]
    d, u = torch.linalg.eigh(c)
    return w @ (u @ torch.diag(d.rsqrt()) @ u.T)
