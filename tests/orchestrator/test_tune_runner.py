"""The Tune stage's planning, without a cluster: pending trials, waves, tasks, Optuna grids."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.grids import Grid
from orchestrator.planning import PlannedTrial
from orchestrator.results import ResultsStore
from orchestrator.tune_runner import TuneRunner, group_tasks, layer_bytes, optuna_grids, waves
from trials.config import TrialConfig


def row(fp, status="done", grid="g"):
    return {"fingerprint": fp, "status": status, "error": "", "grid": grid}


def planned(fp: str, i: int = 0, j: int = 0, **config) -> PlannedTrial:
    return PlannedTrial(fp, "g", TrialConfig(image_layer=i, text_layer=j, **config))


def test_fifo_reruns_stopped_trials_asha_skips_them(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a"), row("s", status="stopped"), row("f", status="failed")])
    trials = [planned(fp) for fp in ("a", "s", "f")]
    pending = {}
    for scheduler in ("asha", "fifo"):
        spec = SimpleNamespace(tune=SimpleNamespace(search_config=SimpleNamespace(scheduler=scheduler)))
        runner = TuneRunner(spec, None, None, store, monitor=None)
        pending[scheduler] = sorted(t.fingerprint for t in runner.pending(trials))
    assert pending == {"asha": ["f"], "fifo": ["f", "s"]}  # FIFO re-runs the stopped trial in full


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_tasks_gather_a_packable_shape_across_layer_pairs_and_other_trials_by_pair(head):
    trials = [planned(f"{i}{j}{s}", i, j, seed=s, head=head) for i in range(2) for j in range(2)
              for s in range(3)]
    assert group_tasks(trials, 1) == [[t] for t in trials]
    tasks = group_tasks(trials, 2)
    pairs = [{(t.config.image_layer, t.config.text_layer) for t in task} for task in tasks]
    if head == "linear":  # one pack shape: 12 trials on 4 pairs, 2 a task, pairs mixed
        assert [len(t) for t in tasks] == [2] * 6 and any(len(p) > 1 for p in pairs)
    else:  # unpackable: 3 trials per pair -> a task of 2 and one of 1 per pair
        assert sorted(len(t) for t in tasks) == [1, 1, 1, 1, 2, 2, 2, 2] and all(len(p) == 1 for p in pairs)
    assert sorted(t.fingerprint for task in tasks for t in task) == sorted(t.fingerprint for t in trials)


def one_split_features() -> tuple[FeatureSet, SimpleNamespace]:
    """A FeatureSet of one image and one text entry of 10 x 4 floats per layer."""
    split = SplitFeatures(image="img", text="txt", text_to_image=np.arange(10))
    features = FeatureSet(split, split, {}, {}, num_layers=(3, 3))
    store = SimpleNamespace(manifest=lambda key: {"shape": [10, 3, 4]})
    return features, store


def test_waves_hold_whole_image_layers_within_the_budget():
    features, store = one_split_features()
    trials = [planned(f"{i}{j}", i, j) for i in range(3) for j in range(3)]
    per_layer = 10 * 4 * 4  # float32 rows x dim
    assert layer_bytes(store, features, [(0, 0), (0, 1)]) == per_layer * (1 + 2)
    assert waves(trials, features, store, budget=float("inf")) == [trials]
    one_each = waves(trials, features, store, budget=1)  # smaller than one layer: one per wave
    assert [{t.config.image_layer for t in w} for w in one_each] == [{0}, {1}, {2}]
    two = waves(trials, features, store, budget=per_layer * (2 + 3))  # 2 image + 3 text layers
    assert [len(w) for w in two] == [6, 3]


def test_optuna_grids_count_their_stored_finished_trials(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", grid="tpe"), row("b", grid="tpe", status="stopped"),
                           row("c", grid="tpe", status="failed"), row("d", grid="other")])
    spec = SimpleNamespace(search=[Grid(name="tpe"), Grid(name="big", num_samples=5)],
                           tune=SimpleNamespace(search_config=SimpleNamespace(num_samples=1)))
    tpe, big = optuna_grids(spec, store, include_stopped=True)
    assert (tpe.wanted, tpe.skipped, tpe.remaining, tpe.planned) == (1, 1, 0, 2)
    assert (big.wanted, big.skipped, big.remaining, big.planned) == (5, 0, 5, 5)
    (tpe,) = optuna_grids(SimpleNamespace(search=spec.search[:1], tune=spec.tune), store,
                          include_stopped=False)
    assert len(tpe.finished) == 1


def test_schedulers_rank_on_objectives_without_the_regulariser():
    from orchestrator.schema import fair_objective
    from orchestrator.tune_runner import asha_scheduler
    asha = SimpleNamespace(max_t=5, grace_period=1, reduction_factor=2)
    spec = SimpleNamespace(training={}, tune=SimpleNamespace(
        search_config=SimpleNamespace(scheduler="asha", asha=asha)))
    assert asha_scheduler(spec).metric == "val_clip_loss"  # val_loss carries λ·R_S
    assert fair_objective("best_val_loss") == "best_val_clip_loss"
    assert fair_objective("zs/cifar10/top1") == "zs/cifar10/top1"  # a metric is already fair


def test_task_cost_ranks_the_demos_tasks_longest_first():
    from orchestrator.tune_runner import task_cost

    def task(n, epochs, lam, members=12):
        return [planned(f"{n}-{epochs}-{lam}-{s}", n_train=n, epochs=epochs, batch_size=512,
                        structure_lambda=lam, seed=s) for s in range(members)]
    big, layer_grid, small = task(2000, 75, 10.0), task(500, 300, 0.0), task(50, 300, 10.0)
    costs = [task_cost(t, 2000) for t in (small, big, layer_grid)]
    assert sorted(costs, reverse=True) == [costs[1], costs[2], costs[0]]
    # n_train beyond the split, or None (all pairs), counts the split's pairs
    assert task_cost([planned("all", batch_size=512, epochs=1)], 600) == \
        task_cost([planned("more", n_train=5000, batch_size=512, epochs=1)], 600) == 2 * 512**2 * 3  # λ: 10
