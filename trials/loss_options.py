"""The options of the alignment loss: its vocabulary and its defaults, in one place.

Plain Python, no torch: :mod:`trials.config` builds its loss fields from
these without loading torch, and :mod:`trials.losses` reads the same values.
Defaults are those of the official ``configs/default.yaml`` CLIPLoss (METHOD.md §2, §3).
"""

from __future__ import annotations

from dataclasses import dataclass

from trials._checks import check_choice, check_int, check_number

# The choices of R_S's structure options (METHOD.md §3)
WEIGHTINGS = ("none", "inverse")
CENTERINGS = ("none", "mean", "standard")
DISTANCES = ("cosine", "rbf", "spearman")
DIVERGENCES = ("official", "js")


@dataclass(frozen=True)
class LossOptions:
    """Options of ``trials.losses.AlignmentLoss``: CLIP loss + λ·R_S with λ warmed up (§2, §3.1).

    The two documented departures from the official code are opt-in:
    ``structure_divergence="js"`` and ``paper_sum=True`` (§13.1, §13.2).
    """

    temperature: float = 0.05
    normalize_latents: bool = True
    warmup_steps: int = 1000  # 0: λ at full strength from the first batch
    structure_lambda: float = 10.0
    structure_levels: int = 1
    structure_weighting: str = "none"
    structure_margin: float = 0.0
    structure_centering: str = "mean"
    structure_distance: str = "cosine"
    structure_center_first: bool = False
    structure_divergence: str = "official"
    paper_sum: bool = False
    structure_use_only_unimodal: bool = False

    def __post_init__(self):
        """Range checks; each failure is a ValueError naming the field and its allowed values."""
        check_number("temperature", self.temperature, 0, strict=True)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("structure_levels", self.structure_levels, 1)
        for name in ("structure_lambda", "structure_margin"):
            check_number(name, getattr(self, name), 0)
        for name, allowed in (("structure_weighting", WEIGHTINGS), ("structure_centering", CENTERINGS),
                              ("structure_distance", DISTANCES), ("structure_divergence", DIVERGENCES)):
            check_choice(name, getattr(self, name), allowed)


LOSS_DEFAULTS = LossOptions()
