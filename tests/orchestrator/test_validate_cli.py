"""`structure-sweep validate`: exit codes and messages, before any Ray start."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def validate(spec: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", "validate", str(spec)],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_validate_prints_trial_count():
    out = validate(ROOT / "search_spaces" / "demo.yaml")
    assert out.returncode == 0, out.stderr
    assert "84 trials in 3 grid(s)" in out.stdout


def test_validate_rejects_bad_specs_without_starting_ray(tmp_path):
    demo = (ROOT / "search_spaces" / "demo.yaml").read_text()
    cases = {"misspelt": demo.replace("batch_size: 512", "batch_sise: 512"),
             "wrong type": demo.replace("epochs: 300", "epochs: forty"),
             "unknown encoder": demo.replace("synthetic:image", "clip:vit-b")}
    for name, text in cases.items():
        spec = tmp_path / f"{name.replace(' ', '_')}.yaml"
        spec.write_text(text)
        out = validate(spec)
        assert out.returncode == 2, name
        assert out.stderr.startswith("error: invalid spec:"), name
        assert "ray" not in out.stderr.lower()  # never got as far as Ray


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
