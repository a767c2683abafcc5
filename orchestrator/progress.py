"""Live progress of a sweep's trial stage: the state, and two ways to show it.

:class:`SweepProgress` is the state (counts, rate, ETA, best so far), pure
and driven by the results sink's events (through
:class:`orchestrator.monitoring.SweepMetrics`, which exports the same numbers
to Prometheus). A display shows it:

- :class:`LiveDisplay` (a terminal): one ``rich`` Live panel redrawn in place;
  log lines and failures scroll above it, finished trials do not.
- :class:`PlainDisplay` (CI, ``ray job`` logs, a file): log lines and failures
  as they come, and a summary line with the same numbers at most every
  ``interval`` seconds, so a sweep of thousands of trials logs tens of lines.

Ray-free: ``dashboards`` and tests import it without a cluster.
"""

from __future__ import annotations

import bisect
import math
import re
import time
from collections import deque
from typing import Callable

from orchestrator.schema import FAILED, STOPPED

RATE_WINDOW_S = 600.0  # the rate (and ETA) follows the last 10 minutes of a long sweep
PANEL_WIDTH = 100


class TrialLine(str):
    """A log line about one ended trial. Printed as is by a plain ``log``
    (``print``); a display keeps the line of a finished trial out of the
    scroll (its counts are in the progress) and prints a failure's."""

    status: str

    def __new__(cls, text: str, status: str):
        line = super().__new__(cls, text)
        line.status = status
        return line


def window_rate(end_times, now: float, since: float, window: float = RATE_WINDOW_S) -> float | None:
    """Trials per minute over the last ``window`` seconds (or since ``since``
    when that is later); None before a trial ended or before time passed."""
    if not end_times:
        return None
    return _per_minute(sum(1 for t in end_times if t >= now - window), now, since, window)


def _per_minute(recent: int, now: float, since: float, window: float) -> float | None:
    """``recent`` ends in the window as a rate (see :func:`window_rate`)."""
    span = min(window, now - since)
    return None if span <= 0 else recent * 60.0 / span


def format_duration(seconds: float | None) -> str:
    """``1h 02m``, ``3m 07s``, ``12s``; ``–`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class SweepProgress:
    """Counts, rate, ETA and best objective of one sweep's trial stage.

    Events: :meth:`planned` (trials to run), :meth:`trial_started`,
    :meth:`trial_retried`, :meth:`trial_ended`. ``clock`` is injectable so the
    numbers are testable without waiting.
    """

    def __init__(self, metric: str | None = None, mode: str = "max",
                 clock: Callable[[], float] = time.monotonic, window: float = RATE_WINDOW_S):
        self.metric, self.mode, self.clock, self.window = metric, mode, clock, window
        self.to_run = self.done = self.stopped = self.failed = self.running = 0
        self.best: float | None = None
        self.started_at: float | None = None  # the first trial's start: rate excludes features
        self._ends: deque[float] = deque()

    def planned(self, to_run: int) -> None:
        self.to_run = to_run

    def trial_started(self) -> None:
        if self.started_at is None:
            self.started_at = self.clock()
        self.running += 1

    def trial_retried(self) -> None:
        self.running = max(0, self.running - 1)

    def trials_ended(self, ended: list[tuple[str, dict]]) -> None:
        """Several trials ended at once (the planned trials of one task): (status, result) each."""
        for status, result in ended:
            self.trial_ended(status, result)

    def trial_ended(self, status: str, result: dict) -> None:
        self.running = max(0, self.running - 1)
        now = self.clock()
        if self.started_at is None:  # an end without a start (a task's other trials)
            self.started_at = now
        self._ends.append(now)
        while self._ends and self._ends[0] < now - self.window:
            self._ends.popleft()  # bounded: only the window's ends are kept
        if status == FAILED:
            self.failed += 1
            return
        self.done += 1
        self.stopped += status == STOPPED
        self._consider(result.get(self.metric) if self.metric else None)

    def _consider(self, value) -> None:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
            return
        if self.best is None or (value > self.best if self.mode == "max" else value < self.best):
            self.best = float(value)

    @property
    def ended(self) -> int:
        return self.done + self.failed

    @property
    def pending(self) -> int:
        """Trials to run that have not ended (the running ones included)."""
        return max(0, self.to_run - self.ended)

    @property
    def elapsed(self) -> float:
        """Since the first trial started; stops at the last trial's end."""
        if self.started_at is None:
            return 0.0
        over = self.to_run and self.pending == 0 and self._ends
        return (self._ends[-1] if over else self.clock()) - self.started_at

    @property
    def rate_per_minute(self) -> float | None:
        """Ended trials (done, stopped or failed) per minute, over the rate window."""
        if self.started_at is None or not self._ends:
            return None
        now = self.clock()
        # the ends are in time order: count the window's by bisection, not one by one
        recent = len(self._ends) - bisect.bisect_left(self._ends, now - self.window)
        return _per_minute(recent, now, self.started_at, self.window)

    @property
    def eta_seconds(self) -> float | None:
        """Seconds until the pending trials end at the current rate; None if unknown."""
        if self.pending == 0:
            return 0.0 if self.to_run else None
        rate = self.rate_per_minute
        return self.pending * 60.0 / rate if rate else None

    def summary(self) -> str:
        """One line with every number: what the plain display prints."""
        rate = self.rate_per_minute
        stopped = f" ({self.stopped} stopped early)" if self.stopped else ""
        best = f" | best {self.metric}={self.best:.4f}" if self.best is not None else ""
        return (f"progress: {self.ended}/{self.to_run} ended: {self.done} done{stopped}, "
                f"{self.failed} failed, {self.running} running, {self.pending} pending | "
                f"{'–' if rate is None else f'{rate:.1f}'} trials/min | "
                f"ETA {format_duration(self.eta_seconds)} | "
                f"elapsed {format_duration(self.elapsed)}{best}")


class PlainDisplay:
    """Lines for a log that is not a terminal: every log line and failure, and
    :meth:`SweepProgress.summary` at most every ``interval`` s (and once when
    the last trial ends), instead of a line per finished trial."""

    def __init__(self, out: Callable[[str], None] | None = None, interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.out = out or (lambda line: print(line, flush=True))
        self.interval, self.clock = interval, clock
        self.progress: SweepProgress | None = None
        self._last_print: float | None = None
        self._printed: tuple = ()  # the counts last printed: the exit does not repeat them

    def log(self, line: str) -> None:
        if isinstance(line, TrialLine) and line.status != FAILED:
            return  # counted in the next summary line
        self.out(str(line))

    def changed(self, progress: SweepProgress) -> None:
        self.progress = progress
        if progress.ended == 0:
            return  # a start or the plan: nothing to summarise yet
        now = self.clock()
        last_one = progress.pending == 0
        if last_one or self._last_print is None or now - self._last_print >= self.interval:
            self._print_summary(now)

    def _print_summary(self, now: float) -> None:
        p = self.progress
        counts = (p.to_run, p.done, p.failed, p.running)
        if counts != self._printed:
            self.out(p.summary())
            self._printed, self._last_print = counts, now

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None and self.progress.ended:
            self._print_summary(self.clock())  # the final numbers, if not printed yet


class LiveDisplay:
    """A ``rich`` Live panel on a terminal, redrawn a few times a second (so
    elapsed time and ETA move between events); log lines scroll above it."""

    def __init__(self, console=None, title: str = "sweep", refresh_per_second: float = 4):
        from rich.console import Console

        self.console = console or Console()
        self.title, self.refresh_per_second = title, refresh_per_second
        self.progress: SweepProgress | None = None
        self.last_trial = ""
        self._live = None

    def log(self, line: str) -> None:
        if isinstance(line, TrialLine) and line.status != FAILED:
            # shown in the panel, not scrolled; without the sink's "[n/total]", which
            # counts one Tune run (a wave) while the panel counts the sweep
            self.last_trial = re.sub(r"^\[\d+/\d+\]\s*", "", line.strip())
            return
        style = "red" if isinstance(line, TrialLine) else None
        # markup off: log lines hold brackets ("[1/3]") and user strings
        self.console.print(str(line), markup=False, highlight=False, style=style)

    def changed(self, progress: SweepProgress) -> None:
        self.progress = progress
        if self._live is None and progress.to_run:  # the trial stage has begun
            from rich.live import Live

            self._live = Live(get_renderable=self.renderable, console=self.console,
                              refresh_per_second=self.refresh_per_second, transient=False)
            self._live.start()

    def renderable(self):
        return render(self.progress, self.title, self.last_trial)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.stop()  # leaves the last frame on screen
            self._live = None


def render(progress: SweepProgress, title: str = "sweep", last_trial: str = ""):
    """The Live panel of ``progress``: a bar, counts, rate/ETA, best, last trial."""
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table

    p = progress
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    share = f"{100 * p.ended / p.to_run:.0f}%" if p.to_run else ""
    bar = Table.grid(padding=(0, 1))
    bar.add_row(ProgressBar(total=max(p.to_run, 1), completed=p.ended, width=40),
                f"{p.ended}/{p.to_run}  {share}")
    grid.add_row("trials", bar)
    grid.add_row("", _counts(p))
    rate = p.rate_per_minute
    grid.add_row("rate", f"{'–' if rate is None else f'{rate:.1f}'} trials/min   "
                         f"ETA {format_duration(p.eta_seconds)}   "
                         f"elapsed {format_duration(p.elapsed)}")
    if p.metric:
        grid.add_row("best", f"{p.metric} = {'–' if p.best is None else f'{p.best:.4f}'}")
    if last_trial:
        grid.add_row("last", last_trial)
    # a fixed width (narrowed to the terminal's): the frame does not jump with the last line
    return Panel(grid, title=title, title_align="left", width=PANEL_WIDTH)  # expands to it


def _counts(p: SweepProgress):
    from rich.text import Text

    stopped = f" ({p.stopped} stopped early)" if p.stopped else ""
    return Text.assemble((f"{p.done} done{stopped}", "green"), "  ",
                         (f"{p.running} running", "cyan"), "  ",
                         (f"{p.failed} failed", "red" if p.failed else ""), "  ",
                         f"{p.pending} pending")


def make_display(mode: str = "auto", title: str = "sweep", interval: float = 10.0, console=None):
    """``live`` on a terminal (``auto``), ``plain`` lines elsewhere; both write
    to ``console`` (default: stdout)."""
    from rich.console import Console

    console = console or Console()
    if mode == "auto":
        mode = "live" if console.is_terminal and not console.is_dumb_terminal else "plain"
    if mode == "live":
        return LiveDisplay(console, title)
    return PlainDisplay(out=lambda line: print(line, file=console.file, flush=True),
                        interval=interval)
