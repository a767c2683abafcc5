"""The worker with packed trials: the same rows as one by one, failures per member."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from orchestrator.config import SpecError
from orchestrator.features import FeatureSet, trial_data
from orchestrator.schema import DONE, FAILED
from orchestrator.tune_settings import TuneSpec
from orchestrator.worker import EPOCHS_JSON, TrialTask, WorkerContext, pack_cap, plan_packs, run_task
from test_worker import Fetch, in_memory_features, trial  # test_worker's in-memory features

UNPACKED = WorkerContext(pack=False)
TIMING = {"started_at", "finished_at", "trial_seconds", "train_seconds", "host"}


@pytest.fixture
def features() -> FeatureSet:
    return in_memory_features()


def close(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= 1e-5 * max(abs(a), abs(b)) + 1e-7
    return a == b


def mixed_task() -> TrialTask:
    """Two shapes that pack (n_train 64 and 32), an unpackable head, a NaN member."""
    return TrialTask((trial("a", seed=0), trial("b", seed=1, lr=3e-3, structure_lambda=0.0),
                      trial("mlp", head="mlp"), trial("c", seed=2, n_train=32),
                      trial("d", seed=3, temperature=0.1), trial("e", seed=4, n_train=32),
                      trial("nan", seed=5, temperature=1e-45)))


def test_packed_task_gives_the_rows_of_the_unpacked_task(features):
    packed = run_task(mixed_task(), features, Fetch(features))
    alone = run_task(mixed_task(), features, Fetch(features), UNPACKED)
    assert [r["fingerprint"] for r in packed] == [r["fingerprint"] for r in alone] == \
        ["a", "b", "mlp", "c", "d", "e", "nan"]
    assert [r["status"] for r in packed] == [r["status"] for r in alone] == [DONE] * 6 + [FAILED]
    assert "diverged" in packed[-1]["error"] and "diverged" in alone[-1]["error"]
    for row, alone_row in zip(packed, alone):
        assert set(row) == set(alone_row)
        for key in set(alone_row) - TIMING - {"error", EPOCHS_JSON}:
            assert close(row[key], alone_row[key]), (row["fingerprint"], key, row[key], alone_row[key])
        epochs, alone_epochs = json.loads(row[EPOCHS_JSON]), json.loads(alone_row[EPOCHS_JSON])
        assert [e["epoch"] for e in epochs] == [e["epoch"] for e in alone_epochs]
        assert all(close(e["val_loss"], a["val_loss"]) for e, a in zip(epochs, alone_epochs))
    assert all(r["trial_seconds"] >= 0 and r["started_at"] <= r["finished_at"] for r in packed)


def test_plan_packs_groups_equal_shapes_in_task_order_within_pack_size(features):
    task = mixed_task()
    data = trial_data(features, Fetch(features), *task.pairs[0])
    assert plan_packs(task.trials, lambda t: data, WorkerContext()) == [[0, 1, 4, 6], [2], [3, 5]]
    assert plan_packs(task.trials, lambda t: data, WorkerContext(pack_size=2)) == [[0, 1], [2], [3, 5], [4, 6]]
    assert pack_cap(task.trials[0].config, data, "cpu") > 100  # tiny trials: memory is no limit


def test_a_pack_failing_as_a_whole_reruns_its_members_one_by_one(features, monkeypatch):
    import orchestrator.worker as worker

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(worker, "run_pack", out_of_memory)
    task = TrialTask((trial("a", seed=0), trial("b", seed=1)))
    rows = run_task(task, features, Fetch(features))
    assert [r["status"] for r in rows] == [DONE, DONE]
    alone = run_task(task, features, Fetch(features), UNPACKED)
    assert [r["best_val_loss"] for r in rows] == [r["best_val_loss"] for r in alone]


def test_tune_pack_settings_parse_and_check():
    run = TuneSpec.parse({"trials_per_task": 8, "pack": "off", "pack_size": 4}, "tune").run_config
    assert not run.packing and run.pack_size == 4
    assert TuneSpec.parse({}, "tune").run_config.packing  # auto by default
    with pytest.raises(SpecError, match="pack"):
        TuneSpec.parse({"pack": "always"}, "tune")
    with pytest.raises(SpecError, match="pack_size"):
        TuneSpec.parse({"pack_size": 0}, "tune")


def test_tasks_put_trials_of_one_shape_together():
    from orchestrator.planning import PlannedTrial
    from orchestrator.tune_runner import group_tasks
    from trials.config import TrialConfig

    # planned order alternates two shapes (n_train 64 / 32) and an unpackable head
    trials = [PlannedTrial(f"t{i}", "g", TrialConfig(n_train=(64, 32, 64, 32, 64, 32)[i], seed=i,
                                                    head="mlp" if i == 2 else "linear"))
              for i in range(6)]
    tasks = group_tasks(trials, 3)
    assert all(len(task) <= 3 for task in tasks)
    flat = [t for task in tasks for t in task]
    assert sorted(t.fingerprint for t in flat) == [t.fingerprint for t in trials]
    def shapes_of(t):
        return t.config.head, t.config.n_train
    shapes = [shapes_of(t) for t in flat]
    changes = sum(a != b for a, b in zip(shapes, shapes[1:]))
    assert changes == 2 and shapes[-1] == ("mlp", 64)  # each shape contiguous, unpackable last
    assert [t.fingerprint for t in flat if shapes_of(t) == ("linear", 64)] == ["t0", "t4"]  # planned order kept


def cross_pair_task() -> TrialTask:
    """One shape on three layer pairs, λ = 0 and > 0, and a member that stops at once."""
    return TrialTask((trial("a", seed=0), trial("b", seed=1, image_layer=0, text_layer=0),
                      trial("c", seed=2, image_layer=2, text_layer=1, structure_lambda=0.0),
                      trial("d", seed=3, image_layer=0, text_layer=0, patience=1, epochs=1)))


def test_one_shape_on_several_layer_pairs_is_one_pack_with_the_rows_of_each_trial_alone(features, monkeypatch):
    import orchestrator.worker as worker

    packs = []
    real_run_pack = worker.run_pack

    def recording(data, configs, **kwargs):
        packs.append([(c.image_layer, c.text_layer) for c in configs])
        return real_run_pack(data, configs, **kwargs)

    monkeypatch.setattr(worker, "run_pack", recording)
    packed = run_task(cross_pair_task(), features, Fetch(features))
    assert packs == [[(1, 2), (0, 0), (2, 1), (0, 0)]]  # one pack over three layer pairs
    alone = run_task(cross_pair_task(), features, Fetch(features), UNPACKED)
    assert [r["status"] for r in packed] == [r["status"] for r in alone] == [DONE] * 4
    for row, alone_row in zip(packed, alone):
        for key in set(alone_row) - TIMING - {"error", EPOCHS_JSON}:
            assert close(row[key], alone_row[key]), (row["fingerprint"], key, row[key], alone_row[key])
    assert packed[0]["best_val_loss"] != packed[1]["best_val_loss"]


def test_trials_of_different_feature_shapes_never_share_a_pack(features):
    task = cross_pair_task()
    wide = trial_data(features, Fetch(features), 1, 2)
    narrow = dataclasses.replace(wide, train_image=wide.train_image[:, :4], val_image=wide.val_image[:, :4])
    data_of = {(1, 2): wide, (0, 0): narrow, (2, 1): wide}
    units = plan_packs(task.trials, lambda t: data_of[t.config.image_layer, t.config.text_layer], WorkerContext())
    assert units == [[0, 2], [1, 3]]


def test_tasks_gather_one_shape_across_layer_pairs():
    from orchestrator.planning import PlannedTrial
    from orchestrator.tune_runner import group_tasks
    from trials.config import TrialConfig

    trials = [PlannedTrial(f"t{i}", "g", TrialConfig(image_layer=i % 3, text_layer=i % 2, seed=i,
                                                    head="mlp" if i >= 6 else "linear"))
              for i in range(8)]
    tasks = group_tasks(trials, 10)
    # the six linear trials sit on six layer pairs and form one task; the mlp ones go by pair
    assert [[t.fingerprint for t in task] for task in tasks] == [[f"t{i}" for i in range(6)], ["t6"], ["t7"]]
