"""The frozen Gram matrix of a trial's training rows: a training batch's frozen-space
similarity S of R_S (METHOD.md §3 steps 1-2) gathered by row index, not recomputed.

At a batch of n rows of d features, S is an n×n×d product per batch and modality;
gathered from the N×N Gram of all N training rows it is n² reads (~4-8x less time on
CPU at n = 4096, d = 768, sorted rows). Building the Gram costs N²·d once per trial,
so it pays when a trial runs more than about N/n epochs (:func:`trials.fast_loop.gram_pays`).
"""

from __future__ import annotations

from typing import Optional

import torch

from trials.fused_loss import one_member_temperature
from trials.losses import safe_normalize
from trials.packed_loss import FrozenSide, Workspace, frozen_buffers, frozen_from_similarity

GRAM_CENTERINGS = ("none", "mean")  # the centrings whose batch S a Gram of all rows gives


class FrozenGram:
    """The Gram matrix of a trial's normalised training features, [N, N]: a training batch's
    frozen similarity S is gathered from it (n² reads) rather than recomputed (n²·d FLOPs).

    For cosine distance with ``center_first`` False and centring "none" or "mean" only
    (:data:`GRAM_CENTERINGS`): "none" reads S = G[rows][:, rows] with G = X̂X̂ᵀ; "mean"
    double-centres the gathered block, S = H G_b H, which equals the batch-centred product
    exactly (a constant shift of the rows cancels). G is built from the globally centred rows
    X̂ − mean(X̂), so it has no large common component to cancel in float32. safe_norm's
    "already unit norm?" test runs once over all N rows, not per batch: a batch of unit rows
    in a set that is not moves by at most its 1e-6 tolerance.
    """

    def __init__(self, features: torch.Tensor, centering: str):
        if centering not in GRAM_CENTERINGS:
            raise ValueError(f"the frozen Gram covers centering in {GRAM_CENTERINGS}, got {centering!r}")
        self.centering = centering
        with torch.no_grad(), torch.autocast(device_type=features.device.type, enabled=False):
            x = safe_normalize(features)
            if centering == "mean":
                x = x - x.mean(0, keepdim=True)
            self.matrix = torch.mm(x, x.T)

    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()

    @torch.no_grad()
    def similarity(self, rows: torch.Tensor, out: torch.Tensor, workspace: Workspace) -> torch.Tensor:
        """S of the batch ``rows`` into ``out`` [n, n], in the rows' order."""
        picked = workspace.matrix("gram_rows", len(rows), len(self.matrix), self.matrix)
        torch.index_select(self.matrix, 0, rows, out=picked)
        torch.index_select(picked, 1, rows, out=out)
        if self.centering == "mean":  # S_ij = G_ij − r_i − r_j + c, r the row means, c their mean
            shift = out.mean(1)
            shift.sub_(shift.mean(), alpha=0.5)
            out.sub_(shift[:, None]).sub_(shift[None, :])
        return out


@torch.no_grad()
def frozen_side_from_gram(gram: FrozenGram, rows: torch.Tensor, *, levels: int, temperature: float,
                          workspace: Optional[Workspace] = None) -> FrozenSide:
    """``trials.fused_loss.frozen_side`` of the training rows ``rows`` (a one-member
    :class:`~trials.packed_loss.FrozenSide`), S read from ``gram``; sorted rows gather fastest."""
    matrix = gram.matrix
    with torch.autocast(device_type=matrix.device.type, enabled=False):
        half_p, log_p = frozen_buffers(1, len(rows), levels, matrix, workspace)
        gram.similarity(rows, out=half_p[0][0], workspace=workspace or Workspace())
        return frozen_from_similarity(half_p, log_p, one_member_temperature(temperature, matrix))
