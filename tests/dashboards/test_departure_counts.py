"""The summary's "Departures from the official code in this run": counted from the store."""

from __future__ import annotations

import json

from dashboards import data as D
from dashboards.departures import departure_counts, departures_html
from dashboards.report import summary_section
from tests.dashboards.conftest import SPEC, build_rows, similarity_rows, trial_row, write_run


def row(fp: str, lam: float, divergence: str, similarity_n: int, status: str = "done") -> dict:
    return {**trial_row(fp, "g", (2, 3), lam, 1000, 0, 0.5), "status": status,
            "config/structure_divergence": divergence, "similarity_n": similarity_n}


def two_departure_run(tmp_path):
    """The textbook JS (in effect where λ > 0) and the oracle (where a similarity rule
    picked the layers), plus a failed trial that used both and is not counted."""
    trials = [row("a", 10, "js", 100), row("b", 10, "js", 0), row("c", 0, "js", 100),
              row("d", 10, "official", 0), row("e", 10, "official", 100),
              row("failed", 10, "js", 100, status="failed")]
    spec = {**SPEC, "similarity": {**SPEC["similarity"], "selection": "oracle"}}
    return D.load_run(write_run(tmp_path / "run", trials, similarity_rows(), spec=spec))


def test_a_run_lists_exactly_its_two_departures_with_their_counts(tmp_path):
    run = two_departure_run(tmp_path)
    counts = departure_counts(run.all_done, run.spec)
    # js: a, b (c has λ = 0); oracle: a, c, e (b and d picked no layers by similarity)
    assert dict(zip(counts["name"], counts["trials"])) == {"textbook JS divergence": 2,
                                                          "oracle layer selection": 3}
    assert counts.attrs["n_trials"] == 5
    assert list(counts["key"]) == ["structure_divergence", "similarity.selection"]


def test_the_summary_shows_the_departures_table(tmp_path):
    html = "".join(summary_section(two_departure_run(tmp_path)).blocks)
    assert "Departures from the official code in this run" in html
    assert "textbook JS divergence" in html and "2 of 5" in html
    assert "oracle layer selection" in html and "3 of 5" in html
    assert "none: every trial" not in html and "Not departures: tune.pack" in html


def test_a_faithful_run_lists_none(tmp_path):
    trials = [r for r in build_rows() if r["config/head"] == "linear"]
    run = D.load_run(write_run(tmp_path / "run", trials, similarity_rows()))
    counts = departure_counts(run.all_done, run.spec)
    assert counts.empty and counts.attrs["n_trials"] == len(trials)
    html = "".join(summary_section(run).blocks)
    assert f"none: every trial ran the official behaviour ({len(trials):,} finished trials)" in html
    assert "<table>" not in html


def test_default_departures_are_marked_and_head_options_read_from_json(tmp_path):
    """A curated set left at faithful: false departs by default; the MLP head is counted per
    trial, and a res_low_rank gate read from the stored JSON options."""
    trials = [r for r in build_rows() if r["config/head"] == "mlp"]  # 3 trials
    trials[0] = {**trials[0], "config/head": "res_low_rank",
                 "config/head_options": json.dumps({"gate_init": 0.25})}
    spec = {**SPEC, "data": {**SPEC["data"], "train": {"dataset": "curated", "split": "train",
                                                       "options": {"prototypes": "p.npz"}}}}
    run = D.load_run(write_run(tmp_path / "run", trials, similarity_rows(), spec=spec))
    counts = departure_counts(run.all_done, run.spec).set_index("name")
    assert dict(counts["trials"]) == {"plain MLP head (ours)": 2, "res_low_rank gate open": 1,
                                      "curation on float scores": 3}
    assert bool(counts.loc["curation on float scores", "default"])
    assert "= false (the default)" in departures_html(departure_counts(run.all_done, run.spec))


def test_a_run_without_finished_trials_says_so(tmp_path):
    failed = [row("x", 10, "js", 100, status="failed")]
    run = D.load_run(write_run(tmp_path / "run", failed, similarity_rows()))
    assert "no finished trial yet" in departures_html(departure_counts(run.all_done, run.spec))
