"""The trial worker without Ray or Tune: in-memory features, a plain ``fetch``."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.planning import PlannedTrial
from orchestrator.schema import ASHA_METRIC, DONE, FAILED
from orchestrator.worker import (EPOCHS_JSON, ROWS_JSON, TRIAL_COMPLETE, TrialTask, WorkerContext,
                                 WorkerPayload, final_report, report_rows, run_task)
from trials.config import TrialConfig

LAYERS, DIM = 3, 8


def split(prefix: str, n: int, **extra) -> SplitFeatures:
    return SplitFeatures(image=f"{prefix}/image", text=f"{prefix}/text",
                         text_to_image=np.arange(n), **extra)


def in_memory_features() -> FeatureSet:
    """Store keys of 96 training, 32 validation pairs and two evaluation sets (read by :class:`Fetch`)."""
    return FeatureSet(
        train=split("train", 96), val=split("val", 32),
        zero_shot={"classes": SplitFeatures(image="zs/image", text="zs/prompts",
                                            text_to_image=np.arange(0), labels=np.arange(24) % 4,
                                            n_prompts=[2] * 4)},
        retrieval={"captions": split("ret", 16)}, num_layers=(LAYERS, LAYERS))


@pytest.fixture
def features() -> FeatureSet:
    return in_memory_features()


class Fetch:
    """In-memory layers of every key; records what a task reads."""

    def __init__(self, features: FeatureSet):
        rng = np.random.default_rng(0)
        rows = {"train/image": 96, "train/text": 96, "val/image": 32, "val/text": 32,
                "zs/image": 24, "zs/prompts": 8, "ret/image": 16, "ret/text": 16}
        self.arrays = {key: rng.normal(size=(LAYERS, rows[key], DIM)).astype(np.float32)
                       for key in features.keys()}
        self.calls: set[tuple[str, int]] = set()

    def __call__(self, key: str, layer: int) -> np.ndarray:
        self.calls.add((key, layer))
        return self.arrays[key][layer]


def trial(fingerprint: str, **config) -> PlannedTrial:
    values = dict(image_layer=1, text_layer=2, out_dim=4, epochs=2, batch_size=32, lr=1e-3,
                  patience=2, warmup_steps=1, n_train=64)
    return PlannedTrial(fingerprint, "g", TrialConfig(**{**values, **config}))


def raising(error: BaseException):
    def train(data, config, **kwargs):
        raise error
    return train


def test_a_trial_runs_on_its_two_layers_and_returns_one_row(features):
    fetch = Fetch(features)
    (row,) = run_task(TrialTask((trial("f1"),)), features, fetch)
    assert row["fingerprint"] == "f1" and row["status"] == DONE and row["error"] == ""
    assert 0 <= row["zs/classes/top1"] <= 1 and np.isfinite(row["best_val_loss"])
    assert "ret/captions/standard/I2T/R@1" in row and row["n_train_used"] == 64
    assert row["started_at"] <= row["finished_at"] and row["trial_seconds"] >= 0
    assert isinstance(row["host"], str) and row["host"]
    image_keys = {"train/image", "val/image", "zs/image", "ret/image"}
    assert fetch.calls == {(k, 1 if k in image_keys else 2) for k in features.keys()}


def test_a_deterministic_error_in_a_task_fails_only_its_trial(features):
    """A CSA head wider than the features' rank raises ValueError inside run_trial."""
    task = TrialTask((trial("good"), trial("too-wide", head="csa", out_dim=64), trial("good2")))
    rows = run_task(task, features, Fetch(features))
    assert [r["fingerprint"] for r in rows] == ["good", "too-wide", "good2"]
    assert [r["status"] for r in rows] == [DONE, FAILED, DONE]
    assert "exceeds the data rank" in rows[1]["error"] and "zs/classes/top1" not in rows[1]
    assert rows[0]["error"] == rows[2]["error"] == ""


@pytest.mark.parametrize("error", [ValueError("training diverged at epoch 3"),
                                   FloatingPointError("nan loss")])
def test_deterministic_errors_become_a_failed_row_without_raising(features, error):
    (row,) = run_task(TrialTask((trial("f1"),)), features, Fetch(features), train=raising(error))
    assert row["status"] == FAILED and str(error) in row["error"]
    assert row["fingerprint"] == "f1" and row["trial_seconds"] >= 0


def test_other_errors_of_a_one_trial_task_are_raised_for_tune_to_retry(features):
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        run_task(TrialTask((trial("f1"),)), features, Fetch(features),
                 train=raising(RuntimeError("CUDA out of memory")))


def test_other_errors_in_a_multi_trial_task_fail_only_that_trial(features):
    from trials.trial import run_trial

    def train(data, config, **kwargs):
        if config.seed == 1:
            raise RuntimeError("CUDA out of memory")
        return run_trial(data, config, **kwargs)

    task = TrialTask((trial("a", seed=0), trial("b", seed=1), trial("c", seed=2)))
    rows = run_task(task, features, Fetch(features), train=train)
    assert [r["status"] for r in rows] == [DONE, FAILED, DONE]
    assert "CUDA out of memory" in rows[1]["error"]


@pytest.mark.parametrize("report_epochs", [True, False])
def test_per_epoch_val_loss_is_reported_only_when_asked(features, report_epochs):
    reports = []
    (row,) = run_task(TrialTask((trial("f1", patience=3, epochs=3),)), features, Fetch(features),
                      WorkerContext(report_epochs=report_epochs), report=reports.append)
    assert row["status"] == DONE
    if report_epochs:
        assert [r["epoch"] for r in reports] == list(range(1, row["epochs_run"] + 1))
        assert all(np.isfinite(r["val_loss"]) for r in reports)
        assert all(np.isfinite(r[ASHA_METRIC]) for r in reports)  # the scheduler's metric
    else:
        assert reports == []


def test_a_row_carries_its_recorded_epochs_as_json(features):
    (row,) = run_task(TrialTask((trial("e1", patience=3, epochs=3),)), features, Fetch(features))
    epochs = json.loads(row[EPOCHS_JSON])
    assert [e["epoch"] for e in epochs] == list(range(row["epochs_run"]))
    assert all(0 <= e["nbr_image"] <= 1 and 0 <= e["nbr_text"] <= 1 for e in epochs)
    assert np.isfinite(row["best_val_clip_loss"])


def test_final_report_round_trips_one_or_many_rows():
    one = [{"fingerprint": "a", "status": DONE, "zs/x/top1": 0.5, "best_epoch": 3}]
    assert final_report(one)[TRIAL_COMPLETE] and report_rows(final_report(one)) == one
    many = one + [{"fingerprint": "b", "status": FAILED, "error": "boom"}]
    assert final_report(many)[TRIAL_COMPLETE] and report_rows(final_report(many)) == many


def test_a_final_report_shows_tune_no_metric_but_a_one_row_tasks_objective():
    # Tune keeps (and pickles, at every experiment save) statistics of each number reported:
    # the rows travel as text; a searcher still finds its objective as a number
    one = [{"fingerprint": "a", "status": DONE, "zs/x/top1": 0.5, "best_val_clip_loss": 1.25}]
    assert set(final_report(one)) == {TRIAL_COMPLETE, ROWS_JSON}
    assert final_report(one, "best_val_clip_loss")["best_val_clip_loss"] == 1.25
    failed = [{"fingerprint": "a", "status": FAILED, "error": "boom"}]
    assert set(final_report(failed, "best_val_clip_loss")) == {TRIAL_COMPLETE, ROWS_JSON}
    two = one + [{"fingerprint": "b", "status": DONE, "best_val_clip_loss": 1.0}]
    assert "best_val_clip_loss" not in final_report(two, "best_val_clip_loss")  # grid tasks: no searcher


def test_a_task_names_the_layer_pairs_its_trials_read():
    assert TrialTask((trial("a"), trial("b", seed=3))).pairs == [(1, 2)]
    assert TrialTask((trial("a"), trial("b", image_layer=0), trial("c"))).pairs == [(1, 2), (0, 2)]
    with pytest.raises(ValueError, match="at least one"):
        TrialTask(())


def test_a_task_on_two_layer_pairs_reads_each_pair_once(features):
    fetch, reads = Fetch(features), Counter()

    def counting(key, layer):
        reads[key, layer] += 1
        return fetch(key, layer)
    task = TrialTask((trial("a"), trial("b", image_layer=0, text_layer=0), trial("c", seed=3)))
    rows = run_task(task, features, counting, WorkerContext(pack=False))
    assert [r["status"] for r in rows] == [DONE] * 3
    assert rows[0]["best_val_loss"] != rows[1]["best_val_loss"]  # other layers, other features
    train_reads = {k: v for k, v in reads.items() if k[0].startswith("train/")}
    assert train_reads == {("train/image", 1): 1, ("train/text", 2): 1, ("train/image", 0): 1, ("train/text", 0): 1}


def test_a_grid_payload_maps_a_tune_config_to_its_task(features):
    tasks = (TrialTask((trial("a"),)), TrialTask((trial("b", text_layer=0),)))
    payload = WorkerPayload(features, refs={}, context=WorkerContext(), tasks=tasks)
    assert payload.task({"task": 1}) is tasks[1]
