"""A results store built in the test: a small sweep with known numbers.

``make_run(tmp_path)`` writes a run directory through the real
``ResultsStore`` with:
- a 4x4 layer similarity for two metrics, the maximum at (image 2, text 3);
- a layer grid: every pair, linear head, λ=0, N=1000, seed 0, whose
  accuracy rises with similarity (so the correlation is positive);
- a data-scaling grid on the similar (2,3) and last (3,3) pairs, λ in {0, 10},
  N in {100, 1000, 10000}, seeds {0, 1}, accuracy from ``scaling_value``;
- a levels grid (MLP head, λ=10, levels 1/2/3) at N=1000;
- two failed trials with errors and one scheduler-stopped trial;
- spec.json and plan.json (with one planned trial never stored).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from orchestrator.results import ResultsStore

ZS, I2T, T2I = ("zs/toy/top1", "ret/toycap/official/I2T/R@1", "ret/toycap/official/T2I/R@1")
LAYERS = 4
SIMILAR, LAST = (2, 3), (3, 3)


def similarity_score(i: int, j: int, metric: str) -> float:
    """Peaks at SIMILAR; the CKA-like metric is a monotone transform plus a bump."""
    base = 1.0 / (1.0 + abs(i - SIMILAR[0]) + abs(j - SIMILAR[1]))
    return base if metric == "mutual_knn" else base ** 0.5 + 0.01 * i


def grid_accuracy(i: int, j: int) -> float:
    return 0.2 + 0.5 * similarity_score(i, j, "mutual_knn") + 0.01 * ((i * 7 + j * 3) % 5)


def scaling_value(pair: tuple, lam: float, n: int, seed: int) -> float:
    """log-linear in N, +0.1 on the similar pair, +0.05 with R_S, ±0.01 per seed."""
    value = 0.1 * np.log10(n) + (0.1 if pair == SIMILAR else 0.0) + (0.05 if lam else 0.0)
    return float(value + (0.01 if seed else -0.01))


def trial_row(fp: str, grid: str, pair: tuple, lam: float, n: int, seed: int,
              value: float, levels: int = 1, t0: float = 1.7e9, head: str = "linear") -> dict:
    """A done trial row in the store's schema (metrics derived from ``value``)."""
    return {"fingerprint": fp, "grid": grid, "status": "done", "error": "",
            "config/image_layer": pair[0], "config/text_layer": pair[1],
            "config/head": head, "config/head_options": "{}", "config/n_train": n,
            "config/seed": seed, "config/structure_lambda": float(lam),
            "config/structure_levels": levels, "config/lr": 0.001,
            ZS: value, "zs/toy/top5": min(1.0, value + 0.2), I2T: value / 2, T2I: value / 3,
            "best_val_loss": 1.0 - value, "n_train_used": n, "train_seconds": 2.0 + seed,
            "started_at": t0, "finished_at": t0 + 2.0 + seed, "host": "test"}


def build_rows() -> list[dict]:
    """Layer grid, scaling grid and an MLP levels grid (fingerprints as a sweep dedups them)."""
    rows, t = [], 1.7e9
    for i in range(LAYERS):
        for j in range(LAYERS):
            t += 3
            # On the similar/last pairs the grid's trial *is* the scaling trial (same config).
            special = (i, j) in (SIMILAR, LAST)
            value = scaling_value((i, j), 0, 1000, 0) if special else grid_accuracy(i, j)
            rows.append(trial_row(f"grid-{i}-{j}", "layer-grid", (i, j), 0, 1000, 0, value, t0=t))
    for pair in (SIMILAR, LAST):
        for lam in (0, 10):
            for n in (100, 1000, 10000):
                for seed in (0, 1):
                    if (lam, n, seed) == (0, 1000, 0):
                        continue  # stored by the layer grid
                    t += 3
                    rows.append(trial_row(f"scale-{pair}-{lam}-{n}-{seed}", "data-scaling", pair,
                                          lam, n, seed, scaling_value(pair, lam, n, seed), t0=t))
    for levels in (1, 2, 3):
        rows.append(trial_row(f"levels-{levels}", "levels", SIMILAR, 10, 1000, 0,
                              0.5 + 0.01 * levels, levels, t0=t, head="mlp"))
    return rows


def problem_rows() -> list[dict]:
    """Two failures (same error) and one trial stopped early by the scheduler."""
    failed = [{"fingerprint": f"fail-{k}", "grid": "data-scaling", "status": "failed",
               "error": "Traceback (most recent call last):\n  ...\nRuntimeError: CUDA out of memory",
               "config/image_layer": 0, "config/text_layer": 0, "config/head": "linear",
               "started_at": 1.7e9 + k, "finished_at": 1.7e9 + 5 + k, "host": "test"}
              for k in range(2)]
    stopped = {**trial_row("stopped-0", "data-scaling", LAST, 0, 100, 3, 0.05), "status": "stopped"}
    return failed + [stopped]


def similarity_rows() -> list[dict]:
    return [{"row_key": f"{m}/{i}/{j}", "similarity_key": f"key-{m}", "metric": m, "k": 10,
             "n_samples": 100, "image_layer": i, "text_layer": j,
             "score": similarity_score(i, j, m)}
            for m in ("mutual_knn", "cka") for i in range(LAYERS) for j in range(LAYERS)]


SPEC = {"name": "toy", "source": "search_spaces/toy.yaml",
        "encoders": {"image": {"name": "synthetic:image", "options": {"layers": LAYERS}},
                     "text": {"name": "synthetic:text", "options": {"layers": LAYERS}}},
        "data": {"train": {"dataset": "synthetic", "split": "train", "name": "synthetic"},
                 "zero_shot": [{"dataset": "synthetic", "split": "test", "name": "toy"}]},
        "similarity": {"metric": "mutual_knn", "k": 10, "n_samples": 100}}


def write_run(run_dir, trials: list[dict], similarity: list[dict], spec: dict = SPEC,
              planned: list[str] | None = None):
    """A run directory with the given rows, spec.json and plan.json."""
    store = ResultsStore(run_dir)
    store.root.mkdir(parents=True, exist_ok=True)
    store.write("trials", trials)
    store.write("layer_similarity", similarity)
    (run_dir / "spec.json").write_text(json.dumps(spec))
    fingerprints = planned if planned is not None else [r["fingerprint"] for r in trials]
    (run_dir / "plan.json").write_text(json.dumps({"fingerprints": fingerprints}))
    return run_dir


@pytest.fixture
def toy_run(tmp_path):
    """The full toy sweep, plus one planned trial that was never stored."""
    trials = build_rows() + problem_rows()
    planned = [r["fingerprint"] for r in trials] + ["never-ran"]
    return write_run(tmp_path / "run", trials, similarity_rows(), planned=planned)
