"""Report section 9: neighbourhood preservation over training (the ``epochs`` table).

Per recorded epoch, each trial stores the mutual-kNN agreement between an
encoder's frozen features and its head's output on a fixed probe set
(``nbr_image``, ``nbr_text``; see :mod:`trials.neighbourhood`). The figure
shows it over epochs for λ = 0 against λ > 0: R_S is meant to keep the
encoders' neighbourhoods, so the λ > 0 lines should stay higher.
:func:`neighbourhood_curves` is the tested data; the drawing computes nothing.
"""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards import figures as F
from dashboards import html as H
from orchestrator.results import ResultsStore

MODALITIES = {"nbr_image": "image", "nbr_text": "text"}
_CURVE_COLUMNS = ["n_train", "lam", "line", "modality", "epoch", "mean", "std", "trials"]


def neighbourhood_curves(epochs: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over trials (seeds, and any other setting sharing N and λ) of each
    modality's agreement per (N, λ, epoch); ``line`` names the λ and, when the run
    has several N, the N. Empty when the table has no agreement values."""
    needed = {"fingerprint", "epoch", "structure_lambda", "n_train", *MODALITIES}
    if epochs.empty or not needed <= set(epochs.columns):
        return pd.DataFrame(columns=_CURVE_COLUMNS)
    long = epochs.melt(id_vars=["n_train", "structure_lambda", "epoch"], value_vars=list(MODALITIES),
                       var_name="modality", value_name="agreement").dropna(subset=["agreement"])
    long["n_train"] = long["n_train"].fillna(-1).astype(int)  # None = the whole split
    long["modality"] = long["modality"].map(MODALITIES)
    curves = (long.groupby(["n_train", "structure_lambda", "modality", "epoch"])["agreement"]
              .agg(mean="mean", std="std", trials="count").reset_index()
              .rename(columns={"structure_lambda": "lam"}))
    curves["std"] = curves["std"].fillna(0.0)  # one trial: no spread
    several_n = curves["n_train"].nunique() > 1
    curves["line"] = [_line(lam, n, several_n) for lam, n in zip(curves["lam"], curves["n_train"])]
    return curves[_CURVE_COLUMNS].sort_values(["line", "modality", "epoch"]).reset_index(drop=True)


def _line(lam: float, n: int, several_n: bool) -> str:
    kind = "no R_S" if lam == 0 else "R_S"
    name = f"λ={lam:g} ({kind})"
    return f"{name}, N={'all' if n < 0 else f'{n:,}'}" if several_n else name


def neighbourhood_figure(curves: pd.DataFrame) -> go.Figure:
    """Agreement vs epoch, one panel per modality, one line per λ (and N)."""
    panels = sorted(curves["modality"].unique())
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[f"{m} encoder" for m in panels],
                        shared_yaxes=True)
    palette = F.colors(curves["line"])
    for col, modality in enumerate(panels, start=1):
        for line, group in curves[curves["modality"] == modality].groupby("line", sort=True):
            fig.add_trace(go.Scatter(x=group["epoch"], y=group["mean"], name=line, legendgroup=line,
                                     showlegend=col == 1, mode="lines+markers",
                                     error_y={"type": "data", "array": group["std"], "visible": True},
                                     line={"color": palette[line], "dash": "dot" if "no R_S" in line else None}),
                          1, col)
        fig.update_xaxes(title_text="epoch", row=1, col=col)
    fig.update_yaxes(title_text="mutual-kNN agreement, frozen vs aligned", row=1, col=1)
    fig.update_layout(title="Neighbourhood preservation over training (mean ± std over trials)",
                      template=F.TEMPLATE, height=420)
    return fig


def neighbourhood_section(run, epochs: pd.DataFrame | None = None) -> H.Section:
    """Section 9; ``epochs`` defaults to the run directory's ``epochs`` table."""
    if epochs is None:
        epochs = ResultsStore(run.run_dir).query("epochs")
    curves = neighbourhood_curves(epochs)
    section = H.Section("neighbourhood", "9. Neighbourhood preservation over training", note=(
        "no trained trial recorded its epochs (closed-form heads and runs written before "
        "the epochs table have none)"))
    if curves.empty:
        return section
    section.lead = ("How much of each frozen encoder's neighbourhood structure its head keeps: "
                    "mutual-kNN agreement (k=10) between the frozen features and the head's "
                    "output on the first 500 validation pairs, per recorded epoch. The "
                    "regulariser R_S (λ > 0) is meant to keep it high; λ = 0 is dotted.")
    section.blocks = [neighbourhood_figure(curves)]
    return section
