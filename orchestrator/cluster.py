"""Connecting to Ray: a local cluster on loopback by default, or a given one.

What decides where a local cluster listens (Ray 2.60, read in its source and
measured with ``ss -ltnp``): every Ray server binds according to the *node
address* of its node. With a loopback node address, gcs_server, raylet (node
manager and object manager), the core workers (driver included), the
dashboard agent (gRPC and HTTP), the runtime-env agent and the metrics
exporter all listen on 127.0.0.1; with any other node address the gRPC
servers listen on every interface (``0.0.0.0``) and the agents on the node
address. ``ray.init(_node_ip_address="127.0.0.1")`` keeps a loopback node
address only if ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` was ``0`` when ``ray``
was imported (``ray._private.ray_constants`` reads it once; otherwise
``services.resolve_ip_for_localhost`` rewrites 127.0.0.1 to the routable
address): :mod:`orchestrator` sets it on import. The dashboard web server
follows ``dashboard_host``. So Ray offers two real choices: loopback only, or
every interface; ``bind`` picks one.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from typing import Iterator

from orchestrator import RAY_ENV

LOOPBACK = "127.0.0.1"
EVERY_INTERFACE = ("0.0.0.0", "::")
METRICS_INTERVAL_MS = 2000  # how often a local cluster exports metrics (Ray's default: 10 s)
LOOPBACK_VARIABLE = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class BindError(RuntimeError):
    """A local cluster cannot listen where it was asked to."""


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and IPv4-mapped loopback (``::ffff:127.0.0.1``, as ``ss`` shows
    a dual-stack socket bound to 127.0.0.1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)


@contextlib.contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None,
                dashboard: bool = False, metrics_port: int | None = None,
                bind: str = LOOPBACK, log=print) -> Iterator[None]:
    """Use the cluster at ``address``, or start a private local one.

    A local cluster listens on 127.0.0.1 only, unless ``bind`` names another
    address (``0.0.0.0``: every interface, reachable from other machines);
    ``dashboard`` starts the Ray dashboard there, ``metrics_port`` fixes the
    port of its Prometheus endpoint (``/metrics``, where the sweep's custom
    metrics appear). If Ray is already initialised (a test or notebook
    started it) it is used and left running.
    """
    for key, value in RAY_ENV.items():  # a caller that bypassed `import orchestrator`'s defaults
        os.environ.setdefault(key, value)
    import ray

    if ray.is_initialized():
        yield
        return
    context = _init(address, num_cpus, dashboard, metrics_port, bind)
    _log_endpoints(context, address, dashboard, metrics_port, bind, log)
    try:
        yield
    finally:
        ray.shutdown()


def _log_endpoints(context, address, dashboard: bool, metrics_port, bind: str, log) -> None:
    if not address and not is_loopback(bind):
        log(f"Ray listens on every interface (--bind {bind}); node address "
            f"{_node_address(bind)}")
    if dashboard and getattr(context, "dashboard_url", None):
        log(f"Ray dashboard: http://{context.dashboard_url}"
            + ("  (token: ~/.ray/auth_token, or start Ray with RAY_AUTH_MODE=disabled)"
               if os.environ.get("RAY_AUTH_MODE") != "disabled" else ""))
    if metrics_port and not address:
        host = LOOPBACK if is_loopback(bind) else _node_address(bind)
        log(f"Ray metrics: http://{host}:{metrics_port}/metrics (ray_structure_sweep_*)")


def _init(address: str | None, num_cpus: int | None, dashboard: bool, metrics_port: int | None,
          bind: str = LOOPBACK):
    """``ray.init`` of the given cluster, or of a new local one listening on ``bind``."""
    import ray

    kwargs = dict(include_dashboard=dashboard, log_to_driver=True, logging_level="WARNING",
                  configure_logging=True)
    if address:
        return ray.init(address=address, **kwargs)
    return ray.init(address="local", num_cpus=num_cpus, **local_cluster_options(bind, metrics_port),
                    **kwargs)


def local_cluster_options(bind: str = LOOPBACK, metrics_port: int | None = None) -> dict:
    """The ``ray.init`` arguments of a new local cluster listening on ``bind``."""
    if is_loopback(bind):
        check_loopback_possible()
    elif bind not in EVERY_INTERFACE:
        _check_local_address(bind)
    extra = {"_metrics_export_port": metrics_port} if metrics_port else {}
    dashboard_host = LOOPBACK if is_loopback(bind) else bind
    return dict(_node_ip_address=_node_address(bind), dashboard_host=dashboard_host,
                _system_config={"metrics_report_interval_ms": METRICS_INTERVAL_MS}, **extra)


def check_loopback_possible() -> None:
    """Raise :class:`BindError` if a new local cluster would not stay on loopback.

    Before ``ray.init``, ``ray.util.get_node_ip_address()`` answers what Ray
    will make of 127.0.0.1: loopback only if the variable was 0 when ``ray``
    was imported.
    """
    import ray.util

    if is_loopback(ray.util.get_node_ip_address()):
        return
    value = os.environ.get(LOOPBACK_VARIABLE)
    why = (f"{LOOPBACK_VARIABLE}={value} is set in the environment" if value != "0" else
           "`ray` was imported before `orchestrator` (Ray reads "
           f"{LOOPBACK_VARIABLE} once, at import)")
    raise BindError(
        f"a local Ray cluster would listen on every interface, not 127.0.0.1 only: {why}. "
        f"Fix: unset {LOOPBACK_VARIABLE} (or set it to 0 before importing ray; importing "
        "orchestrator first does that), or ask for every interface explicitly with "
        "--bind 0.0.0.0 (run_sweep(..., bind='0.0.0.0')).")


def _check_local_address(host: str) -> None:
    """Raise :class:`BindError` unless ``host`` is an address of this machine."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except OSError as err:
        raise BindError(f"--bind {host}: not an address of this machine ({err.strerror}); "
                        "use one of its addresses (`ip -brief addr`), 0.0.0.0 for every "
                        "interface, or 127.0.0.1") from None


def _node_address(bind: str) -> str:
    """The node address Ray advertises for ``bind``: 127.0.0.1, the address
    given, or for 0.0.0.0/:: this machine's routable address."""
    if is_loopback(bind):
        return LOOPBACK
    if bind not in EVERY_INTERFACE:
        return bind
    # the source address of a route to a public address (UDP connect sends nothing)
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("203.0.113.1", 9))
        return s.getsockname()[0]
    return socket.gethostbyname(socket.gethostname())
