"""Benchmarks don't rot: each one's ``--smoke-test`` runs its real code path at
tiny sizes. Parametrised over the files in benchmarks/, so a new benchmark is
covered (and must accept ``--smoke-test``) without editing this test."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BENCHMARKS = sorted((ROOT / "benchmarks").glob("*.py"))


def test_there_are_benchmarks():
    assert BENCHMARKS


@pytest.mark.parametrize("script", BENCHMARKS, ids=lambda p: p.stem)
def test_benchmark_smoke_test(script):
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, str(script), "--smoke-test"], cwd=ROOT, capture_output=True,
                          text=True, timeout=400, env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, f"{script.name} --smoke-test failed:\n{done.stderr[-4000:]}"
    summary = done.stdout.strip().splitlines()[-1:]  # the benchmark's closing summary line
    assert summary and any(c.isdigit() for c in summary[0]), done.stdout[-2000:]
