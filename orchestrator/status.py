"""``structure-sweep status``: what a run directory holds, read from its store.

Reads files only (``plan.json`` and the results store), so it works while a
driver runs, after it died and with no Ray at all; ``--watch``
(:func:`watch_status`) refreshes it until no planned trial is pending.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from orchestrator.durable import atomic_write_bytes
from orchestrator.progress import RATE_WINDOW_S, format_duration, window_rate
from orchestrator.results import ResultsStore, plan_progress
from orchestrator.schema import (DONE, FAILED, PLAN_FILE, RESULTS_DIR, SPEC_FILE, STOPPED,
                                 headline_metric)


def write_plan(run_dir: Path, fingerprints: list[str], optuna: dict | None = None) -> None:
    """Record the planned fingerprints (grid search) or trial counts per grid
    (Optuna), so status can count what is pending."""
    plan = {"fingerprints": fingerprints, "optuna": optuna or {}}
    atomic_write_bytes(run_dir / PLAN_FILE, json.dumps(plan).encode())


@dataclass
class StatusView:
    """One reading of a run directory: the text and the counts a watch stops on."""

    text: str
    planned: int
    pending: int
    has_plan: bool  # plan.json written: the trial stage has begun at least once

    @property
    def finished(self) -> bool:
        return self.has_plan and self.pending == 0


def run_status(run_dir: Path) -> str:
    return status_view(run_dir).text


def status_view(run_dir: Path, now: float | None = None) -> StatusView:
    """Counts, rate/ETA, best and the first failures of ``run_dir``'s store."""
    has_plan = (run_dir / PLAN_FILE).is_file()
    if not (run_dir / RESULTS_DIR).is_dir() and not has_plan:
        if (run_dir / SPEC_FILE).is_file():  # a driver that has not reached the trials yet
            return StatusView(f"run: {run_dir}\nno trials planned yet (features and layer "
                              "similarity come first)", 0, 0, False)
        raise FileNotFoundError(f"{run_dir} is not a run directory (no results/ or {PLAN_FILE}); "
                                "pass the directory that `structure-sweep run` printed")
    trials = ResultsStore(run_dir).query("trials")
    progress = plan_progress(run_dir, trials)
    pending, n_planned = progress["pending"], progress["planned"]
    lines = [f"run: {run_dir}", _counts_line(trials, pending, n_planned)]
    lines += _rate_lines(trials, pending, time.time() if now is None else now)
    lines += _best_lines(trials) + _failure_lines(trials)
    return StatusView("\n".join(lines), n_planned, pending, has_plan)


def _with_status(trials: pd.DataFrame, status: str) -> pd.DataFrame:
    return trials[trials["status"] == status] if not trials.empty else trials


def _counts_line(trials: pd.DataFrame, pending: int, n_planned: int) -> str:
    done, stopped, failed = (len(_with_status(trials, s)) for s in (DONE, STOPPED, FAILED))
    return (f"trials: {done} done, {stopped} stopped early, {failed} failed, {pending} pending"
            + (f" (of {n_planned} planned)" if n_planned else ""))


def _rate_lines(trials: pd.DataFrame, pending: int, now: float) -> list[str]:
    """Trials per minute from the stored end times of the last few minutes, and
    the ETA of the pending ones; nothing once no trial ended recently (no driver)."""
    if pending == 0 or "finished_at" not in trials or "started_at" not in trials:
        return []
    recent = trials[trials["finished_at"] >= now - RATE_WINDOW_S]  # NaN (failed rows) drop out
    if recent.empty:
        return []
    rate = window_rate(list(recent["finished_at"]), now, float(recent["started_at"].min()))
    if not rate:
        return []
    return [f"rate: {rate:.1f} trials/min over the last {RATE_WINDOW_S / 60:.0f} min, "
            f"ETA {format_duration(pending * 60.0 / rate)}"]


def _best_lines(trials: pd.DataFrame) -> list[str]:
    done = _with_status(trials, DONE)
    metric = headline_metric(done)
    if not metric:
        return []
    best = done.loc[done[metric].idxmax()]
    return [f"best {metric}: {best[metric]:.4f}  (layers {best['config/image_layer']},"
            f"{best['config/text_layer']}, head {best['config/head']}, "
            f"λ={best['config/structure_lambda']:g}, n_train={best['config/n_train']}, "
            f"seed={best['config/seed']})"]


def _failure_lines(trials: pd.DataFrame) -> list[str]:
    lines = []
    for _, row in _with_status(trials, FAILED).head(5).iterrows():
        last = (row["error"] or "").strip().splitlines()[-1:] or [""]
        lines.append(f"failed {row['fingerprint']}: {last[0][:200]}")
    return lines


def watch_status(run_dir: Path, interval: float = 5.0, console=None,
                 max_iterations: int | None = None, sleep=time.sleep) -> bool:
    """Show :func:`status_view` every ``interval`` s until no planned trial is
    pending (True) or after ``max_iterations`` readings (False; a test's bound).

    On a terminal the view is redrawn in place (``rich`` Live); elsewhere a
    reading is printed when its text changed.
    """
    from rich.console import Console

    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist")
    console = console or Console()
    show = _LiveView(console) if console.is_terminal else _PlainView(console)
    with show:
        for count in itertools.count(1):
            view = status_view(run_dir)
            show(view.text, view.finished)
            if view.finished or (max_iterations is not None and count >= max_iterations):
                return view.finished
            sleep(interval)


class _PlainView:
    def __init__(self, console):
        self.console, self.last = console, None

    def __call__(self, text: str, final: bool = False) -> None:
        if text != self.last:
            self.console.print(f"--- {time.strftime('%H:%M:%S')}\n{text}", markup=False,
                               highlight=False, soft_wrap=True)
            self.last = text

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


class _LiveView:
    def __init__(self, console):
        from rich.live import Live

        self.live = Live(console=console, auto_refresh=False)

    def __call__(self, text: str, final: bool = False) -> None:
        from rich.text import Text

        hint = "" if final else "\n(refreshing; Ctrl-C to stop)"
        self.live.update(Text(text + hint), refresh=True)

    def __enter__(self):
        self.live.start()
        return self

    def __exit__(self, *exc):
        self.live.stop()
