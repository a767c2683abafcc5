"""Per-trial overhead of the sweep engine on a sweep of ≥1,000 cheap trials.

Runs a synthetic spec (tiny planted encoders, one-epoch linear heads) through
the real driver (``run_sweep``: Ray Tune, object-store features, the results
sink) and prints, for the Tune stage:

    overhead per trial = (wall − Σ trial compute / slots) / trials

where trial compute is the time each trial spends inside its trainable
(feature fetch + train + evaluate) and slots the trials run at once (1 by
default: on 2 cores Tune's driver loop is the bottleneck). It also checks that
the store holds every planned fingerprint exactly once (raw part files, no
read-time deduplication), then runs the spec again and checks nothing re-ran.
Both runs share one local Ray cluster.

    .venv/bin/python benchmarks/bench_sweep_overhead.py              # 1,080 trials
    .venv/bin/python benchmarks/bench_sweep_overhead.py --trials-per-task 12 --pack off
    .venv/bin/python benchmarks/bench_sweep_overhead.py --trials-per-task 12   # packs of 12
    .venv/bin/python benchmarks/bench_sweep_overhead.py --smoke-test  # 9 trials
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.results import ResultsStore  # noqa: E402
from orchestrator.spec import load_spec  # noqa: E402
from orchestrator.cluster import ray_session  # noqa: E402
from orchestrator.driver import run_sweep  # noqa: E402


def bench_spec(root: Path, seeds: int, concurrency: int, per_task: int,
               smoke: bool = False, pack: str = "auto") -> dict:
    return {
        "name": "bench-overhead",
        "encoders": {"image": {"name": "synthetic:image", "batch_size": 512,
                               "options": {"layers": 3, "planted_layer": 1, "dim": 16}},
                     "text": {"name": "synthetic:text", "batch_size": 512,
                              "options": {"layers": 3, "planted_layer": 2, "dim": 16}}},
        "data": {"train": {"dataset": "synthetic", "split": "train", "options": {"size": 256}},
                 "val": {"dataset": "synthetic", "split": "val", "options": {"size": 64}},
                 "zero_shot": [{"dataset": "synthetic", "split": "test", "name": "classes",
                                "options": {"size": 64}}]},
        "similarity": {"k": 5, "n_samples": 256},
        "training": {"out_dim": 8, "epochs": 1, "batch_size": 128, "lr": 0.003, "patience": 1,
                     "warmup_steps": 1, "n_train": 128},
        "search": [{"name": "cheap", "layers": "all", "seed": list(range(seeds)),
                    "structure_lambda": [10] if smoke else [0, 1, 10],
                    "temperature": [0.05] if smoke else [0.05, 0.1]}],
        "tune": {"max_concurrent_trials": concurrency, "trials_per_task": per_task, "pack": pack},
        "output_dir": str(root / "run"), "cache_dir": str(root / "cache"),
    }


def report(outcome, rows, concurrency: int, per_task: int, total: float, pack: str) -> None:
    n = len(rows)
    compute = float(rows["trial_seconds"].sum())
    train = float(rows["train_seconds"].sum())
    wall = outcome.tune_seconds
    overhead = wall - compute / concurrency
    print(f"trials: {outcome.planned} planned, {outcome.finished} finished, "
          f"{outcome.failed} failed; store rows {n}, unique fingerprints "
          f"{rows['fingerprint'].nunique()} (exactly once: {n == outcome.planned == rows['fingerprint'].nunique()})")
    print(f"sweep wall {total:.1f} s (features, similarity, Tune); "
          f"Tune stage wall {wall:.1f} s, {n / wall:.1f} trials/s")
    print(f"trial compute: Σ {compute:.1f} s ({1000 * compute / n:.1f} ms/trial; "
          f"of which train+eval {1000 * train / n:.1f} ms), slots {concurrency}, "
          f"trials per Tune trial {per_task}, pack {pack} (a pack's wall time is shared among its trials)")
    print(f"per-trial overhead: {1000 * overhead / n:.1f} ms "
          f"({100 * overhead / wall:.0f}% of the Tune stage's wall time)")
    # the overhead's two parts: before the first trial starts (Tune's set-up and the trial
    # processes' start: a Ray worker importing Ray Tune and torch), and between trials
    running = float(rows["finished_at"].max() - rows["started_at"].min())
    start_up = wall - running
    steady = running - compute / concurrency
    print(f"of which start-up (Tune stage start to the first trial's start) {start_up:.1f} s, "
          f"then {1000 * steady / n:.1f} ms/trial between trials "
          f"({100 * steady / running:.0f}% of the {running:.1f} s after the start-up)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="9 pairs x 6 x seeds trials")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--trials-per-task", type=int, default=1)
    parser.add_argument("--pack", choices=("auto", "off"), default="auto",
                        help="tune.pack: the trials of a task train as one pack (auto) or one by one")
    parser.add_argument("--smoke-test", action="store_true",
                        help="1 seed, 1 λ, 1 temperature (9 trials): checks that it runs")
    args = parser.parse_args()
    seeds = 1 if args.smoke_test else args.seeds
    with tempfile.TemporaryDirectory() as tmp, ray_session(num_cpus=2, log=lambda *_: None):
        root = Path(tmp)
        (root / "spec.yaml").write_text(yaml.safe_dump(bench_spec(
            root, seeds, args.concurrency, args.trials_per_task, smoke=args.smoke_test, pack=args.pack)))
        spec = load_spec(root / "spec.yaml")
        started = time.monotonic()
        outcome = run_sweep(spec, log=lambda *_: None)
        total = time.monotonic() - started
        rows = ResultsStore(spec.run_dir).query("trials", dedup=False)
        report(outcome, rows, args.concurrency, args.trials_per_task, total, args.pack)
        again = run_sweep(spec, log=lambda *_: None)
        print(f"second run: {again.finished} trials ran, {again.skipped} skipped; store rows "
              f"{len(ResultsStore(spec.run_dir).query('trials', dedup=False))}")


if __name__ == "__main__":
    main()
