"""dashboards.neighbourhood: the agreement-over-epochs data, apart from its drawing."""

import pandas as pd
import pytest

from dashboards import data as D
from dashboards.neighbourhood import neighbourhood_curves, neighbourhood_section
from orchestrator.results import ResultsStore


def epoch_rows(lam, seed, n=100, epochs=3, base=0.5):
    return [{"row_key": f"{lam}-{seed}-{n}/{e}", "fingerprint": f"{lam}-{seed}-{n}", "epoch": e,
             "structure_lambda": lam, "n_train": n, "seed": seed,
             "nbr_image": base + 0.1 * seed - 0.1 * e * (lam == 0), "nbr_text": 0.3}
            for e in range(epochs)]


def test_curves_average_seeds_per_lambda_and_epoch():
    rows = epoch_rows(0.0, 0) + epoch_rows(0.0, 1) + epoch_rows(10.0, 0) + epoch_rows(10.0, 1)
    curves = neighbourhood_curves(pd.DataFrame(rows))
    image = curves[curves["modality"] == "image"].set_index(["line", "epoch"])
    assert set(curves["line"]) == {"λ=0 (no R_S)", "λ=10 (R_S)"}  # one N: not in the name
    assert image.loc[("λ=0 (no R_S)", 2), "mean"] == pytest.approx(0.55 - 0.2)
    assert image.loc[("λ=10 (R_S)", 2), "mean"] == pytest.approx(0.55)
    assert image.loc[("λ=10 (R_S)", 0), "std"] == pytest.approx(pd.Series([0.5, 0.6]).std())
    assert set(curves["trials"]) == {2}


def test_curves_name_n_when_several_and_skip_missing_values():
    rows = epoch_rows(0.0, 0, n=100) + epoch_rows(1.0, 0, n=None)
    rows[0]["nbr_image"] = None
    curves = neighbourhood_curves(pd.DataFrame(rows))
    assert set(curves["line"]) == {"λ=0 (no R_S), N=100", "λ=1 (R_S), N=all"}
    image0 = curves[(curves["modality"] == "image") & (curves["n_train"] == 100)]
    assert list(image0["epoch"]) == [1, 2] and set(curves["std"]) == {0.0}
    assert neighbourhood_curves(pd.DataFrame()).empty


def test_section_draws_one_figure_from_the_stored_table_or_leaves_a_note(toy_run):
    run = D.load_run(toy_run)
    assert neighbourhood_section(run).note and not neighbourhood_section(run).blocks
    ResultsStore(toy_run).write("epochs", epoch_rows(0.0, 0) + epoch_rows(10.0, 0))
    assert neighbourhood_section(run).figures == 1
