"""A cluster the tool starts itself listens on loopback only.

`structure-sweep run` starts its own local cluster (a subprocess, as a user
runs it); while its trials run, the OS socket table (/proc/net/tcp{,6}, the
sockets mapped to processes through /proc/PID/fd, as `ss -ltnp` does) must
show every listening socket of the CLI process and its descendants (GCS,
raylet, workers, dashboard, agents, metrics) on 127.0.0.1 or ::1.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from orchestrator.cluster import is_loopback

ROOT = Path(__file__).parents[2]
LISTEN = "0A"  # TCP state LISTEN in /proc/net/tcp


def command(pid: int) -> str:
    """``name: command line`` of a process (the name: what ``ss -p`` shows)."""
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
        line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
    return f"{name}: {line[:160]}"


def _address(hex_addr: str) -> str:
    """/proc/net/tcp{,6} address -> text (the kernel prints 32-bit words in host order)."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def listening_inodes() -> dict[str, tuple[str, int]]:
    """Socket inode -> (address, port) of every listening TCP socket of this network."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:  # no IPv6 here
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == LISTEN:
                host, port = fields[1].split(":")
                out[fields[9]] = (_address(host), int(port, 16))
    return out


def listeners(pids: list[int]) -> list[tuple[int, str, str, int]]:
    """(pid, command, address, port) of each listening socket the processes hold."""
    inodes, found = listening_inodes(), []
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:  # exited meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            inode = target[len("socket:["):-1] if target.startswith("socket:[") else None
            if inode in inodes:
                found.append((pid, command(pid), *inodes[inode]))
    return found


def _is_worker(label: str) -> bool:
    return label.startswith("ray::") and "Agent" not in label


def test_the_socket_table_reader_sees_a_listener_of_this_process():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert (os.getpid(), command(os.getpid()), "127.0.0.1", port) in listeners([os.getpid()])


def tiny_run_spec(tmp_path: Path, tiny: dict) -> Path:
    spec = {**tiny, "name": "loopback", "search": [{"name": "grid", "layers": "all", "n_train": 300,
                                                    "seed": [0, 1]}],
            "training": {**tiny["training"], "epochs": 20, "patience": 20},
            "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_self_started_cluster_listens_on_loopback_only(tmp_path, tiny, sweep_cli, wait_for):
    run = sweep_cli("run", str(tiny_run_spec(tmp_path, tiny)), "--num-cpus", "2", "--no-report",
                    "--dashboard")
    # every Ray process is up once the trials run (workers, agents, dashboard)
    wait_for(lambda: "[3/3] trials" in run.text(), 300, run, what="the trial stage")
    samples, deadline = [], time.monotonic() + 180
    # sample several times, at least until a worker process (a trial) shows a listener
    while run.proc.poll() is None and time.monotonic() < deadline and not (
            len(samples) >= 5 and any(_is_worker(label) for s in samples for _, label, _, _ in s)):
        samples.append(listeners([run.proc.pid, *run.tree()]))
        time.sleep(1)  # spacing between samples, not a wait for a condition
    seen = [s for sample in samples for s in sample]
    commands = "\n".join(sorted({label for _, label, _, _ in seen}))
    assert len(samples) >= 3, f"the run ended before 3 samples:\n{run.text()[-2000:]}"
    assert any(_is_worker(label) for _, label, _, _ in seen), f"no worker listener seen:\n{commands}"
    for process in ("gcs_server:", "raylet:", "ray::DashboardA", "ray::RuntimeEnv", "dashboard.py"):
        assert process in commands, f"no listener of {process} seen (are we seeing Ray?):\n{commands}"
    off_loopback = sorted({s for s in seen if not is_loopback(s[2])})
    assert not off_loopback, "listening off loopback:\n" + "\n".join(map(str, off_loopback))


def test_bind_is_checked_before_any_work():
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", "spec.yaml", "--bind",
                          "not-an-ip"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "'not-an-ip' is not an IP address" in out.stderr
    out = subprocess.run([sys.executable, "-m", "orchestrator", "run", "spec.yaml", "--bind",
                          "0.0.0.0", "--address", "auto"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2 and "--bind applies to the local cluster" in out.stderr


def test_ray_imported_before_orchestrator_is_refused_not_exposed():
    code = ("import ray\nfrom orchestrator.cluster import local_cluster_options\n"
            "local_cluster_options()")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={k: v for k, v in os.environ.items()
                                           if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"})
    assert out.returncode != 0
    assert "would listen on every interface" in out.stderr and "--bind 0.0.0.0" in out.stderr
