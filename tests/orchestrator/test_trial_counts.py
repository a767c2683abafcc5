"""validate's trial counts are the run's: checked against the planner itself
(``plan_trials`` with placeholder features and many similarity matrices)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from orchestrator.planning import count_trials, plan_trials
from orchestrator.spec import load_spec
from orchestrator.trial_counts import count_plan


class NoFeatures:
    """The planner keys trials by their features too; one placeholder set for all
    (600 training pairs, the tiny spec's split)."""

    train = SimpleNamespace(text_to_image=range(600))

    def keys(self) -> list[str]:
        return []


GRIDS = {
    "tiny": None,  # the fixture's own: an 'all' grid beside similar/last ones
    "two-grids-one-trial": [{"name": "a", "layers": "all", "n_train": 300},
                            {"name": "b", "layers": ["similar", "last"], "n_train": 300}],
    "csa-across-grids": [{"name": "a", "head": "csa", "layers": "last", "structure_lambda": 0},
                         {"name": "b", "head": "csa", "layers": "last", "structure_lambda": 10}],
    "same-pair-twice": [{"name": "a", "layers": [[0, 1], [0, 1], [-3, -2], "last"], "seed": [0, 1]}],
    "sampled": [{"name": "a", "layers": ["last", [2, 2]], "lr": {"loguniform": [1e-4, 1e-2]},
                 "num_samples": 3}],
    "presets": [{"name": "a", "preset": ["linear+last", "linear+similar", "csa+last", "csa+similar"]},
                {"name": "b", "layers": "top3", "head": "csa"}],
    "bins": [{"name": "a", "layers": ["bins2", "similar"]}],
}


def spec_with(tiny: dict, tmp_path, grids) -> object:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**tiny, "search": grids or tiny["search"]}))
    return load_spec(path)


@pytest.mark.parametrize("name", list(GRIDS))
def test_unique_count_is_what_the_planner_plans(tiny, tmp_path, name):
    spec = spec_with(tiny, tmp_path, GRIDS[name])
    count = count_plan(spec, (3, 3))
    if count.exact:
        assert count.total == count_trials(spec, (3, 3))[0]
    rng = np.random.default_rng(0)
    planned = [len(plan_trials(spec, NoFeatures(), rng.random((3, 3)))) for _ in range(20)]
    planned.append(len(plan_trials(spec, NoFeatures(), np.arange(9.0).reshape(3, 3))))  # max = last
    if count.unique_exact:
        assert set(planned) == {count.unique}
    else:  # an upper bound, reached when the similarity pairs fall elsewhere
        assert max(planned) <= count.unique and min(planned) < count.unique


def test_known_counts(tiny, tmp_path):
    two = count_plan(spec_with(tiny, tmp_path, GRIDS["two-grids-one-trial"]), (3, 3))
    assert (two.per_grid, two.unique, two.unique_exact) == ({"a": 9, "b": 2}, 9, True)
    csa = count_plan(spec_with(tiny, tmp_path, GRIDS["csa-across-grids"]), (3, 3))
    assert (csa.total, csa.unique, csa.unique_exact) == (2, 1, True)  # λ is not a CSA field
    same = count_plan(spec_with(tiny, tmp_path, GRIDS["same-pair-twice"]), (3, 3))
    assert (same.total, same.unique) == (8, 4)  # [-3, -2] is [0, 1]


def test_without_layer_counts(tiny, tmp_path):
    spec = spec_with(tiny, tmp_path, None)
    count = count_plan(spec, None)
    assert count.per_grid == {"grid": None, "scaling": 8} and count.total is None and count.unique is None
    presets = count_plan(spec_with(tiny, tmp_path, GRIDS["presets"]), None)
    assert presets.total == 7 and presets.unique == 7 and not presets.unique_exact


def test_optuna_grids_count_their_samples(tiny, tmp_path):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**tiny, "tune": {"search": "optuna", "num_samples": 5}}))
    count = count_plan(load_spec(path), (3, 3))
    assert count.optuna and count.per_grid == {"grid": 5, "scaling": 5} and count.unique is None
