"""Time the HTML report of a large synthetic results store (target: 100,000 trials < 60 s).

    python benchmarks/bench_report.py                  # 100,000 trials, 12 x 12 layers
    python benchmarks/bench_report.py --rows 2000      # quicker
    python benchmarks/bench_report.py --smoke-test     # 500 trials, a few seconds

Not a test: it builds the store through ``ResultsStore.write`` (in part files,
as a sweep writes them), then prints the time of each phase of
``write_report`` and the page size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator.results import ResultsStore

HEADS = np.array(["linear", "mlp", "csa"])
LAMBDAS = np.array([0.0, 0.0, 1.0, 10.0, 100.0])  # λ=0 twice: baselines are common
SIZES = np.array([100, 300, 1000, 3000, 10000])
ERRORS = ["RuntimeError: CUDA out of memory", "ValueError: loss is NaN",
          "ray.exceptions.WorkerCrashedError: the worker died unexpectedly"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="trials in the store")
    parser.add_argument("--layers", type=int, default=12, help="layers of each encoder")
    parser.add_argument("--parts", type=int, default=50, help="part files to write")
    parser.add_argument("--out", help="run directory to keep (default: a temporary one)")
    parser.add_argument("--smoke-test", action="store_true", help="500 trials")
    args = parser.parse_args(argv)
    if args.smoke_test:
        args.rows, args.parts = 500, 5
    return args


def similarity(layers: int) -> np.ndarray:
    """A similarity matrix peaking at the middle-late pair, for two metrics."""
    i, j = np.meshgrid(np.arange(layers), np.arange(layers), indexing="ij")
    return 1.0 / (1.0 + np.abs(i - layers * 2 // 3) + np.abs(j - layers * 3 // 4))


def trials(rows: int, layers: int, rng: np.random.Generator) -> pd.DataFrame:
    """Random grid points; the metric follows similarity, log N, head and λ, plus noise."""
    sim = similarity(layers)
    i, j = rng.integers(0, layers, rows), rng.integers(0, layers, rows)
    head, lam = rng.choice(HEADS, rows), rng.choice(LAMBDAS, rows)
    n, seed = rng.choice(SIZES, rows), rng.integers(0, 5, rows)
    levels = rng.integers(1, 4, rows)
    value = np.clip(0.1 * np.log10(n) + 0.4 * sim[i, j] + 0.05 * (lam > 0)
                    + 0.02 * (head == "csa") + rng.normal(0, 0.02, rows), 0, 1)
    status = rng.choice(["done", "failed", "stopped"], rows, p=[0.96, 0.03, 0.01])
    start = 1.7e9 + np.sort(rng.uniform(0, 3600 * 5, rows))
    seconds = rng.gamma(2.0, 3.0, rows)
    frame = pd.DataFrame({
        "fingerprint": [f"{k:020x}" for k in range(rows)], "grid": rng.choice(["a", "b"], rows),
        "status": status, "error": np.where(status == "failed", rng.choice(ERRORS, rows), ""),
        "config/image_layer": i, "config/text_layer": j, "config/head": head,
        "config/head_options": "{}", "config/n_train": n, "config/seed": seed,
        "config/structure_lambda": lam, "config/structure_levels": levels,
        "config/lr": 1e-3, "config/epochs": 100,
        "zs/cifar10/top1": value, "zs/cifar10/top5": np.minimum(1, value + 0.2),
        "zs/stl10/top1": np.minimum(1, value * 1.1),
        "ret/flickr/official/I2T/R@1": value * 0.6, "ret/flickr/official/T2I/R@1": value * 0.5,
        "best_val_loss": 2 - value, "n_train_used": n, "train_seconds": seconds,
        "started_at": start, "finished_at": start + seconds, "host": "bench"})
    metrics = [c for c in frame if c.startswith(("zs/", "ret/")) or c == "best_val_loss"]
    frame.loc[status == "failed", metrics + ["train_seconds"]] = np.nan
    return frame


def write_store(run_dir: Path, frame: pd.DataFrame, layers: int, parts: int) -> None:
    store = ResultsStore(run_dir)
    for rows in np.array_split(np.arange(len(frame)), parts):
        store.write("trials", frame.iloc[rows].to_dict("records"))
    sim = similarity(layers)
    store.write("layer_similarity", [
        {"row_key": f"{m}/{i}/{j}", "similarity_key": m, "metric": m, "k": 10, "n_samples": 1000,
         "image_layer": i, "text_layer": j, "score": float(sim[i, j] ** p)}
        for m, p in (("mutual_knn", 1.0), ("cka", 0.5)) for i in range(layers)
        for j in range(layers)])
    spec = {"name": "bench", "source": "benchmarks/bench_report.py",
            "similarity": {"metric": "mutual_knn"}}
    (run_dir / "spec.json").write_text(json.dumps(spec))
    (run_dir / "plan.json").write_text(json.dumps({"fingerprints": list(frame["fingerprint"])}))


def timed(label: str, fn):
    start = time.perf_counter()
    value = fn()
    print(f"  {label:<28s} {time.perf_counter() - start:7.2f} s")
    return value


def main(argv=None) -> int:
    from dashboards import data as D
    from dashboards.report import build_sections, write_report

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.out or tmp)
        frame = trials(args.rows, args.layers, np.random.default_rng(0))
        print(f"store: {args.rows:,} trials, {args.layers}x{args.layers} layers -> {run_dir}")
        timed("write store", lambda: write_store(run_dir, frame, args.layers, args.parts))
        print("phases (each measured on its own):")
        run = timed("load the store", lambda: D.load_run(run_dir))
        timed("compute + draw sections", lambda: build_sections(run))
        start = time.perf_counter()
        page = write_report(run_dir)
        total = time.perf_counter() - start
        print(f"write_report (load, compute, draw, write): {total:.2f} s for {args.rows:,} trials; "
              f"page {page.stat().st_size / 1e6:.1f} MB "
              f"({'under' if total < 60 else 'OVER'} the 60 s target)")
    return 0 if total < 60 else 1


if __name__ == "__main__":
    raise SystemExit(main())
