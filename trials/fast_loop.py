"""The fast path of a trial's training loop: the same loop, the fused loss terms.

:func:`trials.train.train_alignment` runs the loop of :mod:`trials.train`
either with the caller's :class:`~trials.losses.AlignmentLoss` (the reference
path, the oracle of the tests) or with its :class:`FusedAlignmentLoss` twin
(this module), which computes the same numbers with the fused terms of
:mod:`trials.fused_loss`, reuses its scratch matrices across steps, and
computes the frozen-space half of R_S on the validation batches once per
trial. Everything else (batch order, λ schedule, optimiser, clipping,
FuseMix, extras, early stopping) is the one loop, so both paths see the same
batches in the same order.
"""

from __future__ import annotations

from typing import Optional

import torch

from trials.fused_loss import FrozenSide, Workspace, frozen_side, fused_clip_loss, fused_structure_regularizer
from trials.loss_options import LOSS_DEFAULTS, LossOptions
from trials.losses import AlignmentLoss

# The frozen half of R_S on the validation batches is cached up to this size
# per trial (2·L n×n matrices per batch and modality); batches beyond it are
# recomputed every epoch. 20,000 validation pairs at L=1 take ~1.3 GB.
VALIDATION_CACHE_BYTES = 2 * 1024**3


def unsupported(loss_fn) -> list[str]:
    """Why the fused loss cannot stand in for ``loss_fn`` (empty: it can)."""
    if type(loss_fn) is not AlignmentLoss:
        return [f"loss_fn is a {type(loss_fn).__name__}, not a trials.losses.AlignmentLoss"]
    reasons = []
    options = loss_fn.structure_options
    if options["distance"] != "cosine":
        reasons.append(f"structure_distance={options['distance']!r} (fused: 'cosine')")
    if options["divergence"] != "official":
        reasons.append(f"structure_divergence={options['divergence']!r} (fused: 'official')")
    return reasons


class FusedAlignmentLoss(AlignmentLoss):
    """:class:`~trials.losses.AlignmentLoss` with fused CLIP and R_S terms.

    Same options, schedule and outputs; the frozen half of R_S is looked up in
    a cache for batches registered with :meth:`cache_frozen` (the validation
    batches), and computed per call otherwise.
    """

    def __init__(self, options: LossOptions = LOSS_DEFAULTS, **overrides):
        super().__init__(options, **overrides)
        self.workspace = Workspace()
        self._frozen: dict[tuple, tuple[torch.Tensor, FrozenSide]] = {}
        self._frozen_bytes = 0

    @classmethod
    def twin_of(cls, loss_fn: AlignmentLoss) -> "FusedAlignmentLoss":
        """A fused loss in the same state as ``loss_fn`` (options, λ schedule, unimodal switch)."""
        twin = cls(loss_fn.options)
        twin.steps = loss_fn.steps
        twin.use_only_unimodal = loss_fn.use_only_unimodal
        return twin

    def clip_term(self, image_aligned, text_aligned):
        return fused_clip_loss(image_aligned, text_aligned, self.temperature, self.workspace)

    def structure_term(self, original, aligned):
        cached = self._frozen.get(_content_key(original))
        return fused_structure_regularizer(original, aligned, frozen=None if cached is None else cached[1],
                                           workspace=self.workspace, **self.structure_options)

    def cache_frozen(self, original: torch.Tensor, budget: int = VALIDATION_CACHE_BYTES) -> bool:
        """Compute the frozen half of R_S for ``original`` once; later calls on the same view reuse it.

        Returns False (and caches nothing) when it would pass ``budget`` bytes.
        """
        n, levels = len(original), self.structure_options["levels"]
        size = 2 * levels * n * n * original.element_size()
        if self._frozen_bytes + size > budget:
            return False
        options = {k: self.structure_options[k] for k in ("levels", "temperature", "centering", "center_first")}
        # the view is kept: its memory cannot be reused while the entry lives
        self._frozen[_content_key(original)] = (original, frozen_side(original, **options))
        self._frozen_bytes += size
        return True


def _content_key(t: torch.Tensor) -> tuple:
    """Same storage, offset, shape, strides and version counter: same contents."""
    return (t.device, t.dtype, t.data_ptr(), tuple(t.shape), t.stride(), t._version)


def fused_twin(loss_fn, impl: str) -> Optional[FusedAlignmentLoss]:
    """The fused twin ``impl`` asks for: None for the reference path ("reference", or "auto" where
    the fused terms do not cover the options); "fast" on options it does not cover raises."""
    if impl == "reference":
        return None
    reasons = unsupported(loss_fn)
    if reasons and impl == "fast":
        raise ValueError("impl='fast' does not cover " + "; ".join(reasons) + "; use impl='reference'")
    return None if reasons else FusedAlignmentLoss.twin_of(loss_fn)


def cache_validation(loss_fn: FusedAlignmentLoss, val_image: torch.Tensor, val_text: torch.Tensor,
                     batch_size: int) -> None:
    """The frozen half of R_S on every validation batch (as ``trials.train._validate`` slices them)."""
    if loss_fn.lambda_base <= 0:
        return  # R_S never runs
    for start in range(0, len(val_image), batch_size):
        for features in (val_image, val_text):
            loss_fn.cache_frozen(features[start:start + batch_size])
