"""Faults on real parts (real Ray, real files), each with the message the user gets
and the command that recovers:

1. the encoder actor killed mid-extraction (twice: once is retried);
2. a node lost mid-sweep on a two-node cluster on this machine;
3. a full disk while results are flushed (a real tmpfs filled up; root only,
   plus a portable in-process check of the store's write);
4. a results part file damaged from outside.

Every wait is for a condition, bounded and generous (the machine is shared).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from orchestrator import cli
from orchestrator.durable import DiskFull
from orchestrator.feature_store import FeatureStore
from orchestrator.results import DamagedPartFile, ResultsStore

ROOT = Path(__file__).parents[2]


def write_spec(tmp_path: Path, tiny: dict, *, seeds: int = 1, epochs: int = 5, layers="all",
               slow_image_encoder: bool = False, **tune) -> Path:
    """The tiny spec as one grid: ``layers`` (all: 9 pairs) x ``seeds``. A slow image encoder
    (wider layers, more training pairs) takes seconds to extract the training split."""
    spec = {**tiny, "name": "faults",
            "training": {**tiny["training"], "epochs": epochs, "patience": epochs},
            "search": [{"name": "grid", "layers": layers, "seed": list(range(seeds)),
                        "n_train": 300}],
            "tune": {"max_concurrent_trials": 2, "flush_seconds": 0.2, **tune},
            "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    if slow_image_encoder:
        image = tiny["encoders"]["image"]
        spec["encoders"] = {**tiny["encoders"],
                            "image": {**image, "options": {**image["options"], "dim": 512}}}
        spec["data"] = {**tiny["data"], "train": {**tiny["data"]["train"],
                                                  "options": {"size": 8000}}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def raw_rows(run_dir: Path):
    return ResultsStore(run_dir).query("trials", dedup=False)


def planned(run_dir: Path) -> set[str]:
    return set(json.loads((run_dir / "plan.json").read_text())["fingerprints"])


def assert_each_planned_trial_stored_once(run_dir: Path):
    rows = raw_rows(run_dir)
    assert rows["fingerprint"].is_unique, "a trial was stored twice"
    assert set(rows["fingerprint"]) == planned(run_dir), "a planned trial is missing"
    assert (rows["status"] == "done").all(), rows[["fingerprint", "status", "error"]]
    return rows


def processes_below(pid: int) -> dict[int, str]:
    """pid -> command line of every descendant of ``pid``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                out[child] = Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            todo.append(child)
    return out


def wait_until_cluster_idle(wait_for) -> None:
    """A driver that stopped on an error left no actor or placement group holding CPUs
    of the (shared, in-process) cluster: the next run gets all of them."""
    import ray

    total = ray.cluster_resources()["CPU"]
    wait_for(lambda: ray.available_resources().get("CPU", 0) == total, 120,
             what="every CPU of the cluster free again")


class Background(threading.Thread):
    """Runs ``body(stop)`` beside the sweep; an exception is re-raised by :meth:`result`."""

    def __init__(self, body):
        super().__init__(daemon=True)
        self.body, self.stop, self.error, self.value = body, threading.Event(), None, None

    def run(self):
        try:
            self.value = self.body(self.stop)
        except BaseException as err:  # noqa: BLE001 -- handed to the test thread
            self.error = err

    def result(self, timeout: float = 60):
        self.stop.set()
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.value


# --- 1. the encoder actor killed mid-extraction -------------------------------------------

def kill_encoder_mid_entry(features: Path, times: int, stop: threading.Event,
                           deadline_s: float = 400) -> list[int]:
    """SIGKILL the encoder actor each time a new one is writing a new partial entry
    (a ``.tmp-*`` directory in the store), ``times`` times; the pids killed."""
    killed, partials_seen = [], set()
    deadline = time.monotonic() + deadline_s
    while len(killed) < times and not stop.is_set() and time.monotonic() < deadline:
        partials = {p.name for p in features.glob(".tmp-*")} if features.is_dir() else set()
        actors = [pid for pid, line in processes_below(os.getpid()).items()
                  if "EncoderActor" in line and pid not in killed]
        if actors and partials - partials_seen:
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])
            partials_seen |= partials
        time.sleep(0.01)
    return killed


def test_encoder_actor_killed_mid_extraction_fails_clearly_and_the_next_run_completes(
        ray_cluster, tmp_path, tiny, capsys, wait_for):
    spec = str(write_spec(tmp_path, tiny, layers="similar", slow_image_encoder=True))
    features = tmp_path / "cache" / "features"
    killer = Background(lambda stop: kill_encoder_mid_entry(features, 2, stop))
    killer.start()
    assert cli.main(["run", spec, "--no-report"]) == 2
    assert len(set(killer.result())) == 2  # the first death was retried on a restarted actor
    err = capsys.readouterr().err
    assert "error: image encoder 'synthetic:image' died while extracting features" in err
    assert "not done: synthetic/train/images" in err and "run the same command again" in err
    assert list(features.glob(".tmp-*"))  # the killed writer's partial entry: there, never used
    store = FeatureStore(features)
    assert all(store.has(p.name, verify=True) for p in features.iterdir()
               if not p.name.startswith("."))
    wait_until_cluster_idle(wait_for)

    assert cli.main(["run", spec, "--no-report"]) == 0
    out = capsys.readouterr().out
    assert "features train/synthetic/images: computed" in out
    assert not list(features.glob(".tmp-*")), "a partial entry was left behind"
    entries = [p.name for p in features.iterdir() if not p.name.startswith(".")]
    assert entries and all(store.has(key, verify=True) for key in entries)
    assert_each_planned_trial_stored_once(tmp_path / "run")


# --- 2. a node lost mid-sweep --------------------------------------------------------------

def trial_on(raylet_pid: int) -> int | None:
    """A process below that raylet in the middle of a Tune trial, if any (a reused trial
    actor waiting between trials is titled ray::ImplicitFunc, without .train)."""
    return next((pid for pid, line in processes_below(raylet_pid).items()
                 if "ImplicitFunc.train" in line), None)


@pytest.fixture
def two_nodes():
    """A head and a worker node (1 CPU each) on 127.0.0.1, started by this process; a
    lost node is noticed within seconds (fast health checks)."""
    from ray.cluster_utils import Cluster

    checks = {"health_check_period_ms": 500, "health_check_failure_threshold": 4,
              "health_check_timeout_ms": 1000, "health_check_initial_delay_ms": 0}
    cluster = Cluster(initialize_head=True, shutdown_at_exit=False,
                      head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1",
                                      "_system_config": checks, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    yield cluster, worker
    cluster.shutdown()


def test_node_lost_mid_sweep_reschedules_its_trials_and_stores_each_once(
        tmp_path, tiny, two_nodes, sweep_cli, wait_for):
    cluster, worker = two_nodes
    spec = write_spec(tmp_path, tiny, epochs=30, max_failures=3, cpus_per_trial=1)
    run = sweep_cli("run", str(spec), "--address", cluster.address, "--no-report")
    raylet = worker.all_processes["raylet"][0].process.pid
    wait_for(lambda: trial_on(raylet), 400, run, step=0.05, what="a trial on the worker node")
    cluster.remove_node(worker, allow_graceful=False)  # its raylet, workers, agents: gone

    code, out = run.finish(600)
    assert code == 0, out[-3000:]
    rows = assert_each_planned_trial_stored_once(tmp_path / "run")
    assert rows["retries"].max() >= 1, "the trial of the lost node should have run again"


# --- 3. a full disk while flushing results -------------------------------------------------

def test_a_full_disk_on_write_names_the_file_and_leaves_nothing_partial(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path / "run")
    store.write("trials", [{"fingerprint": "a", "status": "done"}])

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("orchestrator.durable.os.fsync", no_space)
    with pytest.raises(DiskFull, match=r"no space left on the device of .*results/trials while "
                                       r"writing part-\w+\.parquet .*Fix: free space") as err:
        store.write("trials", [{"fingerprint": "b", "status": "done"}])
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "run/results/trials").iterdir()) == \
        [p.name for p in store.files("trials")]  # no temp file, no partial part
    assert list(store.query("trials")["fingerprint"]) == ["a"]


@pytest.fixture
def small_filesystem(tmp_path):
    """A 16 MiB tmpfs at tmp_path/run (root only): a disk that really fills up."""
    mount = tmp_path / "run"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount
    if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write ``directory/filler`` until the filesystem has no byte left."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    f.write(b"\0" * size)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    return filler


def fill_once_rows_are_stored(run_dir: Path, stop: threading.Event) -> Path | None:
    while not stop.is_set():
        if (run_dir / "results/trials").is_dir() and len(raw_rows(run_dir)) >= 2:
            return fill(run_dir)
        time.sleep(0.05)
    return None


def test_disk_full_while_flushing_stops_clearly_and_resume_finishes(
        ray_cluster, tmp_path, tiny, small_filesystem, capsys, wait_for):
    run_dir = small_filesystem
    spec = write_spec(tmp_path, tiny, seeds=2, epochs=8)
    filler = Background(lambda stop: fill_once_rows_are_stored(run_dir, stop))
    filler.start()
    assert cli.main(["run", str(spec), "--no-report"]) == 2
    assert filler.result() is not None, "the disk was never filled"
    err = capsys.readouterr().err
    # a trial's per-epoch rows (table epochs) are written just before its row (table trials)
    assert re.search(rf"error: no space left on the device of {re.escape(str(run_dir))}"
                     r"/results/(trials|epochs) while writing part-", err), err
    assert f"`structure-sweep resume {run_dir}`" in err
    for table in ("trials", "epochs"):
        assert not list((run_dir / "results" / table).glob(".tmp-*")), "a partial part file is left"
    ResultsStore(run_dir).check()  # every visible part file is whole
    before = raw_rows(run_dir)
    assert 2 <= len(before) < len(planned(run_dir)), "the disk should fill mid-sweep"
    wait_until_cluster_idle(wait_for)  # the trials in flight were stopped with the driver

    (run_dir / "filler").unlink()  # space is back
    assert cli.main(["resume", str(run_dir), "--no-report"]) == 0
    after = assert_each_planned_trial_stored_once(run_dir)
    kept = after.set_index("fingerprint").loc[before["fingerprint"], "started_at"]
    assert list(kept) == list(before["started_at"])  # stored trials were not re-run


# --- 4. a results part file damaged from outside -------------------------------------------

def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    else:  # bytes flipped in the middle (data pages), the size unchanged
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64])
                         + data[middle + 64:])


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_a_damaged_part_file_is_named_never_skipped(tmp_path, how):
    store = ResultsStore(tmp_path / "run")
    for part in range(3):
        store.write("trials", [{"fingerprint": f"{part}-{i}", "status": "done", "score": i / 7,
                                "error": ""} for i in range(50)])
    victim = store.files("trials")[1]
    damage(victim, how)
    for read in (lambda: store.query("trials"), store.finished_fingerprints, store.check):
        with pytest.raises(DamagedPartFile, match=rf"results part file {victim} is damaged") as err:
            read()
        assert err.value.path == victim and "mv " in str(err.value)


def test_damaged_part_file_status_says_what_to_do_and_resume_recomputes_it(
        ray_cluster, tmp_path, tiny):
    spec = write_spec(tmp_path, tiny, epochs=3)
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(spec), "--no-report"]) == 0
    parts = ResultsStore(run_dir).files("trials")
    victim = max(parts, key=lambda p: p.stat().st_size)
    lost = set(ResultsStore(run_dir).query("trials", dedup=False)["fingerprint"])
    damage(victim, "garbled")

    status = subprocess.run([sys.executable, "-m", "orchestrator", "status", str(run_dir)],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert status.returncode == 2, status.stdout + status.stderr
    assert f"results part file {victim} is damaged" in status.stderr
    assert f"mv {victim} {run_dir / 'damaged'}/" in status.stderr
    assert f"`structure-sweep resume {run_dir}` recomputes what it held" in status.stderr
    assert cli.main(["resume", str(run_dir), "--no-report"]) == 2  # refused, not skipped

    (run_dir / "damaged").mkdir()
    victim.rename(run_dir / "damaged" / victim.name)  # the fix the message gives
    lost -= set(ResultsStore(run_dir).query("trials", dedup=False)["fingerprint"])
    assert lost, "the damaged part should have held some trials"
    assert cli.main(["resume", str(run_dir), "--no-report"]) == 0
    rows = assert_each_planned_trial_stored_once(run_dir)
    assert lost <= set(rows["fingerprint"])
