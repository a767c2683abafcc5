"""Summary, sensitivity, search and health figure data, checked by hand."""

import numpy as np
import pandas as pd
import pytest

from dashboards import data as D
from dashboards import diagnostics as G
from tests.dashboards.conftest import LAST, SIMILAR, ZS, scaling_value


@pytest.fixture
def run(toy_run):
    return D.load_run(toy_run)


def test_trial_counts_include_stopped_and_pending(run):
    counts = G.trial_counts(run)
    assert counts["done"] == len(run.done)
    assert (counts["failed"], counts["stopped"], counts["other"]) == (2, 1, 0)
    assert counts["planned"] == len(run.trials) + 1 and counts["pending"] == 1


def test_summary_names_spec_encoders_and_datasets(run):
    s = G.summary(run)
    assert s["source"] == "search_spaces/toy.yaml"
    assert s["fingerprint"] == G.spec_fingerprint(dict(reversed(list(run.spec.items()))))
    assert s["encoders"][0] == "image: synthetic:image (layers=4)"
    assert s["datasets"] == ["train: synthetic (train)", "zero_shot: toy (test)"]
    assert "pandas" in s["versions"] and "python" in s["versions"]
    assert s["time"]["wall_seconds"] == pytest.approx(
        run.trials["finished_at"].max() - run.trials["started_at"].min())


def test_lambda_sensitivity_by_hand(run):
    curve = G.sensitivity(run.done, D.run_pairs(run), D.LAMBDA, ZS)
    # Every N varies λ on both linear families (the MLP has one λ): the tie goes to the largest.
    assert curve.attrs["n_train"] == 10000
    assert set(curve["line"]) == {"linear + last", "linear + similar"}
    row = curve[(curve["line"] == "linear + last") & (curve["value"] == 10)]
    assert row["mean"].item() == pytest.approx(
        np.mean([scaling_value(LAST, 10, 10000, s) for s in (0, 1)]))
    assert row["count"].item() == 2
    assert set(curve["value"]) == {0.0, 10.0}


def test_levels_sensitivity_only_where_levels_vary(run):
    curve = G.sensitivity(run.done, D.run_pairs(run), G.LEVELS, ZS, only_rs=True)
    assert set(curve["line"]) == {"mlp + similar"} and curve.attrs["n_train"] == 1000
    assert list(curve["mean"]) == pytest.approx([0.51, 0.52, 0.53])


def test_rs_gain_is_the_relative_gain_of_seed_means(run):
    gain = G.rs_gain(run.done, D.run_pairs(run), ZS)
    row = gain[(gain["family"] == "linear + similar") & (gain["n_train"] == 100)]
    without = np.mean([scaling_value(SIMILAR, 0, 100, s) for s in (0, 1)])
    with_rs = np.mean([scaling_value(SIMILAR, 10, 100, s) for s in (0, 1)])
    assert row["gain"].item() == pytest.approx(with_rs - without)
    assert row["rel_gain"].item() == pytest.approx(100 * (with_rs - without) / without)
    assert sorted(gain["n_train"].unique()) == [100, 1000, 10000]


def test_varied_params_skip_constants(run):
    params = G.varied_params(run.done)
    assert {"config/image_layer", "config/structure_lambda", "config/seed"} <= set(params)
    assert "config/lr" not in params and "config/head_options" not in params


def test_parallel_data_samples_and_codes_categories(run):
    params = ["config/head", "config/n_train"]
    frame, categories = G.parallel_data(run.done, params, ZS, limit=10)
    assert len(frame) == 10 and frame.attrs["total"] == len(run.done)
    assert list(categories) == ["config/head"]  # the string column is coded, n_train is not
    assert set(categories["config/head"]) <= {"linear", "mlp"}
    assert set(frame["config/head"]) <= {0, 1}


def test_param_importance_ranks_the_parameter_that_drives_the_metric():
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"config/a": rng.integers(0, 4, 400), "config/b": rng.integers(0, 4, 400)})
    frame["m"] = frame["config/a"] + 0.01 * rng.normal(size=400)
    importance = G.param_importance(frame, ["config/a", "config/b"], "m")
    assert importance.index[0] == "a"
    assert importance.sum() == pytest.approx(1.0)
    assert importance["a"] > 0.8


def test_histogram_counts_every_value_once():
    values = pd.Series([0.0, 0.1, 0.5, 0.9, 1.0, np.nan])
    hist = G.histogram(values, pd.Series(["x", "y", "x", "x", "y", "y"]), bins=4)
    assert hist["count"].sum() == 5
    assert hist.groupby("group")["count"].sum().to_dict() == {"x": 3, "y": 2}


def test_timeline_is_cumulative_and_downsampled(run):
    tl = G.timeline(run.trials, points=5)
    done = tl[tl["status"] == "done"]
    assert len(done) == 5 and done["count"].iloc[-1] == len(run.done)
    assert done["count"].is_monotonic_increasing


def test_failures_are_grouped_by_last_error_line(run):
    fails = G.failures(run.trials)
    assert len(fails) == 1
    row = fails.iloc[0]
    assert row["error"] == "RuntimeError: CUDA out of memory" and row["count"] == 2
    assert row["grids"] == "data-scaling" and "Traceback" in row["detail"]


def test_durations_fall_back_to_timestamps_for_failures(run):
    seconds = G.trial_seconds(run.trials)
    failed = run.trials["status"] == "failed"
    assert list(seconds[failed]) == [5.0, 5.0]
    hist = G.durations(run.trials)
    assert hist["count"].sum() == len(run.trials)
    assert G.duration_stats(run.trials)["max"] == 5.0
