"""'Which encoders to align': the encoder-pair figure data, checked by hand."""

import pandas as pd
import pytest

from dashboards import data as D
from dashboards import encoders as E
from dashboards.report import build_sections
from orchestrator.results import ResultsStore
from tests.dashboards.conftest import SPEC, ZS, trial_row, write_run

# Four candidate pairs; planted: CKA falls with the index, and so does what the pair reaches.
PAIRS = [("img-a", "txt-a"), ("img-a", "txt-b"), ("img-b", "txt-a"), ("img-b", "txt-b")]
SCORES = [0.8, 0.6, 0.4, 0.2]
LAST = [0.7, 0.3, 0.5, 0.1]  # the last layers rank the middle two the other way round
BEST = [0.9, 0.7, 0.5, 0.3]


def selection_rows(key="sel-1", written_at=2.0, pairs=PAIRS) -> list[dict]:
    return [{"row_key": f"{key}/{k}", "selection_key": key, "pair_key": f"p{k}",
             "image_encoder": i, "text_encoder": t, "protocol": "per_layer", "metric": "cka",
             "image_layer": 2, "text_layer": 3, "score": SCORES[k], "last_score": LAST[k],
             "rank": k + 1, "written_at": written_at} for k, (i, t) in enumerate(pairs)]


def pair_trials(trained=PAIRS) -> list[dict]:
    """Two trials per trained pair: its best value and 0.1 below it."""
    rows = []
    for k, pair in enumerate(PAIRS):
        if pair not in trained:
            continue
        for seed, value in ((0, BEST[k]), (1, BEST[k] - 0.1)):
            row = trial_row(f"{pair}-{seed}", "g", (2, 3), 0, 1000, seed, value)
            rows.append({**row, "image_encoder": pair[0], "text_encoder": pair[1]})
    return rows


def test_each_pair_gets_its_scores_and_best_metric():
    frame = E.encoder_alignment(pd.DataFrame(selection_rows()), pd.DataFrame(pair_trials()), ZS)
    assert list(frame["pair"]) == [f"{i} + {t}" for i, t in PAIRS]
    assert list(frame["best"]) == pytest.approx(BEST)
    assert list(frame["n_trials"]) == [2, 2, 2, 2] and list(frame["rank"]) == [1, 2, 3, 4]
    assert E.rank_correlation(frame)["spearman_rho"] == pytest.approx(1.0)
    last = E.rank_correlation(frame, "last_score")
    assert last["spearman_rho"] == pytest.approx(0.8) and last["n_pairs"] == 4


def test_untrained_pairs_are_kept_without_a_best_and_correlation_needs_three():
    trained = PAIRS[:2]
    frame = E.encoder_alignment(pd.DataFrame(selection_rows()), pd.DataFrame(pair_trials(trained)), ZS)
    assert frame["best"].isna().tolist() == [False, False, True, True]
    assert list(frame["n_trials"]) == [2, 2, 0, 0]
    assert E.rank_correlation(frame) == {}  # two pairs: ρ undefined


def test_pairs_trained_without_a_selection_still_compare():
    frame = E.encoder_alignment(pd.DataFrame(), pd.DataFrame(pair_trials()), ZS)
    assert len(frame) == 4 and frame["score"].isna().all()
    assert frame.iloc[0]["pair"] == "img-a + txt-a"  # the best first
    assert E.encoder_alignment(pd.DataFrame(), pd.DataFrame(pair_trials(PAIRS[:1])), ZS).empty


def test_the_latest_ranking_wins_and_the_focus_is_its_best_trained_pair():
    old = selection_rows("sel-0", 1.0, list(reversed(PAIRS)))
    latest = E.latest_selection(pd.DataFrame(old + selection_rows()))
    assert set(latest["selection_key"]) == {"sel-1"} and list(latest["rank"]) == [1, 2, 3, 4]
    trials = pd.DataFrame(pair_trials(PAIRS[1:]))
    assert E.focus_pair(trials, latest) == PAIRS[1]  # rank 1 was not trained
    assert E.focus_pair(pd.DataFrame(pair_trials(PAIRS[:1])), latest) is None  # one pair: no focus
    assert len(E.of_pair(trials, PAIRS[2])) == 2 and len(E.of_pair(trials, None)) == 6


def test_a_multi_encoder_run_reports_every_pair_and_one_pair_below(tmp_path):
    run_dir = write_run(tmp_path / "run", pair_trials(), [], spec={**SPEC, "encoder_selection": {"metric": "cka"}})
    ResultsStore(run_dir).write("encoder_pairs", selection_rows())
    run = D.load_run(run_dir)
    assert run.focus == PAIRS[0] and len(run.all_done) == 8 and len(run.done) == 2
    sections = {s.key: s for s in build_sections(run)}
    assert sections["encoders"].figures == 1
    assert "Spearman ρ (best layer pair) = 1.000" in sections["encoders"].lead
    assert "img-a + txt-a" in sections["encoders"].lead  # the pair the other sections show
    assert sections["table"].blocks
    assert D.paper_table(run.done, {})[ZS].tolist() == pytest.approx([0.85])  # one pair's 2 seeds, not 4 pairs
