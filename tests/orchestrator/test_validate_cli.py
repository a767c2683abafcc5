"""`structure-sweep validate`: exit codes and messages, before any Ray start."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def validate(spec: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(spec)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_validate_prints_trial_count():
    import yaml

    out = validate(ROOT / "search_spaces" / "demo.yaml")
    assert out.returncode == 0, out.stderr
    grids = len(yaml.safe_load((ROOT / "search_spaces" / "demo.yaml").read_text())["search"])
    assert f"trials in {grids} grid(s) (6 image x 6 text layers)" in out.stdout.splitlines()[0]
    assert "6 layers (options.layers)" in out.stdout


def test_validate_counts_what_the_run_plans(tmp_path):
    # the v0.1 demo: its two grids both name (similar and last, λ 0, n 1000, seed 0);
    # validate used to print 68 while the run planned 66
    spec = tmp_path / "demo.yaml"
    spec.write_text(V01_DEMO)
    first = validate(spec).stdout.splitlines()[0]
    assert "68 trials in 2 grid(s)" in first and "at most 66 unique" in first, first


def test_validate_rejects_bad_specs_without_starting_ray(tmp_path):
    import re

    demo = (ROOT / "search_spaces" / "demo.yaml").read_text()
    cases = {"misspelt": demo.replace("batch_size: 512", "batch_sise: 512"),
             "wrong type": re.sub(r"epochs: \d+", "epochs: forty", demo, count=1),
             "unknown encoder": demo.replace("synthetic:image", "clip:vit-b")}
    for name, text in cases.items():
        spec = tmp_path / f"{name.replace(' ', '_')}.yaml"
        spec.write_text(text)
        out = validate(spec)
        assert out.returncode == 2, name
        assert out.stderr.startswith("error: invalid spec:"), name
        assert len(out.stderr.splitlines()) == 1, out.stderr
        assert "ray" not in out.stderr.lower()  # never got as far as Ray


V01_DEMO = """
name: demo
encoders:
  image: {name: "synthetic:image", batch_size: 1024, options: {layers: 6, planted_layer: 3}}
  text: {name: "synthetic:text", batch_size: 1024, options: {layers: 6, planted_layer: 4}}
data:
  train: {dataset: synthetic, split: train, options: {size: 4000}}
  val: {dataset: synthetic, split: val, options: {size: 1000}}
  zero_shot: [{dataset: synthetic, split: test, name: synthetic-classes, options: {size: 1000}}]
similarity: {metric: mutual_knn, k: 10, n_samples: 2000}
training: {head: linear, out_dim: 32, epochs: 40, batch_size: 512, lr: 0.001}
search:
  - {name: layer-grid, layers: all, structure_lambda: 0, n_train: 1000}
  - {name: data-scaling, layers: [similar, last], structure_lambda: [0, 10],
     n_train: [100, 300, 1000, 4000], seed: [0, 1]}
"""


def _raise_in_ray(exc):
    from ray.exceptions import ActorDiedError, RayTaskError

    def ray_task_error():
        tb = f"Traceback (most recent call last):\n  File \"x.py\", line 1\n{type(exc).__module__}." \
             f"{type(exc).__name__}: {exc}"
        return RayTaskError("extract", tb, exc)

    return {"task": lambda: ray_task_error().as_instanceof_cause(),
            "actor": lambda: ActorDiedError(ray_task_error()),
            "direct": lambda: exc}


def test_errors_from_ray_actors_and_tasks_print_their_cause(monkeypatch, capsys):
    import pytest

    from orchestrator import cli
    from orchestrator.datasets import DatasetError
    from orchestrator.encoders import EncoderWeightsMissing

    for exc in (EncoderWeightsMissing("weights of hf:nope not found; set HF_HOME"),
                DatasetError("coco: annotations file /x/captions.json not found")):
        for how, make in _raise_in_ray(exc).items():
            def fail(args, make=make):
                raise make()
            monkeypatch.setattr(cli, "_status", fail)
            assert cli.main(["status", "somewhere"]) == 2, how
            err = capsys.readouterr().err
            assert err.startswith("error: ") and str(exc) in err, (how, err)
            assert "Traceback" not in err and len(err.splitlines()) == 1, (how, err)
    monkeypatch.setattr(cli, "_status", lambda args: 1 / 0)  # a bug still shows its traceback
    with pytest.raises(ZeroDivisionError):
        cli.main(["status", "somewhere"])
