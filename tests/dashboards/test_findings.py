"""The claims the report states, against seed means computed by hand."""

import pandas as pd
import pytest

from dashboards.findings import claims, rs_gain_on_similar, similar_vs_last

METRIC = "zs/set/top1"
PAIRS = {"similar": (3, 4), "last": (5, 5)}


def _trials() -> pd.DataFrame:
    rows = []
    for n, (sim0, sim10, last0) in {50: (0.5, 0.6, 0.2), 2000: (0.8, 0.808, 0.7)}.items():
        for seed, wobble in ((0, -0.01), (1, 0.01)):
            for (i, j), lam, value in (((3, 4), 0, sim0), ((3, 4), 10, sim10), ((5, 5), 0, last0)):
                rows.append({"config/image_layer": i, "config/text_layer": j, "config/head": "linear",
                             "config/structure_lambda": lam, "config/seed": seed, "n_train_used": n,
                             "status": "done", METRIC: value + wobble})
    return pd.DataFrame(rows)


def test_rs_gain_on_the_similar_pair_per_size():
    gain = rs_gain_on_similar(_trials(), PAIRS, METRIC)
    assert list(gain["n_train"]) == [50, 2000]
    assert gain["rel_gain"].tolist() == pytest.approx([100 * 0.1 / 0.5, 100 * 0.008 / 0.8])


def test_similar_against_last_without_rs():
    versus = similar_vs_last(_trials(), PAIRS, METRIC)
    assert versus[["similar", "last"]].to_numpy().ravel().tolist() == pytest.approx([0.5, 0.2, 0.8, 0.7])
    assert versus["seeds"].tolist() == [2, 2]


def test_claims_state_the_numbers():
    text = claims(_trials(), PAIRS, METRIC)
    assert any("+20.0% at N=50" in t and "+1.0% at N=2000" in t for t in text), text
    assert any("beats the last pair (no R_S) at 2 of 2 data sizes" in t for t in text), text
    assert claims(_trials().iloc[0:0], PAIRS, METRIC) == []
