"""From a validated spec and its layer similarity to the list of trials.

Layer rules become concrete layer pairs here; each trial gets a fingerprint of
everything that determines its result (its TrialConfig, the feature keys of
its two layers and evaluation sets, the trial code version), so a re-run can
skip what is stored and two grids asking for the same trial run it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.config import from_dict
from orchestrator.spec import SweepSpec, _top_k, expand_grid
from trials.config import TRIAL_CODE_VERSION, TrialConfig

if TYPE_CHECKING:
    from orchestrator.features import FeatureSet


@dataclass
class PlannedTrial:
    fingerprint: str
    grid: str
    config: TrialConfig

    def as_param(self) -> dict:
        return {"fingerprint": self.fingerprint, "grid": self.grid,
                "config": dataclasses.asdict(self.config)}


def resolve_layers(rule, similarity: np.ndarray) -> list[tuple[int, int]]:
    """Layer pairs named by a rule, given the [Li, Lj] similarity matrix."""
    li, lj = similarity.shape
    if isinstance(rule, tuple):
        i, j = rule
        if not (-li <= i < li and -lj <= j < lj):
            raise ValueError(f"layer pair {list(rule)} is out of range for {li} image "
                             f"and {lj} text layers")
        return [(i % li, j % lj)]
    if rule == "all":
        return [(i, j) for i in range(li) for j in range(lj)]
    if rule == "last":
        return [(li - 1, lj - 1)]
    k = 1 if rule == "best" else _top_k(rule)
    order = np.argsort(-similarity, axis=None, kind="stable")[:k]
    return [tuple(int(v) for v in np.unravel_index(o, similarity.shape)) for o in order]


def fingerprint(config: TrialConfig, features: FeatureSet) -> str:
    i, j = config.image_layer, config.text_layer
    inputs = {"layers": [i, j], "features": features.keys(), "code": TRIAL_CODE_VERSION}
    blob = json.dumps([dataclasses.asdict(config), inputs], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def plan_trials(spec: SweepSpec, features: FeatureSet, similarity: np.ndarray) -> list[PlannedTrial]:
    """Every trial of every grid, deduplicated by fingerprint (first grid wins)."""
    planned: dict[str, PlannedTrial] = {}
    for grid in spec.search:
        for combo in expand_grid(grid):
            name, rule = combo.pop("name"), combo.pop("layers")
            combo.pop("preset", None)  # already unfolded into trial values
            for i, j in resolve_layers(rule, similarity):
                values = {**spec.training, **combo, "image_layer": i, "text_layer": j}
                config = from_dict(TrialConfig, values)
                fp = fingerprint(config, features)
                planned.setdefault(fp, PlannedTrial(fp, name, config))
    return list(planned.values())


def count_trials(spec: SweepSpec, num_layers: tuple[int, int] | None) -> int:
    """Trials a spec expands to before deduplication (layer counts needed for 'all')."""
    total = 0
    for grid in spec.search:
        for combo in expand_grid(grid):
            rule = combo["layers"]
            if rule == "all":
                if num_layers is None:
                    raise ValueError("counting 'all' layer pairs needs the encoders' layer counts")
                total += num_layers[0] * num_layers[1]
            else:
                total += 1 if isinstance(rule, tuple) or rule in ("last", "best") else _top_k(rule)
    return total
