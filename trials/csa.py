"""CSA, the closed-form head: centre, CCA, optionally refine with R_S (METHOD.md §4.4, §11).

:func:`fit_csa` fits both views at once and returns a :class:`CSAFit`, whose
``transform_x``/``transform_y`` map raw features to canonical coordinates.
Its options and their defaults are :class:`trials.head_options.CSAOptions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from trials.evaluate import zero_shot_weights
from trials.head_options import CSAOptions
from trials.losses import safe_normalize, structure_regularizer


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

    def class_vectors(self, prompts: torch.Tensor) -> torch.Tensor:
        """Zero-shot class vectors [C, dim] of raw prompt features [C, T, Dt], as STRUCTURE:
        templates averaged on the raw features, then the view-2 transform, with no
        renormalisation after it (§4.4)."""
        return self.transform_y(zero_shot_weights(prompts))


def _project(x, mean: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    dtype = x.dtype if x.is_floating_point() else torch.float64
    x = x.to(dtype)
    return (x - mean.to(x)) @ weight.to(x)


def fit_csa(x_train, y_train, dim: int, *, seed: int = 0, **options) -> CSAFit:
    """Fit CSA as STRUCTURE does (§4.4): centre, closed-form CCA, optional R_S refinement.

    ``options`` are :class:`~trials.head_options.CSAOptions` fields. The CCA is
    textbook (whitening + SVD, float64, PCA-style rank handling), rescaled to
    cca_zoo's weights. ``refine=True`` runs the ``CCA_RS`` refinement
    (``seed`` orders its mini-batches). Runs on ``x_train``'s device.

    ``whiten=False`` is the faithful default: the official whitening step
    (§4.4 step 3) is a silent no-op. It writes ``W @= M`` on a loop variable,
    and ``torch.Tensor`` has no ``__imatmul__``, so Python rebinds the name
    and the stored weights stay unwhitened; the stored refined case matches
    only without whitening. ``whiten=True`` applies what the code intended.
    """
    opts = CSAOptions(**options)
    x = torch.as_tensor(x_train).to(torch.float64)
    y = torch.as_tensor(y_train).to(device=x.device, dtype=torch.float64)
    mean_x, mean_y = x.mean(0), y.mean(0)
    xc, yc = x - mean_x, y - mean_y
    wx, wy, rho = canonical_weights(xc, yc, dim)
    if opts.refine and opts.lambda_rs > 0 and opts.refine_epochs > 0:
        wx, wy = _refine(xc, yc, wx, wy, opts, seed)
    corr = _structure_corr(xc @ wx, yc @ wy)
    return CSAFit(mean_x, mean_y, wx, wy, rho, x.shape[0], corr)


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


def _refine(xc, yc, wx, wy, opts: CSAOptions, seed: int):
    """The ``CCA_RS`` refinement (§4.4 steps 2-3), float32 Adam as the official code."""
    xs = [xc.to(torch.float32), yc.to(torch.float32)]
    ws = [nn.Parameter(w.to(torch.float32)) for w in (wx, wy)]
    optimizer = torch.optim.Adam(ws, lr=opts.lr)
    gen = torch.Generator(device=xc.device).manual_seed(seed)
    n = xs[0].shape[0]
    for _ in range(opts.refine_epochs):
        for idx in torch.randperm(n, generator=gen, device=xc.device).split(opts.batch_size or n):
            loss = _refine_loss(xs[0][idx], xs[1][idx], ws, opts)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        ws = [_whitened(x, w) if opts.whiten else w.detach() for x, w in zip(xs, ws)]
    return ws[0].to(torch.float64), ws[1].to(torch.float64)


def _refine_loss(bx, by, ws, opts: CSAOptions):
    """``λ_rs ½[R_S(X1,Ẑ1)+R_S(X2,Ẑ2)] − λ_cca Σ(Ẑ1⊙Ẑ2)/k`` with R_S's own defaults (§4.4)."""
    zx, zy = safe_normalize(bx @ ws[0]), safe_normalize(by @ ws[1])
    reg = dict(levels=opts.levels, temperature=opts.tau, weighting="inverse")
    r_s = (structure_regularizer(bx, zx, **reg) + structure_regularizer(by, zy, **reg)) / 2
    return opts.lambda_rs * r_s - opts.lambda_cca * (zx * zy).sum() / zx.shape[1]


def _whitened(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``W C^{-1/2}`` with ``C = W'X'XW/n`` (symmetric inverse square root, §4.4 step 3)."""
    c = (w.T @ x.T @ x @ w) / x.shape[0]
    d, u = torch.linalg.eigh(c)
    return w @ (u @ torch.diag(d.rsqrt()) @ u.T)
