"""Distributed, stateful parts of structure-sweep.

Importing the package puts the environment variables that shape Ray in
place, so they are set before any ``import ray`` of every entry point that
goes through it (the ``structure-sweep`` script, ``python -m orchestrator``,
a Ray job whose entrypoint is either, a script that imports ``orchestrator``
first). Ray reads some of them once, when it is imported: setting them later
(e.g. just before ``ray.init``) is too late. ``setdefault``: a value the user
exported wins. Ray processes started afterwards inherit them.
"""

import os

RAY_ENV = {
    # Ray keeps a node whose address is 127.0.0.1 on loopback (gcs_server, raylet,
    # object manager, workers, dashboard agent, metrics, runtime-env agent) only when
    # this is 0 at import; otherwise ray.init rewrites 127.0.0.1 to the routable address
    # and its servers listen on every interface. See orchestrator/cluster.py.
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    # no Tune per-trial logger files (we keep our own store), no periodic Tune
    # experiment checkpoints (resume reads our store instead)
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    "TUNE_GLOBAL_CHECKPOINT_S": "86400",
    "TUNE_MAX_PENDING_TRIALS_PG": "8",
    "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1",  # per-epoch reports lack the final metric
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "1000000",
    "RAY_AIR_NEW_OUTPUT": "0",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # no progress bars from transformers in the actors
}

for _key, _value in RAY_ENV.items():
    os.environ.setdefault(_key, _value)
