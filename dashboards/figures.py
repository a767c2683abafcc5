"""Plotly drawing of the figure data from :mod:`dashboards.data` and :mod:`dashboards.diagnostics`.

Each function draws one figure from already-aggregated data and computes
nothing of substance itself, so what a figure shows is what the data tests
checked.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf")
PAIR_SYMBOLS = {"similar": "star", "last": "x"}
TEMPLATE = "plotly_white"


def colors(names) -> dict[str, str]:
    """One stable colour per name (sorted), so a method looks the same in every figure."""
    return {n: PALETTE[k % len(PALETTE)] for k, n in enumerate(sorted(set(names)))}


def short(metric: str) -> str:
    """A readable metric name: ``zs/cifar10/top1`` -> ``cifar10 top1``."""
    parts = metric.split("/")
    if parts[0] == "ret" and len(parts) == 5:
        return f"{parts[1]} {parts[3]} {parts[4]}"
    return " ".join(parts[1:]) if parts[0] in ("zs", "ret") else metric


def _band(x, mean, std, color: str, group: str) -> go.Scatter:
    """A filled ±1 std band (drawn under its line, hidden from the legend)."""
    x = list(x)
    return go.Scatter(x=x + x[::-1], y=list(mean + std) + list(mean - std)[::-1], fill="toself",
                      fillcolor=color, opacity=0.15, line={"width": 0}, hoverinfo="skip",
                      showlegend=False, legendgroup=group)


def scaling_figure(curves: dict[str, pd.DataFrame]) -> go.Figure:
    """Metric vs n_train (log x), one panel per metric, one line per method, ±1 std band."""
    metrics = list(curves)
    palette = colors(m for c in curves.values() for m in c["method"])
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=[short(m) for m in metrics])
    for col, metric in enumerate(metrics, start=1):
        for method, group in curves[metric].groupby("method", sort=True):
            color = palette[method]
            fig.add_trace(_band(group["n_train"], group["mean"], group["std"], color, method), 1, col)
            fig.add_trace(go.Scatter(
                x=group["n_train"], y=group["mean"], name=method, mode="lines+markers",
                line={"color": color}, legendgroup=method, showlegend=col == 1,
                customdata=group[["std", "count"]],
                hovertemplate=f"{method}<br>n=%{{x}}<br>mean=%{{y:.3f}}<br>"
                              "std=%{customdata[0]:.3f}<br>trials=%{customdata[1]}<extra></extra>"),
                1, col)
        fig.update_xaxes(type="log", title_text="paired training samples", row=1, col=col)
        fig.update_yaxes(title_text=short(metric), row=1, col=col)
    fig.update_layout(title="Data scaling (mean over seeds, band ±1 std)", template=TEMPLATE,
                      height=450, legend={"orientation": "h", "y": -0.25})
    return fig


def similarity_figure(matrix: pd.DataFrame, accuracy: pd.DataFrame, points: pd.DataFrame,
                      corr: dict, pairs: dict, metric: str, sim_metric: str) -> go.Figure:
    """Similarity heatmap | accuracy heatmap | scatter of similarity vs accuracy."""
    acc = accuracy.pivot_table(index="image_layer", columns="text_layer", values="accuracy")
    title = (f"ρ={corr['spearman_rho']:.2f} (p={corr['spearman_p']:.1e}), "
             f"r={corr['pearson_r']:.2f} (p={corr['pearson_p']:.1e})") if corr else \
        "similarity vs accuracy (too few pairs for a correlation)"
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.12, subplot_titles=(
        f"layer similarity ({sim_metric})", f"{short(metric)} of trained pairs", title))
    fig.add_trace(_heatmap(matrix, "Viridis", 0.265, sim_metric), 1, 1)
    if not acc.empty:
        fig.add_trace(_heatmap(acc, "Magma", 0.638, short(metric)), 1, 2)
    labels = [f"L{i}/T{j}" for i, j in zip(points["image_layer"], points["text_layer"])]
    fig.add_trace(go.Scatter(x=points["score"], y=points["accuracy"], mode="markers",
                             name="layer pairs", marker={"color": "#444"}, text=labels,
                             hovertemplate="%{text}: sim=%{x:.3f}, acc=%{y:.3f}<extra></extra>"),
                  1, 3)
    _mark_pairs(fig, pairs, points)
    for col in (1, 2):
        fig.update_xaxes(title_text="text layer", dtick=1, row=1, col=col)
        fig.update_yaxes(title_text="image layer", dtick=1, row=1, col=col)
    fig.update_xaxes(title_text=f"similarity ({sim_metric})", row=1, col=3)
    fig.update_yaxes(title_text=short(metric), row=1, col=3)
    fig.update_layout(title=f"Does layer similarity ({sim_metric}) predict alignment quality?",
                      height=470, template=TEMPLATE, legend={"orientation": "h", "y": -0.22})
    return fig


def _heatmap(matrix: pd.DataFrame, scale: str, bar_x: float, name: str) -> go.Heatmap:
    return go.Heatmap(z=matrix.to_numpy(), x=list(matrix.columns), y=list(matrix.index),
                      colorscale=scale, colorbar={"x": bar_x, "xanchor": "left", "len": 0.9, "thickness": 12},
                      hovertemplate=f"image %{{y}}, text %{{x}}: %{{z:.3f}} ({name})<extra></extra>")


def _mark_pairs(fig: go.Figure, pairs: dict, points: pd.DataFrame) -> None:
    """Mark the selected (most similar) and last pairs on all three panels."""
    for name, (i, j) in pairs.items():
        symbol = PAIR_SYMBOLS.get(name, "circle")
        style = {"symbol": symbol, "size": 15, "color": "white", "line": {"width": 2, "color": "black"}}
        for col in (1, 2):
            fig.add_trace(go.Scatter(x=[j], y=[i], mode="markers", name=f"{name} pair (L{i}/T{j})",
                                     marker=style, legendgroup=name, showlegend=col == 1,
                                     hoverinfo="name"), 1, col)
        hit = points[(points["image_layer"] == i) & (points["text_layer"] == j)]
        fig.add_trace(go.Scatter(x=hit["score"], y=hit["accuracy"], mode="markers",
                                 marker={**style, "color": "#d62728"}, legendgroup=name,
                                 showlegend=False, hoverinfo="skip"), 1, 3)


def sensitivity_figure(curve: pd.DataFrame, param: str, metric: str) -> go.Figure:
    """Metric vs a parameter's values (categorical x: grids are sparse), one line per setting."""
    fig = go.Figure()
    palette = colors(curve["line"])
    for line, group in curve.groupby("line", sort=True):
        fig.add_trace(go.Scatter(x=[f"{v:g}" for v in group["value"]], y=group["mean"],
                                 error_y={"type": "data", "array": group["std"], "visible": True},
                                 name=line, mode="lines+markers", line={"color": palette[line]}))
    at = f" at N={curve.attrs['n_train']:,}" if "n_train" in curve.attrs else ""
    fig.update_layout(title=f"{short(metric)} vs {param}{at} (mean ± std over seeds)",
                      xaxis={"title": param, "type": "category"}, yaxis_title=short(metric),
                      template=TEMPLATE, height=400)
    return fig


def rs_gain_figure(gain: pd.DataFrame, metric: str) -> go.Figure:
    """Relative gain of R_S (%) vs n_train (log x), one line per family and λ."""
    fig = go.Figure()
    gain = gain.assign(line=gain["family"] + " + R_S(λ=" + gain["lam"].map("{:g}".format) + ")")
    palette = colors(gain["line"])
    for line, group in gain.groupby("line", sort=True):
        fig.add_trace(go.Scatter(x=group["n_train"], y=group["rel_gain"], name=line,
                                 mode="lines+markers", line={"color": palette[line]},
                                 customdata=group[["without", "with"]],
                                 hovertemplate="n=%{x}<br>gain=%{y:.1f}%<br>without=%{customdata[0]:.3f}"
                                               "<br>with=%{customdata[1]:.3f}<extra></extra>"))
    fig.add_hline(y=0, line={"color": "#999", "dash": "dot"})
    fig.update_layout(title=f"Relative gain of R_S on {short(metric)} vs data size",
                      xaxis={"title": "paired training samples", "type": "log"},
                      yaxis_title="relative gain (%)", template=TEMPLATE, height=400)
    return fig


def parallel_figure(frame: pd.DataFrame, categories: dict, metric: str) -> go.Figure:
    """Parallel coordinates of searched parameters, coloured by the metric."""
    dims = []
    for column in frame.columns.drop(metric):
        dim = {"label": column.removeprefix("config/"), "values": frame[column]}
        if column in categories:
            dim |= {"tickvals": list(range(len(categories[column]))), "ticktext": categories[column]}
        dims.append(dim)
    dims.append({"label": short(metric), "values": frame[metric]})
    fig = go.Figure(go.Parcoords(line={"color": frame[metric], "colorscale": "Viridis",
                                       "showscale": True}, dimensions=dims))
    total = frame.attrs.get("total", len(frame))
    shown = f"all {total:,} trials" if total == len(frame) else \
        f"a random sample of {len(frame):,} of {total:,} trials"
    fig.update_layout(title=f"Searched parameters vs {short(metric)} ({shown})",
                      template=TEMPLATE, height=450)
    return fig


def importance_figure(importance: pd.Series, metric: str) -> go.Figure:
    """Horizontal bars of hyperparameter importance, most important on top."""
    ordered = importance.sort_values()
    fig = go.Figure(go.Bar(x=ordered.to_numpy(), y=[i.removeprefix("config/") for i in ordered.index],
                           orientation="h", marker_color="#1f77b4",
                           hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title=f"Hyperparameter importance for {short(metric)} (Optuna PED-ANOVA)",
                      xaxis_title="importance (sums to 1)", template=TEMPLATE,
                      height=max(300, 40 * len(ordered) + 120))
    return fig


def histogram_figure(hist: pd.DataFrame, title: str, xlabel: str) -> go.Figure:
    """Pre-binned counts as overlaid bars, one series per group."""
    fig = go.Figure()
    palette = colors(hist["group"])
    for group, part in hist.groupby("group", sort=True):
        fig.add_trace(go.Bar(x=(part["left"] + part["right"]) / 2, y=part["count"],
                             width=(part["right"] - part["left"]).to_numpy(), name=str(group),
                             marker_color=palette[group], opacity=0.7,
                             customdata=part[["left", "right"]],
                             hovertemplate="[%{customdata[0]:.3g}, %{customdata[1]:.3g}): "
                                           "%{y}<extra>%{fullData.name}</extra>"))
    fig.update_layout(title=title, xaxis_title=xlabel, yaxis_title="trials", barmode="overlay",
                      template=TEMPLATE, height=380)
    return fig


def timeline_figure(timeline: pd.DataFrame) -> go.Figure:
    """Cumulative trials finished over wall-clock time, one line per status."""
    fig = go.Figure()
    status_colors = {"done": "#2ca02c", "failed": "#d62728", "stopped": "#ff7f0e"}
    for status, part in timeline.groupby("status", sort=True):
        fig.add_trace(go.Scatter(x=part["time"], y=part["count"], name=str(status),
                                 mode="lines", line={"color": status_colors.get(status, "#7f7f7f"),
                                                     "shape": "hv"}))
    fig.update_layout(title="Trials finished over time (cumulative, UTC)", xaxis_title="time",
                      yaxis_title="trials", template=TEMPLATE, height=380)
    return fig


def encoder_pairs_figure(frame: pd.DataFrame, corr: dict, metric: str, sim_metric: str) -> go.Figure:
    """Selection score vs the best ``metric`` each encoder pair reached: one point per pair at
    its best layer pair (filled) and at its last layers (open), as freeze-align Figures 1/4."""
    fig = go.Figure()
    points = frame.dropna(subset=["best"])
    for column, name, symbol in (("score", "best layer pair", "circle"),
                                 ("last_score", "last layers", "circle-open")):
        rho = corr.get(column, {})
        label = f"{name}: ρ = {rho['spearman_rho']:.2f}" if rho else name
        fig.add_trace(go.Scatter(x=points[column], y=points["best"], mode="markers+text", name=label,
                                 text=points["pair"] if column == "score" else None,
                                 textposition="top center", marker={"symbol": symbol, "size": 11},
                                 customdata=points[["pair", "n_trials"]],
                                 hovertemplate="%{customdata[0]}<br>" + f"{sim_metric} ({name})"
                                               "=%{x:.3f}<br>best=%{y:.3f} over %{customdata[1]} "
                                               "trials<extra></extra>"))
    fig.update_layout(title=f"Does {sim_metric} on the probe set predict how well a pair aligns?",
                      xaxis_title=f"{sim_metric} of the encoder pair (probe set)",
                      yaxis_title=f"best {short(metric)} of its trials", template=TEMPLATE, height=450,
                      legend={"orientation": "h", "y": -0.2})
    return fig
