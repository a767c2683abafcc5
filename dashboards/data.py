"""The numbers behind each report figure, computed apart from the drawing.

Every function takes DataFrames read from the results store and returns a
DataFrame (or a small dict) that a figure draws as is; tests check these
numbers on their own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator.results import ResultsStore, headline_metric


@dataclass
class RunData:
    run_dir: Path
    trials: pd.DataFrame  # every stored trial row (done and failed)
    similarity: pd.DataFrame  # layer_similarity rows
    spec: dict

    @property
    def done(self) -> pd.DataFrame:
        if self.trials.empty:
            return self.trials
        return self.trials[self.trials["status"] == "done"]


def load_run(run_dir: str | Path) -> RunData:
    run_dir = Path(run_dir)
    if not (run_dir / "results").is_dir():
        raise FileNotFoundError(f"{run_dir} has no results/ directory: is it a run directory "
                                "written by `structure-sweep run`?")
    store = ResultsStore(run_dir)
    spec_file = run_dir / "spec.json"
    spec = json.loads(spec_file.read_text()) if spec_file.is_file() else {}
    return RunData(run_dir, store.read("trials"), store.read("layer_similarity"), spec)


def similarity_matrix(similarity: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """[image layer x text layer] score matrix of one metric (the first stored)."""
    if similarity.empty:
        return pd.DataFrame()
    metric = metric or similarity["metric"].iloc[0]
    rows = similarity[similarity["metric"] == metric]
    return rows.pivot_table(index="image_layer", columns="text_layer", values="score")


def special_pairs(matrix: pd.DataFrame) -> dict[str, tuple[int, int]]:
    """The most similar pair ("similar") and the last pair ("last") of a matrix."""
    if matrix.empty:
        return {}
    i, j = np.unravel_index(np.nanargmax(matrix.to_numpy()), matrix.shape)
    return {"similar": (int(matrix.index[i]), int(matrix.columns[j])),
            "last": (int(matrix.index[-1]), int(matrix.columns[-1]))}


def method_labels(trials: pd.DataFrame, pairs: dict[str, tuple[int, int]]) -> pd.Series:
    """Paper-style method names: ``<head> + <similar|last|Li/Tj> [+ R_S]``."""
    by_pair = {pair: name for name, pair in reversed(list(pairs.items()))}

    def label(row) -> str:
        pair = (int(row["config/image_layer"]), int(row["config/text_layer"]))
        layer = by_pair.get(pair, f"L{pair[0]}/T{pair[1]}")
        rs = " + R_S" if row["config/structure_lambda"] > 0 else ""
        return f"{row['config/head']} + {layer}{rs}"

    return trials.apply(label, axis=1) if not trials.empty else pd.Series(dtype=str)


def scaling_curves(trials: pd.DataFrame, metric: str, pairs: dict) -> pd.DataFrame:
    """Mean, std and count of ``metric`` over seeds, per method and n_train.

    Only trials on the "similar" or "last" pair form curves: those are the
    methods a data-scaling comparison is about.
    """
    if trials.empty or metric not in trials:
        return pd.DataFrame(columns=["method", "n_train", "mean", "std", "count"])
    frame = trials.assign(method=method_labels(trials, pairs),
                          n_train=trials["n_train_used"])
    frame = frame[frame["method"].str.contains(r"\+ (?:similar|last)", regex=True)]
    grouped = frame.groupby(["method", "n_train"])[metric]
    curves = grouped.agg(["mean", "std", "count"]).reset_index()
    return curves.fillna({"std": 0.0}).sort_values(["method", "n_train"]).reset_index(drop=True)


def layer_accuracy(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean ``metric`` per layer pair, over the setting that covers most pairs.

    The layer grid of a sweep trains many pairs under one setting (head, λ,
    n_train); that setting is found as the one with the most distinct pairs,
    and its seeds are averaged.
    """
    if trials.empty or metric not in trials:
        return pd.DataFrame(columns=["image_layer", "text_layer", "accuracy"])
    setting = ["config/head", "config/structure_lambda", "n_train_used"]
    pair = ["config/image_layer", "config/text_layer"]
    coverage = trials.groupby(setting)[pair].apply(lambda g: len(g.drop_duplicates()))
    chosen = trials.set_index(setting).loc[[coverage.idxmax()]].reset_index()
    accuracy = chosen.groupby(pair)[metric].mean().reset_index()
    return accuracy.set_axis(["image_layer", "text_layer", "accuracy"], axis=1)


def similarity_vs_accuracy(similarity: pd.DataFrame, accuracy: pd.DataFrame,
                           metric: str | None = None) -> pd.DataFrame:
    """Layer pairs with both a similarity score and a trained accuracy."""
    matrix = similarity_matrix(similarity, metric)
    if matrix.empty or accuracy.empty:
        return pd.DataFrame(columns=["image_layer", "text_layer", "score", "accuracy"])
    scores = matrix.stack().rename("score").reset_index()
    return scores.merge(accuracy, on=["image_layer", "text_layer"], how="inner")


def correlation(points: pd.DataFrame) -> dict[str, float]:
    """Spearman ρ and Pearson r of score vs accuracy, with p-values."""
    if len(points) < 3:
        return {}
    rho, rho_p = stats.spearmanr(points["score"], points["accuracy"])
    r, r_p = stats.pearsonr(points["score"], points["accuracy"])
    return {"spearman_rho": float(rho), "spearman_p": float(rho_p),
            "pearson_r": float(r), "pearson_p": float(r_p), "n_pairs": len(points)}


__all__ = ["RunData", "load_run", "similarity_matrix", "special_pairs", "method_labels",
           "scaling_curves", "layer_accuracy", "similarity_vs_accuracy", "correlation",
           "headline_metric"]
