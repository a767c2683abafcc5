"""The alignment loss of P trials at once: :mod:`trials.fused_loss` over stacked batches.

Every tensor has a leading member axis: features and head outputs are
[P, n, d], the n×n matrices [P, n, n] (``bmm`` where the fused path has
``mm``), and each term's value is a vector [P], one loss per member. Members
never mix: every reduction runs over a member's own rows, so a member whose
numbers blow up (NaN) leaves the others untouched. Each member has its own
temperature (a [P] tensor); the structure options (levels, weighting, margin,
centring) are the pack's, as :func:`trials.packed.pack_key` requires.

The formulas, the order of operations and the analytic gradients are those
of :mod:`trials.fused_loss` (see its docstring), so a member's loss equals
the same trial's fused (and reference) loss up to float rounding; checked by
``tests/trials/test_packed.py``. Only cosine distance and the official
divergence are covered, as in the fused path.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from trials.fused_loss import Workspace
from trials.losses import EPS, UNIT_NORM_TOL


def _cube(workspace: Workspace, name: str, p: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """A scratch [p, n, n] tensor from the fused path's workspace (reused across steps)."""
    return workspace.matrix(name, p * n, n, like).view(p, n, n)


def _column(values: torch.Tensor) -> torch.Tensor:
    """A [P] vector as [P, 1, 1], to scale each member's matrix."""
    return values.view(-1, 1, 1)


# ------------------------------------------------------------------ per-member preparation (§1, §3 step 1)


def packed_safe_normalize(x: torch.Tensor) -> torch.Tensor:
    """``trials.losses.safe_normalize`` of each member [P, n, d]: its own "already unit?" test."""
    norms = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    already_unit = ((norms - 1).abs() < UNIT_NORM_TOL).all(dim=1, keepdim=True)
    return torch.where(already_unit, x, F.normalize(x, p=2, dim=-1, eps=EPS))


def _center(x: torch.Tensor, centering: str) -> torch.Tensor:
    """``trials.losses.center`` over each member's rows."""
    if centering == "none":
        return x
    centred = x - x.mean(1, keepdim=True)
    if centering == "mean":
        return centred
    return centred / x.std(1, keepdim=True)


def _prepare(x: torch.Tensor, centering: str, center_first: bool) -> torch.Tensor:
    if center_first:
        return packed_safe_normalize(_center(x, centering))
    return _center(packed_safe_normalize(x), centering)


# ------------------------------------------------------------------ value and gradient in one pass


class _PackedTerm(torch.autograd.Function):
    """A [P] vector of terms whose gradients are made with their values."""

    @staticmethod
    def forward(ctx, compute, *inputs):
        value, grads = compute(*inputs, need_grad=True)
        ctx.grads = grads
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value):
        scale = _column(grad_value)
        return (None, *(None if g is None else scale * g for g in ctx.grads))


def _packed(compute, *inputs: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return _PackedTerm.apply(compute, *inputs)
    return compute(*inputs, need_grad=False)[0]


def _softmax_similarity_(x: torch.Tensor, temperature: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    torch.bmm(x, x.transpose(1, 2), out=out)
    out.div_(_column(temperature))
    return torch.softmax(out, dim=2, out=out)


# ------------------------------------------------------------------ CLIP (§2)


def packed_clip_loss(image: torch.Tensor, text: torch.Tensor, temperature: torch.Tensor,
                     workspace: Optional[Workspace] = None) -> torch.Tensor:
    """:func:`trials.fused_loss.fused_clip_loss` of every member: [P, n, d] -> [P]."""
    return _packed(partial(_clip_pass, temperature=temperature, workspace=workspace or Workspace()),
                   image, text)


def _clip_pass(image, text, *, temperature, workspace, need_grad):
    p, n = image.shape[:2]
    logits = _cube(workspace, "q0", p, n, image)
    torch.bmm(image, text.transpose(1, 2), out=logits)
    logits.div_(_column(temperature))
    rows = torch.log_softmax(logits, 2, out=_cube(workspace, "m", p, n, image))
    columns = torch.log_softmax(logits, 1, out=logits)
    value = -0.5 * (rows.diagonal(dim1=1, dim2=2).mean(1) + columns.diagonal(dim1=1, dim2=2).mean(1))
    if not need_grad:
        return value, None
    grad = rows.exp_().add_(columns.exp_())
    grad.diagonal(dim1=1, dim2=2).sub_(2.0)
    # 1/(2nT) in double, then float32: the fused path's Python-float scale, bit for bit
    scale = _column((1.0 / (2 * n * temperature.double())).to(image.dtype))
    return value, (torch.bmm(grad, text).mul_(scale), torch.bmm(grad.transpose(1, 2), image).mul_(scale))


# ------------------------------------------------------------------ R_S (§3)


@dataclass
class PackedFrozenSide:
    """The frozen-space half of R_S per member and level: ½P^l + ε and log(P^l + ε), [P, n, n]."""

    half_p: list
    log_p: list

    def select(self, index: torch.Tensor) -> "PackedFrozenSide":
        return PackedFrozenSide([t[index] for t in self.half_p], [t[index] for t in self.log_p])

    @staticmethod
    def cat(sides: list) -> "PackedFrozenSide":
        """The members of several sides, stacked in order (copies)."""
        return PackedFrozenSide([torch.cat(levels) for levels in zip(*(s.half_p for s in sides))],
                                [torch.cat(levels) for levels in zip(*(s.log_p for s in sides))])

    def expand(self, p: int) -> "PackedFrozenSide":
        """One frozen side ([1, n, n]) shared by ``p`` members, as views (no copy)."""
        return PackedFrozenSide([t.expand(p, -1, -1) for t in self.half_p],
                                [t.expand(p, -1, -1) for t in self.log_p])


@torch.no_grad()
def packed_frozen_side(original: torch.Tensor, temperature: torch.Tensor, *, levels: int,
                       centering: str, center_first: bool,
                       workspace: Optional[Workspace] = None) -> PackedFrozenSide:
    """:func:`trials.fused_loss.frozen_side` of every member; new tensors without a workspace."""
    x = _prepare(original, centering, center_first)
    p, n = x.shape[:2]

    def new(name):
        return torch.empty(p, n, n, dtype=x.dtype, device=x.device) if workspace is None \
            else _cube(workspace, name, p, n, x)
    half_p = [new(f"half_p{level}") for level in range(levels)]
    log_p = [new(f"log_p{level}") for level in range(levels)]
    _softmax_similarity_(x, temperature, out=half_p[0])
    for level in range(1, levels):
        torch.bmm(half_p[level - 1], half_p[0], out=half_p[level])
    eps = torch.tensor(EPS, dtype=x.dtype)
    for p_l, log_p_l in zip(half_p, log_p):
        torch.add(p_l, EPS, out=log_p_l).log_()
        torch.add(eps, p_l, alpha=0.5, out=p_l)
    return PackedFrozenSide(half_p, log_p)


def packed_structure_regularizer(original: torch.Tensor, aligned: torch.Tensor,
                                 temperature: torch.Tensor, *, levels: int, weighting: str,
                                 margin: float, centering: str, center_first: bool,
                                 frozen: Optional[PackedFrozenSide] = None,
                                 workspace: Optional[Workspace] = None) -> torch.Tensor:
    """:func:`trials.fused_loss.fused_structure_regularizer` of every member: [P]."""
    workspace = workspace or Workspace()
    if frozen is None:
        frozen = packed_frozen_side(original, temperature, levels=levels, centering=centering,
                                    center_first=center_first, workspace=workspace)
    prepared = _prepare(aligned, centering, center_first)
    compute = partial(_structure_pass, frozen=frozen, temperature=temperature, levels=levels,
                      weighting=weighting, margin=margin, workspace=workspace)
    return _packed(compute, prepared)


def _structure_pass(x, *, frozen, temperature, levels, weighting, margin, workspace, need_grad):
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
        total = total + (d_l if weighting == "none" else d_l * weight)
        grads.append(grad)
        coefficients.append((raw - margin > 0).to(x.dtype) * (weight / (levels * 2 * n)))
    value = total / levels
    if not need_grad:
        return value, None
    grad_q, scale = _through_powers(q, grads, coefficients, workspace)
    grad_s = torch.ops.aten._softmax_backward_data.out(grad_q, q[0], 2, x.dtype,
                                                       grad_input=_cube(workspace, "m", p, n, x))
    scratch = _cube(workspace, "lq", p, n, x)
    grad_s.add_(scratch.copy_(grad_s.transpose(1, 2)))  # G + Gᵀ, as the fused path
    return value, (torch.bmm(grad_s, x).mul_(_column(scale / temperature)),)


def _divergence(q, half_p, log_p, workspace, grad_name, need_grad):
    """The official "JS" of each member (see ``trials.fused_loss._divergence``)."""
    p, n = q.shape[:2]
    mix = torch.add(half_p, q, alpha=0.5, out=_cube(workspace, "m", p, n, q))
    ratio = torch.log(mix, out=_cube(workspace, grad_name, p, n, q))
    q_eps = torch.add(q, EPS, out=_cube(workspace, "q_eps", p, n, q))
    scratch = torch.log(q_eps, out=_cube(workspace, "lq", p, n, q))
    ratio.sub_(scratch.add_(log_p), alpha=0.5)
    raw = torch.mul(mix, ratio, out=scratch).sum((1, 2)) / n
    if not need_grad:
        return raw, None
    return raw, ratio.sub_(mix.div_(q_eps))


def _through_powers(q, grads, coefficients, workspace):
    """∂R/∂Q from the per-level ∂R/∂Q^l (``trials.fused_loss._through_powers``), per member."""
    if len(q) == 1:
        return grads[0], coefficients[0]
    for grad, coefficient in zip(grads, coefficients):
        grad.mul_(_column(coefficient))
    p, n = q[0].shape[:2]
    grad_q = _cube(workspace, "grad_q", p, n, q[0])
    upstream = grads[-1]
    for level in range(len(q) - 1, 0, -1):
        if level == len(q) - 1:
            torch.bmm(q[level - 1].transpose(1, 2), upstream, out=grad_q)
        else:
            grad_q.baddbmm_(q[level - 1].transpose(1, 2), upstream)
        upstream = grads[level - 1].baddbmm_(upstream, q[0].transpose(1, 2))
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
                 frozen: Optional[tuple] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(overall, clip) per member. ``lambdas`` are λ as Python floats (which members run
        R_S is decided on the host), ``lambda_t`` the same as a [P] tensor; ``frozen`` the
        (image, text) :class:`PackedFrozenSide` of the originals, when cached."""
        if self.normalize_latents:
            image_aligned, text_aligned = packed_safe_normalize(image_aligned), packed_safe_normalize(text_aligned)
        clip = packed_clip_loss(image_aligned, text_aligned, temperature, self.workspace)
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
