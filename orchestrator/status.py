"""``structure-sweep status``: what a run directory holds, read from its store."""

from __future__ import annotations

import json
from pathlib import Path

from orchestrator.durable import atomic_write_bytes
from orchestrator.results import ResultsStore, plan_progress
from orchestrator.schema import DONE, FAILED, PLAN_FILE, RESULTS_DIR, STOPPED, headline_metric


def write_plan(run_dir: Path, fingerprints: list[str], optuna: dict | None = None) -> None:
    """Record the planned fingerprints (grid search) or trial counts per grid
    (Optuna), so status can count what is pending."""
    plan = {"fingerprints": fingerprints, "optuna": optuna or {}}
    atomic_write_bytes(run_dir / PLAN_FILE, json.dumps(plan).encode())


def run_status(run_dir: Path) -> str:
    if not (run_dir / RESULTS_DIR).is_dir() and not (run_dir / PLAN_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no results/ or {PLAN_FILE}); "
                                "pass the directory that `structure-sweep run` printed")
    trials = ResultsStore(run_dir).query("trials")
    status = trials["status"] if not trials.empty else None
    done = trials[status == DONE] if status is not None else trials
    stopped = trials[status == STOPPED] if status is not None else trials
    failed = trials[status == FAILED] if status is not None else trials
    progress = plan_progress(run_dir, trials)
    pending, n_planned = progress["pending"], progress["planned"]
    lines = [f"run: {run_dir}",
             f"trials: {len(done)} done, {len(stopped)} stopped early, {len(failed)} failed, "
             f"{pending} pending" + (f" (of {n_planned} planned)" if n_planned else "")]
    metric = headline_metric(done)
    if metric:
        best = done.loc[done[metric].idxmax()]
        lines.append(f"best {metric}: {best[metric]:.4f}  (layers {best['config/image_layer']},"
                     f"{best['config/text_layer']}, head {best['config/head']}, "
                     f"λ={best['config/structure_lambda']:g}, n_train={best['config/n_train']}, "
                     f"seed={best['config/seed']})")
    for _, row in failed.head(5).iterrows():
        last = (row["error"] or "").strip().splitlines()[-1:] or [""]
        lines.append(f"failed {row['fingerprint']}: {last[0][:200]}")
    return "\n".join(lines)
