"""CLIP loss and R_S of one trial with analytic gradients over reused n×n buffers: the
numbers of :mod:`trials.losses`, computed for speed (METHOD.md §2, §3).

A trial is a stack of one: these are the kernels of :mod:`trials.packed_loss`
(whose docstring says how they are fused, and why) on a member axis of length
1, with a Python-float temperature and 0-d values. The values and gradients
equal the reference's up to float rounding (``tests/trials/test_fused_loss.py``).
"""

from __future__ import annotations

from typing import Optional

import torch

from trials.losses import _check_structure_options
from trials.packed_loss import FrozenSide, Workspace, packed_clip_loss, packed_structure_regularizer
from trials.packed_loss import frozen_side as _frozen_sides

__all__ = ["FrozenSide", "Workspace", "frozen_side", "fused_clip_loss", "fused_structure_regularizer",
           "one_member_temperature"]


def one_member_temperature(temperature: float, like: torch.Tensor) -> torch.Tensor:
    """The one member's temperature as the [1] tensor the kernels read (no host sync)."""
    return torch.full((1,), temperature, dtype=like.dtype, device=like.device)


def fused_clip_loss(image: torch.Tensor, text: torch.Tensor, temperature: float,
                    workspace: Optional[Workspace] = None) -> torch.Tensor:
    """:func:`trials.losses.clip_loss` with its gradient made in the forward."""
    return packed_clip_loss(image[None], text[None], one_member_temperature(temperature, image), workspace)[0]


@torch.no_grad()
def frozen_side(original: torch.Tensor, *, levels: int, temperature: float, centering: str,
                center_first: bool, workspace: Optional[Workspace] = None) -> FrozenSide:
    """P = softmax(S(C(safe_norm(X)))) and its powers, as a one-member :class:`FrozenSide` (§3).

    Without a workspace the matrices are new (to be cached); with one they are
    scratch, valid until the next batch.
    """
    with torch.autocast(device_type=original.device.type, enabled=False):
        return _frozen_sides(original[None], one_member_temperature(temperature, original), levels=levels,
                             centering=centering, center_first=center_first, workspace=workspace)


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
    with torch.autocast(device_type=aligned.device.type, enabled=False):
        return packed_structure_regularizer(
            None if original is None else original[None], aligned[None], one_member_temperature(temperature, aligned),
            levels=levels, weighting=weighting, margin=margin, centering=centering,
            center_first=center_first, frozen=frozen, workspace=workspace)[0]
