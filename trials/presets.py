"""Named presets matching the official STRUCTURE configs (METHOD.md §2 table, §4.4).

A preset is a plain dict::

    {"head": str, "head_options": dict, "out_dim": int,
     "layer_rule": "last" | "similar",
     "loss": LossOptions fields, "train": TrainConfig overrides}

``layer_rule`` "last" trains the last-layer pair, "similar" the most similar pair
(§6). A head fitted in closed form (``csa``) takes no loss, so its ``loss`` is
empty. ``train`` is empty for STRUCTURE's presets because :class:`trials.train_options.TrainConfig`'s
defaults are the official ones (1000 epochs, batch 4096, LR finder, patience 200);
the ``freeze_align`` presets (token projector, METHOD.md §4.5) set freeze-align's.
Values that equal an owner's default are read from that owner, never restated.
"""

from __future__ import annotations

import copy
import dataclasses

from trials.head_options import CSAOptions, ResLowRankOptions, TokenProjectorOptions
from trials.loss_options import LOSS_DEFAULTS
from trials.registry import Registry

PRESETS: Registry[dict] = Registry("preset")

# configs/default.yaml's CLIPLoss settings, which every config inherits (§2); the
# names are the keys the presets have always carried (they enter trial fingerprints)
_RS_LOSS = {name: getattr(LOSS_DEFAULTS, name) for name in (
    "temperature", "normalize_latents", "warmup_steps", "structure_lambda", "structure_levels",
    "structure_weighting")}
_NO_RS_LOSS = dict(_RS_LOSS, structure_lambda=0.0)
# configs/losses_mlp/*: ResLowRankHead, rank 64 (dropout 0.1, gate stuck at 0: the defaults, §4.3)
_RES_LOW_RANK = dataclasses.asdict(ResLowRankOptions(rank=64))
# configs/csa/csa_structure_*: CCA_RS refinement (§4.4); the configs do not name `whiten`
_CSA_REFINE = {k: v for k, v in dataclasses.asdict(CSAOptions(refine=True)).items() if k != "whiten"}
LEVELS = (2, 3, 5)  # clip_structure_{2,3,5} / csa_structure_{2,3,5}


# freeze-align (METHOD.md §4.5, config dinov2-arl-wds-combined.yaml): the token projector,
# temperature 0.07 (learnable), AdamW lr 1e-3 wd 0.02, 15 epochs, batch 1800 (per GPU:
# the official run had 8), no gradient clipping, last layer; λ=0 is faithful and
# freeze_align+rs adds STRUCTURE's R_S (λ=10, warmed up over 1000 steps) on the pooled features.
_FREEZE_ALIGN_LOSS = dict(_NO_RS_LOSS, temperature=0.07)
_FREEZE_ALIGN_TRAIN = {"lr": 1e-3, "weight_decay": 0.02, "epochs": 15, "batch_size": 1800, "grad_clip": 0.0}
_TOKEN_PROJECTOR = dataclasses.asdict(TokenProjectorOptions())


def list_presets() -> list[str]:
    """Names of all presets, sorted."""
    return PRESETS.names()


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name``; ValueError naming the presets if unknown."""
    return copy.deepcopy(PRESETS.get(name))


def _register(name, head, layer_rule, loss, head_options=None, out_dim=512, train=None) -> None:
    PRESETS.register(name, {"head": head, "head_options": dict(head_options or {}), "out_dim": out_dim,
                            "layer_rule": layer_rule, "loss": dict(loss), "train": dict(train or {})})


def _levels(loss: dict, levels: int) -> dict:
    """clip_structure_{L}: L hops with inverse weighting (L=1 keeps 'none', same thing)."""
    return dict(loss, structure_levels=levels, structure_weighting="inverse")


def _register_gradient_heads() -> None:
    """losses_lin/* (``linear``) and losses_mlp/* (``res_low_rank``)."""
    for head, options in (("linear", {}), ("res_low_rank", _RES_LOW_RANK)):
        _register(f"{head}+last", head, "last", _NO_RS_LOSS, options)
        _register(f"{head}+similar", head, "similar", _NO_RS_LOSS, options)
        _register(f"{head}+similar+rs", head, "similar", _RS_LOSS, options)
        for levels in LEVELS:
            _register(f"{head}+similar+rs-l{levels}", head, "similar", _levels(_RS_LOSS, levels), options)


def _register_csa() -> None:
    """csa/csa_base_{last,best} and csa/csa_structure_{1,2,3,5}; sim_dim 512."""
    _register("csa+last", "csa", "last", {})
    _register("csa+similar", "csa", "similar", {})
    _register("csa+similar+rs", "csa", "similar", {}, _CSA_REFINE)
    for levels in LEVELS:
        _register(f"csa+similar+rs-l{levels}", "csa", "similar", {}, dict(_CSA_REFINE, levels=levels))


def _register_ablations() -> None:
    """ablations/*: Linear d=512, L=1, T=0.05, λ=10, one R_S switch each (§2, §3)."""
    switches = {
        "ablation-centering-none": dict(structure_centering="none"),
        "ablation-centering-standard": dict(structure_centering="standard"),
        "ablation-center-first": dict(structure_center_first=True, structure_centering="mean"),
        "ablation-distance-rbf": dict(structure_distance="rbf"),
        "ablation-distance-spearman": dict(structure_distance="spearman"),
    }
    for name, switch in switches.items():
        _register(name, "linear", "similar", dict(_RS_LOSS, **switch))


_register("default", "linear", "similar", _RS_LOSS, out_dim=256)  # configs/default.yaml
_register_gradient_heads()
_register_csa()
_register_ablations()
_register("freeze_align", "token_projector", "last", _FREEZE_ALIGN_LOSS, _TOKEN_PROJECTOR, 1024, _FREEZE_ALIGN_TRAIN)
_register("freeze_align+rs", "token_projector", "last", dict(_FREEZE_ALIGN_LOSS, structure_lambda=10.0),
          _TOKEN_PROJECTOR, 1024, _FREEZE_ALIGN_TRAIN)
