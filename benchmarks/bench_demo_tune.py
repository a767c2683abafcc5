"""The demo sweep's Tune stage, one trial per Tune trial against the demo's tasks and packs.

Runs ``search_spaces/demo.yaml`` twice on one local Ray cluster, into two fresh
run directories that share one feature cache (only the first run extracts):

* ``one by one``: ``tune.trials_per_task: 1``, ``tune.pack: off``: every trial
  is its own Tune trial, as the demo ran before packs;
* ``as specified``: the spec's own ``tune`` section (tasks of one shape across
  layer pairs, trained as packs).

It prints each run's Tune-stage wall time and their ratio, both measured in
this run, and how far the two runs' metrics are apart (same fingerprints; a
packed member equals its trial alone up to float rounding, so an argmax may
flip where two epochs' losses tie to 1e-7).

    .venv/bin/python benchmarks/bench_demo_tune.py
    .venv/bin/python benchmarks/bench_demo_tune.py --smoke-test   # 16 short trials
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.cluster import ray_session  # noqa: E402
from orchestrator.driver import run_sweep  # noqa: E402
from orchestrator.results import ResultsStore  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "search_spaces" / "demo.yaml"
METRICS = ("best_val_loss", "zs/synthetic-classes/top1")


def variant(raw: dict, root: Path, name: str, tune: dict, smoke: bool):
    spec = {**raw, "output_dir": str(root / name), "cache_dir": str(root / "cache"),
            "tune": {**raw.get("tune", {}), **tune}}
    if smoke:  # no layer grid, one seed, 10 epochs: 16 trials
        spec["training"] = {**spec["training"], "epochs": 10, "patience": 10}
        spec["search"] = [{**{k: v for k, v in grid.items() if k != "epochs"}, "seed": [0]}
                          for grid in spec["search"] if grid["name"] != "layer-grid"]
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_spec(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke-test", action="store_true",
                        help="16 trials of 10 epochs (no layer grid, one seed): checks that it runs")
    args = parser.parse_args()
    raw = yaml.safe_load(DEMO.read_text())
    with tempfile.TemporaryDirectory() as tmp, ray_session(log=lambda *_: None):
        root = Path(tmp)
        one_by_one = {"trials_per_task": 1, "pack": "off"}
        specs = {"one by one": variant(raw, root, "single", one_by_one, args.smoke_test),
                 "as specified": variant(raw, root, "spec", {}, args.smoke_test)}
        seconds, rows = {}, {}
        for name, spec in specs.items():
            outcome = run_sweep(spec, log=lambda *_: None)
            seconds[name] = outcome.tune_seconds
            rows[name] = ResultsStore(spec.run_dir).query("trials").set_index("fingerprint").sort_index()
            run = spec.tune.run_config
            print(f"{name:>12}: {outcome.finished} trials, trials_per_task {run.trials_per_task}, "
                  f"pack {'on' if run.packing else 'off'}: Tune stage {seconds[name]:.1f} s")
        single, packed = rows["one by one"], rows["as specified"]
        assert list(single.index) == list(packed.index), "the two runs planned different trials"
        for metric in METRICS:
            a, b = packed[metric].to_numpy(), single[metric].to_numpy()
            gap = np.abs(a - b) / np.maximum(np.abs(b), 1e-12)
            print(f"  {metric}: largest relative difference {gap.max():.2g} "
                  f"({int((gap > 1e-5).sum())} of {len(gap)} trials beyond 1e-5)")
        ratio = seconds["one by one"] / seconds["as specified"]
        print(f"SUMMARY demo_tune_one_by_one={seconds['one by one']:.1f}s "
              f"demo_tune_as_specified={seconds['as specified']:.1f}s speedup={ratio:.2f}x")


if __name__ == "__main__":
    main()
