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
    assert "68 trials in 2 grid(s)" in out.stdout


def test_validate_rejects_bad_specs_without_starting_ray(tmp_path):
    demo = (ROOT / "search_spaces" / "demo.yaml").read_text()
    cases = {"misspelt": demo.replace("batch_size: 512", "batch_sise: 512"),
             "wrong type": demo.replace("epochs: 40", "epochs: forty"),
             "unknown encoder": demo.replace("synthetic:image", "clip:vit-b")}
    for name, text in cases.items():
        spec = tmp_path / f"{name.replace(' ', '_')}.yaml"
        spec.write_text(text)
        out = validate(spec)
        assert out.returncode == 2, name
        assert out.stderr.startswith("error: invalid spec:"), name
        assert "ray" not in out.stderr.lower()  # never got as far as Ray
