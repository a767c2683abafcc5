"""The flat config of one trial: every field is a possible search dimension.

Kept free of heavy imports so a spec validates without loading torch.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Literal, Optional

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
    # loss (trials.losses.AlignmentLoss)
    temperature: float = 0.05
    normalize_latents: bool = True
    warmup_steps: int = 1000
    structure_lambda: float = 10.0
    structure_levels: int = 1
    structure_weighting: Literal["none", "inverse"] = "none"
    structure_margin: float = 0.0
    structure_centering: Literal["none", "mean", "standard"] = "mean"
    structure_distance: Literal["cosine", "rbf", "spearman"] = "cosine"
    structure_center_first: bool = False
    structure_divergence: Literal["official", "js"] = "official"
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
