"""Which heads exist, the options each takes and their defaults (METHOD.md §4).

Plain Python, no torch: a spec's ``head``/``head_options`` validate, and a
trial's fingerprint knows whether its head is fitted in closed form, without
loading torch. :data:`HEAD_OPTIONS` is keyed by head name; each entry is the
head's options dataclass, registered with ``closed_form=True`` when the head
is fitted in closed form rather than trained, and with ``tokens=True`` when
the head reads token features (every patch / word of one layer) rather than
pooled ones (:func:`needs_tokens`). The code of each head is registered under
the same name in :data:`trials.heads.HEADS`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

from trials._checks import check_choice, check_int, check_number
from trials.registry import Registry

HEAD_OPTIONS: Registry[type] = Registry("head")
MLP_ACTIVATIONS = ("relu", "gelu")
TOKEN_SCHEDULES = ("freeze_align", "none")


@HEAD_OPTIONS.register("linear", closed_form=False)
@dataclass(frozen=True)
class LinearOptions:
    """``linear``: the official ``LinearAlignmentLayer``, ``x -> W x + b`` (§4.1)."""

    bias: bool = True


@HEAD_OPTIONS.register("res_low_rank", closed_form=False)
@dataclass(frozen=True)
class ResLowRankOptions:
    """``res_low_rank``: the official ``ResLowRankHead`` of every "MLP" config (§4.3)."""

    rank: Optional[int] = None  # None: max(8, out_dim // 4)
    dropout_p: float = 0.1
    gate_init: float = 0.0  # 0: the official gate, stuck shut for ever


@HEAD_OPTIONS.register("mlp", closed_form=False)
@dataclass(frozen=True)
class MLPOptions:
    """``mlp`` (ours): a plain MLP shaped like the official, unused ``MLPAlignmentLayer`` (§4.2)."""

    hidden_dim: Optional[int] = None  # None: out_dim
    num_layers: int = 2
    activation: str = "relu"
    dropout_p: float = 0.0

    def __post_init__(self):
        check_int("num_layers", self.num_layers, 1)
        check_choice("activation", self.activation, MLP_ACTIVATIONS)


@HEAD_OPTIONS.register("csa", closed_form=True)
@dataclass(frozen=True)
class CSAOptions:
    """``csa``: closed-form CCA, optionally refined with R_S (§4.4); defaults: ``csa_structure_*``.

    ``levels`` is R_S's L, ``tau`` its temperature; ``whiten=False`` is faithful
    (the official whitening step is a silent no-op, see :func:`trials.csa.fit_csa`).
    """

    refine: bool = False
    lambda_rs: float = 10.0
    lambda_cca: float = 1e-2
    levels: int = 1
    tau: float = 0.2
    refine_epochs: int = 10
    lr: float = 5e-4
    batch_size: Optional[int] = 4096  # None: full batch
    whiten: bool = False


@HEAD_OPTIONS.register("token_projector", closed_form=False, tokens=True)
@dataclass(frozen=True)
class TokenProjectorOptions:
    """``token_projector``: freeze-align's lightweight projector on token features (§4.5).

    Trained by :func:`trials.token_trial.run_token_trial`, not by the pooled
    loop; these options hold the parts of freeze-align's recipe that
    ``TrialConfig`` has no field for (its ``temperature`` is the initial
    temperature, 0.07 in the ``freeze_align`` preset). Defaults are faithful:

    * ``dropout_p``: the Dropout after each projector's LayerNorm (and in the text MLP);
    * ``learn_temperature``: the CLIP temperature is a parameter, clamped to
      [0.001, 0.5] before each forward; False keeps it fixed at ``temperature``;
    * ``mixed_precision``: the heads run under bf16 autocast on CUDA (the
      official code uses fp16 with a GradScaler; bf16 needs no scaler); no
      effect on CPU;
    * ``schedule``: "freeze_align" is the official ALBEF-style LR schedule read
      literally (METHOD.md §4.5: warm-up over epoch 0's first 1000 steps, then
      the cosine at ``epoch + 10`` of 15, so the LR reaches 1e-5 by epoch 5);
      "none" keeps ``lr`` constant (ours).
    """

    dropout_p: float = 0.1
    learn_temperature: bool = True
    mixed_precision: bool = True
    schedule: str = "freeze_align"

    def __post_init__(self):
        check_number("dropout_p", self.dropout_p, 0)
        check_choice("schedule", self.schedule, TOKEN_SCHEDULES)


def parse_head_options(name: str, options: dict):
    """``options`` as head ``name``'s options dataclass, defaults filled in.

    ValueError for an unknown head (listing the heads), an unknown option
    (listing the allowed ones) or a value the head's options reject.
    """
    options_class = HEAD_OPTIONS.get(name)
    allowed = [f.name for f in fields(options_class)]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"head {name!r} has no option(s) {unknown}; allowed: {allowed}")
    return options_class(**options)


def check_head_options(name: str, options: dict) -> None:
    """ValueError unless ``name`` is a head and ``options`` are options it accepts; builds nothing."""
    parse_head_options(name, options)


def is_closed_form(name: str) -> bool:
    """Whether head ``name`` is fitted in closed form (False for a name no one registered)."""
    return name in HEAD_OPTIONS.names(closed_form=True)


def needs_tokens(name: str) -> bool:
    """Whether head ``name`` reads token features (False for a name no one registered)."""
    return name in HEAD_OPTIONS.names(tokens=True)
