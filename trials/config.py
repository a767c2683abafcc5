"""The flat config of one trial: every field is a possible search dimension.

Composed from the options of each concern, which own their defaults: the
loss (:class:`trials.loss_options.LossOptions`), the training loop
(:class:`trials.train_options.TrainConfig`) and the head
(:mod:`trials.head_options`, through ``head``/``head_options``). Kept free of
torch so a spec validates without loading it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal, Optional

from trials._checks import check_int
from trials.head_options import check_head_options, is_closed_form
from trials.loss_options import LOSS_DEFAULTS as LOSS
from trials.loss_options import CENTERINGS, DISTANCES, DIVERGENCES, WEIGHTINGS, LossOptions
from trials.train_options import RUN_FIELDS, TrainConfig
from trials.train_options import TRAIN_DEFAULTS as TRAIN

# Version of the trial logic; part of every trial's fingerprint, so bump it
# when a change in trials/* changes a trial's numbers.
TRIAL_CODE_VERSION = "1"


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
    # loss (trials.loss_options.LossOptions)
    temperature: float = LOSS.temperature
    normalize_latents: bool = LOSS.normalize_latents
    warmup_steps: int = LOSS.warmup_steps
    structure_lambda: float = LOSS.structure_lambda
    structure_levels: int = LOSS.structure_levels
    structure_weighting: Literal[WEIGHTINGS] = LOSS.structure_weighting
    structure_margin: float = LOSS.structure_margin
    structure_centering: Literal[CENTERINGS] = LOSS.structure_centering
    structure_distance: Literal[DISTANCES] = LOSS.structure_distance
    structure_center_first: bool = LOSS.structure_center_first
    structure_divergence: Literal[DIVERGENCES] = LOSS.structure_divergence
    paper_sum: bool = LOSS.paper_sum
    # optimisation (trials.train_options.TrainConfig)
    epochs: int = TRAIN.epochs
    batch_size: int = TRAIN.batch_size
    lr: Optional[float] = TRAIN.lr  # None: the LR finder of §5.2
    weight_decay: float = TRAIN.weight_decay
    grad_clip: float = TRAIN.grad_clip
    patience: int = TRAIN.patience
    mixup_alpha: float = TRAIN.mixup_alpha
    fixed_structure: bool = TRAIN.fixed_structure

    def __post_init__(self):
        """Range checks; each failure is a ValueError naming the field and its allowed values."""
        for name in ("image_layer", "text_layer"):
            check_int(name, getattr(self, name))
        for name, minimum in (("out_dim", 1), ("seed", 0)):
            check_int(name, getattr(self, name), minimum)
        check_int("n_train", self.n_train, 1, optional=True)
        self.loss_options()  # each part checks its own fields
        self.train_config(device="cpu")
        if not isinstance(self.head_options, dict):
            raise ValueError(f"head_options={self.head_options!r} is not supported; "  # noqa: TRY004 (one type for every check)
                             "allowed values: a mapping of the head's options")
        if self.head_options:  # head names themselves are checked by the spec
            check_head_options(self.head, self.head_options)

    def fingerprint_fields(self) -> dict:
        """The fields that determine the result: all of them, except for a head fitted in
        closed form, which ignores the loss and optimisation fields
        (``CLOSED_FORM_IGNORED``), so e.g. a λ sweep over CSA is one trial per setting
        of the remaining fields."""
        fields = dataclasses.asdict(self)
        if is_closed_form(self.head):
            for name in CLOSED_FORM_IGNORED:
                del fields[name]
        return fields

    def loss_options(self) -> LossOptions:
        return LossOptions(**{name: getattr(self, name) for name in LOSS_FIELDS})

    def train_config(self, device: str) -> TrainConfig:
        optimiser = {name: getattr(self, name) for name in OPTIMISER_FIELDS}
        return TrainConfig(**optimiser, seed=self.seed, device=device)


def _fields_shared_with(options: type, exclude: tuple = ()) -> tuple[str, ...]:
    """TrialConfig's fields that ``options`` declares too, in TrialConfig's order."""
    theirs = {f.name for f in dataclasses.fields(options)} - set(exclude)
    return tuple(f.name for f in dataclasses.fields(TrialConfig) if f.name in theirs)


LOSS_FIELDS = _fields_shared_with(LossOptions)
OPTIMISER_FIELDS = _fields_shared_with(TrainConfig, exclude=RUN_FIELDS)
# A closed-form head is fitted, not trained: neither the loss nor the optimiser
# settings reach it (the trial's seed does: it orders CSA's refinement batches).
CLOSED_FORM_IGNORED = LOSS_FIELDS + OPTIMISER_FIELDS
