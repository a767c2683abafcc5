"""CLIP loss and R_S with analytic gradients over reused n×n buffers, for a stack of
trials at once: the numbers of :mod:`trials.losses`, computed for speed (METHOD.md §2, §3).

Every tensor has a leading member axis: features and head outputs are
[P, n, d], the n×n matrices [P, n, n], and each term's value is a vector [P],
one loss per member. A single trial is a stack of one (:mod:`trials.fused_loss`);
a pack of trials (:mod:`trials.packed_loop`) is P of them. Members never mix:
every reduction runs over a member's own rows, so a member whose numbers blow
up (NaN) leaves the others untouched. Each member has its own temperature (a
[P] tensor); the structure options (levels, weighting, margin, centring) are
the stack's, as :func:`trials.packed.pack_key` requires.

Why this exists: at a batch of 4096 every n×n matrix is 64 MiB, and the
reference path (autograd over ``F.kl_div``, ``softmax``, ``log``) allocates a
dozen of them per term, faults their pages in, and recomputes
``target·log(target)`` in the forward and again in the backward. Memory
traffic, not arithmetic, sets its pace. Here each term computes its value and
its gradient together, in place, in named scratch matrices (:class:`Workspace`)
that live for the whole trial:

* the frozen-space side of R_S needs no autograd: ``½P^l + ε`` and
  ``log(P^l + ε)`` are made once per batch (:func:`frozen_side`), and once per
  trial for the validation batches (the caller caches them); a training
  batch's similarity S can be gathered from a Gram matrix of all the training
  rows, built once per trial (:mod:`trials.frozen_gram`), instead of
  recomputed as an n×n×d product;
* one log of the mixture serves both KL terms: with M̃ = ½(P+Q)+ε,
  D = (1/n) Σ M̃·K where K = log M̃ − ½log(Q+ε) − ½log(P+ε), and
  2n·∂D/∂Q = K + 1 − M̃/(Q+ε);
* the gradient goes back through the level powers Q^l = Q^(l-1)·Q with the
  powers already made in the forward, then through one fused softmax backward.

The heads' side (safe_norm, centring, the heads themselves) stays on autograd:
it is n×d and cheap. The values and gradients equal the reference's up to float
rounding (``tests/trials/test_fused_loss.py``), and a member's equal the same
trial's alone (``tests/trials/test_packed.py``). Only cosine distance and the
official divergence are covered.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch.autograd.function import once_differentiable

from trials.losses import EPS, _prepare, safe_normalize


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



def _cube(workspace: Workspace, name: str, p: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """A scratch [p, n, n] tensor of the workspace (reused across steps)."""
    return workspace.matrix(name, p * n, n, like).view(p, n, n)


def _column(values: torch.Tensor) -> torch.Tensor:
    """A [P] vector as [P, 1, 1], to scale each member's matrix."""
    return values.view(-1, 1, 1)


# ------------------------------------------------------------------ value and gradient in one pass


class _PackedTerm(torch.autograd.Function):
    """A [P] vector of terms whose gradients are made with their values; backward only scales them."""

    @staticmethod
    def forward(ctx, compute, *inputs):
        value, grads = compute(*inputs, need_grad=True)
        ctx.grads = grads  # intermediates, not inputs: kept as attributes
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):
        scale = _column(grad_value)
        return (None, *(None if g is None else scale * g for g in ctx.grads))


def _packed(compute, *inputs: torch.Tensor) -> torch.Tensor:
    """``compute(*inputs, need_grad)`` -> (value, grads) as a differentiable [P] tensor."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _PackedTerm.apply(compute, *inputs)
    return compute(*inputs, need_grad=False)[0]


def _softmax_similarity_(x: torch.Tensor, temperature: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = softmax(x xᵀ / T)`` over each member's rows, in place (§3 steps 2-3, cosine distance)."""
    torch.bmm(x, x.transpose(1, 2), out=out)
    return _softmax_rows_(out, temperature)


def _softmax_rows_(s: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``s = softmax(s / T)`` over each member's rows, in place."""
    _divide_(s, temperature)  # as the reference: (x @ x.T) / T
    return torch.softmax(s, dim=2, out=s)


def _divide_(s: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``s /= T`` of each member, in place. On CPU each member is divided by its T as a Python
    float, the reference's own op: a float64 [P, 1, 1] divisor takes the type-promoted path (s
    copied to float64 and back), 20-400x slower. On CUDA the divisor stays a device tensor:
    reading T on the host would wait for the device."""
    if s.device.type != "cpu":
        return s.div_(_column(temperature))
    for member, value in zip(s, temperature.tolist()):
        member.div_(value)
    return s


def _symmetrize_(g: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """``g += gᵀ`` (each member's) in place. ``scratch.copy_(gᵀ)`` of a 2-D matrix takes PyTorch's
    blocked-transpose copy (a contiguous destination): ~13 ms at n = 4096, against ~100 ms for
    ``g + gᵀ`` read across rows, and a few large ops rather than hundreds of tiles, which a
    loaded machine's thread barriers would stall. A 3-D transposed copy misses that path
    (~9x slower): members are copied one by one."""
    n = g.shape[-1]
    for member, out in zip(g.reshape(-1, n, n), scratch.reshape(-1, n, n)):
        out.copy_(member.T)
    return g.add_(scratch)


# ------------------------------------------------------------------ CLIP (§2)


def packed_clip_loss(image: torch.Tensor, text: torch.Tensor, temperature: torch.Tensor,
                     workspace: Optional[Workspace] = None) -> torch.Tensor:
    """:func:`trials.losses.clip_loss` of every member, its gradient made in the forward: [P, n, d] -> [P]."""
    return _packed(partial(_clip_pass, temperature=temperature, workspace=workspace or Workspace()),
                   image, text)


def _clip_pass(image, text, *, temperature, workspace, need_grad):
    """½[CE(Z, diag) + CE(Zᵀ, diag)] and its gradients: ∂/∂Z = (softmax_rows + softmax_cols − 2I)/2n.

    CE(Z, diag) is −mean(diag(log_softmax(Z))), as ``F.cross_entropy`` computes it.
    """
    p, n = image.shape[:2]
    logits = _cube(workspace, "q0", p, n, image)  # R_S's buffers: the terms run one after the other
    torch.bmm(image, text.transpose(1, 2), out=logits)
    _divide_(logits, temperature)
    rows = torch.log_softmax(logits, 2, out=_cube(workspace, "m", p, n, image))
    columns = torch.log_softmax(logits, 1, out=logits)
    value = -0.5 * (rows.diagonal(dim1=1, dim2=2).mean(1) + columns.diagonal(dim1=1, dim2=2).mean(1))
    if not need_grad:
        return value, None
    grad = rows.exp_().add_(columns.exp_())
    grad.diagonal(dim1=1, dim2=2).sub_(2.0)
    # 1/(2nT) in double, then float32: a Python-float scale's rounding
    scale = _column((1.0 / (2 * n * temperature.double())).to(image.dtype))
    return value, (torch.bmm(grad, text).mul_(scale), torch.bmm(grad.transpose(1, 2), image).mul_(scale))


# ------------------------------------------------------------------ R_S (§3)


@dataclass
class FrozenSide:
    """The frozen-space half of R_S per member and level: ½P^l + ε and log(P^l + ε), [P, n, n]."""

    half_p: list
    log_p: list

    def select(self, index: torch.Tensor) -> "FrozenSide":
        return FrozenSide([t[index] for t in self.half_p], [t[index] for t in self.log_p])

    @staticmethod
    def cat(sides: list) -> "FrozenSide":
        """The members of several sides, stacked in order (copies)."""
        return FrozenSide([torch.cat(levels) for levels in zip(*(s.half_p for s in sides))],
                          [torch.cat(levels) for levels in zip(*(s.log_p for s in sides))])

    def expand(self, p: int) -> "FrozenSide":
        """One frozen side ([1, n, n]) shared by ``p`` members, as views (no copy)."""
        return FrozenSide([t.expand(p, -1, -1) for t in self.half_p], [t.expand(p, -1, -1) for t in self.log_p])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.half_p + self.log_p)


@torch.no_grad()
def frozen_side(original: torch.Tensor, temperature: torch.Tensor, *, levels: int,
                centering: str, center_first: bool, workspace: Optional[Workspace] = None) -> FrozenSide:
    """P = softmax(S(C(safe_norm(X)))) of every member and its powers, in the forms the divergence
    reads (§3). Without a workspace the matrices are new (to be cached); with one they are
    scratch, valid until the next batch."""
    x = _prepare(original, centering, center_first)
    half_p, log_p = frozen_buffers(x.shape[0], x.shape[1], levels, x, workspace)
    torch.bmm(x, x.transpose(1, 2), out=half_p[0])
    return frozen_from_similarity(half_p, log_p, temperature)


def frozen_buffers(p: int, n: int, levels: int, like: torch.Tensor, workspace: Optional[Workspace]):
    """(half_p, log_p): per level, new [p, n, n] matrices, or the workspace's scratch."""
    def new(name):
        return torch.empty(p, n, n, dtype=like.dtype, device=like.device) if workspace is None \
            else _cube(workspace, name, p, n, like)
    return [new(f"half_p{level}") for level in range(levels)], [new(f"log_p{level}") for level in range(levels)]


def frozen_from_similarity(half_p: list, log_p: list, temperature: torch.Tensor) -> FrozenSide:
    """The frozen side from S (in ``half_p[0]``), in place: P = softmax(S/T), its powers, ½P^l + ε
    and log(P^l + ε)."""
    _softmax_rows_(half_p[0], temperature)
    for level in range(1, len(half_p)):  # P^l = P^(l-1) P, all powers before P is overwritten
        torch.bmm(half_p[level - 1], half_p[0], out=half_p[level])
    eps = torch.tensor(EPS, dtype=half_p[0].dtype)  # a 0-d operand: ½P + ε in one pass, bit for bit
    for p_l, log_p_l in zip(half_p, log_p):
        torch.add(p_l, EPS, out=log_p_l).log_()
        torch.add(eps, p_l, alpha=0.5, out=p_l)
    return FrozenSide(half_p, log_p)


def packed_structure_regularizer(original: torch.Tensor, aligned: torch.Tensor,
                                 temperature: torch.Tensor, *, levels: int, weighting: str,
                                 margin: float, centering: str, center_first: bool,
                                 frozen: Optional[FrozenSide] = None,
                                 workspace: Optional[Workspace] = None) -> torch.Tensor:
    """R_S (cosine distance, official divergence) of every member: [P].

    ``frozen`` is the precomputed :func:`frozen_side` of ``original`` (then
    ``original`` is not read). Autograd runs only through the n×d preparation
    of ``aligned``; the n×n part has an analytic gradient.
    """
    workspace = workspace or Workspace()
    if frozen is None:
        frozen = frozen_side(original, temperature, levels=levels, centering=centering,
                             center_first=center_first, workspace=workspace)
    prepared = _prepare(aligned, centering, center_first)
    compute = partial(_structure_pass, frozen=frozen, temperature=temperature, levels=levels,
                      weighting=weighting, margin=margin, workspace=workspace)
    return _packed(compute, prepared)


def _structure_pass(x, *, frozen, temperature, levels, weighting, margin, workspace, need_grad):
    """(1/L) Σ_l w_l·max(D(P^l, Q^l) − margin, 0) for prepared aligned rows x, and ∂/∂x."""
    p, n = x.shape[:2]
    q = [_cube(workspace, f"q{level}", p, n, x) for level in range(levels)]
    _softmax_similarity_(x, temperature, out=q[0])
    for level in range(1, levels):
        torch.bmm(q[level - 1], q[0], out=q[level])
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
    grad_s = torch.ops.aten._softmax_backward_data.out(grad_q, q[0], 2, x.dtype,
                                                       grad_input=_cube(workspace, "m", p, n, x))
    # (G + Gᵀ) x: the gradient of S = x xᵀ; symmetrising G costs a fraction of a second product
    _symmetrize_(grad_s, _cube(workspace, "lq", p, n, x))  # "lq" is free by now
    return value, (torch.bmm(grad_s, x).mul_(_column(scale / temperature)),)


def _divergence(q, half_p, log_p, workspace, grad_name, need_grad):
    """The official "JS" ½[KL(M̃‖Q̃) + KL(M̃‖P̃)] of each member (§3 step 5) and, if asked,
    2n·∂D/∂Q up to row constants.

    One log of M̃ serves both KL terms. The gradient's +1 is dropped: a
    constant per row (and so a constant through the level powers, whose rows
    sum to 1) vanishes in the softmax backward.
    """
    p, n = q.shape[:2]
    mix = torch.add(half_p, q, alpha=0.5, out=_cube(workspace, "m", p, n, q))  # M̃ = ½(P + Q) + ε
    ratio = torch.log(mix, out=_cube(workspace, grad_name, p, n, q))
    q_eps = torch.add(q, EPS, out=_cube(workspace, "q_eps", p, n, q))  # Q̃, kept for the gradient
    scratch = torch.log(q_eps, out=_cube(workspace, "lq", p, n, q))
    ratio.sub_(scratch.add_(log_p), alpha=0.5)  # K = log M̃ − ½log Q̃ − ½log P̃
    raw = torch.mul(mix, ratio, out=scratch).sum((1, 2)) / n
    if not need_grad:
        return raw, None
    return raw, ratio.sub_(mix.div_(q_eps))  # K − M̃/Q̃


def _through_powers(q, grads, coefficients, workspace):
    """∂R/∂Q from the per-level ∂R/∂Q^l, backwards through Q^l = Q^(l-1)·Q, per member.

    Returns (matrix, scale): with one level the coefficient is left to scale
    the n×d result instead of an n×n matrix.
    """
    if len(q) == 1:
        return grads[0], coefficients[0]
    for grad, coefficient in zip(grads, coefficients):
        grad.mul_(_column(coefficient))
    p, n = q[0].shape[:2]
    grad_q = _cube(workspace, "grad_q", p, n, q[0])
    upstream = grads[-1]  # ∂R/∂Q^L
    for level in range(len(q) - 1, 0, -1):  # Q^(l+1) = Q^l · Q, 0-based level l
        if level == len(q) - 1:
            torch.bmm(q[level - 1].transpose(1, 2), upstream, out=grad_q)
        else:
            grad_q.baddbmm_(q[level - 1].transpose(1, 2), upstream)
        upstream = grads[level - 1].baddbmm_(upstream, q[0].transpose(1, 2))  # ∂R/∂Q^l, all paths
    return grad_q.add_(upstream), torch.ones(p, dtype=q[0].dtype, device=q[0].device)


# ------------------------------------------------------------------ the whole loss (§2, §3.1)


class PackedAlignmentLoss:
    """:class:`trials.losses.AlignmentLoss`'s forward for every member: [P] losses.

    ``structure_options`` are the pack's shared R_S options (levels, weighting,
    margin, centering, center_first); λ and the temperature come per call, one
    per member. A member whose λ is exactly 0 skips R_S, as in the code: R_S
    runs on the sub-stack of members with λ > 0 only.
    """

    def __init__(self, *, normalize_latents: bool, paper_sum: bool, structure_options: dict):
        self.normalize_latents, self.paper_sum = normalize_latents, paper_sum
        self.structure_options = structure_options
        self.workspace = Workspace()
        self._index: dict[tuple, torch.Tensor] = {}

    def __call__(self, image_aligned, text_aligned, image_original, text_original,
                 temperature: torch.Tensor, lambdas: list, lambda_t: torch.Tensor,
                 frozen: Optional[tuple] = None,
                 order: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(overall, clip) per member. ``lambdas`` are λ as Python floats (which members run
        R_S is decided on the host), ``lambda_t`` the same as a [P] tensor; ``frozen`` the
        (image, text) :class:`FrozenSide` of the originals, when cached; ``order`` [P, n], when
        given, the row order of the frozen side: R_S reads each member's aligned rows in it
        (R_S is invariant to a permutation of both sides)."""
        if self.normalize_latents:
            image_aligned, text_aligned = safe_normalize(image_aligned, stacked=True), safe_normalize(text_aligned, stacked=True)
        clip = packed_clip_loss(image_aligned, text_aligned, temperature, self.workspace)
        if order is not None:
            image_aligned, text_aligned = (torch.gather(a, 1, order[..., None].expand_as(a))
                                           for a in (image_aligned, text_aligned))
        active = tuple(i for i, lam in enumerate(lambdas) if lam > 0)
        if not active:
            return clip, clip
        index = None if len(active) == len(lambdas) else self._rows(active, clip)

        def pick(t):
            return t if index is None or t is None else t.index_select(0, index)
        sides = (None, None) if frozen is None else [f if index is None else f.select(index) for f in frozen]
        # with a frozen side the originals are not read (they may be shared [n, d] rows)
        originals = (image_original, text_original) if frozen is None else (None, None)
        terms = [packed_structure_regularizer(pick(original), pick(aligned), pick(temperature),
                                              frozen=side, workspace=self.workspace, **self.structure_options)
                 for original, aligned, side in zip(originals, (image_aligned, text_aligned), sides)]
        structure = terms[0] + terms[1] if self.paper_sum else (terms[0] + terms[1]) / 2
        if index is None:
            return clip + lambda_t * structure, clip
        # clip + 0 = clip exactly for the members without R_S
        return clip + torch.zeros_like(clip).index_add(0, index, pick(lambda_t) * structure), clip

    def _rows(self, active: tuple, like: torch.Tensor) -> torch.Tensor:
        """The member indices as a device tensor, made once per subset (no transfer per step)."""
        if active not in self._index:
            self._index[active] = torch.tensor(active, device=like.device)
        return self._index[active]
