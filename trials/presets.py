"""Named presets matching the official STRUCTURE configs (METHOD.md §2 table, §4.4).

A preset is a plain dict::

    {"head": str, "head_options": dict, "out_dim": int,
     "layer_rule": "last" | "similar",
     "loss": AlignmentLoss kwargs, "train": TrainConfig overrides}

``layer_rule`` "last" trains the last-layer pair, "similar" the most similar pair
(§6). For ``csa`` the head options are :func:`trials.heads.fit_csa` options
and ``loss`` is empty (closed form, no training loop). ``train`` is empty
because :class:`trials.train.TrainConfig`'s defaults are the official ones
(1000 epochs, batch 4096, LR finder, patience 200).
"""

from __future__ import annotations

import copy

# configs/default.yaml's CLIPLoss settings, which every config inherits (§2)
_RS_LOSS = dict(temperature=0.05, normalize_latents=True, warmup_steps=1000, structure_lambda=10.0,
                structure_levels=1, structure_weighting="none")
_NO_RS_LOSS = dict(_RS_LOSS, structure_lambda=0.0)
# configs/losses_mlp/*: ResLowRankHead, rank 64, dropout 0.1, gate stuck at 0 (§4.3)
_RES_LOW_RANK = dict(rank=64, dropout_p=0.1, gate_init=0.0)
# configs/csa/csa_structure_*: CCA_RS refinement (§4.4)
_CSA_REFINE = dict(refine=True, lambda_rs=10.0, lambda_cca=1e-2, levels=1, tau=0.2,
                   refine_epochs=10, lr=5e-4, batch_size=4096)
LEVELS = (2, 3, 5)  # clip_structure_{2,3,5} / csa_structure_{2,3,5}


def _preset(head, layer_rule, loss, head_options=None, out_dim=512) -> dict:
    return {"head": head, "head_options": dict(head_options or {}), "out_dim": out_dim,
            "layer_rule": layer_rule, "loss": dict(loss), "train": {}}


def _levels(loss: dict, levels: int) -> dict:
    """clip_structure_{L}: L hops with inverse weighting (L=1 keeps 'none', same thing)."""
    return dict(loss, structure_levels=levels, structure_weighting="inverse")


def _gradient_heads() -> dict[str, dict]:
    """losses_lin/* (``linear``) and losses_mlp/* (``res_low_rank``)."""
    out = {}
    for head, options in (("linear", {}), ("res_low_rank", _RES_LOW_RANK)):
        out[f"{head}+last"] = _preset(head, "last", _NO_RS_LOSS, options)
        out[f"{head}+similar"] = _preset(head, "similar", _NO_RS_LOSS, options)
        out[f"{head}+similar+rs"] = _preset(head, "similar", _RS_LOSS, options)
        for levels in LEVELS:
            out[f"{head}+similar+rs-l{levels}"] = _preset(head, "similar", _levels(_RS_LOSS, levels), options)
    return out


def _csa() -> dict[str, dict]:
    """csa/csa_base_{last,best} and csa/csa_structure_{1,2,3,5}; sim_dim 512."""
    out = {"csa+last": _preset("csa", "last", {}), "csa+similar": _preset("csa", "similar", {})}
    out["csa+similar+rs"] = _preset("csa", "similar", {}, _CSA_REFINE)
    for levels in LEVELS:
        out[f"csa+similar+rs-l{levels}"] = _preset("csa", "similar", {}, dict(_CSA_REFINE, levels=levels))
    return out


def _ablations() -> dict[str, dict]:
    """ablations/*: Linear d=512, L=1, T=0.05, λ=10, one R_S switch each (§2, §3)."""
    switches = {
        "ablation-centering-none": dict(structure_centering="none"),
        "ablation-centering-standard": dict(structure_centering="standard"),
        "ablation-center-first": dict(structure_center_first=True, structure_centering="mean"),
        "ablation-distance-rbf": dict(structure_distance="rbf"),
        "ablation-distance-spearman": dict(structure_distance="spearman"),
    }
    return {name: _preset("linear", "similar", dict(_RS_LOSS, **switch)) for name, switch in switches.items()}


_PRESETS: dict[str, dict] = {
    "default": _preset("linear", "similar", _RS_LOSS, out_dim=256),  # configs/default.yaml
    **_gradient_heads(),
    **_csa(),
    **_ablations(),
}


def list_presets() -> list[str]:
    """Names of all presets, sorted."""
    return sorted(_PRESETS)


def get_preset(name: str) -> dict:
    """A deep copy of preset ``name``; ValueError naming the presets if unknown."""
    if name not in _PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {', '.join(list_presets())}")
    return copy.deepcopy(_PRESETS[name])
