"""Per-trial layer selection in the report: each trial beside the matrix of its own data."""

import pandas as pd
import pytest

from dashboards import data as D
from dashboards.report import layers_section, render_html
from tests.dashboards.conftest import LAST, SIMILAR, SPEC, ZS, grid_accuracy, trial_row, write_run

SMALL_BEST = (1, 1)  # where the N=100 subsamples' matrices peak (the full data: SIMILAR)
PER_TRIAL = {**SPEC, "similarity": {**SPEC["similarity"], "selection": "per_trial"}}


def _score(i: int, j: int, best: tuple) -> float:
    return 1.0 / (1.0 + abs(i - best[0]) + abs(j - best[1]))


def _matrix_rows(n: int, seed: int, best: tuple, selection: str = "per_trial") -> list[dict]:
    key = f"{selection}-{n}-{seed}"
    return [{"row_key": f"{key}/{i}/{j}", "similarity_key": key, "metric": "mutual_knn", "k": "10",
             "k_value": 10, "n_samples": 100, "selection": selection, "n_train": n, "seed": seed,
             "similarity_n": min(n, 100), "image_layer": i, "text_layer": j,
             "score": _score(i, j, best)}
            for i in range(4) for j in range(4)]


def _per_trial_run(tmp_path):
    """N=100 subsamples select SMALL_BEST, N=1000 select SIMILAR; a layer grid at N=1000 seed 0.
    The last matrix written is a small one: a run-wide 'last written' matrix would be wrong."""
    similarity = (_matrix_rows(1000, 0, SIMILAR) + _matrix_rows(1000, 1, SIMILAR)
                  + _matrix_rows(100, 0, SMALL_BEST) + _matrix_rows(100, 1, SMALL_BEST))
    trials = [trial_row(f"grid-{i}-{j}", "layer-grid", (i, j), 0, 1000, 0, grid_accuracy(i, j))
              for i in range(4) for j in range(4)]
    for n, best in ((100, SMALL_BEST), (1000, SIMILAR)):
        for seed in (0, 1):
            for rule, pair, value in (("similar", best, 0.5), ("last", LAST, 0.3)):
                if (n, seed) != (1000, 0):  # that one is the layer grid's trial
                    trials.append({**trial_row(f"{rule}-{n}-{seed}", "scaling", pair, 0, n, seed,
                                               value), "layer_rule": rule})
    trials.append(trial_row("other-100", "scaling", SIMILAR, 0, 100, 0, 0.4))  # not small's pick
    return D.load_run(write_run(tmp_path / "run", trials, similarity, spec=PER_TRIAL))


def test_each_trial_is_labelled_by_its_own_selection(tmp_path):
    run = _per_trial_run(tmp_path)
    labels = D.with_methods(run.done, D.run_pairs(run)).set_index("fingerprint")["layer"]
    assert labels["similar-100-0"] == labels["similar-100-1"] == "similar"  # on (1, 1)
    assert labels["similar-1000-1"] == labels["grid-2-3"] == "similar"  # on (2, 3)
    assert labels["other-100"] == "L2/T3"  # (2, 3) is not what N=100 selects
    assert labels["grid-1-1"] == "L1/T1"  # nor is (1, 1) at N=1000
    assert labels["last-100-0"] == "last"
    own = D.own_pairs(run.done, run.similarity, run.spec).set_index(run.done["fingerprint"])
    assert tuple(own.loc["similar-100-1", ["similar/image_layer", "similar/text_layer"]]) == SMALL_BEST


def test_scaling_curves_follow_each_sizes_own_similar_pair(tmp_path):
    run = _per_trial_run(tmp_path)
    curves = D.scaling_curves(run.done, ZS, D.run_pairs(run))
    similar = curves[curves["method"] == "linear + similar"].set_index("n_train")
    assert similar.loc[100, "mean"] == pytest.approx(0.5) and similar.loc[100, "count"] == 2


def test_the_layer_figure_uses_the_matrix_of_the_grids_own_subsample(tmp_path):
    run = _per_trial_run(tmp_path)
    accuracy = D.layer_accuracy(run.done, ZS)  # its setting also holds 2 pairs of seed 1
    assert accuracy.attrs == {"n_train": 1000, "seeds": [0]}  # the seed of the whole grid
    matrix = D.similarity_matrix(run.similarity, "mutual_knn", selection="per_trial",
                                 n_train=1000, seeds=[0])
    assert matrix.loc[2, 3] == pytest.approx(1.0) and matrix.attrs["n_train"] == 1000
    assert D.special_pairs(matrix)["similar"] == SIMILAR
    small = D.similarity_matrix(run.similarity, "mutual_knn", selection="per_trial",
                                n_train=100, seeds=[0, 1])
    assert D.special_pairs(small)["similar"] == SMALL_BEST and small.attrs["seeds"] == [0, 1]
    assert D.similarity_matrix(run.similarity, "mutual_knn", n_train=500, seeds=[0], strict=True).empty
    section = layers_section(run, D.run_pairs(run))
    assert "(N = 1,000, seed 0): most similar pair image layer 2, text layer 3" in section.lead
    assert "Spearman" in section.lead
    assert "N = 1,000, seed 0" in render_html(run)


def test_without_a_matching_matrix_the_overall_one_is_used(tmp_path):
    run = _per_trial_run(tmp_path)
    overall = D.similarity_matrix(run.similarity, "mutual_knn", selection="per_trial")
    assert overall.attrs["n_train"] == 1000  # the largest subsample, not the last written
    frame = pd.DataFrame([trial_row("x", "g", SIMILAR, 0, 300, 0, 0.1)])  # no (300, 0) matrix
    frame = frame.join(D.own_pairs(frame, run.similarity, run.spec))
    assert frame["similar/image_layer"].isna().all()
    assert list(D.layer_labels(frame, D.run_pairs(run))) == ["similar"]


def test_an_oracle_run_has_one_matrix_for_every_trial(tmp_path):
    similarity = _matrix_rows(4000, 0, SIMILAR, selection="oracle")
    trials = [trial_row("a", "g", SIMILAR, 0, 100, 1, 0.2)]
    spec = {**SPEC, "similarity": {**SPEC["similarity"], "selection": "oracle"}}
    run = D.load_run(write_run(tmp_path / "run", trials, similarity, spec=spec))
    assert run.done["similar/image_layer"].isna().all()
    assert list(D.with_methods(run.done, D.run_pairs(run))["layer"]) == ["similar"]
    matrix = D.similarity_matrix(run.similarity, "mutual_knn", selection="oracle", n_train=100,
                                 seeds=[1])
    assert matrix.attrs["selection"] == "oracle"
