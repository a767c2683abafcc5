"""Reference vectors of the official code (shared/reference/reference_vectors.json).

``reference_vectors`` is the whole JSON. A test that takes an argument named
``<section>_ref_case`` (``structure_reg_ref_case``, ``clip_loss_ref_case``, ...)
runs once per stored case of that JSON section, so a fuller file (with the
held-back cases) is checked the same way without editing the tests.
"""

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

# Ray starts its workers at nice 15: beside other busy processes (a loaded CI
# machine) they get ~4% of a core each and a sweep test crawls for an hour.
# Tests run them at the driver's priority so their time tracks the fair share.
os.environ.setdefault("RAY_worker_niceness", "0")

import orchestrator  # noqa: F401,E402 -- sets Ray's environment (loopback) before any test imports ray
from processes import descendants, start_time

_DEFAULT = Path(__file__).parents[1].parent / "shared/reference/reference_vectors.json"
# A copy kept in the repo, so a clone without shared/ still checks every case.
_VENDORED = Path(__file__).parent / "data" / "reference_vectors.json"
_SUFFIX = "_ref_case"


@functools.lru_cache(maxsize=1)
def _load():
    """The JSON from $STRUCTURE_SWEEP_REFERENCE, else shared/, else the repo's copy."""
    env = os.environ.get("STRUCTURE_SWEEP_REFERENCE")
    for path in (Path(env) if env else None, _DEFAULT, _VENDORED):
        if path is not None and path.is_file():
            return json.loads(path.read_text())
    return None


@pytest.fixture(scope="session")
def reference_vectors():
    data = _load()
    if data is None:
        pytest.fail(f"reference vectors not found at $STRUCTURE_SWEEP_REFERENCE, {_DEFAULT} "
                    f"or {_VENDORED}")
    return data


def pytest_generate_tests(metafunc):
    for arg in metafunc.fixturenames:
        if arg.endswith(_SUFFIX):
            section = (_load() or {}).get(arg[: -len(_SUFFIX)], [])
            cases = section.get("cases", []) if isinstance(section, dict) else section
            ids = [str(c.get("name", i)) for i, c in enumerate(cases)]
            metafunc.parametrize(arg, cases, ids=ids)


# A sweep small enough for a test: 3 x 3 layers, a few hundred synthetic pairs.
TINY = {
    "name": "tiny",
    "encoders": {"image": {"name": "synthetic:image", "batch_size": 256,
                           "options": {"layers": 3, "planted_layer": 1}},
                 "text": {"name": "synthetic:text", "batch_size": 256,
                          "options": {"layers": 3, "planted_layer": 2}}},
    "data": {"train": {"dataset": "synthetic", "split": "train", "options": {"size": 600}},
             "val": {"dataset": "synthetic", "split": "val", "options": {"size": 200}},
             "zero_shot": [{"dataset": "synthetic", "split": "test", "name": "classes",
                            "options": {"size": 200}}],
             "retrieval": [{"dataset": "synthetic", "split": "test", "name": "captions",
                            "options": {"size": 100, "captions_per_image": 2}}]},
    "similarity": {"k": 5, "n_samples": 400},
    "training": {"out_dim": 16, "epochs": 5, "batch_size": 256, "lr": 0.003, "patience": 3,
                 "warmup_steps": 10},
    "search": [{"name": "grid", "layers": "all", "structure_lambda": 0, "n_train": 300},
               {"name": "scaling", "layers": ["similar", "last"], "structure_lambda": [0, 10],
                "n_train": [150, 600]}],
    "tune": {"max_concurrent_trials": 2},
}


@pytest.fixture
def tiny():
    """A fresh copy of the tiny sweep spec (a dict, as parsed from YAML)."""
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster on 127.0.0.1 for the tests that drive sweeps in-process."""
    import ray

    from orchestrator.cluster import local_cluster_options

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR",
             **local_cluster_options())
    yield
    ray.shutdown()


# --- `structure-sweep` as a subprocess, with its own Ray (fault and loopback tests) -------

ROOT = Path(__file__).parents[1]


def _wait_for(predicate, timeout: float, run: "CliRun | None" = None, step: float = 0.2,
              what: str = ""):
    """``predicate()`` once truthy; fails after ``timeout`` s (generous: the machine is
    shared) or as soon as ``run`` exits first, with its output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if run is not None and run.proc.poll() is not None:
            time.sleep(0.5)  # let the reader thread take the last lines
            pytest.fail(f"the sweep exited ({run.proc.returncode}) before {what or 'the condition'}"
                        f":\n{run.text()[-3000:]}")
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what or 'the condition'}"
                + (f":\n{run.text()[-3000:]}" if run is not None else ""))


class CliRun:
    """One ``structure-sweep`` subprocess; its output is read as it comes (a thread),
    so a test can wait for a line while the run goes on."""

    def __init__(self, args: list[str], env: dict | None = None):
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True,
                                     env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self.known: dict[int, int | None] = {}  # descendant seen -> start time (to kill leftovers)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)

    def tree(self) -> list[int]:
        pids = descendants(self.proc.pid)
        self.known.update({pid: start_time(pid) for pid in pids if pid not in self.known})
        return pids

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait for the exit (bounded), then the return code and the whole output."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"the sweep did not finish in {timeout:.0f}s:\n{self.text()[-3000:]}")
        self._reader.join(timeout=30)
        return self.proc.returncode, self.text()

    def kill(self) -> None:
        """SIGKILL the driver, then whatever Ray processes it started that outlive it
        (only processes this run started: its descendants)."""
        self.tree()
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        for pid, started in sorted(self.known.items()):
            if started is not None and start_time(pid) == started:  # still that process
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=60)


@pytest.fixture
def wait_for():
    """``wait_for(predicate, timeout, run=None, step=0.2, what="")``: the predicate's value
    once truthy; fails on timeout or when ``run`` (a :class:`CliRun`) exits first."""
    return _wait_for


@pytest.fixture
def sweep_cli():
    """``start(*args, env=None)`` -> a :class:`CliRun` of ``structure-sweep`` (the console
    script of this environment); every run still alive at teardown is killed."""
    runs: list[CliRun] = []
    script = Path(sys.executable).parent / "structure-sweep"
    entry = [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator"]

    def start(*args: str, env: dict | None = None) -> CliRun:
        runs.append(CliRun([*entry, *args], env))
        return runs[-1]

    yield start
    for run in runs:
        if run.proc.poll() is None or run.known:
            run.kill()
