"""Live progress: the pure state on a fake clock, its plain and rich displays,
the metrics exporter's wiring, and ``status --watch`` on a store filled meanwhile."""

from __future__ import annotations

import json
import threading
import time
from io import StringIO

import pytest
from rich.console import Console

from orchestrator.progress import (LiveDisplay, PlainDisplay, SweepProgress, TrialLine,
                                   format_duration, make_display, render, window_rate)
from orchestrator.results import ResultsStore
from orchestrator.schema import DONE, FAILED, PLAN_FILE, SPEC_FILE, STOPPED
from orchestrator.status import status_view, watch_status

METRIC = "zs/x/top1"


class FakeClock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def progress_at(clock: FakeClock, to_run: int = 10, mode: str = "max") -> SweepProgress:
    progress = SweepProgress(METRIC, mode, clock=clock)
    progress.planned(to_run)
    return progress


def end(progress: SweepProgress, clock: FakeClock, after: float, status=DONE, value=None):
    clock.now += after
    progress.trial_ended(status, {METRIC: value} if value is not None else {})


# --- the state -------------------------------------------------------------------------------

def test_rate_and_eta_follow_ended_trials():
    clock = FakeClock()
    p = progress_at(clock, to_run=10)
    assert p.rate_per_minute is None and p.eta_seconds is None  # nothing started
    p.trial_started()
    p.trial_started()
    assert (p.running, p.pending, p.rate_per_minute) == (2, 10, None)
    for _ in range(4):  # one trial every 15 s: 4 per minute
        end(p, clock, 15)
    assert p.rate_per_minute == pytest.approx(4.0)
    assert p.pending == 6 and p.eta_seconds == pytest.approx(90.0)  # 6 trials at 4/min
    end(p, clock, 15, status=FAILED)  # a failure ends a trial too: it counts in the rate
    assert (p.done, p.failed, p.ended, p.pending) == (4, 1, 5, 5)
    assert p.rate_per_minute == pytest.approx(4.0)


def test_the_rate_window_forgets_an_old_pace():
    clock = FakeClock()
    p = SweepProgress(METRIC, clock=clock, window=60)
    p.planned(100)
    p.trial_started()
    for _ in range(10):  # fast: 10 in the first 10 s
        end(p, clock, 1)
    for _ in range(2):  # then slow: one per 35 s
        end(p, clock, 35)
    assert p.rate_per_minute == pytest.approx(2.0)  # only the last 60 s count


def test_the_progress_rate_counts_as_window_rate_does():
    # SweepProgress counts its (time-ordered) ends by bisection; window_rate counts any list
    clock = FakeClock()
    p = SweepProgress(METRIC, clock=clock, window=60)
    p.planned(1000)
    p.trial_started()
    ends = []
    for step in [0.5] * 50 + [7.0] * 10 + [0.0] * 5 + [61.0] + [2.0] * 3:
        end(p, clock, step)
        ends.append(clock.now)
        clock.now += 0.25  # asked between ends: the window's edge moves
        assert p.rate_per_minute == pytest.approx(window_rate(ends, clock.now, p.started_at, 60))


def test_best_follows_the_mode_and_skips_missing_values():
    clock = FakeClock()
    for mode, values, best in (("max", [0.3, 0.7, 0.5], 0.7), ("min", [0.3, 0.1, 0.5], 0.1)):
        p = progress_at(clock, mode=mode)
        for v in values:
            end(p, clock, 1, value=v)
        end(p, clock, 1, value=float("nan"))
        end(p, clock, 1, status=FAILED, value=9.0)  # a failed trial's numbers never count
        end(p, clock, 1, status=STOPPED)  # a stopped trial without the metric
        assert p.best == best and p.stopped == 1


def test_eta_is_zero_when_everything_ended_and_durations_read_well():
    clock = FakeClock()
    p = progress_at(clock, to_run=1)
    p.trial_started()
    end(p, clock, 5)
    clock.now += 60  # the display stays up a while after the last trial
    assert p.pending == 0 and p.eta_seconds == 0.0 and p.elapsed == 5.0
    assert [format_duration(s) for s in (None, 7, 187, 3725)] == ["–", "7s", "3m 07s", "1h 02m"]
    assert window_rate([], 10.0, 0.0) is None and window_rate([5.0], 10.0, 10.0) is None


# --- plain lines -----------------------------------------------------------------------------

def test_plain_mode_prints_failures_and_rate_limited_summaries():
    clock, lines = FakeClock(), []
    display = PlainDisplay(out=lines.append, interval=10, clock=clock)
    p = progress_at(clock, to_run=4)
    p.trial_started()
    display.changed(p)
    assert lines == []  # a start alone: no summary yet
    with display:
        display.log("[3/3] trials: 4 planned")
        end(p, clock, 1, value=0.5)
        display.log(TrialLine("  [1/4] done layers (1,2) ...", DONE))
        display.changed(p)
        end(p, clock, 1, status=FAILED)
        display.log(TrialLine("  [2/4] FAILED b: ValueError: boom", FAILED))
        display.changed(p)  # 1 s after the first summary: rate-limited
        end(p, clock, 20, value=0.9)
        display.changed(p)  # past the interval: a summary
        end(p, clock, 1, value=0.1)
        display.changed(p)  # the last trial: a summary regardless of the interval
    assert lines[0] == "[3/3] trials: 4 planned"
    assert not any("done layers" in line for line in lines)  # folded into the summaries
    assert "FAILED b: ValueError: boom" in lines[2]
    summaries = [line for line in lines if line.startswith("progress:")]
    assert len(summaries) == 3  # first end, past the interval, last end; exit repeats nothing
    assert "4/4 ended: 3 done, 1 failed" in summaries[-1] and "0 pending" in summaries[-1]
    assert "trials/min" in summaries[-1] and "ETA 0s" in summaries[-1]
    assert f"best {METRIC}=0.9000" in summaries[-1]


def test_auto_mode_is_plain_when_the_output_is_not_a_terminal():
    out = StringIO()
    display = make_display("auto", console=Console(file=out))
    assert isinstance(display, PlainDisplay)
    clock = FakeClock()
    p = progress_at(clock, to_run=2)
    p.trial_started()
    display.log("hello [1/3]")
    end(p, clock, 30, value=0.25)
    display.changed(p)
    text = out.getvalue()
    assert "hello [1/3]\n" in text and "\x1b[" not in text  # as given: no markup, no colours
    assert "1/2 ended" in text and "2.0 trials/min" in text and "ETA 30s" in text


# --- the rich panel ----------------------------------------------------------------------------

def terminal() -> tuple[Console, StringIO]:
    out = StringIO()
    return Console(file=out, force_terminal=True, width=100, color_system=None), out


def test_the_live_panel_shows_counts_rate_eta_best_and_the_last_trial():
    clock = FakeClock()
    p = progress_at(clock, to_run=8)
    p.trial_started()
    for value in (0.4, 0.6):
        end(p, clock, 30, value=value)
    console, out = terminal()
    console.print(render(p, "sweep demo", "[2/8] done layers (3,4) linear"))
    text = out.getvalue()
    for expected in ("sweep demo", "2/8", "25%", "2 done", "6 pending", "2.0 trials/min",
                     "ETA 3m 00s", f"{METRIC} = 0.6000", "[2/8] done layers (3,4) linear"):
        assert expected in text, (expected, text)


def test_live_display_redraws_on_a_terminal_and_prints_failures_above():
    console, out = terminal()
    display = make_display("auto", title="sweep t", console=console)
    assert isinstance(display, LiveDisplay)
    clock = FakeClock()
    p = progress_at(clock, to_run=3)
    with display:
        display.log("[1/3] features")  # before the trial stage: printed, no panel yet
        display.changed(p)
        end(p, clock, 10, value=0.8)
        display.log(TrialLine("  [1/3] done     layers (1,2) linear", DONE))
        end(p, clock, 10, status=FAILED)
        display.log(TrialLine("  [2/3] FAILED f: boom", FAILED))
        display.changed(p)
    text = out.getvalue()
    assert "[1/3] features" in text and "[2/3] FAILED f: boom" in text
    assert "2/3" in text and "1 failed" in text and f"{METRIC} = 0.8000" in text
    assert "last    done     layers (1,2) linear" in text  # in the panel, as the last trial
    assert display._live is None  # stopped on exit


# --- the metrics exporter feeds the same state ---------------------------------------------------

def test_sweep_metrics_export_the_progress_and_tell_the_display(monkeypatch):
    import ray.util.metrics as ray_metrics

    from orchestrator.monitoring import METRICS, PREFIX, SweepMetrics

    values: dict[str, float] = {}

    class Fake:
        def __init__(self, name, description, tag_keys):
            self.name = name

        def set(self, value, tags):
            values[self.name] = value

        def inc(self, value, tags):
            values[self.name] = values.get(self.name, 0) + value

    monkeypatch.setattr(ray_metrics, "Counter", Fake)
    monkeypatch.setattr(ray_metrics, "Gauge", Fake)
    seen, clock = [], FakeClock()
    metrics = SweepMetrics("s", METRIC, "max", on_change=seen.append, clock=clock)
    assert set(metrics.series) == set(METRICS)
    metrics.features(cached=3, computed=1)
    metrics.planned(2)
    metrics.trial_started()
    clock.now += 30
    metrics.trial_ended(DONE, {METRIC: 0.5})
    clock.now += 30
    metrics.trial_ended(FAILED, {})
    got = {name[len(PREFIX):]: v for name, v in values.items()}
    assert got == {"feature_cache_hits": 3, "feature_cache_misses": 1, "trials_running": 0,
                   "trials_pending": 0, "trials_finished": 1, "trials_failed": 1,
                   "trials_per_minute": pytest.approx(2.0), "best_metric": 0.5}
    assert seen and all(s is metrics.progress for s in seen)
    # a task's trials end together: one update of each series and one redraw for all of them
    metrics.planned(5)
    before = len(seen)
    metrics.trials_ended([(DONE, {METRIC: 0.9}), (FAILED, {}), (DONE, {METRIC: 0.1})])
    got = {name[len(PREFIX):]: v for name, v in values.items()}
    assert (got["trials_finished"], got["trials_failed"], got["best_metric"]) == (3, 2, 0.9)
    assert got["trials_pending"] == 0 and len(seen) == before + 1


# --- status --watch ------------------------------------------------------------------------------

def stored_row(fingerprint: str, value: float, now: float) -> dict:
    return {"fingerprint": fingerprint, "grid": "g", "status": DONE, "error": "", METRIC: value,
            "config/image_layer": 1, "config/text_layer": 2, "config/head": "linear",
            "config/structure_lambda": 0.0, "config/n_train": 100, "config/seed": 0,
            "started_at": now - 1.0, "finished_at": now}


def planned_run(tmp_path, n: int):
    (tmp_path / SPEC_FILE).write_text("{}")
    (tmp_path / PLAN_FILE).write_text(json.dumps({"fingerprints": [f"f{i}" for i in range(n)]}))
    return tmp_path


def test_status_view_counts_rate_and_eta_from_the_store(tmp_path):
    run = planned_run(tmp_path, 4)
    assert not status_view(run).finished and "0 done" in status_view(run).text
    now = time.time()
    ResultsStore(run).write("trials", [stored_row("f0", 0.5, now - 29), stored_row("f1", 0.7, now)])
    view = status_view(run, now=now)
    assert (view.planned, view.pending) == (4, 2) and not view.finished
    assert "2 done" in view.text and f"best {METRIC}: 0.7000" in view.text
    assert "rate: 4.0 trials/min" in view.text and "ETA 30s" in view.text  # 2 ended in the 30 s since the first start


def test_watch_stops_once_a_store_filled_meanwhile_has_no_pending_trial(tmp_path):
    run, n = planned_run(tmp_path, 12), 12

    def writer():  # a driver's sink: a part file of two rows at a time
        for k in range(0, n, 2):
            ResultsStore(run).write("trials", [stored_row(f"f{i}", i / n, time.time())
                                               for i in (k, k + 1)])
            time.sleep(0.05)

    thread = threading.Thread(target=writer, daemon=True)
    out = StringIO()
    thread.start()
    try:  # the bound keeps a broken watch from hanging the suite; it is not a timing claim
        finished = watch_status(run, interval=0.05, console=Console(file=out), max_iterations=2000)
    finally:
        thread.join(timeout=60)
    assert finished, out.getvalue()[-2000:]
    last = out.getvalue().rstrip().split("--- ")[-1]
    assert "12 done, 0 stopped early, 0 failed, 0 pending (of 12 planned)" in last


def test_watch_gives_up_after_its_bound_and_waits_for_a_plan(tmp_path):
    (tmp_path / SPEC_FILE).write_text("{}")  # a driver still extracting features
    out, naps = StringIO(), []
    assert watch_status(tmp_path, interval=7, console=Console(file=out), max_iterations=3,
                        sleep=naps.append) is False
    assert naps == [7, 7] and out.getvalue().count("no trials planned yet") == 1  # unchanged text
    with pytest.raises(FileNotFoundError):
        watch_status(tmp_path / "missing", max_iterations=1)


def test_watch_on_a_terminal_redraws_in_place_and_drops_its_hint_when_done(tmp_path):
    run = planned_run(tmp_path, 1)
    console, out = terminal()
    assert watch_status(run, console=console, max_iterations=1) is False  # pending: hint shown
    assert "1 pending" in out.getvalue() and "Ctrl-C to stop" in out.getvalue()
    ResultsStore(run).write("trials", [stored_row("f0", 0.5, time.time())])
    console, out = terminal()
    assert watch_status(run, console=console, max_iterations=1) is True
    assert "0 pending" in out.getvalue() and "Ctrl-C" not in out.getvalue()
