"""freeze-align's lightweight token projector (Figure 3; METHOD.md §4.5) and its loss.

The head reads every token of one layer (:mod:`trials.tokens`), as tensors
``local`` [B, L, D], ``mask`` [B, L] (True on real tokens) and ``prefix``
[B, K, D] (CLS and register tokens; K = 0 for text):

- ``Patch(D→E)(x) = Linear(x) + Linear(GELU(Linear(x)))``, all with bias;
  a *projector* is ``LayerNorm(D) → Dropout → Patch``;
- image: a local projector on every patch token, masked mean over the patch
  tokens (prefix excluded), plus a separate projector on the CLS token
  (``prefix[:, 0]``); output ``normalize(mean_patches + cls_proj)``;
- text: the local projector per token, masked mean, then freeze-align's
  "mlp" head ``p = Linear(x); LayerNorm_E(p + Dropout(Linear(GELU(p))))``,
  normalised.

:class:`LearnableTemperatureLoss` is ``trials.losses.AlignmentLoss`` with the
CLIP temperature a parameter (init 0.07 in the preset, clamped to
[0.001, 0.5] before each forward, as the official ``self.temp.clamp_``), so
R_S combines with it unchanged. R_S's "original space" is the *pooled* frozen
feature (:func:`pooled_original`): the CLS token for images (the mean of the
patches when a model has no prefix token), the masked mean for text.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trials.loss_options import LOSS_DEFAULTS, LossOptions
from trials.losses import AlignmentLoss, clip_loss

TEMPERATURE_RANGE = (0.001, 0.5)  # the official clamp of the learnable temperature


class Tokens(NamedTuple):
    """A batch of token features as tensors (see :class:`trials.tokens.TokenBatch`)."""

    local: torch.Tensor
    mask: torch.Tensor
    prefix: torch.Tensor

    @classmethod
    def from_numpy(cls, batch, pin: bool = False) -> Tokens:
        """Host tensors sharing ``batch``'s arrays (pinned for a non-blocking copy when ``pin``)."""
        tensors = (torch.from_numpy(np.ascontiguousarray(a)) for a in (batch.local, batch.mask, batch.prefix))
        return cls(*(t.pin_memory() if pin else t for t in tensors))

    def to(self, device, non_blocking: bool = False) -> Tokens:
        return Tokens(*(t.to(device, non_blocking=non_blocking) for t in self))


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of ``x`` [B, L, E] on the tokens where ``mask`` [B, L] is True."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1)


def pooled_original(tokens: Tokens, image: bool) -> torch.Tensor:
    """The pooled frozen feature R_S preserves: an image's CLS token (``prefix[:, 0]``;
    the mean of its patches when K = 0), a text's masked mean of its tokens."""
    if image and tokens.prefix.shape[1] > 0:
        return tokens.prefix[:, 0].float()
    return masked_mean(tokens.local.float(), tokens.mask)


class PatchProjection(nn.Module):
    """``Linear(x) + Linear(GELU(Linear(x)))``: a linear path plus a two-layer MLP path."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


def projector(in_dim: int, out_dim: int, dropout_p: float) -> nn.Sequential:
    """freeze-align's "patch" projector: ``LayerNorm(D) → Dropout → PatchProjection``."""
    return nn.Sequential(nn.LayerNorm(in_dim), nn.Dropout(dropout_p), PatchProjection(in_dim, out_dim))


class ProjectionHead(nn.Module):
    """freeze-align's "mlp" head: ``p = Linear(x); LayerNorm(p + Dropout(Linear(GELU(p))))``.

    The official code builds its first Linear with the text encoder's width
    although it receives the E-dim pooled projection (every config it ran
    has width = E); here it takes E, the only shape that runs otherwise.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout_p: float):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout_p)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        return self.layer_norm(projected + self.dropout(self.fc(F.gelu(projected))))


class ImageTokenHead(nn.Module):
    """``normalize(mean over patches of local(patch) + cls(CLS))``; prefix tokens never enter the mean.

    Ours, for a model without a prefix token (K = 0): the ``cls`` projector
    takes the mean of the raw patches, the pooled feature R_S uses too.
    """

    def __init__(self, in_dim: int, out_dim: int, dropout_p: float):
        super().__init__()
        self.local = projector(in_dim, out_dim, dropout_p)
        self.cls = projector(in_dim, out_dim, dropout_p)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        patches = masked_mean(self.local(tokens.local), tokens.mask)
        global_token = tokens.prefix[:, 0] if tokens.prefix.shape[1] > 0 else masked_mean(tokens.local, tokens.mask)
        return F.normalize(patches + self.cls(global_token), dim=-1)


class TextTokenHead(nn.Module):
    """``normalize(mlp(masked mean of local(token)))``: padding never enters the mean."""

    def __init__(self, in_dim: int, out_dim: int, dropout_p: float):
        super().__init__()
        self.local = projector(in_dim, out_dim, dropout_p)
        self.mlp = ProjectionHead(out_dim, out_dim, dropout_p)

    def forward(self, tokens: Tokens) -> torch.Tensor:
        return F.normalize(self.mlp(masked_mean(self.local(tokens.local), tokens.mask)), dim=-1)


class TokenProjector(nn.Module):
    """The pair of token heads, ``.image`` and ``.text``; the head's code in ``trials.heads.HEADS``.

    Built by :func:`trials.token_trial.build_token_projector` from the
    head's options (``trials.head_options.TokenProjectorOptions``).
    """

    def __init__(self, image_dim: int, text_dim: int, out_dim: int, dropout_p: float):
        super().__init__()
        self.image = ImageTokenHead(image_dim, out_dim, dropout_p)
        self.text = TextTokenHead(text_dim, out_dim, dropout_p)


class LearnableTemperatureLoss(AlignmentLoss):
    """CLIP loss with logits ``sim / temp``, ``temp`` a parameter initialised to
    ``options.temperature``, plus λ·R_S exactly as :class:`AlignmentLoss`.

    R_S keeps the fixed ``options.temperature`` as its own τ. Call
    :meth:`clamp_temperature` before each forward (the trial does), as the
    official ``_forward_``. ``learnable=False`` freezes the temperature.
    """

    def __init__(self, options: LossOptions = LOSS_DEFAULTS, *, learnable: bool = True, **overrides):
        super().__init__(options, **overrides)
        self.temp = nn.Parameter(torch.tensor(float(self.temperature)), requires_grad=learnable)

    @torch.no_grad()
    def clamp_temperature(self) -> None:
        self.temp.clamp_(*TEMPERATURE_RANGE)

    def clip_term(self, image_aligned: torch.Tensor, text_aligned: torch.Tensor) -> torch.Tensor:
        return clip_loss(image_aligned, text_aligned, self.temp)
