"""Custom Ray metrics of a running sweep (``ray.util.metrics``).

Exported by Ray's metrics agent at ``http://<node>:<metrics_export_port>/metrics``
with a ``ray_`` prefix, and a ``_total`` suffix on counters, e.g.
``ray_structure_sweep_trials_finished_total{sweep="demo"}`` (see
:func:`exported_name`). Updated by the driver's results sink
(``orchestrator.results_sink``); cheap (a few µs per update).

:data:`METRICS` is the one list of them: the metrics are created from it and
the Grafana dashboard (``dashboards/grafana.py``) is generated from it. This
module imports Ray only inside :class:`SweepMetrics`, so the dashboard
generator reads the table without Ray.
"""

from __future__ import annotations

import time
from typing import Callable

from orchestrator.progress import SweepProgress
from orchestrator.schema import FAILED

PREFIX = "structure_sweep_"
COUNTER, GAUGE = "counter", "gauge"
TAGS = ("sweep",)

# name (without PREFIX) -> (kind, description)
METRICS: dict[str, tuple[str, str]] = {
    "trials_finished": (COUNTER, "trials finished (done or stopped)"),
    "trials_failed": (COUNTER, "trials failed after their retries"),
    "trials_running": (GAUGE, "trials running now"),
    "trials_pending": (GAUGE, "trials of this run not yet ended (running ones included)"),
    "trials_per_minute": (GAUGE, "trials ended per minute over the last 10 minutes"),
    "best_metric": (GAUGE, "best value so far of the sweep's objective (tune.metric)"),
    "feature_cache_hits": (GAUGE, "feature entries read from cache"),
    "feature_cache_misses": (GAUGE, "feature entries computed"),
}


def exported_name(name: str) -> str:
    """The Prometheus series of a :data:`METRICS` entry: Ray prefixes ``ray_``
    and its exporter suffixes counters with ``_total``."""
    kind, _ = METRICS[name]
    return f"ray_{PREFIX}{name}" + ("_total" if kind == COUNTER else "")


class SweepMetrics:
    """The sweep's events -> :class:`SweepProgress` -> Ray counters and gauges.

    ``on_change(progress)`` is called after every trial event (the CLI's live
    display); the progress state is the one count behind both.
    """

    def __init__(self, sweep: str, metric: str | None = None, mode: str = "max",
                 on_change: Callable[[SweepProgress], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        from ray.util.metrics import Counter, Gauge

        kinds = {COUNTER: Counter, GAUGE: Gauge}
        self.series = {name: kinds[kind](PREFIX + name, description, TAGS)
                       for name, (kind, description) in METRICS.items()}
        self.tags = {"sweep": sweep}
        self.progress = SweepProgress(metric, mode, clock=clock)
        self.on_change = on_change
        self._set("trials_running", 0)

    def _set(self, name: str, value: float) -> None:
        self.series[name].set(value, self.tags)

    def features(self, cached: int, computed: int) -> None:
        self._set("feature_cache_hits", cached)
        self._set("feature_cache_misses", computed)

    def planned(self, pending: int) -> None:
        self.progress.planned(pending)
        self._changed()

    def trial_started(self) -> None:
        self.progress.trial_started()
        self._changed()

    def trial_retried(self) -> None:
        self.progress.trial_retried()
        self._changed()

    def trial_ended(self, status: str, result: dict) -> None:
        self.trials_ended([(status, result)])

    def trials_ended(self, ended: list[tuple[str, dict]]) -> None:
        """Trials that ended together (a task's): one update of each series, one ``on_change``."""
        self.progress.trials_ended(ended)
        failed = sum(status == FAILED for status, _ in ended)
        for counter, count in (("trials_failed", failed), ("trials_finished", len(ended) - failed)):
            if count:
                self.series[counter].inc(float(count), self.tags)
        self._changed()

    def _changed(self) -> None:
        p = self.progress
        self._set("trials_running", p.running)
        self._set("trials_pending", p.pending)
        if p.rate_per_minute is not None:
            self._set("trials_per_minute", p.rate_per_minute)
        if p.best is not None:
            self._set("best_metric", p.best)
        if self.on_change is not None:
            self.on_change(p)
