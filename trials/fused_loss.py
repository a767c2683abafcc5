"""CLIP loss and R_S with analytic gradients over reused n×n buffers: the numbers of
:mod:`trials.losses`, computed for speed (METHOD.md §2, §3).

Why this exists: at a batch of 4096 every n×n matrix is 64 MiB, and the
reference path (autograd over ``F.kl_div``, ``softmax``, ``log``) allocates a
dozen of them per term, faults their pages in, and recomputes
``target·log(target)`` in the forward and again in the backward. Memory
traffic, not arithmetic, sets its pace. Here each term computes its value and
its gradient together, in place, in named scratch matrices (:class:`Workspace`)
that live for the whole trial:

* the frozen-space side of R_S needs no autograd: ``½P^l + ε`` and
  ``log(P^l + ε)`` are made once per batch (:func:`frozen_side`), and once per
  trial for the validation batches (the caller caches them);
* one log of the mixture serves both KL terms: with M̃ = ½(P+Q)+ε,
  D = (1/n) Σ M̃·K where K = log M̃ − ½log(Q+ε) − ½log(P+ε), and
  2n·∂D/∂Q = K + 1 − M̃/(Q+ε);
* the gradient goes back through the level powers Q^l = Q^(l-1)·Q with the
  powers already made in the forward, then through one fused softmax backward.

The heads' side (safe_norm, centring, the heads themselves) stays on autograd:
it is n×d and cheap. The values and gradients equal the reference's up to float
rounding (checked by ``tests/trials/test_fused_loss.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional

import torch
from torch.autograd.function import once_differentiable

from trials.losses import EPS, _check_structure_options, _prepare


class Workspace:
    """Named scratch matrices, allocated once and reused at every step.

    A fresh 64 MiB tensor costs ~20 ms of page faults under glibc's allocator
    before any arithmetic, so R_S's matrices are allocated once per trial (the
    largest n seen) and handed out as views. A name is reused only by code that
    is done with the previous contents.
    """

    def __init__(self):
        self._flat: dict[str, torch.Tensor] = {}

    def matrix(self, name: str, rows: int, cols: int, like: torch.Tensor) -> torch.Tensor:
        size = rows * cols
        flat = self._flat.get(name)
        if flat is None or flat.numel() < size or flat.dtype != like.dtype or flat.device != like.device:
            flat = torch.empty(size, dtype=like.dtype, device=like.device)
            self._flat[name] = flat
        return flat[:size].view(rows, cols)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._flat.values())


def _matrix(workspace: Optional[Workspace], name: str, n: int, like: torch.Tensor) -> torch.Tensor:
    """A scratch n×n matrix, or a new one when there is no workspace (e.g. for a cache)."""
    if workspace is None:
        return torch.empty(n, n, dtype=like.dtype, device=like.device)
    return workspace.matrix(name, n, n, like)


# ------------------------------------------------------------------ value and gradient in one pass


class _FusedTerm(torch.autograd.Function):
    """A scalar term whose gradient is made with its value; backward only scales it."""

    @staticmethod
    def forward(ctx, compute, *inputs):
        value, grads = compute(*inputs, need_grad=True)
        ctx.grads = grads  # intermediates, not inputs: kept as attributes
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):
        return (None, *(None if g is None else grad_value * g for g in ctx.grads))


def _fused(compute: Callable, *inputs: torch.Tensor) -> torch.Tensor:
    """``compute(*inputs, need_grad)`` -> (value, grads) as a differentiable 0-d tensor."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _FusedTerm.apply(compute, *inputs)
    return compute(*inputs, need_grad=False)[0]


def _softmax_similarity_(x: torch.Tensor, temperature: float, out: torch.Tensor) -> torch.Tensor:
    """``out = softmax(x xᵀ / T)`` over rows, in place (§3 steps 2-3, cosine distance)."""
    torch.mm(x, x.T, out=out)
    out.div_(temperature)  # as the reference: (x @ x.T) / T, same rounding
    return torch.softmax(out, dim=1, out=out)


def _symmetrize_(g: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``g += gᵀ`` in place. ``scratch.copy_(g.T)`` takes PyTorch's blocked-transpose copy
    (a contiguous destination): ~13 ms at n = 4096, against ~100 ms for ``g + g.T`` read
    across rows, and two large ops rather than hundreds of tiles, which a loaded machine's
    thread barriers would stall."""
    return g.add_(scratch.copy_(g.T))


# ------------------------------------------------------------------ CLIP (§2)


def fused_clip_loss(image: torch.Tensor, text: torch.Tensor, temperature: float,
                    workspace: Optional[Workspace] = None) -> torch.Tensor:
    """:func:`trials.losses.clip_loss` with its gradient made in the forward."""
    return _fused(partial(_clip_pass, temperature=temperature, workspace=workspace or Workspace()),
                  image, text)


def _clip_pass(image, text, *, temperature, workspace, need_grad):
    """½[CE(Z, diag) + CE(Zᵀ, diag)] and its gradients: ∂/∂Z = (softmax_rows + softmax_cols − 2I)/2n.

    CE(Z, diag) is −mean(diag(log_softmax(Z))), as ``F.cross_entropy`` computes it.
    """
    n = len(image)
    logits = workspace.matrix("q0", n, n, image)  # R_S's buffers: the terms run one after the other
    torch.mm(image, text.T, out=logits)
    logits.div_(temperature)
    rows = torch.log_softmax(logits, 1, out=workspace.matrix("m", n, n, image))
    columns = torch.log_softmax(logits, 0, out=logits)
    value = -0.5 * (rows.diagonal().mean() + columns.diagonal().mean())
    if not need_grad:
        return value, None
    grad = rows.exp_().add_(columns.exp_())
    grad.diagonal().sub_(2.0)
    scale = 1.0 / (2 * n * temperature)
    return value, ((grad @ text).mul_(scale), (grad.T @ image).mul_(scale))


# ------------------------------------------------------------------ R_S (§3)


@dataclass
class FrozenSide:
    """The frozen-space half of R_S for one batch, per level l: ½P^l + ε and log(P^l + ε)."""

    half_p: list
    log_p: list

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.half_p + self.log_p)


@torch.no_grad()
def frozen_side(original: torch.Tensor, *, levels: int, temperature: float, centering: str,
                center_first: bool, workspace: Optional[Workspace] = None) -> FrozenSide:
    """P = softmax(S(C(safe_norm(X)))) and its powers, in the forms the divergence reads (§3).

    Without a workspace the matrices are new (to be cached); with one they are
    scratch, valid until the next batch.
    """
    with torch.autocast(device_type=original.device.type, enabled=False):
        x = _prepare(original, centering, center_first)
    n = len(x)
    half_p = [_matrix(workspace, f"half_p{level}", n, x) for level in range(levels)]
    log_p = [_matrix(workspace, f"log_p{level}", n, x) for level in range(levels)]
    _softmax_similarity_(x, temperature, out=half_p[0])
    for level in range(1, levels):  # P^l = P^(l-1) P, all powers before P is overwritten
        torch.mm(half_p[level - 1], half_p[0], out=half_p[level])
    eps = torch.tensor(EPS, dtype=x.dtype)  # a 0-d operand: ½P + ε in one pass, bit for bit
    for p_l, log_p_l in zip(half_p, log_p):
        torch.add(p_l, EPS, out=log_p_l).log_()
        torch.add(eps, p_l, alpha=0.5, out=p_l)
    return FrozenSide(half_p, log_p)


def fused_structure_regularizer(original: torch.Tensor, aligned: torch.Tensor, *, levels: int,
                                temperature: float, weighting: str, margin: float, centering: str,
                                center_first: bool, distance: str = "cosine",
                                divergence: str = "official", frozen: Optional[FrozenSide] = None,
                                workspace: Optional[Workspace] = None) -> torch.Tensor:
    """:func:`trials.losses.structure_regularizer` (cosine distance, official divergence), fused.

    ``frozen`` is the precomputed :func:`frozen_side` of ``original`` (then
    ``original`` is not read). Autograd runs only through the n×d preparation
    of ``aligned``; the n×n part has an analytic gradient.
    """
    _check_structure_options(levels, temperature, weighting, centering, distance, divergence)
    if distance != "cosine" or divergence != "official":
        raise ValueError(f"the fused R_S computes distance='cosine', divergence='official' only, got "
                         f"distance={distance!r}, divergence={divergence!r}; use trials.losses")
    workspace = workspace or Workspace()
    with torch.autocast(device_type=aligned.device.type, enabled=False):
        if frozen is None:
            frozen = frozen_side(original, levels=levels, temperature=temperature, centering=centering,
                                 center_first=center_first, workspace=workspace)
        prepared = _prepare(aligned, centering, center_first)
        compute = partial(_structure_pass, frozen=frozen, levels=levels, temperature=temperature,
                          weighting=weighting, margin=margin, workspace=workspace)
        return _fused(compute, prepared)


def _structure_pass(x, *, frozen, levels, temperature, weighting, margin, workspace, need_grad):
    """(1/L) Σ_l w_l·max(D(P^l, Q^l) − margin, 0) for prepared aligned rows x, and ∂/∂x."""
    n = len(x)
    q = [workspace.matrix(f"q{level}", n, n, x) for level in range(levels)]
    _softmax_similarity_(x, temperature, out=q[0])
    for level in range(1, levels):
        torch.mm(q[level - 1], q[0], out=q[level])
    total, grads, coefficients = 0.0, [], []
    for level in range(1, levels + 1):
        raw, grad = _divergence(q[level - 1], frozen.half_p[level - 1], frozen.log_p[level - 1],
                                workspace, f"g{level - 1}", need_grad)
        weight = 1.0 if weighting == "none" else 1.0 / level
        d_l = torch.relu(raw - margin)
        total = total + (d_l if weighting == "none" else d_l * weight)  # the reference's order
        grads.append(grad)
        # relu's gradient is 0 where its output is 0; 1/(2n) turns grad into ∂D/∂Q
        coefficients.append((raw - margin > 0).to(x.dtype) * (weight / (levels * 2 * n)))
    value = total / levels
    if not need_grad:
        return value, None
    grad_q, scale = _through_powers(q, grads, coefficients, workspace)
    # into the mixture's buffer (free by now): no kernel is trusted to read and write one buffer
    grad_s = torch.ops.aten._softmax_backward_data.out(grad_q, q[0], 1, x.dtype,
                                                       grad_input=workspace.matrix("m", n, n, x))
    return value, (_symmetric_product(grad_s, x, workspace).mul_(scale / temperature),)


def _divergence(q, half_p, log_p, workspace, grad_name, need_grad):
    """The official "JS" ½[KL(M̃‖Q̃) + KL(M̃‖P̃)] (§3 step 5) and, if asked, 2n·∂D/∂Q up to row constants.

    One log of M̃ serves both KL terms. The gradient's +1 is dropped: a
    constant per row (and so a constant through the level powers, whose rows
    sum to 1) vanishes in the softmax backward.
    """
    n = len(q)
    mix = workspace.matrix("m", n, n, q)
    torch.add(half_p, q, alpha=0.5, out=mix)  # M̃ = ½(P + Q) + ε
    ratio = workspace.matrix(grad_name, n, n, q)
    torch.log(mix, out=ratio)
    q_eps = torch.add(q, EPS, out=workspace.matrix("q_eps", n, n, q))  # Q̃, kept for the gradient
    scratch = torch.log(q_eps, out=workspace.matrix("lq", n, n, q))
    ratio.sub_(scratch.add_(log_p), alpha=0.5)  # K = log M̃ − ½log Q̃ − ½log P̃
    raw = torch.mul(mix, ratio, out=scratch).sum() / n
    if not need_grad:
        return raw, None
    return raw, ratio.sub_(mix.div_(q_eps))  # K − M̃/Q̃


def _through_powers(q, grads, coefficients, workspace):
    """∂R/∂Q from the per-level ∂R/∂Q^l, backwards through Q^l = Q^(l-1)·Q.

    Returns (matrix, scale): with one level the coefficient is left to scale
    the n×d result instead of an n×n matrix.
    """
    if len(q) == 1:
        return grads[0], coefficients[0]
    for grad, coefficient in zip(grads, coefficients):
        grad.mul_(coefficient)
    n = len(q[0])
    grad_q = workspace.matrix("grad_q", n, n, q[0])
    upstream = grads[-1]  # ∂R/∂Q^L
    for level in range(len(q) - 1, 0, -1):  # Q^(l+1) = Q^l · Q, 0-based level l
        if level == len(q) - 1:
            torch.mm(q[level - 1].T, upstream, out=grad_q)
        else:
            grad_q.addmm_(q[level - 1].T, upstream)
        upstream = grads[level - 1].addmm_(upstream, q[0].T)  # ∂R/∂Q^l, all paths
    return grad_q.add_(upstream), 1.0


def _symmetric_product(grad_s: torch.Tensor, x: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """(G + Gᵀ) x, the gradient of S = x xᵀ with respect to x for upstream G = ∂R/∂S.

    Symmetrising G in place costs a fraction of the second n×n×d product it saves.
    """
    n = len(x)
    return _symmetrize_(grad_s, workspace.matrix("lq", n, n, x)) @ x  # "lq" is free by now
