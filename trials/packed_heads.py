"""The heads of a pack as stacked tensors, with their AdamW state (packed trials).

Each trainable tensor of a head becomes one [P, ...] tensor, member first:
the forward is a batched matmul, clipping and AdamW run elementwise with one
learning rate, weight decay and clip value per member. Built from, and
written back to, the members' own ``nn.Module`` heads, so a packed member
starts from exactly the weights its trial alone would build.

Heads covered (:data:`STACKED_PARAMETERS`):

- ``linear``: ``x Wᵀ + b`` (``bias`` optional).
- ``res_low_rank`` with ``gate_init=0`` (the official setting): its gate is
  stuck shut (sigmoid(-inf) = 0), W2 stays zero and the gradients of W1, W2
  and the gate are exactly 0, so the head is ``x Pᵀ``, and only P is stacked.
  The one thing not mirrored is AdamW's weight decay of the unused W1, which
  never reaches an output. A trainable gate (``gate_init > 0``) draws dropout
  masks and is not packed.
"""

from __future__ import annotations

import torch
from torch import nn

# head -> its trained tensors, by parameter name, the weight first
STACKED_PARAMETERS = {"linear": ("weight", "bias"), "res_low_rank": ("P.weight",)}


def _per_member(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A [P] vector shaped to scale each member of a [P, ...] tensor."""
    return values.view(-1, *[1] * (like.dim() - 1))


class HeadStack:
    """The image and text heads of P members: stacked tensors, AdamW moments, best weights."""

    def __init__(self, head: str, image_heads: list[nn.Module], text_heads: list[nn.Module]):
        present = dict(image_heads[0].named_parameters())  # a bias-free linear head has no "bias"
        self.names = [name for name in STACKED_PARAMETERS[head] if name in present]
        self.params = [torch.stack([h.get_parameter(name).detach() for h in heads]).requires_grad_()
                       for heads in (image_heads, text_heads) for name in self.names]
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.best = [p.detach().clone() for p in self.params]  # the initial weights, until an epoch improves

    def _modality(self, which: int) -> list[torch.Tensor]:
        k = len(self.names)
        return self.params[which * k:(which + 1) * k]

    def forward(self, which: int, x: torch.Tensor) -> torch.Tensor:
        """Head ``which`` (0 image, 1 text) of every member on x: [P, n, d] or shared [n, d]."""
        weight, *bias = self._modality(which)
        if x.dim() == 2:
            x = x.expand(len(weight), -1, -1)
        if bias:
            return torch.baddbmm(bias[0].unsqueeze(1), x, weight.transpose(1, 2))
        return torch.bmm(x, weight.transpose(1, 2))

    @torch.no_grad()
    def clip_(self, grads: list[torch.Tensor], clip: torch.Tensor) -> None:
        """``clip_grad_norm_`` of each member's head (module norm); members with clip 0 are left alone."""
        k = len(self.names)
        for head_grads in (grads[:k], grads[k:]):
            norms = torch.stack([torch.linalg.vector_norm(g.flatten(1), 2, dim=1) for g in head_grads], dim=1)
            total = torch.linalg.vector_norm(norms, 2, dim=1)
            coef = torch.where(clip > 0, (clip / (total + 1e-6)).clamp(max=1.0), 1.0)
            for g in head_grads:
                g.mul_(_per_member(coef, g))

    @torch.no_grad()
    def adamw_(self, grads: list[torch.Tensor], decay: torch.Tensor, neg_step: torch.Tensor,
               bias_correction2_sqrt: float, betas: tuple, eps: float) -> None:
        """One step of ``torch.optim.AdamW`` (single-tensor form), per member.

        ``decay`` = 1 − lr·wd and ``neg_step`` = −lr/(1 − β1^t) are each member's,
        computed in double on the host as torch computes them and cast to float32,
        as torch casts its Python scalars.
        """
        beta1, beta2 = betas
        for p, g, m, v in zip(self.params, grads, self.exp_avg, self.exp_avg_sq):
            p.mul_(_per_member(decay, p))
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
            p.add_(torch.mul(m, _per_member(neg_step, m)).div_(denom))  # addcdiv's (value·m)/denom

    @torch.no_grad()
    def keep_best_(self, improved: torch.Tensor) -> None:
        """Snapshot the current weights of the members at ``improved`` (indices)."""
        for best, p in zip(self.best, self.params):
            best.index_copy_(0, improved, p.detach().index_select(0, improved))

    def select_(self, keep: torch.Tensor) -> None:
        """Keep only the members at ``keep``: stopped members leave the stack."""
        self.params = [p.detach().index_select(0, keep).requires_grad_() for p in self.params]
        for group in (self.exp_avg, self.exp_avg_sq, self.best):
            group[:] = [t.index_select(0, keep) for t in group]

    @torch.no_grad()
    def write_best(self, member: int, image_head: nn.Module, text_head: nn.Module) -> None:
        """Copy member ``member``'s best weights into its own modules (the restored best epoch)."""
        for i, (head, name) in enumerate((h, n) for h in (image_head, text_head) for n in self.names):
            head.get_parameter(name).copy_(self.best[i][member])
