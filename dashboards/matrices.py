"""Layer-similarity matrices of a run, and which matrix belongs to which trial.

A run with ``similarity.selection: per_trial`` (the default) stores one matrix
per training subsample: rows of ``layer_similarity`` carry ``selection``,
``n_train`` (the subsample's pairs, matching a trial's ``n_train_used``),
``seed`` (matching ``config/seed``) and ``similarity_n``. A trial's "similar"
pair is the one its own matrix picks, so labels and figures look up that
matrix (:func:`own_pairs`, :func:`similarity_matrix` with ``n_train``/``seeds``);
an ``oracle`` run has one whole-split matrix for every trial. Runs written
before per-trial selection have neither column: one matrix, as before.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from orchestrator.schema import TRAIN_DATA
from trials.selection import select_layers

N_TRAIN, SEED, IMAGE, TEXT = "n_train_used", "config/seed", "config/image_layer", "config/text_layer"
RULES = ("similar", "last")
OWN = {rule: (f"{rule}/image_layer", f"{rule}/text_layer") for rule in RULES}  # per-trial pairs


def _has(frame: pd.DataFrame, *columns: str) -> bool:
    return not frame.empty and all(c in frame.columns for c in columns)


def selection_of(spec: dict | None) -> str | None:
    """The run's ``similarity.selection`` (None for runs written before it existed)."""
    return ((spec or {}).get("similarity") or {}).get("selection")


def similarity_metrics(similarity: pd.DataFrame, spec: dict | None = None) -> list[str]:
    """Stored similarity metrics, the spec's (the one layer selection used) first."""
    if not _has(similarity, "metric", "score"):
        return []
    metrics = sorted(similarity["metric"].dropna().unique())
    selected = ((spec or {}).get("similarity") or {}).get("metric")
    return sorted(metrics, key=lambda m: m != selected)


def similarity_matrix(similarity: pd.DataFrame, metric: str | None = None, *,
                      selection: str | None = None, n_train: int | None = None,
                      seeds=None, strict: bool = False) -> pd.DataFrame:
    """[image layer x text layer] scores of one metric (default: the first stored).

    With ``n_train`` and ``seeds`` (per-trial runs): the mean of the matrices of
    those subsamples, the data the trials themselves chose on. Otherwise, or
    where none is stored (``strict``: then empty), the run's overall matrix:
    the oracle's, else that of the largest subsample, else the last written.
    ``attrs`` say which: ``selection``, ``n_train``, ``seeds``.
    """
    if not _has(similarity, "metric", "score", "image_layer", "text_layer"):
        return pd.DataFrame()
    metric = metric or similarity["metric"].iloc[0]
    rows = similarity[similarity["metric"] == metric]
    if selection and "selection" in rows and (rows["selection"] == selection).any():
        rows = rows[rows["selection"] == selection]
    matched = _subsample_rows(rows, n_train, seeds)
    if matched.empty and strict:
        return pd.DataFrame()
    rows = matched if not matched.empty else _overall_rows(rows)
    matrix = rows.pivot_table(index="image_layer", columns="text_layer", values="score")
    matrix.attrs = _provenance(rows)
    return matrix


def _subsample_rows(rows: pd.DataFrame, n_train, seeds) -> pd.DataFrame:
    """The rows of the subsamples (n_train, each of ``seeds``), one matrix (key) per seed."""
    if n_train is None or seeds is None or not _has(rows, "n_train", "seed", "similarity_key"):
        return rows.iloc[0:0]
    rows = rows[(rows["n_train"] == n_train) & rows["seed"].isin(list(seeds))]
    rows = rows[rows["selection"] != "oracle"] if "selection" in rows else rows
    last_keys = rows.groupby("seed")["similarity_key"].last()  # settings changed: the latest
    return rows[rows["similarity_key"].isin(last_keys)]


def _overall_rows(rows: pd.DataFrame) -> pd.DataFrame:
    if "similarity_key" not in rows or rows["similarity_key"].nunique() <= 1:
        return rows
    if "selection" in rows and (rows["selection"] == "oracle").any():
        rows = rows[rows["selection"] == "oracle"]
    elif "n_train" in rows and rows["n_train"].notna().any():
        rows = rows[rows["n_train"] == rows["n_train"].max()]
    return rows[rows["similarity_key"] == rows["similarity_key"].iloc[-1]]


def _provenance(rows: pd.DataFrame) -> dict:
    if rows.empty:
        return {}
    first = rows.iloc[0]
    return {"selection": first.get("selection") if "selection" in rows else None,
            "n_train": int(first["n_train"]) if "n_train" in rows and pd.notna(first["n_train"]) else None,
            "seeds": sorted(int(s) for s in rows["seed"].dropna().unique()) if "seed" in rows else []}


def special_pairs(matrix: pd.DataFrame, seed: int = 0) -> dict[str, tuple[int, int]]:
    """The pairs the "similar" and "last" layer rules pick on a matrix (trials.selection)."""
    values = matrix.to_numpy()
    if matrix.empty or not np.isfinite(values).all():  # a partly written matrix names no pair
        return {}
    picks = {rule: select_layers(values, rule, seed=seed)[0] for rule in RULES}
    return {rule: (int(matrix.index[i]), int(matrix.columns[j])) for rule, (i, j) in picks.items()}


def run_pairs(run) -> dict[str, tuple[int, int]]:
    """The run's overall special pairs under the spec's similarity metric (see
    :func:`similarity_matrix`); per-trial pairs are :func:`own_pairs`."""
    metrics = similarity_metrics(run.similarity, run.spec)
    if not metrics:
        return {}
    return special_pairs(similarity_matrix(run.similarity, metrics[0], selection=selection_of(run.spec)))


def own_pairs(trials: pd.DataFrame, similarity: pd.DataFrame, spec: dict | None) -> pd.DataFrame:
    """Per trial, the similar and last pairs of ITS matrix (columns :data:`OWN`).

    Per-trial runs: the matrix of the trial's subsample (``n_train_used``,
    ``config/seed``) of its training split (``train_data``, where grids vary
    it); NaN where none is stored (the report then uses the run's overall
    pairs). Other runs: all NaN (the overall pairs are theirs).
    """
    out = pd.DataFrame(np.nan, index=trials.index, columns=[c for rule in RULES for c in OWN[rule]])
    metrics = similarity_metrics(similarity, spec)
    if selection_of(spec) != "per_trial" or not metrics or not _has(trials, N_TRAIN, SEED):
        return out
    split_of = lambda frame: (frame[TRAIN_DATA].fillna("") if TRAIN_DATA in frame  # noqa: E731
                              else pd.Series("", index=frame.index))
    splits = split_of(similarity)
    for (n, seed, split), group in trials.groupby([trials[N_TRAIN], trials[SEED], split_of(trials)]):
        matrix = similarity_matrix(similarity[splits == split], metrics[0], selection="per_trial",
                                   n_train=n, seeds=[seed], strict=True)
        for rule, pair in special_pairs(matrix, seed=int(seed)).items():
            out.loc[group.index, list(OWN[rule])] = pair
    return out


def with_own_pairs(trials: pd.DataFrame, similarity: pd.DataFrame, spec: dict | None) -> pd.DataFrame:
    """``trials`` plus the :data:`OWN` columns (replacing any it had)."""
    if trials.empty:
        return trials
    base = trials.drop(columns=[c for cols in OWN.values() for c in cols if c in trials])
    return base.join(own_pairs(base, similarity, spec))


def own_label_conditions(trials: pd.DataFrame, pairs: dict) -> dict[str, pd.Series]:
    """Rule -> rows on the pair that rule picks: the trial's own pair where known, else ``pairs``."""
    i, j = trials[IMAGE].astype(int), trials[TEXT].astype(int)
    out = {}
    for rule in RULES:
        overall = (i == pairs[rule][0]) & (j == pairs[rule][1]) if rule in pairs else False
        if OWN[rule][0] in trials:
            oi, oj = trials[OWN[rule][0]], trials[OWN[rule][1]]
            out[rule] = pd.Series(np.where(oi.notna(), (i == oi) & (j == oj), overall), index=trials.index)
        elif rule in pairs:
            out[rule] = overall
    return out
