"""The numbers behind the report's science figures, computed apart from the drawing.

Every function takes DataFrames read from the results store and returns a
DataFrame (or a small dict) that a figure or table draws as is; tests check
these numbers on their own. Columns beyond the core schema (see
``orchestrator.results``) are optional: a function that needs a missing
column returns an empty frame and the report shows a note instead.

Vocabulary used here:
- *layer*: "similar" (the most similar pair of the spec's similarity metric,
  the pair layer selection picks on the trial's OWN data: per-trial runs
  store one matrix per training subsample, see :mod:`dashboards.matrices`),
  "last" (the last pair), else "Li/Tj".
- *method*: ``<head> + <layer> [+ R_S]`` (R_S: structure_lambda > 0), the
  paper's row names. When a run has several non-zero λ the λ is added; when
  grids vary the training split (``train_data``), its label is too:
  ``linear + similar [method=random]`` (``[data.train]``: the spec's own).
- *family*: a method without its R_S part (``<head> + <layer>``).
- *baseline*: ``<head> + last`` without R_S, the paper's reference row.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from dashboards.encoders import focus_pair, latest_selection, of_pair
from dashboards.matrices import (SEED, own_label_conditions, own_pairs, run_pairs, selection_of,
                                 similarity_matrix, similarity_metrics, special_pairs,
                                 with_own_pairs)
from orchestrator.results import ResultsStore
from orchestrator.schema import TRAIN_DATA, headline_metric

IMAGE, TEXT, LAMBDA = "config/image_layer", "config/text_layer", "config/structure_lambda"
HEAD, N_TRAIN = "config/head", "n_train_used"
PAIR = [IMAGE, TEXT]


@dataclass
class RunData:
    """Everything the report reads from a run directory."""

    run_dir: Path
    trials: pd.DataFrame  # every stored trial row (done, failed, stopped, ...)
    similarity: pd.DataFrame  # layer_similarity rows (of the focus pair, see below)
    spec: dict
    plan: dict = field(default_factory=dict)
    encoder_pairs: pd.DataFrame = field(default_factory=pd.DataFrame)  # the selection's rows

    def __post_init__(self):
        # A run of several encoder pairs: the per-method sections read one pair (``focus``),
        # the encoder section (dashboards.encoders) compares them all (``all_done``).
        self.focus = focus_pair(self.trials, latest_selection(self.encoder_pairs))
        self.similarity = of_pair(self.similarity, self.focus)
        # each trial's own similar/last pair: that of the matrix of its own subsample
        self.trials = with_own_pairs(self.trials, self.similarity, self.spec)
        has_status = "status" in self.trials
        self.all_done = self.trials[self.trials["status"] == "done"] if has_status else self.trials
        self.done = of_pair(self.all_done, self.focus)


def load_run(run_dir: str | Path) -> RunData:
    """Read the results store, spec.json and plan.json of ``run_dir``."""
    run_dir = Path(run_dir)
    if not (run_dir / "results").is_dir():
        raise FileNotFoundError(f"{run_dir} has no results/ directory: is it a run directory "
                                "written by `structure-sweep run`?")
    store = ResultsStore(run_dir)
    return RunData(run_dir, store.query("trials"), store.query("layer_similarity"),
                   _read_json(run_dir / "spec.json"), _read_json(run_dir / "plan.json"),
                   store.query("encoder_pairs"))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or being rewritten while a sweep runs
        return {}
    return value if isinstance(value, dict) else {}


def has_columns(frame: pd.DataFrame, *columns: str) -> bool:
    return not frame.empty and all(c in frame.columns for c in columns)


# --- metric columns ------------------------------------------------------------

@dataclass(frozen=True)
class MetricColumn:
    column: str  # the store's column
    kind: str  # "zs" (zero-shot accuracy) or "ret" (retrieval R@1)
    dataset: str
    label: str  # short header, e.g. "I2T"


def table_columns(trials: pd.DataFrame) -> list[MetricColumn]:
    """The paper table's columns: zero-shot top-1 per set, then retrieval R@1 I2T/T2I."""
    filled = [c for c in trials.columns if trials[c].notna().any()]
    columns = [MetricColumn(c, "zs", m.group(1), "top-1")
               for c in sorted(filled) if (m := re.fullmatch(r"zs/(.+)/top1", c))]
    for name in sorted({m.group(1) for c in filled if (m := re.fullmatch(r"ret/([^/]+)/.+", c))}):
        for direction in ("I2T", "T2I"):
            column = _retrieval_column(filled, name, direction)
            if column:
                columns.append(MetricColumn(column, "ret", name, direction))
    return columns


def _retrieval_column(columns: list[str], name: str, direction: str) -> str | None:
    # The official protocol is the paper's; "standard" is the fallback.
    for protocol in ("official", "standard"):
        column = f"ret/{name}/{protocol}/{direction}/R@1"
        if column in columns:
            return column
    return None


# --- method names --------------------------------------------------------------

def layer_labels(trials: pd.DataFrame, pairs: dict[str, tuple[int, int]]) -> pd.Series:
    """"similar" / "last" / "Li/Tj" per trial ("similar" wins when they coincide).

    A trial is "similar" when it trained the pair its OWN layer selection picks
    (the matrix of its own subsample, columns ``similar/*`` of
    :func:`dashboards.matrices.own_pairs`), else, where unknown, ``pairs[...]``.
    """
    i, j = trials[IMAGE].astype(int), trials[TEXT].astype(int)
    default = "L" + i.astype(str) + "/T" + j.astype(str)
    conditions = own_label_conditions(trials, pairs)
    if not conditions:
        return default
    return pd.Series(np.select(list(conditions.values()), list(conditions), default=default),
                     index=trials.index)


def rs_labels(trials: pd.DataFrame) -> pd.Series:
    """"" without R_S, " + R_S" with it, " + R_S(λ=v)" when a run has several λ > 0."""
    lam = trials[LAMBDA].fillna(0.0).astype(float) if LAMBDA in trials else pd.Series(
        0.0, index=trials.index)
    positive = sorted(lam[lam > 0].unique())
    names = {v: (f" + R_S(λ={v:g})" if len(positive) > 1 else " + R_S") for v in positive}
    return lam.map(names).fillna("")  # vectorised: one dict lookup per row, no apply


def with_methods(trials: pd.DataFrame, pairs: dict[str, tuple[int, int]]) -> pd.DataFrame:
    """``trials`` plus columns layer, family, method and baseline (see module doc)."""
    if not has_columns(trials, IMAGE, TEXT, HEAD):
        return trials.iloc[0:0].assign(layer="", family="", method="", baseline="")
    head, split = trials[HEAD].astype(str), split_labels(trials)
    layer = layer_labels(trials, pairs)
    family = head + " + " + layer + split
    return trials.assign(layer=layer, family=family,
                         method=head + " + " + layer + rs_labels(trials) + split,
                         baseline=head + " + last" + split)


def split_labels(trials: pd.DataFrame) -> pd.Series:
    """" [<train_data>]" per trial when the run trained on several training splits, else ""."""
    split = trials[TRAIN_DATA].fillna("") if TRAIN_DATA in trials else pd.Series("", index=trials.index)
    if split.nunique() < 2:
        return pd.Series("", index=trials.index)
    return " [" + split.replace("", "data.train") + "]"


def named_methods(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows on the similar or last pair when there are any, else all rows.

    The paper's comparisons (table, scaling, sensitivity) are between those
    two pairs; a layer grid's other pairs are the subject of the layer
    section, and as lines they would bury the comparison (144 pairs x heads).
    """
    named = frame[frame["layer"].isin(["similar", "last"])]
    return named if not named.empty else frame


def method_labels(trials: pd.DataFrame, pairs: dict[str, tuple[int, int]]) -> pd.Series:
    """Paper-style method names: ``<head> + <similar|last|Li/Tj> [+ R_S]``."""
    return with_methods(trials, pairs)["method"] if not trials.empty else pd.Series(dtype=str)


# --- the paper table -----------------------------------------------------------

def table_n_train(frame: pd.DataFrame) -> int | None:
    """The n_train of the table: where the most methods were trained (ties: the largest).

    The paper's table compares methods at one data size; this picks the size
    that lets the most rows be compared.
    """
    if not has_columns(frame, N_TRAIN, "method"):
        return None
    coverage = frame.drop_duplicates([N_TRAIN, "method"]).groupby(N_TRAIN).size()
    return int(coverage[coverage == coverage.max()].index.max())


def paper_table(done: pd.DataFrame, pairs: dict, n_train: int | None = None) -> pd.DataFrame:
    """Mean metric per method (rows) and table column (columns), at one n_train.

    Rows are the similar/last methods when the run has any (other pairs are in
    the layer section). Extra columns: ``improv_zs`` and ``improv_ret``, the
    relative improvement (%) over the row's baseline (see
    :func:`relative_improvement`), and ``n_trials``.
    """
    columns = [c.column for c in table_columns(done)]
    frame = with_methods(done, pairs)
    if frame.empty or not columns or N_TRAIN not in frame:
        return pd.DataFrame()
    frame = named_methods(frame)
    n_train = n_train if n_train is not None else table_n_train(frame)
    frame = frame[frame[N_TRAIN] == n_train]
    table = frame.groupby("method")[columns].mean()
    table["n_trials"] = frame.groupby("method").size()
    baselines = frame.drop_duplicates("method").set_index("method")["baseline"]
    table = table.loc[sorted(table.index, key=lambda m: _row_order(m, baselines[m]))]
    for kind in ("zs", "ret"):
        kind_columns = [c.column for c in table_columns(done) if c.kind == kind]
        table[f"improv_{kind}"] = relative_improvement(table[kind_columns], baselines)
    table.attrs["n_train"] = n_train
    return table


def _row_order(method: str, baseline: str) -> tuple:
    # Paper order: per head, the baseline first, then similar, then the rest.
    rank = 0 if method == baseline else 1 if " + similar" in method else 2
    return (baseline, rank, method)


def relative_improvement(table: pd.DataFrame, baselines: pd.Series) -> pd.Series:
    """Mean over columns of (method - baseline) / baseline, in percent, per row.

    This is how the paper's "x% improv." labels are computed: e.g. Linear +
    Similar + R_S vs Linear + Last over the 7 classification columns of its
    table gives 68.4%. A row whose baseline is absent gets NaN; the baseline
    row itself gets 0.
    """
    result = pd.Series(np.nan, index=table.index, dtype=float)
    if table.shape[1] == 0:
        return result
    for method in table.index:
        base = baselines.get(method)
        if base in table.index:
            ratio = (table.loc[method] - table.loc[base]) / table.loc[base]
            result[method] = 100 * ratio.replace([np.inf, -np.inf], np.nan).mean()
    return result


# --- data scaling --------------------------------------------------------------

def scaling_curves(done: pd.DataFrame, metric: str, pairs: dict) -> pd.DataFrame:
    """Mean, std (ddof 1, 0 for one seed) and count of ``metric`` per method and n_train.

    Only methods trained at two or more data sizes form curves (a layer grid
    at one size is not a scaling experiment), on the similar/last pairs when
    the run has them (:func:`named_methods`).
    """
    empty = pd.DataFrame(columns=["method", "baseline", "n_train", "mean", "std", "count"])
    frame = with_methods(done, pairs)
    if frame.empty or metric not in frame or N_TRAIN not in frame:
        return empty
    frame = named_methods(frame[frame[metric].notna()])
    sizes = frame.groupby("method")[N_TRAIN].nunique()
    frame = frame[frame["method"].isin(sizes[sizes > 1].index)]
    if frame.empty:
        return empty
    grouped = frame.groupby(["method", "baseline", N_TRAIN])[metric]
    curves = grouped.agg(["mean", "std", "count"]).reset_index().rename(columns={N_TRAIN: "n_train"})
    return curves.fillna({"std": 0.0}).sort_values(["method", "n_train"]).reset_index(drop=True)


def pairs_to_match(base_n, base_mean, value: float) -> tuple[float, str]:
    """Pairs the baseline needs to reach ``value``, on its curve interpolated in log n.

    Returns (n, how): how is "interpolated", "below" (the baseline's smallest
    size already reaches it: n is that size, an upper bound) or "above" (the
    baseline never reaches it: n is NaN). The first crossing counts.
    """
    n, y = np.asarray(base_n, float), np.asarray(base_mean, float)
    log_n = np.log(n)
    if y[0] >= value:
        return float(n[0]), "below"
    for k in range(1, len(y)):
        if y[k] >= value:  # crossing between k-1 and k, where y rises through value
            t = (value - y[k - 1]) / (y[k] - y[k - 1])
            return float(np.exp(log_n[k - 1] + t * (log_n[k] - log_n[k - 1]))), "interpolated"
    return float("nan"), "above"


def label_efficiency(curves: pd.DataFrame) -> pd.DataFrame:
    """For each non-baseline method and n_train: pairs the baseline needs to match it.

    ``ratio`` = baseline pairs / method pairs (the paper's "label efficiency").
    """
    rows = []
    for (method, baseline), curve in curves.groupby(["method", "baseline"]):
        base = curves[curves["method"] == baseline].sort_values("n_train")
        if method == baseline or base.empty:
            continue
        for n, value in zip(curve["n_train"], curve["mean"]):
            needed, how = pairs_to_match(base["n_train"], base["mean"], value)
            rows.append({"method": method, "baseline": baseline, "n_train": int(n),
                         "value": value, "baseline_n": needed, "how": how,
                         "ratio": needed / n})
    columns = ["method", "baseline", "n_train", "value", "baseline_n", "how", "ratio"]
    return pd.DataFrame(rows, columns=columns)


# --- layer similarity vs accuracy --------------------------------------------

def layer_accuracy(done: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean ``metric`` per layer pair, over the setting that covers most pairs.

    The layer grid of a sweep trains many pairs under one setting (head, λ,
    n_train); that setting is found as the one with the most distinct pairs,
    and its seeds are averaged. ``attrs``: its ``n_train`` and the ``seeds``
    covering the most pairs: the subsamples whose similarity matrices match it.
    """
    empty = pd.DataFrame(columns=["image_layer", "text_layer", "accuracy"])
    setting = [c for c in (HEAD, LAMBDA, N_TRAIN) if c in done]
    if not has_columns(done, *PAIR, metric) or not setting:
        return empty
    frame = done[done[metric].notna()]
    coverage = frame.drop_duplicates(setting + PAIR).groupby(setting, dropna=False).size()
    if coverage.empty:
        return empty
    chosen = frame.set_index(setting).loc[[coverage.idxmax()]].reset_index()
    accuracy = chosen.groupby(PAIR)[metric].mean().reset_index()
    accuracy = accuracy.set_axis(["image_layer", "text_layer", "accuracy"], axis=1)
    accuracy.attrs = {"n_train": int(chosen[N_TRAIN].iloc[0]) if N_TRAIN in chosen else None,
                      "seeds": _grid_seeds(chosen)}
    return accuracy


def _grid_seeds(chosen: pd.DataFrame) -> list[int] | None:
    """The seeds that cover the most layer pairs of a setting (the layer grid's, not
    those of another grid's few trials that happen to share the setting)."""
    if SEED not in chosen or chosen[SEED].isna().all():
        return None
    coverage = chosen.drop_duplicates([SEED] + PAIR).groupby(SEED).size()
    return sorted(int(s) for s in coverage[coverage == coverage.max()].index)


def similarity_vs_accuracy(matrix: pd.DataFrame, accuracy: pd.DataFrame) -> pd.DataFrame:
    """Layer pairs with both a similarity score (from ``matrix``) and a trained accuracy."""
    if matrix.empty or accuracy.empty:
        return pd.DataFrame(columns=["image_layer", "text_layer", "score", "accuracy"])
    scores = matrix.stack().rename("score").reset_index()
    scores = scores.astype({"image_layer": int, "text_layer": int})
    accuracy = accuracy.astype({"image_layer": int, "text_layer": int})
    return scores.merge(accuracy, on=["image_layer", "text_layer"], how="inner")


def correlation(points: pd.DataFrame) -> dict[str, float]:
    """Spearman ρ and Pearson r of score vs accuracy, with p-values (needs 3 pairs)."""
    if len(points) < 3 or points["score"].nunique() < 2 or points["accuracy"].nunique() < 2:
        return {}
    rho, rho_p = stats.spearmanr(points["score"], points["accuracy"])
    r, r_p = stats.pearsonr(points["score"], points["accuracy"])
    return {"spearman_rho": float(rho), "spearman_p": float(rho_p),
            "pearson_r": float(r), "pearson_p": float(r_p), "n_pairs": len(points)}


__all__ = ["RunData", "MetricColumn", "load_run", "has_columns", "table_columns",
           "similarity_metrics", "similarity_matrix", "special_pairs", "run_pairs", "own_pairs",
           "selection_of",
           "layer_labels", "rs_labels", "split_labels", "with_methods", "named_methods", "method_labels", "table_n_train",
           "paper_table", "relative_improvement", "scaling_curves", "pairs_to_match",
           "label_efficiency", "layer_accuracy", "similarity_vs_accuracy", "correlation",
           "headline_metric"]
