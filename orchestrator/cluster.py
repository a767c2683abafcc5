"""Connecting to Ray: a local cluster on loopback by default, or a given one."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# Set before Ray starts, so every Ray process inherits them:
# - keep a self-started cluster on 127.0.0.1 (all listeners; see ENVIRONMENT.md)
# - no usage reporting, no Tune per-trial logger files (we keep our own store),
#   no periodic Tune experiment checkpoints (resume reads our store instead),
#   no progress bars from transformers in the actors.
QUIET_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_GLOBAL_CHECKPOINT_S": "86400",
    "TUNE_MAX_PENDING_TRIALS_PG": "8",
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # per-epoch reports lack the final metric
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000000",
    "RAY_AIR_NEW_OUTPUT": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
METRICS_INTERVAL_MS = 2000  # how often a local cluster exports metrics (Ray's default: 10 s)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                dashboard: bool = False, metrics_port: int | None = None,
                log=print) -> Iterator[None]:
    """Use the cluster at ``address``, or start a private local one.

    A local cluster listens on 127.0.0.1 only; ``dashboard`` starts the Ray
    dashboard there, ``metrics_port`` fixes the port of its Prometheus
    endpoint (``/metrics``, where the sweep's custom metrics appear). If Ray
    is already initialised (a test or notebook started it) it is used and
    left running.
    """
    import ray

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    context = _init(address, num_cpus, dashboard, metrics_port)
    if dashboard and getattr(context, "dashboard_url", None):
        log(f"Ray dashboard: http://{context.dashboard_url}"
            + ("  (token: ~/.ray/auth_token, or start Ray with RAY_AUTH_MODE=disabled)"
               if os.environ.get("RAY_AUTH_MODE") != "disabled" else ""))
    if metrics_port and not address:
        log(f"Ray metrics: http://127.0.0.1:{metrics_port}/metrics (ray_structure_sweep_*)")
    try:
        yield
    finally:
        ray.shutdown()


def _init(address: str | None, num_cpus: int | None, dashboard: bool, metrics_port: int | None):
    """``ray.init`` of the given cluster, or of a new local one on 127.0.0.1."""
    import ray

    kwargs = dict(include_dashboard=dashboard, log_to_driver=True, logging_level="WARNING",
                  configure_logging=True)
    if address:
        return ray.init(address=address, **kwargs)
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    return ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                    _node_ip_address="127.0.0.1",
                    _system_config={"metrics_report_interval_ms": METRICS_INTERVAL_MS},
                    **extra, **kwargs)
