"""The HTML report of a run: figures drawn from :mod:`dashboards.data`.

One self-contained page (plotly.js inlined once), readable offline. A
section without data is replaced by a one-line note, never an empty plot.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import data as D

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2")


def scaling_figure(curves: pd.DataFrame, metric: str) -> go.Figure:
    """Metric vs n_train (log x), one line per method, ±1 std band over seeds."""
    fig = go.Figure()
    for index, (method, group) in enumerate(curves.groupby("method", sort=True)):
        color = PALETTE[index % len(PALETTE)]
        upper, lower = group["mean"] + group["std"], group["mean"] - group["std"]
        fig.add_trace(go.Scatter(x=list(group["n_train"]) + list(group["n_train"])[::-1],
                                 y=list(upper) + list(lower)[::-1], fill="toself",
                                 fillcolor=color, opacity=0.15, line={"width": 0},
                                 hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=group["n_train"], y=group["mean"], name=method,
                                 mode="lines+markers", line={"color": color},
                                 customdata=group[["std", "count"]],
                                 hovertemplate="n=%{x}<br>mean=%{y:.3f}<br>std=%{customdata[0]:.3f}"
                                               "<br>seeds=%{customdata[1]}"))
    fig.update_layout(title=f"Data scaling: {metric}", xaxis_title="paired training samples",
                      yaxis_title=metric, xaxis_type="log", template="plotly_white")
    return fig


def similarity_figure(matrix: pd.DataFrame, accuracy: pd.DataFrame, points: pd.DataFrame,
                      corr: dict, pairs: dict, metric: str, sim_metric: str) -> go.Figure:
    """Similarity heatmap | accuracy heatmap | scatter of similarity vs accuracy."""
    acc = accuracy.pivot_table(index="image_layer", columns="text_layer", values="accuracy")
    title = (f"Spearman ρ={corr['spearman_rho']:.2f} (p={corr['spearman_p']:.1e}), "
             f"Pearson r={corr['pearson_r']:.2f} (p={corr['pearson_p']:.1e})") if corr else ""
    fig = make_subplots(rows=1, cols=3, subplot_titles=(
        f"layer similarity ({sim_metric})", f"{metric} of trained pairs", title or "similarity vs accuracy"))
    fig.add_trace(go.Heatmap(z=matrix.to_numpy(), x=list(matrix.columns), y=list(matrix.index),
                             colorscale="Viridis", colorbar={"x": 0.29, "len": 0.9},
                             hovertemplate="image %{y}, text %{x}: %{z:.3f}<extra></extra>"), 1, 1)
    if not acc.empty:
        fig.add_trace(go.Heatmap(z=acc.to_numpy(), x=list(acc.columns), y=list(acc.index),
                                 colorscale="Magma", colorbar={"x": 0.645, "len": 0.9},
                                 hovertemplate="image %{y}, text %{x}: %{z:.3f}<extra></extra>"), 1, 2)
    fig.add_trace(go.Scatter(x=points["score"], y=points["accuracy"], mode="markers",
                             name="layer pairs", marker={"color": "#444"},
                             text=[f"L{i}/T{j}" for i, j in zip(points["image_layer"], points["text_layer"])],
                             hovertemplate="%{text}: sim=%{x:.3f}, acc=%{y:.3f}<extra></extra>"), 1, 3)
    for (name, (i, j)), symbol in zip(pairs.items(), ("star", "x")):
        for col in (1, 2):
            fig.add_trace(go.Scatter(x=[j], y=[i], mode="markers", name=f"{name} pair",
                                     marker={"symbol": symbol, "size": 14, "color": "white",
                                             "line": {"width": 1, "color": "black"}},
                                     showlegend=col == 1), 1, col)
        hit = points[(points["image_layer"] == i) & (points["text_layer"] == j)]
        fig.add_trace(go.Scatter(x=hit["score"], y=hit["accuracy"], mode="markers",
                                 marker={"symbol": symbol, "size": 14, "color": "#d62728"},
                                 showlegend=False), 1, 3)
    for col in (1, 2):
        fig.update_xaxes(title_text="text layer", row=1, col=col)
        fig.update_yaxes(title_text="image layer", row=1, col=col)
    fig.update_xaxes(title_text="similarity", row=1, col=3)
    fig.update_yaxes(title_text=metric, row=1, col=3)
    fig.update_layout(title="Does layer similarity predict alignment quality?", height=460,
                      template="plotly_white", legend={"orientation": "h", "y": -0.2})
    return fig


def build_sections(run: D.RunData) -> list[tuple[str, go.Figure | None, str]]:
    """(title, figure or None, note) for each section, in page order."""
    done, metric = run.done, D.headline_metric(run.done) if not run.done.empty else None
    matrix = D.similarity_matrix(run.similarity)
    pairs = D.special_pairs(matrix)
    sections = []
    curves = D.scaling_curves(done, metric, pairs) if metric else pd.DataFrame()
    if not curves.empty and curves["n_train"].nunique() > 1:
        sections.append(("Data scaling", scaling_figure(curves, metric), ""))
    else:
        sections.append(("Data scaling", None, "no method was trained at more than one n_train"))
    accuracy = D.layer_accuracy(done, metric) if metric else pd.DataFrame()
    points = D.similarity_vs_accuracy(run.similarity, accuracy)
    if not matrix.empty and not points.empty:
        sim_metric = run.similarity["metric"].iloc[0]
        fig = similarity_figure(matrix, accuracy, points, D.correlation(points), pairs, metric,
                                sim_metric)
        sections.append(("Layer similarity vs accuracy", fig, _pairs_note(pairs, D.correlation(points))))
    else:
        sections.append(("Layer similarity vs accuracy", None,
                         "needs a layer-similarity table and trained layer pairs"))
    return sections


def _pairs_note(pairs: dict, corr: dict) -> str:
    parts = [f"{name} pair: image layer {i}, text layer {j}" for name, (i, j) in pairs.items()]
    if corr:
        parts.append(f"Spearman ρ = {corr['spearman_rho']:.3f} over {corr['n_pairs']} pairs")
    return "; ".join(parts)


def render_html(run: D.RunData) -> str:
    trials = run.trials
    counts = trials["status"].value_counts().to_dict() if not trials.empty else {}
    summary = (f"{counts.get('done', 0)} trials done, {counts.get('failed', 0)} failed. "
               f"Spec: {html.escape(str(run.spec.get('source', '')))}")
    body, first = [], True
    for title, fig, note in build_sections(run):
        body.append(f"<section><h2>{html.escape(title)}</h2>")
        if note:
            body.append(f"<p class='note'>{html.escape(note)}</p>")
        if fig is not None:
            body.append(fig.to_html(full_html=False, include_plotlyjs=first,
                                    config={"displaylogo": False}))
            first = False
        body.append("</section>")
    name = html.escape(str(run.spec.get("name", run.run_dir.name)))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>structure-sweep: {name}"
            f"</title><style>body{{font-family:sans-serif;margin:2em;max-width:1400px}}"
            f".note{{color:#555}}</style></head><body><h1>structure-sweep report: {name}</h1>"
            f"<p>{summary}<br>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"
            + "".join(body) + "</body></html>")


def write_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``RUN_DIR/report.html``)."""
    run = D.load_run(run_dir)
    output = Path(output) if output else Path(run_dir) / "report.html"
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(render_html(run), encoding="utf-8")
    tmp.replace(output)  # a browser never sees a half-written page
    return output.resolve()
