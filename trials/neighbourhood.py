"""Per-epoch diagnostics of a trained pair of heads: the fair validation
objective and neighbourhood preservation (DESIGN: schedulers on a fair
objective; neighbourhood preservation over training).

* :func:`validation_clip_loss`: the CLIP part of the validation loss, over
  the same in-order batches the trainer validates with. Schedulers rank on it
  because the trainer's ``val_loss`` adds λ·R_S, which penalises λ > 0 by
  construction.
* :func:`neighbourhood_agreement`: mutual-kNN agreement between an encoder's
  frozen space and its aligned space on the same rows: 1 when the head keeps
  every neighbourhood, about k/n for unrelated spaces.
* :class:`EpochRecorder`: the ``on_epoch`` hook that computes both and keeps
  one row per recorded epoch.

Recording costs one CLIP-only validation pass and two mutual-kNN scores on at
most :data:`PROBE_ROWS` rows (two PROBE_ROWS² Gram matrices per modality), and
runs every :func:`record_stride` epochs, so a trial stores at most about
:data:`MAX_RECORDED_EPOCHS` rows whatever its length.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from trials.losses import AlignmentLoss
from trials.similarity import mutual_knn

# Constants, not TrialConfig fields: a field would change every trial fingerprint.
PROBE_ROWS = 500  # the probe set: the first min(PROBE_ROWS, n_val) validation pairs
NEIGHBOURS = 10  # k of the mutual kNN (clipped to n - 1 on tiny probe sets)
MAX_RECORDED_EPOCHS = 50  # the stride keeps a trial's epoch rows near this count

OnEpoch = Callable[[int, dict], Optional[bool]]


def record_stride(epochs: int) -> int:
    """Record every ``max(1, epochs // MAX_RECORDED_EPOCHS)`` epochs (epoch 0 always)."""
    return max(1, int(epochs) // MAX_RECORDED_EPOCHS)


def neighbourhood_agreement(frozen: torch.Tensor, aligned: torch.Tensor,
                            k: int = NEIGHBOURS) -> float:
    """Mutual-kNN agreement of two representations of the same rows, in [0, 1].

    Rows are L2-normalised first (cosine neighbourhoods, like the layer
    similarity). NaN when there are fewer than two rows (no neighbour exists).
    """
    n = frozen.shape[0]
    if n < 2:
        return math.nan
    x, y = F.normalize(frozen.float(), dim=-1), F.normalize(aligned.float(), dim=-1)
    return float(mutual_knn(x, y, min(k, n - 1)))


@torch.no_grad()
def validation_clip_loss(image_head, text_head, val_image: torch.Tensor, val_text: torch.Tensor,
                         batch_size: int, clip_only: AlignmentLoss) -> float:
    """Sample-weighted mean CLIP loss over in-order batches, as the trainer validates.

    ``clip_only`` is an ``AlignmentLoss`` with λ = 0, so its ``overall_loss`` is
    exactly the CLIP term the trainer's loss contains (same normalisation and
    temperature).
    """
    total = torch.zeros((), device=val_image.device)
    for start in range(0, len(val_image), batch_size):
        x_img, x_txt = val_image[start:start + batch_size], val_text[start:start + batch_size]
        loss = clip_only(image_head(x_img), text_head(x_txt), x_img, x_txt)["overall_loss"]
        total = total + loss * len(x_img)
    return float(total / max(len(val_image), 1))


class EpochRecorder:
    """The trainer's ``on_epoch`` hook: adds ``val_clip_loss`` (and, on recorded
    epochs, ``nbr_image``/``nbr_text``) to the epoch's row, keeps recorded rows
    in :attr:`rows`, and forwards the row to ``forward`` when given.

    ``val_clip_loss`` is computed every epoch only when ``forward`` is set (a
    scheduler reads every epoch); otherwise only on recorded epochs, so plain
    trials pay for at most ~MAX_RECORDED_EPOCHS extra validation passes.
    """

    def __init__(self, heads, val_image, val_text, batch_size: int, clip_only: AlignmentLoss,
                 stride: int, forward: Optional[OnEpoch] = None):
        self.heads, self.batch_size, self.clip_only = heads, batch_size, clip_only
        self.val_image, self.val_text = val_image, val_text
        self.probe = (val_image[:PROBE_ROWS], val_text[:PROBE_ROWS])
        self.stride, self.forward = stride, forward
        self.rows: list[dict] = []

    def __call__(self, epoch: int, row: dict) -> Optional[bool]:
        record = epoch % self.stride == 0
        if record or self.forward is not None:
            row = {**row, **self._measure(record)}
        if record:
            self.rows.append(dict(row))
        return self.forward(epoch, row) if self.forward is not None else None

    def _measure(self, record: bool) -> dict:
        # The trainer may leave the heads in either mode; measure in eval mode
        # (no dropout) and give them back as they were.
        modes = [h.training for h in self.heads]
        for head in self.heads:
            head.eval()
        try:
            out = {"val_clip_loss": validation_clip_loss(*self.heads, self.val_image, self.val_text,
                                                         self.batch_size, self.clip_only)}
            if record:
                with torch.no_grad():
                    out["nbr_image"] = neighbourhood_agreement(self.probe[0], self.heads[0](self.probe[0]))
                    out["nbr_text"] = neighbourhood_agreement(self.probe[1], self.heads[1](self.probe[1]))
            return out
        finally:
            for head, mode in zip(self.heads, modes):
                head.train(mode)
