"""From a validated spec and its layer similarity to the list of trials.

Layer rules become concrete layer pairs here; sampled dimensions are drawn
(seeded, so a re-run draws the same values); each trial gets a fingerprint of
everything that determines its result (its TrialConfig, the feature keys of
its two layers and evaluation sets, the trial code version), so a re-run can
skip what is stored and two grids asking for the same trial run it once.

Optuna grids are not planned ahead: :func:`optuna_space` describes what Optuna
chooses from and :func:`materialize` turns one of its suggestions into a
TrialConfig, the same way in the trial and in the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.config import from_dict
from orchestrator.keys import content_key
from orchestrator.spec import SweepSpec, _unfold_preset, expand_grid
from trials.config import TRIAL_CODE_VERSION, TrialConfig

if TYPE_CHECKING:
    from orchestrator.features import FeatureSet


@dataclass
class PlannedTrial:
    fingerprint: str
    grid: str
    config: TrialConfig
    params: str = ""  # Optuna's suggestion (JSON) for optuna grids

    def as_param(self) -> dict:
        return {"fingerprint": self.fingerprint, "grid": self.grid,
                "config": dataclasses.asdict(self.config), "params": self.params}


def fingerprint(config: TrialConfig, features: FeatureSet) -> str:
    i, j = config.image_layer, config.text_layer
    inputs = {"layers": [i, j], "features": features.keys(), "code": TRIAL_CODE_VERSION}
    return content_key([config.fingerprint_fields(), inputs], 20)


def _draws(spec: SweepSpec, grid: dict, combo_index: int) -> list[dict]:
    """The sampled values of one grid combination: num_samples seeded draws."""
    sample = grid.get("sample") or {}
    n = grid.get("num_samples") or spec.tune.num_samples
    if not sample:
        return [{}]  # identical repeats would share one fingerprint
    key = f"{spec.tune.seed}/{grid['name'][0]}/{combo_index}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    return [{k: dim.sample(rng) for k, dim in sorted(sample.items())} for _ in range(n)]


def plan_trials(spec: SweepSpec, features: FeatureSet, similarity: np.ndarray) -> list[PlannedTrial]:
    """Every trial of every grid, deduplicated by fingerprint (first grid wins)."""
    planned: dict[str, PlannedTrial] = {}
    for grid in spec.search:
        for index, combo in enumerate(expand_grid(grid)):
            name, rule = combo.pop("name"), combo.pop("layers")
            combo.pop("preset", None)  # already unfolded into trial values
            pairs = rule.resolve(similarity, seed=spec.similarity.seed)
            for draw in _draws(spec, grid, index):
                for i, j in pairs:
                    values = {**spec.training, **combo, **draw, "image_layer": i, "text_layer": j}
                    config = from_dict(TrialConfig, values)
                    fp = fingerprint(config, features)
                    planned.setdefault(fp, PlannedTrial(fp, name, config))
    return list(planned.values())


# --- Optuna grids ----------------------------------------------------------------------

def optuna_space(spec: SweepSpec, grid: dict, similarity: np.ndarray) -> dict:
    """What Optuna chooses from for one grid.

    Every list dimension becomes a categorical choice (``preset`` included),
    sampled dimensions keep their distribution, and the layer pair is a
    categorical over every pair the grid's layer rules (or its presets' rules)
    name. Returns {"choices": {dim: [values]}, "sample": {dim: Sampled},
    "pairs": [[i, j], ...]}.
    """
    choices = {k: v for k, v in grid.items()
               if k not in ("name", "layers", "sample", "num_samples")}
    rules = grid.get("layers") or sorted({c["layers"] for c in expand_grid(
        {k: v for k, v in grid.items() if k in ("name", "preset")})}, key=str)
    pairs = []
    for rule in rules:
        for pair in rule.resolve(similarity, seed=spec.similarity.seed):
            if list(pair) not in pairs:
                pairs.append(list(pair))
    return {"choices": choices, "sample": dict(grid.get("sample") or {}), "pairs": pairs}


def param_space(space: dict) -> dict:
    """The Tune search space of :func:`optuna_space` (index-encoded categoricals)."""
    from ray import tune

    out = {f"c__{k}": tune.choice(list(range(len(v)))) for k, v in space["choices"].items()
           if len(v) > 1}
    out.update({f"s__{k}": dim.tune_domain() for k, dim in space["sample"].items()})
    if len(space["pairs"]) > 1:
        out["pair"] = tune.choice(list(range(len(space["pairs"]))))
    return out


def materialize(spec_training: dict, grid_name: str, space: dict, suggestion: dict,
                features: FeatureSet) -> PlannedTrial:
    """The trial Optuna's ``suggestion`` (a :func:`param_space` point) stands for."""
    combo = {k: v[suggestion.get(f"c__{k}", 0)] for k, v in space["choices"].items()}
    combo = _unfold_preset(combo)
    combo.pop("layers"), combo.pop("preset", None)
    sampled = {k: suggestion[f"s__{k}"] for k in space["sample"]}
    i, j = space["pairs"][suggestion.get("pair", 0)]
    config = from_dict(TrialConfig, {**spec_training, **combo, **sampled,
                                     "image_layer": i, "text_layer": j})
    params = json.dumps({k: suggestion[k] for k in sorted(suggestion)}, default=float)
    return PlannedTrial(fingerprint(config, features), grid_name, config, params)


def count_trials(spec: SweepSpec, num_layers: tuple[int, int] | None) -> tuple[int, bool]:
    """(trials a spec expands to before deduplication, whether that is exact).

    Layer counts are needed for 'all' and 'lastK'; 'binsN' counts as its upper
    bound (N + 1 pairs); an Optuna grid counts its num_samples.
    """
    total, exact = 0, True
    for grid in spec.search:
        if spec.tune.search == "optuna":
            total += grid.get("num_samples") or spec.tune.num_samples
            continue
        draws = (grid.get("num_samples") or spec.tune.num_samples) if grid.get("sample") else 1
        for combo in expand_grid(grid):
            n, rule_exact = combo["layers"].count(num_layers)
            total, exact = total + n * draws, exact and rule_exact
    return total, exact
