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
from orchestrator.grids import Grid, Sampled, unfold
from orchestrator.keys import content_key
from orchestrator.spec import SweepSpec
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


def _draws(spec: SweepSpec, grid: Grid, combo_index: int) -> list[dict]:
    """The sampled values of one grid combination: seeded, so a re-run draws the same."""
    if not grid.sample:
        return [{}]
    key = f"{spec.tune.search_config.seed}/{grid.name}/{combo_index}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    return [{k: dim.sample(rng) for k, dim in sorted(grid.sample.items())}
            for _ in range(grid.draw_count(spec.tune.search_config.num_samples))]


def plan_trials(spec: SweepSpec, features: FeatureSet, similarity: np.ndarray) -> list[PlannedTrial]:
    """Every trial of every grid, deduplicated by fingerprint (first grid wins)."""
    planned: dict[str, PlannedTrial] = {}
    for grid in spec.search:
        for index, combo in enumerate(grid.combinations()):
            pairs = combo.layers.resolve(similarity, seed=spec.similarity.seed)
            for draw in _draws(spec, grid, index):
                for i, j in pairs:
                    values = {**spec.training, **combo.values, **draw, "image_layer": i, "text_layer": j}
                    config = from_dict(TrialConfig, values)
                    fp = fingerprint(config, features)
                    planned.setdefault(fp, PlannedTrial(fp, grid.name, config))
    return list(planned.values())


# --- Optuna grids ----------------------------------------------------------------------

@dataclass
class OptunaSpace:
    """What Optuna chooses from for one grid (see :func:`optuna_space`)."""

    choices: dict[str, list]  # dimension -> values, ``preset`` included, in the spec's order
    sample: dict[str, Sampled]
    pairs: list[list[int]]  # [i, j] layer pairs


def optuna_space(spec: SweepSpec, grid: Grid, similarity: np.ndarray) -> OptunaSpace:
    """What Optuna chooses from for one grid.

    Every list dimension becomes a categorical choice (``preset`` included),
    sampled dimensions keep their distribution, and the layer pair is a
    categorical over every pair the grid's layer rules (or its presets' rules)
    name.
    """
    choices = {k: v for k, v in grid.axes().items() if k != "layers"}
    pairs = []
    for rule in grid.layer_rules():
        for pair in rule.resolve(similarity, seed=spec.similarity.seed):
            if list(pair) not in pairs:
                pairs.append(list(pair))
    return OptunaSpace(choices, dict(grid.sample), pairs)


def param_space(space: OptunaSpace) -> dict:
    """The Tune search space of :func:`optuna_space` (index-encoded categoricals)."""
    from ray import tune

    out = {f"c__{k}": tune.choice(list(range(len(v)))) for k, v in space.choices.items()
           if len(v) > 1}
    out.update({f"s__{k}": dim.tune_domain() for k, dim in space.sample.items()})
    if len(space.pairs) > 1:
        out["pair"] = tune.choice(list(range(len(space.pairs))))
    return out


def materialize(spec_training: dict, grid_name: str, space: OptunaSpace, suggestion: dict,
                features: FeatureSet) -> PlannedTrial:
    """The trial Optuna's ``suggestion`` (a :func:`param_space` point) stands for."""
    combo = unfold({k: v[suggestion.get(f"c__{k}", 0)] for k, v in space.choices.items()})
    sampled = {k: suggestion[f"s__{k}"] for k in space.sample}
    i, j = space.pairs[suggestion.get("pair", 0)]
    config = from_dict(TrialConfig, {**spec_training, **combo.values, **sampled,
                                     "image_layer": i, "text_layer": j})
    params = json.dumps({k: suggestion[k] for k in sorted(suggestion)}, default=float)
    return PlannedTrial(fingerprint(config, features), grid_name, config, params)


def count_trials(spec: SweepSpec, num_layers: tuple[int, int] | None) -> tuple[int, bool]:
    """(trials a spec expands to before deduplication, whether that is exact).

    Layer counts are needed for 'all' and 'lastK'; 'binsN' counts as its upper
    bound (N + 1 pairs); an Optuna grid counts its num_samples.
    """
    total, exact, tune = 0, True, spec.tune.search_config
    for grid in spec.search:
        if tune.search == "optuna":
            total += grid.sample_count(tune.num_samples)
            continue
        draws = grid.draw_count(tune.num_samples)
        for combo in grid.combinations():
            n, rule_exact = combo.layers.count(num_layers)
            total, exact = total + n * draws, exact and rule_exact
    return total, exact
