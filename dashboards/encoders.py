"""Which encoders to align: the encoder-pair data of the report, apart from the drawing.

A multi-encoder run stores the selection stage's ranking in ``encoder_pairs``
(one row per candidate pair: its CKA at the best layer pair, ``score``, and at
the last layers, ``last_score``) and tags every trial with ``image_encoder``
and ``text_encoder``. :func:`encoder_alignment` sets each pair's score against
the alignment it reached (the best headline metric among its trials), and
:func:`rank_correlation` says how well the score predicts it (Spearman ρ, as
freeze-align's Figures 1 and 4 argue CKA does). The other sections compare
methods within ONE encoder pair (:func:`focus_pair`): mixing pairs there
would average different encoders into one method's row.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pandas as pd
from scipy import stats

PAIR = ["image_encoder", "text_encoder"]
COLUMNS = [*PAIR, "pair", "rank", "score", "last_score", "image_layer", "text_layer", "best", "n_trials"]


def _has(frame: pd.DataFrame, *columns: str) -> bool:
    return not frame.empty and all(c in frame.columns for c in columns)


def latest_selection(pairs: pd.DataFrame) -> pd.DataFrame:
    """The rows of the last ranking written (a run directory re-run with other candidates
    keeps the earlier ranking's rows too), best first."""
    if not _has(pairs, "selection_key", *PAIR, "score"):
        return pd.DataFrame(columns=list(pairs.columns))
    order = "written_at" if "written_at" in pairs else None
    latest = pairs.sort_values(order).iloc[-1] if order else pairs.iloc[-1]
    rows = pairs[pairs["selection_key"] == latest["selection_key"]]
    return rows.sort_values("rank" if "rank" in rows else "score", ascending="rank" in rows)


def trained_pairs(trials: pd.DataFrame) -> list[tuple[str, str]]:
    """The distinct (image, text) encoder pairs of ``trials`` (none for rows without the columns)."""
    if not _has(trials, *PAIR):
        return []
    return [tuple(p) for p in trials[PAIR].dropna().drop_duplicates().itertuples(index=False)]


def focus_pair(trials: pd.DataFrame, selection: pd.DataFrame) -> Optional[tuple[str, str]]:
    """The one pair the per-method sections show when a run trained several: the selection's
    best pair if it was trained, else the pair with the most trials; None for one pair."""
    pairs = trained_pairs(trials)
    if len(pairs) < 2:
        return None
    for row in selection[PAIR].itertuples(index=False) if _has(selection, *PAIR) else []:
        if tuple(row) in pairs:
            return tuple(row)
    counts = trials.groupby(PAIR).size()
    return tuple(counts.idxmax())


def of_pair(frame: pd.DataFrame, pair: Optional[tuple[str, str]]) -> pd.DataFrame:
    """The rows of ``pair`` (all rows when None, or when the rows name no encoders)."""
    if pair is None or not _has(frame, *PAIR):
        return frame
    return frame[(frame[PAIR[0]] == pair[0]) & (frame[PAIR[1]] == pair[1])]


def encoder_alignment(selection: pd.DataFrame, done: pd.DataFrame, metric: Optional[str]) -> pd.DataFrame:
    """Per encoder pair (the selection's, plus any trained outside it): its scores and ``best``,
    the highest ``metric`` of its finished trials (NaN: not trained), and ``n_trials``.

    Empty when there is nothing to compare: no selection and at most one trained pair.
    """
    trained = trained_pairs(done)
    if selection.empty and len(trained) < 2:
        return pd.DataFrame(columns=COLUMNS)
    scored = selection.reindex(columns=[*PAIR, "rank", "score", "last_score", "image_layer", "text_layer"])
    frame = scored.merge(_best(done, metric), on=PAIR, how="outer")
    frame["pair"] = frame[PAIR[0]] + " + " + frame[PAIR[1]]
    frame["n_trials"] = frame["n_trials"].fillna(0).astype(int)
    return frame.sort_values(["rank", "best"], ascending=[True, False], na_position="last")[COLUMNS] \
        .reset_index(drop=True)


def _best(done: pd.DataFrame, metric: Optional[str]) -> pd.DataFrame:
    if not _has(done, *PAIR) or metric is None or metric not in done:
        return pd.DataFrame(columns=[*PAIR, "best", "n_trials"])
    grouped = done.groupby(PAIR)[metric]
    return grouped.agg(best="max", n_trials="count").reset_index()


def rank_correlation(frame: pd.DataFrame, x: str = "score", y: str = "best") -> dict:
    """Spearman ρ (and p) of ``x`` vs ``y`` over the pairs with both; {} under 3 pairs or
    without variation (ρ is undefined)."""
    if not _has(frame, x, y):
        return {}
    points = frame[[x, y]].astype(float).dropna()
    if len(points) < 3 or points[x].nunique() < 2 or points[y].nunique() < 2:
        return {}
    rho, p = stats.spearmanr(points[x], points[y])
    return {"spearman_rho": float(rho), "spearman_p": float(p), "n_pairs": len(points)} \
        if np.isfinite(rho) else {}
