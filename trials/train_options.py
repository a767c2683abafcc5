"""The optimiser settings of one trial's training loop, with their defaults, in one place.

Plain Python, no torch: :mod:`trials.config` builds its optimisation fields
from :class:`TrainConfig` without loading torch; :mod:`trials.train` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass

from trials._checks import check_choice, check_int, check_number

CLIP_MODES = ("module_norm", "per_parameter")  # per_parameter: DINO's clip_gradients
SCHEDULERS = ("cosine_periodic", "none")
EPOCH_CYCLES = 50  # §5.3: T_max = 50 epochs' worth of full batches
# Fields a trial fills from its own context rather than from optimiser settings
RUN_FIELDS = ("seed", "device")


@dataclass
class TrainConfig:
    """Optimisation settings of one trial; defaults are the official ones (§5.2-5.3)."""

    epochs: int = 1000
    batch_size: int = 4096
    lr: float | None = None  # None -> LR finder (§5.2)
    lr_finder_end: float = 10.0
    lr_finder_iters: int = 100
    lr_finder_fallback: float = 1e-3  # the config LR the official finder falls back to
    weight_decay: float = 1e-4
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    clip_mode: str = "module_norm"  # or "per_parameter": UNDETERMINED in the spec (§5.3)
    scheduler: str = "cosine_periodic"  # §5.3 exactly, or "none"
    scheduler_epoch_cycles: int = EPOCH_CYCLES
    patience: int = 200
    mixup_alpha: float = 0.0  # FuseMix (§5.3)
    fixed_structure: bool = False  # reviewer ablation (§5.3)
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        """Range checks; each failure is a ValueError naming the field and its allowed values."""
        for name in ("epochs", "batch_size", "patience"):
            check_int(name, getattr(self, name), 1)
        check_number("lr", self.lr, 0, strict=True, optional=True)
        for name in ("weight_decay", "mixup_alpha", "grad_clip"):
            check_number(name, getattr(self, name), 0)
        check_choice("clip_mode", self.clip_mode, CLIP_MODES)
        check_choice("scheduler", self.scheduler, SCHEDULERS)


TRAIN_DEFAULTS = TrainConfig()
