"""Connecting to Ray: a local cluster on loopback by default, or a given one."""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

# Set before Ray starts, so every Ray process inherits them:
# - keep a self-started cluster on 127.0.0.1 (all listeners; see ENVIRONMENT.md)
# - no usage reporting, no Tune per-trial logger files (we keep our own store),
#   no progress bars from transformers in the actors.
QUIET_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_MAX_PENDING_TRIALS_PG": "8",
    "RAY_AIR_NEW_OUTPUT": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                dashboard: bool = False, log=print) -> Iterator[None]:
    """Use the cluster at ``address``, or start a private local one.

    A local cluster listens on 127.0.0.1 only. If Ray is already initialised
    (e.g. a test or notebook started it) it is used and left running.
    """
    import ray

    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        yield
        return
    kwargs = dict(include_dashboard=dashboard, log_to_driver=True, logging_level="WARNING",
                  configure_logging=True)
    if address:
        context = ray.init(address=address, **kwargs)
    else:
        context = ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1",
                           _node_ip_address="127.0.0.1", **kwargs)
    if dashboard and getattr(context, "dashboard_url", None):
        log(f"Ray dashboard: http://{context.dashboard_url}")
    try:
        yield
    finally:
        ray.shutdown()
