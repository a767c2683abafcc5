"""The science figures' numbers, checked by hand on a store built in the test."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from dashboards import data as D
from tests.dashboards.conftest import (I2T, LAST, SIMILAR, T2I, ZS, build_rows, scaling_value,
                                       similarity_rows, similarity_score, trial_row, write_run)


@pytest.fixture
def run(toy_run):
    return D.load_run(toy_run)


def test_load_run_keeps_every_status_and_done_only_done(run):
    assert set(run.trials["status"]) == {"done", "failed", "stopped"}
    assert set(run.done["status"]) == {"done"}
    assert run.plan["fingerprints"][-1] == "never-ran"


def test_load_run_names_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="no results/ directory"):
        D.load_run(tmp_path)


def test_similarity_matrix_and_special_pairs(run):
    matrix = D.similarity_matrix(run.similarity, "mutual_knn")
    assert matrix.shape == (4, 4)
    assert matrix.loc[1, 2] == pytest.approx(similarity_score(1, 2, "mutual_knn"))
    assert D.special_pairs(matrix) == {"similar": SIMILAR, "last": LAST}
    assert D.run_pairs(run) == {"similar": SIMILAR, "last": LAST}


def test_the_specs_metric_comes_first(run):
    assert D.similarity_metrics(run.similarity, run.spec) == ["mutual_knn", "cka"]
    assert D.similarity_metrics(run.similarity, {"similarity": {"metric": "cka"}})[0] == "cka"


def test_method_labels_name_pairs_and_rs():
    frame = pd.DataFrame([trial_row("a", "g", SIMILAR, 0, 10, 0, 0.1),
                          trial_row("b", "g", LAST, 10, 10, 0, 0.1),
                          trial_row("c", "g", (0, 1), 0, 10, 0, 0.1)])
    pairs = {"similar": SIMILAR, "last": LAST}
    assert list(D.method_labels(frame, pairs)) == [
        "linear + similar", "linear + last + R_S", "linear + L0/T1"]
    frame.loc[2, "config/structure_lambda"] = 1.0  # two different λ > 0: λ is named
    assert list(D.method_labels(frame, pairs))[1:] == [
        "linear + last + R_S(λ=10)", "linear + L0/T1 + R_S(λ=1)"]


def test_similar_wins_when_it_is_also_the_last_pair():
    frame = pd.DataFrame([trial_row("a", "g", (3, 3), 0, 10, 0, 0.1)])
    labels = D.method_labels(frame, {"similar": (3, 3), "last": (3, 3)})
    assert list(labels) == ["linear + similar"]


def test_spearman_and_pearson_equal_scipys(run):
    accuracy = D.layer_accuracy(run.done, ZS)
    matrix = D.similarity_matrix(run.similarity, "mutual_knn")
    points = D.similarity_vs_accuracy(matrix, accuracy)
    assert len(points) == 16  # the layer grid covers every pair
    # The same pairs assembled by hand from the raw rows of the layer grid's setting
    # (linear, λ=0, N=1000), seeds averaged.
    by_pair = {}
    for row in build_rows():
        if (row["config/head"], row["config/structure_lambda"], row["n_train_used"]) == (
                "linear", 0.0, 1000):
            by_pair.setdefault((row["config/image_layer"], row["config/text_layer"]),
                               []).append(row[ZS])
    scores = [similarity_score(i, j, "mutual_knn") for i, j in by_pair]
    accuracies = [np.mean(v) for v in by_pair.values()]
    corr = D.correlation(points)
    rho, rho_p = stats.spearmanr(scores, accuracies)
    r, r_p = stats.pearsonr(scores, accuracies)
    assert corr["spearman_rho"] == pytest.approx(rho, abs=1e-12)
    assert corr["spearman_p"] == pytest.approx(rho_p, rel=1e-9)
    assert corr["pearson_r"] == pytest.approx(r, abs=1e-12)
    assert corr["pearson_p"] == pytest.approx(r_p, rel=1e-9)
    assert corr["n_pairs"] == 16


def test_layer_accuracy_uses_the_setting_covering_most_pairs(run):
    accuracy = D.layer_accuracy(run.done, ZS).set_index(["image_layer", "text_layer"])["accuracy"]
    assert len(accuracy) == 16  # the λ=0, N=1000 layer grid, not the 2-pair scaling grid
    assert accuracy[(0, 1)] == pytest.approx(0.2 + 0.5 * similarity_score(0, 1, "mutual_knn")
                                             + 0.01 * (3 % 5))
    # (2,3) at λ=0, N=1000 has only the grid's seed 0 and the scaling grid's seed 1.
    expected = np.mean([scaling_value(SIMILAR, 0, 1000, s) for s in (0, 1)])
    assert accuracy[SIMILAR] == pytest.approx(expected)


def test_correlation_needs_three_distinct_points():
    two = pd.DataFrame({"score": [0.1, 0.2], "accuracy": [0.3, 0.4]})
    assert D.correlation(two) == {}


def test_scaling_mean_and_std_over_seeds_by_hand(run):
    curves = D.scaling_curves(run.done, ZS, D.run_pairs(run))
    assert set(curves["method"]) == {"linear + similar", "linear + similar + R_S",
                                     "linear + last", "linear + last + R_S"}
    row = curves[(curves["method"] == "linear + similar + R_S") & (curves["n_train"] == 100)]
    seeds = [scaling_value(SIMILAR, 10, 100, s) for s in (0, 1)]
    assert row["mean"].item() == pytest.approx(sum(seeds) / 2)
    assert row["std"].item() == pytest.approx(abs(seeds[0] - seeds[1]) / math.sqrt(2))  # ddof 1
    assert row["count"].item() == 2
    assert row["baseline"].item() == "linear + last"
    # The MLP levels grid ran at one N only: no curve.
    assert not curves["method"].str.startswith("mlp").any()


def test_one_seed_gives_zero_std(tmp_path):
    rows = [trial_row(f"t{n}", "g", LAST, 0, n, 0, 0.1 * k) for k, n in enumerate((10, 100))]
    run = D.load_run(write_run(tmp_path, rows, similarity_rows()))
    curves = D.scaling_curves(run.done, ZS, D.run_pairs(run))
    assert list(curves["std"]) == [0.0, 0.0]


def test_pairs_to_match_interpolates_in_log_n():
    base_n, base_mean = [100, 1000, 10000], [0.2, 0.4, 0.6]
    needed, how = D.pairs_to_match(base_n, base_mean, 0.5)
    assert how == "interpolated"
    assert needed == pytest.approx(10 ** 3.5)  # halfway between 1000 and 10000 in log n
    assert D.pairs_to_match(base_n, base_mean, 0.3)[0] == pytest.approx(10 ** 2.5)
    assert D.pairs_to_match(base_n, base_mean, 0.1) == (100.0, "below")
    needed, how = D.pairs_to_match(base_n, base_mean, 0.7)
    assert how == "above" and math.isnan(needed)


def test_pairs_to_match_takes_the_first_crossing():
    needed, how = D.pairs_to_match([10, 100, 1000, 10000], [0.1, 0.5, 0.3, 0.9], 0.4)
    assert how == "interpolated"
    assert needed == pytest.approx(10 ** 1.75)


def test_label_efficiency_on_a_constructed_curve():
    curves = pd.DataFrame({
        "method": ["lin + last"] * 3 + ["lin + similar"] * 3,
        "baseline": ["lin + last"] * 6,
        "n_train": [100, 1000, 10000] * 2,
        "mean": [0.2, 0.4, 0.6, 0.3, 0.5, 0.7], "std": 0.0, "count": 1})
    eff = D.label_efficiency(curves).set_index("n_train")
    assert list(eff["method"].unique()) == ["lin + similar"]
    assert eff.loc[100, "baseline_n"] == pytest.approx(10 ** 2.5)
    assert eff.loc[100, "ratio"] == pytest.approx(10 ** 0.5)
    assert eff.loc[1000, "ratio"] == pytest.approx(10 ** 0.5)
    assert eff.loc[10000, "how"] == "above"


# --- the paper table -------------------------------------------------------------------

# STRUCTURE main table (METHOD.md §12), the 7 classification columns and Flickr R@1.
PAPER = {"last": [75.6, 85.5, 37.9, 14.8, 34.0, 9.9, 7.0, 32.5, 22.1],
         "similar": [79.7, 89.0, 39.5, 14.6, 33.1, 10.5, 4.9, 35.3, 24.0],
         "similar + R_S": [92.6, 96.3, 56.0, 30.6, 51.3, 24.7, 13.2, 65.8, 53.7]}
SETS = ["stl10", "cifar10", "caltech101", "food101", "cifar100", "imagenet", "pets"]


def paper_rows() -> list[dict]:
    rows = []
    for name, values in PAPER.items():
        pair = SIMILAR if name.startswith("similar") else LAST
        lam = 10.0 if "R_S" in name else 0.0
        row = trial_row(name, "paper", pair, lam, 80000, 0, 0.0)
        row.update({f"zs/{s}/top1": v / 100 for s, v in zip(SETS, values)})
        row.update({"ret/flickr/official/I2T/R@1": values[7] / 100,
                    "ret/flickr/official/T2I/R@1": values[8] / 100})
        for drop in (ZS, I2T, T2I, "zs/toy/top5"):
            row.pop(drop)
        rows.append(row)
    return rows


def test_relative_improvement_reproduces_the_papers_68_4_percent(tmp_path):
    run = D.load_run(write_run(tmp_path, paper_rows(), similarity_rows()))
    table = D.paper_table(run.done, D.run_pairs(run))
    assert list(table.index) == ["linear + last", "linear + similar", "linear + similar + R_S"]
    assert table.attrs["n_train"] == 80000
    # The slide's "68.4% improv.": the mean relative gain over the 7 classification columns.
    assert round(table.loc["linear + similar + R_S", "improv_zs"], 1) == 68.4
    base, rs = np.array(PAPER["last"]), np.array(PAPER["similar + R_S"])
    hand_zs = 100 * np.mean((rs[:7] - base[:7]) / base[:7])
    hand_ret = 100 * np.mean((rs[7:] - base[7:]) / base[7:])
    assert table.loc["linear + similar + R_S", "improv_zs"] == pytest.approx(hand_zs)
    assert table.loc["linear + similar + R_S", "improv_ret"] == pytest.approx(hand_ret)
    assert table.loc["linear + last", "improv_zs"] == 0.0


def test_paper_table_columns_and_values(tmp_path):
    run = D.load_run(write_run(tmp_path, paper_rows(), similarity_rows()))
    columns = D.table_columns(run.done)
    assert [c.dataset for c in columns] == sorted(SETS) + ["flickr", "flickr"]
    assert [c.label for c in columns[-2:]] == ["I2T", "T2I"]
    table = D.paper_table(run.done, D.run_pairs(run))
    assert table.loc["linear + similar", "zs/cifar10/top1"] == pytest.approx(0.890)
    assert table.loc["linear + similar + R_S", "ret/flickr/official/T2I/R@1"] == pytest.approx(0.537)


def test_relative_improvement_without_a_baseline_is_nan():
    table = pd.DataFrame({"a": [0.5]}, index=["mlp + similar"])
    result = D.relative_improvement(table, pd.Series({"mlp + similar": "mlp + last"}))
    assert math.isnan(result["mlp + similar"])


def test_toy_table_is_where_most_methods_ran(run):
    table = D.paper_table(run.done, D.run_pairs(run))
    # N=1000 has the four linear methods and the MLP levels grid; ties would go to the largest.
    assert table.attrs["n_train"] == 1000
    # Paper order per head: the baseline, the similar rows, then the rest.
    assert list(table.index) == ["linear + last", "linear + similar", "linear + similar + R_S",
                                 "linear + last + R_S", "mlp + similar + R_S"]
    expected = np.mean([scaling_value(SIMILAR, 10, 1000, s) for s in (0, 1)])
    assert table.loc["linear + similar + R_S", ZS] == pytest.approx(expected)
    base = np.mean([scaling_value(LAST, 0, 1000, s) for s in (0, 1)])
    hand = 100 * (expected - base) / base
    assert table.loc["linear + similar + R_S", "improv_zs"] == pytest.approx(hand)
    assert math.isnan(table.loc["mlp + similar + R_S", "improv_zs"])  # no "mlp + last" row
    assert table.loc["mlp + similar + R_S", "n_trials"] == 3


def test_table_n_train_ties_go_to_the_largest():
    frame = pd.DataFrame({"method": ["a", "b", "a", "b"], "n_train_used": [10, 10, 100, 100]})
    assert D.table_n_train(frame) == 100


def test_functions_tolerate_a_store_without_optional_columns():
    bare = pd.DataFrame({"fingerprint": ["a"], "status": ["done"]})
    assert D.paper_table(bare, {}).empty
    assert D.scaling_curves(bare, ZS, {}).empty
    assert D.layer_accuracy(bare, ZS).empty
    assert D.similarity_matrix(pd.DataFrame()).empty


def test_rows_built_here_are_the_ones_the_store_returns(run):
    assert len(run.done) == len(build_rows())
