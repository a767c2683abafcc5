"""The page: which sections carry figures, notes for missing data, writing, --watch."""

import json
import re

import pytest
from plotly.offline import get_plotlyjs

from dashboards import data as D
from dashboards import diagnostics as G
from dashboards import figures as F
from dashboards.report import build_sections, watch, write_report
from orchestrator.cli import build_parser
from tests.dashboards.conftest import build_rows, problem_rows, similarity_rows, write_run

EXPECTED_FIGURES = {"summary": 0, "encoders": 0, "table": 0, "scaling": 1, "layers": 2,
                    "sensitivity": 3, "search": 3, "health": 2,
                    "neighbourhood": 0}  # the toy run has no epochs


def test_every_section_has_its_figures(toy_run):
    sections = {s.key: s for s in build_sections(D.load_run(toy_run))}
    assert {k: s.figures for k, s in sections.items()} == EXPECTED_FIGURES
    assert "68" not in sections["table"].note  # the table is there, not a note
    assert any("<table>" in b for b in sections["table"].blocks if isinstance(b, str))


def test_sections_without_data_get_a_note_and_no_figure(tmp_path):
    run = D.load_run(write_run(tmp_path, problem_rows()[:2], []))  # only failures
    sections = {s.key: s for s in build_sections(run)}
    for key in ("table", "scaling", "layers", "sensitivity", "search"):
        assert sections[key].figures == 0 and sections[key].note, key
        assert not sections[key].blocks
    assert sections["health"].figures == 2  # failures still have a timeline and durations


def test_report_is_self_contained_with_plotly_once(toy_run):
    path = write_report(toy_run)
    assert path == (toy_run / "report.html").resolve()
    text = path.read_text()
    assert text.count("* plotly.js v") == 1
    page = text.replace(get_plotlyjs(), "")  # the library's own strings name URLs it never loads
    assert not re.search(r"<script[^>]*\bsrc=", page) and "https://" not in page
    assert text.count("Plotly.newPlot(") == sum(EXPECTED_FIGURES.values())
    assert "http-equiv='refresh'" not in text
    for key, n in EXPECTED_FIGURES.items():
        assert f"<section id='{key}' data-figures='{n}'>" in text


def test_report_marks_best_cells_and_the_improvement(toy_run):
    text = write_report(toy_run, toy_run / "out.html").read_text()
    table = re.search(r"<section id='table'.*?</section>", text, re.S).group(0)
    assert table.count("class='best'") >= 3  # one per metric column at least
    assert "baseline" in table and "%" in table


def test_parallel_coordinates_are_sampled_and_say_so(tmp_path):
    run = D.load_run(write_run(tmp_path, build_rows(), similarity_rows()))
    frame, categories = G.parallel_data(run.done, G.varied_params(run.done), "zs/toy/top1",
                                        limit=10)
    fig = F.parallel_figure(frame, categories, "zs/toy/top1")
    assert "a random sample of 10 of" in fig.layout.title.text


def test_watch_stops_when_the_plan_is_stored(toy_run):
    plan = json.loads((toy_run / "plan.json").read_text())
    plan["fingerprints"].remove("never-ran")
    (toy_run / "plan.json").write_text(json.dumps(plan))
    logs = []
    path = watch(toy_run, interval=0.01, log=logs.append)
    assert logs == [] and path.is_file()


def test_watch_rewrites_with_a_reload_tag_while_running(toy_run):
    logs, pages = [], []

    def log(line):
        logs.append(line)
        pages.append((toy_run / "report.html").read_text())

    path = watch(toy_run, interval=0.01, max_rounds=2, log=log)
    assert len(logs) == 2 and all("(watching)" in line for line in logs)
    assert all("http-equiv='refresh'" in page for page in pages)
    assert "http-equiv='refresh'" not in path.read_text()  # the final write does not reload


def test_cli_report_takes_watch_and_interval():
    args = build_parser().parse_args(["report", "RUN", "--watch", "--interval", "5"])
    assert args.watch and args.interval == 5.0 and args.output is None
    args = build_parser().parse_args(["report", "RUN", "-o", "x.html"])
    assert not args.watch and args.output == "x.html"


def test_cli_report_writes_the_file(toy_run, capsys):
    args = build_parser().parse_args(["report", str(toy_run), "-o", str(toy_run / "r.html")])
    assert args.func(args) == 0
    assert (toy_run / "r.html").is_file() and "report:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", ["spec.json", "plan.json"])
def test_a_half_written_json_does_not_break_the_report(toy_run, bad):
    (toy_run / bad).write_text("{not json")
    assert write_report(toy_run).is_file()


def test_watch_stops_on_a_finished_optuna_sweep(toy_run):
    """An Optuna plan has no fingerprints, only counts per grid; status, the report's
    counts and --watch share one count (orchestrator.results.plan_progress)."""
    from orchestrator.results import plan_progress
    from orchestrator.status import run_status

    trials = D.load_run(toy_run).trials
    per_grid = trials.groupby("grid").size().to_dict()
    plan = {"fingerprints": [], "optuna": {g: n + (g == next(iter(per_grid))) for g, n in per_grid.items()}}
    (toy_run / "plan.json").write_text(json.dumps(plan))
    assert plan_progress(toy_run, trials) == {"planned": len(trials) + 1, "pending": 1}
    assert G.trial_counts(D.load_run(toy_run))["pending"] == 1
    assert "1 pending" in run_status(toy_run)
    assert watch(toy_run, interval=0.01, max_rounds=2, log=lambda *_: None).is_file()

    plan["optuna"] = per_grid  # every sampled trial stored: the sweep is finished
    (toy_run / "plan.json").write_text(json.dumps(plan))
    assert plan_progress(plan, trials) == {"planned": len(trials), "pending": 0}
    logs = []
    watch(toy_run, interval=0.01, log=logs.append)  # returns at once
    assert logs == []
