"""The STRUCTURE paper's two claims, read off a run as numbers the report states.

- *R_S helps most when paired data is scarce*: the relative gain of R_S
  (λ > 0 over λ = 0, means over seeds) on the most similar pair, per data size.
- *Align the most similar layers*: the most similar pair against the last pair
  without R_S, per data size.

Data functions return frames (tested on their own); :func:`claims` words them.
"""

from __future__ import annotations

import pandas as pd

from dashboards.data import HEAD, LAMBDA, N_TRAIN, has_columns, named_methods, split_labels, with_methods
from dashboards.diagnostics import rs_gain

SEED = "config/seed"


def rs_gain_on_similar(done: pd.DataFrame, pairs: dict, metric: str) -> pd.DataFrame:
    """R_S's gain on each head's most similar pair at each N (the largest λ run)."""
    gain = rs_gain(done, pairs, metric)
    gain = gain[gain["family"].str.contains(" + similar", regex=False)]  # "[split]" may follow
    if gain.empty:
        return gain
    return gain[gain["lam"] == gain.groupby("family")["lam"].transform("max")].reset_index(drop=True)


def similar_vs_last(done: pd.DataFrame, pairs: dict, metric: str) -> pd.DataFrame:
    """Seed means of ``metric`` on the similar and the last pair without R_S, per head and N."""
    columns = ["head", "n_train", "similar", "last", "seeds"]
    frame = named_methods(with_methods(done, pairs))
    if not has_columns(frame, LAMBDA, N_TRAIN, metric) or frame.empty:
        return pd.DataFrame(columns=columns)
    frame = frame[frame[LAMBDA].fillna(0) == 0]
    frame = frame.assign(**{HEAD: frame[HEAD].astype(str) + split_labels(frame)})  # one per training split
    table = frame.pivot_table(index=[HEAD, N_TRAIN], columns="layer", values=metric, aggfunc="mean")
    if not {"similar", "last"} <= set(table.columns):
        return pd.DataFrame(columns=columns)
    seeds = frame.groupby([HEAD, N_TRAIN])[SEED].nunique() if SEED in frame else 1
    out = table[["similar", "last"]].assign(seeds=seeds).dropna().reset_index()
    return out.rename(columns={HEAD: "head", N_TRAIN: "n_train"})[columns]


def claims(done: pd.DataFrame, pairs: dict, metric: str) -> list[str]:
    """One sentence per claim the run can speak to (none when it has no such grid)."""
    out = []
    gain = rs_gain_on_similar(done, pairs, metric)
    for family, rows in gain.groupby("family"):
        if rows["n_train"].nunique() > 1:
            small, large = rows.iloc[0], rows.iloc[-1]
            out.append(f"{family}: R_S (λ={small['lam']:g}) changes {metric} by "
                       f"{small['rel_gain']:+.1f}% at N={small['n_train']:g} "
                       f"({small['without']:.3f} → {small['with']:.3f}) and by "
                       f"{large['rel_gain']:+.1f}% at N={large['n_train']:g} "
                       f"({large['without']:.3f} → {large['with']:.3f}).")
    versus = similar_vs_last(done, pairs, metric)
    for head, rows in versus.groupby("head"):
        wins = int((rows["similar"] > rows["last"]).sum())
        sizes = ", ".join(f"N={r.n_train:g}: {r.similar:.3f} vs {r.last:.3f}"
                          for r in rows.itertuples())
        out.append(f"{head}: the most similar pair beats the last pair (no R_S) at {wins} of "
                   f"{len(rows)} data sizes ({sizes}; means over up to {rows['seeds'].max()} seeds).")
    return out
