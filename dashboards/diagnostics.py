"""Figure data for the report's summary, sensitivity, search and health sections.

Like :mod:`dashboards.data`, plain functions of store DataFrames that return
what a figure draws; everything is aggregated here (histograms, samples,
downsampled timelines) so a 100,000-trial store still makes a small page.
"""

from __future__ import annotations

import platform
import warnings
from importlib import metadata

import numpy as np
import pandas as pd

from dashboards.data import (HEAD, LAMBDA, N_TRAIN, RunData, has_columns, named_methods,
                             with_methods)
from orchestrator.results import plan_progress
from orchestrator.keys import content_key

LEVELS = "config/structure_levels"
STATUSES = ("done", "failed", "stopped")
# Config columns that never make sense as a searched hyperparameter axis.
NOT_PARAMS = {"config/head_options"}
VERSION_PACKAGES = ("structure-sweep", "torch", "ray", "timm", "transformers", "numpy",
                    "pandas", "plotly", "optuna")


# --- summary and provenance ------------------------------------------------------

def spec_fingerprint(spec: dict) -> str:
    """A stable short hash of the resolved spec (key order does not matter)."""
    if not spec:
        return ""
    return content_key(spec, 16)


def trial_counts(run: RunData) -> dict[str, int]:
    """Stored trials by status, plus planned and pending (planned but not stored)."""
    trials = run.trials
    status = trials["status"] if "status" in trials else pd.Series(dtype=str)
    counts = {s: int((status == s).sum()) for s in STATUSES}
    counts["other"] = int(len(status) - sum(counts.values()))
    counts.update(plan_progress(run.plan, trials))  # grid fingerprints or Optuna counts
    return counts


def wall_time(trials: pd.DataFrame) -> dict[str, float]:
    """First start to last finish (seconds), and the summed trial compute time."""
    out = {}
    if has_columns(trials, "started_at", "finished_at"):
        out["wall_seconds"] = float(trials["finished_at"].max() - trials["started_at"].min())
        out["first_start"] = float(trials["started_at"].min())
        out["last_finish"] = float(trials["finished_at"].max())
    seconds = trial_seconds(trials)
    if seconds is not None:
        out["compute_seconds"] = float(seconds.sum())
    return out


def encoders(spec: dict) -> list[str]:
    """"role: [label =] name (options)" per encoder of the spec (each candidate of a list)."""
    lines = []
    for role, value in (spec.get("encoders") or {}).items():
        for enc in value if isinstance(value, list) else [value]:
            options = ", ".join(f"{k}={v}" for k, v in (enc.get("options") or {}).items())
            label = f"{enc['label']} = " if enc.get("label") else ""
            lines.append(f"{role}: {label}{enc.get('name', '?')}" + (f" ({options})" if options else ""))
    return lines


def datasets(spec: dict) -> list[str]:
    """"role: name[, name...]" per data role of the spec."""
    lines = []
    for role, value in (spec.get("data") or {}).items():
        entries = value if isinstance(value, list) else [value]
        names = [f"{e.get('name') or e.get('dataset')} ({e.get('split', '?')})"
                 for e in entries if isinstance(e, dict)]
        lines.append(f"{role}: {', '.join(names) or '—'}")
    return lines


def versions(trials: pd.DataFrame) -> dict[str, str]:
    """Versions recorded in the store (columns named *version*), then of this environment."""
    out = {c: ", ".join(map(str, trials[c].dropna().unique()[:5]))
           for c in trials.columns if "version" in c.lower()}
    out["python"] = platform.python_version()
    for package in VERSION_PACKAGES:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return out


def summary(run: RunData) -> dict:
    """Everything section 1 shows."""
    spec = run.spec
    return {"name": spec.get("name", run.run_dir.name), "source": spec.get("source", ""),
            "run_dir": str(run.run_dir.resolve()), "fingerprint": spec_fingerprint(spec),
            "encoders": encoders(spec), "datasets": datasets(spec),
            "grids": sorted(run.trials["grid"].dropna().unique()) if "grid" in run.trials else [],
            "counts": trial_counts(run), "time": wall_time(run.trials),
            "versions": versions(run.trials)}


# --- λ / levels sensitivity and R_S gain --------------------------------------------

def sensitivity(done: pd.DataFrame, pairs: dict, param: str, metric: str,
                only_rs: bool = False) -> pd.DataFrame:
    """Mean/std/count of ``metric`` vs ``param``, one line per family, at one n_train.

    The n_train is the one where ``param`` was varied most (most (family,
    value) combinations; ties: the largest), given in ``attrs["n_train"]``;
    how R_S behaves across sizes is :func:`rs_gain`'s figure. Lines whose
    ``param`` takes a single value are dropped. ``only_rs`` keeps λ > 0
    trials (the levels only matter with the regulariser).
    """
    columns = ["line", "value", "mean", "std", "count"]
    frame = named_methods(with_methods(done, pairs))
    if not has_columns(frame, param, metric, N_TRAIN):
        return pd.DataFrame(columns=columns)
    if only_rs and LAMBDA in frame:
        frame = frame[frame[LAMBDA] > 0]
    frame = frame[frame[metric].notna()]
    spread = frame.groupby(["family", N_TRAIN])[param].nunique()
    spread = spread[spread > 1]
    if spread.empty:
        return pd.DataFrame(columns=columns)
    combos = spread.groupby(level=N_TRAIN).sum()
    n_train = combos[combos == combos.max()].index.max()
    frame = frame[(frame[N_TRAIN] == n_train)
                  & frame["family"].isin(spread.xs(n_train, level=N_TRAIN).index)]
    curve = frame.groupby(["family", param])[metric].agg(["mean", "std", "count"]).reset_index()
    curve = curve.rename(columns={"family": "line", param: "value"}).fillna({"std": 0.0})
    curve = curve[columns].sort_values(["line", "value"]).reset_index(drop=True)
    curve.attrs["n_train"] = int(n_train)
    return curve


def rs_gain(done: pd.DataFrame, pairs: dict, metric: str) -> pd.DataFrame:
    """Gain of R_S over the same family without it, per family, λ and n_train.

    ``gain`` is the difference of seed means; ``rel_gain`` the paper's
    relative improvement in percent, (with - without) / without.
    """
    columns = ["family", "lam", "n_train", "without", "with", "gain", "rel_gain"]
    frame = named_methods(with_methods(done, pairs))
    if not has_columns(frame, LAMBDA, metric, N_TRAIN):
        return pd.DataFrame(columns=columns)
    means = frame.groupby(["family", N_TRAIN, LAMBDA])[metric].mean().reset_index()
    base = means[means[LAMBDA] == 0].drop(columns=LAMBDA).rename(columns={metric: "without"})
    rs = means[means[LAMBDA] > 0].rename(columns={metric: "with", LAMBDA: "lam"})
    gain = rs.merge(base, on=["family", N_TRAIN]).rename(columns={N_TRAIN: "n_train"})
    gain["gain"] = gain["with"] - gain["without"]
    gain["rel_gain"] = 100 * gain["gain"] / gain["without"].replace(0, np.nan)
    return gain[columns].sort_values(["family", "lam", "n_train"]).reset_index(drop=True)


# --- search diagnostics ----------------------------------------------------------

def varied_params(done: pd.DataFrame) -> list[str]:
    """Config columns that take more than one value among ``done`` trials."""
    columns = [c for c in done.columns if c.startswith("config/") and c not in NOT_PARAMS]
    return [c for c in columns if done[c].nunique(dropna=False) > 1]


def sample_rows(frame: pd.DataFrame, limit: int, seed: int = 0) -> pd.DataFrame:
    """At most ``limit`` rows, a uniform random sample (fixed seed) when there are more."""
    return frame if len(frame) <= limit else frame.sample(limit, random_state=seed)


def parallel_data(done: pd.DataFrame, params: list[str], metric: str,
                  limit: int = 1500) -> tuple[pd.DataFrame, dict[str, list[str]]]:
    """Rows for parallel coordinates: a sample of trials, categoricals as integer codes.

    Returns (frame with one column per param plus ``metric``, {param: category
    names} for the coded params). ``frame.attrs["total"]`` is the population.
    """
    frame = done[done[metric].notna()] if metric in done else done.iloc[0:0]
    sample = sample_rows(frame[params + [metric]] if not frame.empty else frame, limit)
    categories, columns = {}, {}
    for p in params:
        values = sample[p]
        numeric = pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
        if numeric and values.notna().all():  # NaN (e.g. lr=None) breaks an axis: code it
            columns[p] = values.astype(float)
        else:
            names = sorted(values.astype(str).unique())
            categories[p] = names
            columns[p] = values.astype(str).map({n: k for k, n in enumerate(names)})
    out = pd.DataFrame(columns, index=sample.index).assign(**{metric: sample[metric]})
    out.attrs["total"] = len(frame)
    return out, categories


def param_importance(done: pd.DataFrame, params: list[str], metric: str,
                     limit: int = 4000) -> pd.Series:
    """Optuna's hyperparameter importance of ``params`` for ``metric`` (sums to 1).

    A study is built from (a sample of) the stored trials with
    ``optuna.trial.create_trial``; every searched value is a categorical choice
    (sweeps are grids). The evaluator is PED-ANOVA, the one of Optuna's that
    needs no scikit-learn (fANOVA does).
    """
    import optuna

    if not params or metric not in done:
        return pd.Series(dtype=float)
    frame = sample_rows(done[done[metric].notna()], limit)
    if len(frame) < 8:
        return pd.Series(dtype=float)
    study = _study(frame, params, metric, optuna)
    evaluator = optuna.importance.PedAnovaImportanceEvaluator()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PED-ANOVA is flagged experimental
        importance = optuna.importance.get_param_importances(study, evaluator=evaluator)
    return pd.Series(importance, dtype=float).sort_values(ascending=False)


def _study(frame: pd.DataFrame, params: list[str], metric: str, optuna):
    from optuna.distributions import CategoricalDistribution

    values = {p: frame[p].astype(str) for p in params}
    distributions = {p: CategoricalDistribution(sorted(v.unique())) for p, v in values.items()}
    names = {p: p.removeprefix("config/") for p in params}
    distributions = {names[p]: d for p, d in distributions.items()}
    rows = zip(*(values[p] for p in params), frame[metric].astype(float))
    trials = [optuna.trial.create_trial(params=dict(zip(names.values(), row[:-1])),
                                        distributions=distributions, value=row[-1])
              for row in rows]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    study.add_trials(trials)
    return study


def histogram(values: pd.Series, groups: pd.Series, bins: int = 30) -> pd.DataFrame:
    """Counts per (group, bin) on shared edges: a histogram without the raw points."""
    values = values.astype(float)
    keep = values.notna()
    if not keep.any():
        return pd.DataFrame(columns=["group", "left", "right", "count"])
    edges = np.histogram_bin_edges(values[keep], bins=bins)
    rows = []
    for group, part in values[keep].groupby(groups[keep].astype(str)):
        counts, _ = np.histogram(part, bins=edges)
        rows.append(pd.DataFrame({"group": group, "left": edges[:-1], "right": edges[1:],
                                  "count": counts}))
    return pd.concat(rows, ignore_index=True)


def outcome_distribution(done: pd.DataFrame, metric: str, bins: int = 30) -> pd.DataFrame:
    """Histogram of ``metric`` over done trials, one series per grid."""
    if metric not in done or done.empty:
        return pd.DataFrame(columns=["group", "left", "right", "count"])
    groups = done["grid"] if "grid" in done else pd.Series("all", index=done.index)
    return histogram(done[metric], groups.fillna("?"), bins)


# --- sweep health ----------------------------------------------------------------

def trial_seconds(trials: pd.DataFrame) -> pd.Series | None:
    """Per-trial duration: trial_seconds (with feature fetching) or train_seconds, else
    finished_at - started_at."""
    column = next((c for c in ("trial_seconds", "train_seconds")
                   if c in trials and trials[c].notna().any()), None)
    if column:
        seconds = trials[column]
        if has_columns(trials, "started_at", "finished_at"):  # failed rows lack train_seconds
            seconds = seconds.fillna(trials["finished_at"] - trials["started_at"])
        return seconds.astype(float)
    if has_columns(trials, "started_at", "finished_at"):
        return (trials["finished_at"] - trials["started_at"]).astype(float)
    return None


def timeline(trials: pd.DataFrame, points: int = 300) -> pd.DataFrame:
    """Cumulative trials finished over time per status, at most ``points`` per status."""
    if not has_columns(trials, "finished_at", "status"):
        return pd.DataFrame(columns=["status", "time", "count"])
    parts = []
    for status, group in trials.dropna(subset=["finished_at"]).groupby("status"):
        times = np.sort(group["finished_at"].to_numpy(float))
        keep = np.unique(np.linspace(0, len(times) - 1, min(points, len(times))).astype(int))
        parts.append(pd.DataFrame({"status": status, "time": pd.to_datetime(times[keep], unit="s"),
                                   "count": keep + 1}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(
        columns=["status", "time", "count"])


def failures(trials: pd.DataFrame, examples: int = 50) -> pd.DataFrame:
    """Failed trials grouped by the last line of their error, most frequent first."""
    columns = ["error", "count", "grids", "example", "detail"]
    if not has_columns(trials, "status") or not (trials["status"] == "failed").any():
        return pd.DataFrame(columns=columns)
    failed = trials[trials["status"] == "failed"]
    error = failed["error"].fillna("").astype(str) if "error" in failed else pd.Series(
        "", index=failed.index)
    last = error.str.strip().str.split("\n").str[-1].replace("", "(no error text)")
    frame = failed.assign(_last=last, _error=error)
    grid = frame["grid"].astype(str) if "grid" in frame else pd.Series("?", index=frame.index)
    grouped = frame.assign(_grid=grid).groupby("_last")
    out = pd.DataFrame({"count": grouped.size(),
                        "grids": grouped["_grid"].agg(lambda g: ", ".join(sorted(set(g)))),
                        "example": grouped["fingerprint"].first() if "fingerprint" in frame
                        else "", "detail": grouped["_error"].first().str[-3000:]})
    out = out.reset_index().rename(columns={"_last": "error"})
    return out[columns].sort_values("count", ascending=False).head(examples).reset_index(drop=True)


def durations(trials: pd.DataFrame, bins: int = 30) -> pd.DataFrame:
    """Histogram of per-trial seconds, one series per status."""
    seconds = trial_seconds(trials)
    if seconds is None or "status" not in trials:
        return pd.DataFrame(columns=["group", "left", "right", "count"])
    return histogram(seconds, trials["status"], bins)


def duration_stats(trials: pd.DataFrame) -> dict[str, float]:
    """Median, 95th percentile and maximum trial seconds."""
    seconds = trial_seconds(trials)
    if seconds is None or seconds.dropna().empty:
        return {}
    s = seconds.dropna()
    return {"median": float(s.median()), "p95": float(s.quantile(0.95)), "max": float(s.max())}


__all__ = ["spec_fingerprint", "trial_counts", "wall_time", "encoders", "datasets", "versions",
           "summary", "sensitivity", "rs_gain", "varied_params", "sample_rows", "parallel_data",
           "param_importance", "histogram", "outcome_distribution", "trial_seconds", "timeline",
           "failures", "durations", "duration_stats", "HEAD", "LEVELS"]
