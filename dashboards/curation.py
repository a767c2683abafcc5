"""Report section 10: the curated training data's concept coverage (the ``curation`` table).

A sweep that reads a ``curated`` dataset stores, per concept, how many
captions its concept-balanced subset holds and how many an equal-size random
subset of the same pool holds (``orchestrator.schema.CURATION_COLUMNS``).
freeze-align §3.2's point is balance: every concept gets up to ``per_concept``
captions, where a random subset follows the pool's long tail. Both subsets are
counted by one rule, each caption's nearest prototype; the curated subset's
own assignment is shown beside it. Where the grids trained on several
training splits (``train_data``: the curated set and its random control, or
several ``per_concept``), a table sets each method's accuracy on each split
side by side. :func:`coverage_frames`, :func:`coverage_summary` and
:func:`split_table` are the tested data; the drawing computes nothing.
The section is left out of a report whose run read no curated dataset.
"""

from __future__ import annotations

from typing import Optional

import pandas as pd
import plotly.graph_objects as go

from dashboards import data as D
from dashboards import figures as F
from dashboards import html as H
from orchestrator.results import ResultsStore
from orchestrator.schema import TRAIN_DATA

SUBSETS = {"curated": "curated: assigned concept", "curated_nearest": "curated: nearest prototype",
           "random_nearest": "random (equal size): nearest prototype"}
_COLUMNS = ["concept", "concept_name", *SUBSETS]
_SUMMARY = ["subset", "captions", "concepts covered", "min", "max", "cv"]


def coverage_frames(table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Per curated dataset of the run (``role/dataset``): the rows of its latest stored
    selection, one per concept, by concept index. Empty without curation rows."""
    needed = {"role", "dataset", "selection_key", "concept", "concept_name", *SUBSETS}
    if table.empty or not needed <= set(table.columns):
        return {}
    out = {}
    for (role, dataset), rows in table.groupby(["role", "dataset"], sort=True):
        order = rows.sort_values("written_at") if "written_at" in rows else rows
        latest = rows[rows["selection_key"] == order["selection_key"].iloc[-1]]
        latest = latest[latest["control_key"] == latest["control_key"].iloc[-1]] \
            if "control_key" in latest else latest
        out[f"{role}/{dataset}"] = latest.sort_values("concept")[_COLUMNS].reset_index(drop=True)
    return out


def coverage_summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per subset: its captions, concepts with at least one, min and max per concept and
    the coefficient of variation (std / mean over concepts; 0 = perfectly balanced)."""
    rows = []
    for column, label in SUBSETS.items():
        counts = frame[column].to_numpy(dtype=float)
        mean = counts.mean() if len(counts) else float("nan")
        rows.append({"subset": label, "captions": int(counts.sum()), "concepts covered": int((counts > 0).sum()),
                     "min": int(counts.min()) if len(counts) else 0, "max": int(counts.max()) if len(counts) else 0,
                     "cv": float(counts.std() / mean) if mean > 0 else float("nan")})
    return pd.DataFrame(rows, columns=_SUMMARY)


def split_table(done: pd.DataFrame, metric: Optional[str], pairs: dict) -> pd.DataFrame:
    """Mean ``metric`` (seeds averaged) per method (rows) and training split (columns, in
    first-trained order; "data.train": the spec's own), with the trials behind each in
    ``attrs["counts"]``. Empty unless the finished trials span several training splits."""
    if metric is None or metric not in done or TRAIN_DATA not in done:
        return pd.DataFrame()
    split = done[TRAIN_DATA].fillna("").replace("", "data.train")
    if split.nunique() < 2:
        return pd.DataFrame()
    methods = D.with_methods(done.drop(columns=[TRAIN_DATA]), pairs)["method"]  # the split apart
    frame = pd.DataFrame({"method": methods, "split": split, "value": done[metric]})
    both = frame.pivot_table(index="method", columns="split", values="value", aggfunc=["mean", "count"])
    order = list(dict.fromkeys(split))
    table = both["mean"][order]
    table.attrs["counts"] = both["count"][order].fillna(0).astype(int)
    return table


def split_html(table: pd.DataFrame, metric: str) -> str:
    counts = table.attrs["counts"]
    head = "".join(f"<th>{H.esc(c)}</th>" for c in table.columns)
    rows = "".join(
        f"<tr><td class='name'>{H.esc(method)}</td>"
        + "".join(f"<td>{H.fmt(row[c], 3)} (n={counts.loc[method, c]})</td>"
                  for c in table.columns) + "</tr>"
        for method, row in table.iterrows())
    return (f"<p>{H.esc(metric)} by training split (mean over seeds; n: finished trials)</p>"
            f"<table><tr><th class='name'>method</th>{head}</tr>{rows}</table>")


def coverage_figure(frame: pd.DataFrame, title: str) -> go.Figure:
    """Captions per concept, one bar group per concept, one bar per subset."""
    palette = F.colors(SUBSETS.values())
    fig = go.Figure([go.Bar(x=frame["concept_name"], y=frame[column], name=label,
                            marker={"color": palette[label]}) for column, label in SUBSETS.items()])
    fig.update_layout(title=title, barmode="group", template=F.TEMPLATE, height=420,
                      xaxis_title="concept", yaxis_title="captions")
    return fig


def summary_html(summary: pd.DataFrame) -> str:
    rows = "".join(f"<tr><td class='name'>{H.esc(r['subset'])}</td><td>{r['captions']:,}</td>"
                   f"<td>{r['concepts covered']}</td><td>{r['min']:,}</td><td>{r['max']:,}</td>"
                   f"<td>{H.fmt(r['cv'], 2)}</td></tr>" for _, r in summary.iterrows())
    return ("<table><tr><th class='name'>subset</th><th>captions</th><th>concepts covered</th>"
            f"<th>min / concept</th><th>max / concept</th><th>CV</th></tr>{rows}</table>")


def curation_section(run, table: Optional[pd.DataFrame] = None,
                     pairs: Optional[dict] = None) -> Optional[H.Section]:
    """Section 10, or None when the run read no curated dataset; ``table`` defaults to the
    run directory's ``curation`` table, ``pairs`` to the run's special pairs."""
    if table is None:
        table = ResultsStore(run.run_dir).query("curation")
    frames = coverage_frames(table)
    if not frames:
        return None
    section = H.Section("curation", "10. Curated training data: concept coverage")
    section.lead = (
        "The concept-balanced subset (freeze-align §3.2: each concept, weakest first, takes up to "
        f"{_per_concept(table)} of its closest captions not taken yet) against a random subset of the "
        "same size from the same pool. Both are counted by each caption's nearest concept prototype "
        "(cosine); the curated subset's own assignment is the first bar. CV: the spread of the "
        "per-concept counts relative to their mean (0: perfectly balanced).")
    for name, frame in frames.items():
        section.blocks += [coverage_figure(frame, f"Captions per concept: {name}"),
                           summary_html(coverage_summary(frame))]
    metric = D.headline_metric(run.done)
    by_split = split_table(run.done, metric, D.run_pairs(run) if pairs is None else pairs)
    if not by_split.empty:
        section.blocks.append(split_html(by_split, metric))
    return section


def _per_concept(table: pd.DataFrame) -> str:
    values = sorted({int(v) for v in table["per_concept"].dropna()}) if "per_concept" in table else []
    return " / ".join(f"{v:,}" for v in values) or "per_concept"

