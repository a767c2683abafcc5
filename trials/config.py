"""The flat config of one trial: every field is a possible search dimension.

Kept free of heavy imports so a spec validates without loading torch.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Literal, Optional

from trials._checks import check_choice, check_int, check_number

# Version of the trial logic; part of every trial's fingerprint, so bump it
# when a change in trials/* changes a trial's numbers.
TRIAL_CODE_VERSION = "1"

# The choices of AlignmentLoss's structure options; trials.losses checks against
# these tuples and the TrialConfig fields below are typed with them.
WEIGHTINGS = ("none", "inverse")
CENTERINGS = ("none", "mean", "standard")
DISTANCES = ("cosine", "rbf", "spearman")
DIVERGENCES = ("official", "js")

# Fields a closed-form head ("csa", fitted by trials.heads.fit_csa) ignores:
# the loss and the gradient optimisation.
CLOSED_FORM_IGNORED = (
    "temperature", "normalize_latents", "warmup_steps", "structure_lambda", "structure_levels",
    "structure_weighting", "structure_margin", "structure_centering", "structure_distance",
    "structure_center_first", "structure_divergence", "paper_sum", "epochs", "batch_size", "lr",
    "weight_decay", "grad_clip", "patience", "mixup_alpha", "fixed_structure",
)


@dataclass
class TrialConfig:
    """Everything that determines one trial's result, besides its features.

    Defaults follow the official ``configs/default.yaml`` (METHOD.md §2, §5)
    except ``epochs``/``patience``, which sweeps set to their budget.
    """

    image_layer: int = -1
    text_layer: int = -1
    head: str = "linear"
    head_options: dict = field(default_factory=dict)
    out_dim: int = 256
    n_train: Optional[int] = None  # None: every training pair
    seed: int = 0
    # loss (trials.losses.AlignmentLoss)
    temperature: float = 0.05
    normalize_latents: bool = True
    warmup_steps: int = 1000
    structure_lambda: float = 10.0
    structure_levels: int = 1
    structure_weighting: Literal[WEIGHTINGS] = "none"
    structure_margin: float = 0.0
    structure_centering: Literal[CENTERINGS] = "mean"
    structure_distance: Literal[DISTANCES] = "cosine"
    structure_center_first: bool = False
    structure_divergence: Literal[DIVERGENCES] = "official"
    paper_sum: bool = False
    # optimisation (trials.train.TrainConfig)
    epochs: int = 1000
    batch_size: int = 4096
    lr: Optional[float] = None  # None: the LR finder of §5.2
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    patience: int = 200
    mixup_alpha: float = 0.0
    fixed_structure: bool = False

    def __post_init__(self):
        """Range checks; each failure is a ValueError naming the field and its allowed values."""
        for name in ("image_layer", "text_layer"):
            check_int(name, getattr(self, name))
        for name, minimum in (("out_dim", 1), ("seed", 0), ("warmup_steps", 0),
                              ("structure_levels", 1), ("epochs", 1), ("batch_size", 1),
                              ("patience", 1)):
            check_int(name, getattr(self, name), minimum)
        check_int("n_train", self.n_train, 1, optional=True)
        check_number("temperature", self.temperature, 0, strict=True)
        check_number("lr", self.lr, 0, strict=True, optional=True)
        # grad_clip 0 turns clipping off (trials.train)
        for name in ("structure_lambda", "structure_margin", "weight_decay", "mixup_alpha", "grad_clip"):
            check_number(name, getattr(self, name), 0)
        for name, allowed in (("structure_weighting", WEIGHTINGS), ("structure_centering", CENTERINGS),
                              ("structure_distance", DISTANCES), ("structure_divergence", DIVERGENCES)):
            check_choice(name, getattr(self, name), allowed)
        if not isinstance(self.head_options, dict):
            raise ValueError(f"head_options={self.head_options!r} is not supported; "  # noqa: TRY004 (one type for every check)
                             "allowed values: a mapping of the head's options")
        if self.head_options:  # trials.heads imports torch: only when there are options to check
            from trials.heads import check_head_options

            check_head_options(self.head, self.head_options)

    def fingerprint_fields(self) -> dict:
        """The fields that determine the result: all of them, except for the closed-form
        ``csa`` head, which ignores the loss and optimisation fields
        (``CLOSED_FORM_IGNORED``), so e.g. a λ sweep over CSA is one trial per setting
        of the remaining fields."""
        fields = dataclasses.asdict(self)
        if self.head == "csa":
            for name in CLOSED_FORM_IGNORED:
                del fields[name]
        return fields

    def loss_kwargs(self) -> dict:
        from trials.losses import AlignmentLoss

        return _pick(self, AlignmentLoss)

    def train_config(self, device: str):
        from trials.train import TrainConfig

        return TrainConfig(**_pick(self, TrainConfig), device=device)


def _pick(config: TrialConfig, target: type) -> dict:
    """The fields of ``config`` that ``target`` accepts as keyword arguments."""
    names = set(inspect.signature(target).parameters) - {"device"}
    return {k: v for k, v in dataclasses.asdict(config).items() if k in names}
