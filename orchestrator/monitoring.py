"""Custom Ray metrics of a running sweep (``ray.util.metrics``).

Exported by Ray's metrics agent at ``http://<node>:<metrics_export_port>/metrics``
with a ``ray_`` prefix, e.g. ``ray_structure_sweep_trials_finished{sweep="demo"}``.
Updated by the driver's results sink (``orchestrator.results_sink``); cheap (a few µs per update).
"""

from __future__ import annotations

import math
import time

from orchestrator.schema import FAILED

PREFIX = "structure_sweep_"


class SweepMetrics:
    """Counters and gauges of one sweep, tagged with its name."""

    def __init__(self, sweep: str, metric: str | None = None, mode: str = "max"):
        from ray.util.metrics import Counter, Gauge

        tags = ("sweep",)
        self.tags = {"sweep": sweep}
        self.metric, self.mode = metric, mode
        self.finished = Counter(PREFIX + "trials_finished", "trials finished (done or stopped)", tags)
        self.failed = Counter(PREFIX + "trials_failed", "trials failed after their retries", tags)
        self.running = Gauge(PREFIX + "trials_running", "trials running now", tags)
        self.rate = Gauge(PREFIX + "trials_per_minute", "finished trials per minute", tags)
        self.best = Gauge(PREFIX + "best_metric", "best value of the sweep's objective", tags)
        self.cache_hits = Gauge(PREFIX + "feature_cache_hits", "feature entries read from cache", tags)
        self.cache_misses = Gauge(PREFIX + "feature_cache_misses", "feature entries computed", tags)
        self.pending = Gauge(PREFIX + "trials_pending", "trials not yet finished", tags)
        self._start, self._done, self._running, self._best = time.monotonic(), 0, 0, None
        self._pending = 0
        self.running.set(0, self.tags)

    def features(self, cached: int, computed: int) -> None:
        self.cache_hits.set(cached, self.tags)
        self.cache_misses.set(computed, self.tags)

    def planned(self, pending: int) -> None:
        self._pending = pending
        self.pending.set(pending, self.tags)

    def trial_started(self) -> None:
        self._running += 1
        self.running.set(self._running, self.tags)

    def trial_retried(self) -> None:
        self._running = max(0, self._running - 1)
        self.running.set(self._running, self.tags)

    def trial_ended(self, status: str, result: dict) -> None:
        self._running = max(0, self._running - 1)
        self.running.set(self._running, self.tags)
        if status == FAILED:
            self.failed.inc(1.0, self.tags)
        else:
            self._done += 1
            self.finished.inc(1.0, self.tags)
            value = result.get(self.metric) if self.metric else None
            if isinstance(value, (int, float)) and not math.isnan(value):
                better = self._best is None or (value > self._best if self.mode == "max"
                                                else value < self._best)
                if better:
                    self._best = float(value)
                    self.best.set(self._best, self.tags)
        minutes = max((time.monotonic() - self._start) / 60, 1e-6)
        self.rate.set(self._done / minutes, self.tags)
        self._pending = max(0, self._pending - 1)
        self.pending.set(self._pending, self.tags)
