"""Kill safety of a sweep run as the CLI runs it (a subprocess with its own Ray).

- SIGKILL the driver mid-sweep, then `structure-sweep resume RUN_DIR`: every
  planned trial ends in the store exactly once and no stored trial re-ran.
- SIGKILL a trial worker mid-trial: the trial is retried and the sweep
  completes; meanwhile every custom metric of the sweep reaches the metrics
  endpoint.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from orchestrator.results import ResultsStore
from processes import cmdline, descendants

ROOT = Path(__file__).parents[2]


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def write_spec(tmp_path: Path, tiny: dict, seeds: int = 2, **tune) -> Path:
    spec = {**tiny, "name": "resilience",
            "training": {**tiny["training"], "epochs": 25, "patience": 25},
            "search": [{"name": "grid", "layers": "all", "seed": list(range(seeds)),
                        "n_train": 600}],
            "tune": {"max_concurrent_trials": 2, "flush_seconds": 0.2, **tune},
            "output_dir": str(tmp_path / "run"), "cache_dir": str(tmp_path / "cache")}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", *args, "--num-cpus", "2",
                             "--no-report"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def raw_rows(run_dir: Path):
    return ResultsStore(run_dir).query("trials", dedup=False)


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, step: float = 0.2,
             what=""):
    """``predicate()`` once truthy; fails after ``timeout`` s or if ``proc`` exits first.
    ``what`` (a string, or a function returning one) says what was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"sweep exited before {_text(what) or 'the condition held'}:\n"
                        f"{proc.stdout.read()[-3000:]}")
        time.sleep(step)
    pytest.fail(f"timed out waiting for {_text(what) or 'the condition'}")


def _text(what) -> str:
    return what() if callable(what) else what


def kill_tree(proc: subprocess.Popen, pids: list[int]) -> None:
    """SIGKILL the driver, then whatever Ray processes it started that outlive it."""
    kill(proc.pid)
    proc.wait(timeout=30)
    time.sleep(1)
    for pid in pids:  # only processes this test started (descendants of its driver)
        kill(pid)


def planned(run_dir: Path) -> set[str]:
    return set(json.loads((run_dir / "plan.json").read_text())["fingerprints"])


def test_driver_killed_mid_sweep_then_resume_runs_each_trial_exactly_once(tmp_path, tiny):
    run_dir = tmp_path / "run"
    first = cli("run", str(write_spec(tmp_path, tiny)))
    try:
        wait_for(lambda: (run_dir / "results" / "trials").is_dir() and len(raw_rows(run_dir)) >= 3,
                 240, first)
    finally:
        kill_tree(first, descendants(first.pid))
    before = raw_rows(run_dir)
    plan = planned(run_dir)
    assert 3 <= len(before) < len(plan), "the kill should land mid-sweep"

    second = cli("resume", str(run_dir))
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 0, out[-3000:]
    assert f"{len(set(before['fingerprint']))} already finished (skipped)" in out

    after = raw_rows(run_dir)
    assert after["fingerprint"].is_unique  # raw part files: nothing ran twice
    assert set(after["fingerprint"]) == plan and (after["status"] == "done").all()
    kept = after.set_index("fingerprint").loc[before["fingerprint"], "started_at"]
    assert list(kept) == list(before["started_at"])  # stored trials untouched


EXPECTED_SERIES = [f"ray_structure_sweep_{name}" for name in (
    "trials_finished", "trials_running", "trials_per_minute", "trials_pending",
    "feature_cache_hits", "feature_cache_misses", "best_metric")]


class MetricsScraper(threading.Thread):
    """Reads the metrics endpoint every ``every`` s while a sweep runs and keeps
    the name of every series of the sweep seen so far: Ray exports each metric
    on its own schedule, so one series present says nothing of the others, and
    the endpoint goes away with the sweep's cluster."""

    def __init__(self, port: int, sweep: str, every: float = 0.5):
        super().__init__(daemon=True)
        self.url, self.tag, self.every = f"http://127.0.0.1:{port}/metrics", f'sweep="{sweep}"', every
        self.seen: set[str] = set()
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(self.every):
            try:
                text = urllib.request.urlopen(self.url, timeout=2).read().decode()
            except OSError:
                continue
            self.seen |= {line.split("{")[0] for line in text.splitlines()
                          if line.startswith("ray_structure_sweep_") and self.tag in line}

    def missing(self) -> list[str]:
        seen = set(self.seen)  # a snapshot: the thread replaces the set
        return [s for s in EXPECTED_SERIES if not any(name.startswith(s) for name in seen)]


def test_worker_killed_mid_trial_is_retried_and_metrics_are_exported(tmp_path, tiny):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    # 36 trials: the sweep outlasts the first metrics export by a wide margin
    proc = cli("run", str(write_spec(tmp_path, tiny, seeds=4, max_failures=2)),
               "--metrics-port", str(port))
    scraper = MetricsScraper(port, "resilience")
    scraper.start()
    try:
        def training_worker():
            return next((pid for pid in descendants(proc.pid)
                         if "ImplicitFunc.train" in cmdline(pid)), None)

        kill(wait_for(training_worker, 240, proc, step=0.05, what="a running trial"))
        wait_for(lambda: not scraper.missing(), 300, proc, step=0.5,
                 what=lambda: f"the metrics series {scraper.missing()}")
        out, _ = proc.communicate(timeout=300)
    finally:
        scraper.done.set()
        if proc.poll() is None:
            kill_tree(proc, descendants(proc.pid))
    assert proc.returncode == 0, out[-3000:]
    rows = raw_rows(run_dir)
    assert rows["fingerprint"].is_unique and set(rows["fingerprint"]) == planned(run_dir)
    assert (rows["status"] == "done").all()
    assert rows["retries"].max() >= 1  # the killed trial ran again


def test_a_second_driver_on_the_same_run_dir_is_refused(tmp_path):
    from orchestrator import cli
    from orchestrator.spec import load_spec
    from orchestrator.driver import RunDirBusy, driver_lock, run_sweep

    demo = yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**demo, "output_dir": str(tmp_path / "run")}))
    (tmp_path / "run").mkdir()
    with driver_lock(tmp_path / "run"):  # the first driver (before any Ray work of the second)
        with pytest.raises(RunDirBusy, match=rf"another structure-sweep run is using .*run \(pid {os.getpid()}\)"):
            run_sweep(load_spec(spec_file), log=lambda *_: None)
        assert cli.main(["run", str(spec_file), "--no-report"]) == 2
    with driver_lock(tmp_path / "run"):  # released when the first ends
        pass
