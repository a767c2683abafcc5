"""The HTML report of a run: sections built from figure data, drawn, written atomically.

``write_report(run_dir, output=None)`` is the entry point (the CLI and the
sweep driver call it); ``watch`` rewrites the report while a sweep runs.
Each ``*_section`` function turns a :class:`~dashboards.data.RunData` into
one :class:`~dashboards.html.Section`; a section without data carries a
one-line note instead of an empty plot.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from dashboards import data as D
from dashboards import diagnostics as G
from dashboards import encoders as E
from dashboards import figures as F
from dashboards import html as H
from dashboards.curation import curation_section
from dashboards.departures import departure_counts, departures_html
from dashboards.findings import claims
from dashboards.neighbourhood import neighbourhood_section

MAX_SCALING_PANELS = 4


def _headline(run: D.RunData) -> str | None:
    return D.headline_metric(run.done) if not run.done.empty else None


# --- 1. summary and provenance ---------------------------------------------------

def summary_section(run: D.RunData) -> H.Section:
    s = G.summary(run)
    c, t = s["counts"], s["time"]
    counts = (f"{c['done']} done, {c['failed']} failed, {c['stopped']} stopped (early, by the "
              f"scheduler)" + (f", {c['other']} other" if c["other"] else "")
              + (f"; {c['planned']} planned, {c['pending']} not yet stored" if c["planned"] else ""))
    rows = [("spec", f"{s['source'] or '—'}  (fingerprint {s['fingerprint'] or '—'})"),
            ("run directory", s["run_dir"]), ("encoders", "; ".join(s["encoders"]) or "—"),
            ("datasets", "; ".join(s["datasets"]) or "—"),
            ("grids", ", ".join(s["grids"]) or "—"), ("trials", counts),
            ("wall time", _wall(t)),
            ("versions", ", ".join(f"{k} {v}" for k, v in s["versions"].items()))]
    lead = ("What was run and where it stands. The spec fingerprint identifies the exact "
            "resolved spec; versions are those recorded in the store, then of the environment "
            "that wrote this report. The departures are the named options by which the finished "
            "trials left the official code's behaviour, and how many trials used each.")
    blocks = [H.key_values(rows), departures_html(departure_counts(run.all_done, run.spec))]
    return H.Section("summary", "1. Summary and provenance",
                     blocks + ([H.spec_html(run.spec)] if run.spec else []), lead=lead)


def _wall(t: dict) -> str:
    if "wall_seconds" not in t:
        return "—"
    start = datetime.fromtimestamp(t["first_start"], timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (f"{H.duration(t['wall_seconds'])} from {start} "
            f"({H.duration(t.get('compute_seconds'))} of trial time summed)")


# --- 2. which encoders to align ------------------------------------------------------

def encoders_section(run: D.RunData) -> H.Section:
    metric = D.headline_metric(run.all_done) if not run.all_done.empty else None
    frame = E.encoder_alignment(E.latest_selection(run.encoder_pairs), run.all_done, metric)
    section = H.Section("encoders", "2. Which encoders to align", note=(
        "one encoder pair and no encoder-pair selection: nothing to compare"))
    if frame.empty:
        return section
    sim_metric = (run.spec.get("encoder_selection") or {}).get("metric", "score")
    corr = {x: E.rank_correlation(frame, x) for x in ("score", "last_score")}
    if frame[["score", "best"]].notna().all(axis=1).any():
        section.blocks.append(F.encoder_pairs_figure(frame, corr, metric, sim_metric))
    section.blocks.append(H.encoder_pairs_html(frame, F.short(metric or "best"), run.focus))
    section.lead = _encoders_lead(run, corr, sim_metric, metric)
    return section


def _encoders_lead(run: D.RunData, corr: dict, sim_metric: str, metric: str | None) -> str:
    text = (f"freeze-align §3.1: before any trial, every candidate (image, text) pair was scored "
            f"with {sim_metric} on a probe set (its best layer pair, and its last layers); "
            f"the y-axis is the best {F.short(metric) if metric else 'metric'} any trial of that "
            "pair reached (a pair trained in more settings has more chances: compare pairs a grid "
            "trains alike). ")
    for column, name in (("score", "best layer pair"), ("last_score", "last layers")):
        c = corr[column]
        text += (f"Spearman ρ ({name}) = {c['spearman_rho']:.3f} (p = {c['spearman_p']:.2g}) over "
                 f"{c['n_pairs']} pairs. " if c else f"ρ ({name}): needs 3 trained pairs. ")
    if run.focus:
        text += (f"The sections below show one pair, {' + '.join(run.focus)} (in bold): "
                 "methods are compared within a pair.")
    return H.esc(text)


# --- 3. the paper table -----------------------------------------------------------

def table_section(run: D.RunData, pairs: dict) -> H.Section:
    table = D.paper_table(run.done, pairs)
    section = H.Section("table", "3. Main table (paper style)", note=(
        "no finished trial with zero-shot or retrieval metrics yet"))
    if table.empty:
        return section
    section.lead = (
        f"Mean over seeds at N = {table.attrs['n_train']:,} paired samples, in %. Method = head + "
        "layer pair (similar: the most similar pair; last: the last layers) [+ R_S: STRUCTURE "
        "regulariser, λ > 0]. Best of each column <u><b>underlined</b></u>. Improvement, as the "
        "paper computes it: the mean over columns of (method − baseline) / baseline, baseline = "
        "the same head on the last layers without R_S; zero-shot and retrieval separately.")
    section.blocks = [H.paper_table_html(table, D.table_columns(run.done))]
    return section


# --- 4. data scaling ---------------------------------------------------------------

def scaling_section(run: D.RunData, pairs: dict) -> H.Section:
    metrics = [c.column for c in D.table_columns(run.done)][:MAX_SCALING_PANELS]
    curves = {m: D.scaling_curves(run.done, m, pairs) for m in metrics}
    curves = {m: c for m, c in curves.items() if not c.empty}
    section = H.Section("scaling", "4. Data scaling", note=(
        "no method was trained at more than one data size (n_train)"))
    if not curves:
        return section
    section.lead = ("Quality vs the number of paired training samples (log x), one line per "
                    "method, mean over seeds with a ±1 std band. The table below reads the curves "
                    "as label efficiency: how many pairs the baseline (same head, last layers, no "
                    "R_S) needs to match each method, interpolated in log N.")
    headline = next(iter(curves))
    efficiency = D.label_efficiency(curves[headline])
    section.blocks = [F.scaling_figure(curves)]
    findings = claims(run.done, pairs, headline)
    if findings:
        section.blocks.append(H.bullets("What this run says about the paper's claims", findings))
    section.blocks.append(H.efficiency_html(efficiency, headline) if not efficiency.empty else
                          H.note("label efficiency needs the baseline's curve (head + last, no R_S)"))
    return section


# --- 5. layer similarity vs accuracy ---------------------------------------------

def layers_section(run: D.RunData, pairs: dict) -> H.Section:
    metric = _headline(run)
    accuracy = D.layer_accuracy(run.done, metric) if metric else pd.DataFrame()
    section = H.Section("layers", "5. Layer similarity vs accuracy", note=(
        "needs a layer-similarity table and trained layer pairs"))
    notes = []
    for sim_metric in D.similarity_metrics(run.similarity, run.spec):
        # the matrix of the trained pairs' own data: their subsample (per-trial selection)
        matrix = D.similarity_matrix(run.similarity, sim_metric, selection=D.selection_of(run.spec),
                                     n_train=accuracy.attrs.get("n_train"),
                                     seeds=accuracy.attrs.get("seeds"))
        points = D.similarity_vs_accuracy(matrix, accuracy)
        if matrix.empty or points.empty:
            continue
        corr, own = D.correlation(points), D.special_pairs(matrix)
        section.blocks.append(F.similarity_figure(matrix, accuracy, points, corr, own, metric,
                                                  sim_metric))
        notes.append(_correlation_note(sim_metric, own, corr, matrix.attrs))
    if section.blocks:
        section.lead = (
            "Left: similarity of every [image layer × text layer] pair of the frozen encoders, "
            "scored on the data the trained pairs had (their training subsample, when layers are "
            "selected per trial; the whole split for the oracle). "
            "Middle: accuracy of a head trained on each pair (the setting covering most pairs, "
            "mean over seeds). Right: one against the other. ★ the selected (most similar) pair "
            "of that matrix, ✕ the last pair. " + " ".join(H.esc(n) for n in notes))
    return section


def _correlation_note(sim_metric: str, own: dict, corr: dict, provenance: dict | None = None) -> str:
    i, j = own["similar"]
    text = f"{sim_metric}{_scored_on(provenance or {})}: most similar pair image layer {i}, text layer {j}"
    if corr:
        text += (f"; Spearman ρ = {corr['spearman_rho']:.3f} (p = {corr['spearman_p']:.2g}), "
                 f"Pearson r = {corr['pearson_r']:.3f} (p = {corr['pearson_p']:.2g}) "
                 f"over {corr['n_pairs']} pairs.")
    return text


def _scored_on(provenance: dict) -> str:
    """' (N = 500, seed 0)', ' (whole split, oracle)' or '' (a run from before per-trial selection)."""
    if provenance.get("selection") == "oracle":
        return " (whole split, oracle)"
    if provenance.get("n_train") is None:
        return ""
    seeds = provenance.get("seeds") or []
    label = "seed" if len(seeds) == 1 else "mean over seeds"
    return f" (N = {provenance['n_train']:,}, {label} {', '.join(map(str, seeds))})"


# --- 6. λ and levels sensitivity; R_S gain -------------------------------------------

def sensitivity_section(run: D.RunData, pairs: dict) -> H.Section:
    metric = _headline(run)
    section = H.Section("sensitivity", "6. λ and levels sensitivity; R_S gain vs N", note=(
        "no grid varied λ or the number of levels, and no setting ran both with and without R_S"))
    if not metric:
        return section
    for param, only_rs in ((D.LAMBDA, False), (G.LEVELS, True)):
        curve = G.sensitivity(run.done, pairs, param, metric, only_rs)
        if not curve.empty:
            section.blocks.append(F.sensitivity_figure(curve, param.removeprefix("config/"), metric))
    gain = G.rs_gain(run.done, pairs, metric)
    if gain["n_train"].nunique() > 1:
        section.blocks.append(F.rs_gain_figure(gain, metric))
    if section.blocks:
        section.lead = ("How sensitive the result is to the regulariser's weight λ and its number "
                        "of levels (one line per head + layer pair, at the data size where it was "
                        "varied most; mean ± std over seeds), and how much R_S adds over the "
                        "same setting without it as data grows.")
    return section


# --- 7. search diagnostics ------------------------------------------------------------

def search_section(run: D.RunData) -> H.Section:
    metric = _headline(run)
    section = H.Section("search", "7. Search diagnostics", note="no finished trial yet")
    if not metric:
        return section
    params = G.varied_params(run.done)
    if params:
        frame, categories = G.parallel_data(run.done, params, metric)
        section.blocks.append(F.parallel_figure(frame, categories, metric))
        importance = G.param_importance(run.done, params, metric)
        if not importance.empty:
            section.blocks.append(F.importance_figure(importance, metric))
    outcomes = G.outcome_distribution(run.done, metric)
    if not outcomes.empty:
        section.blocks.append(F.histogram_figure(outcomes, f"Distribution of {F.short(metric)}",
                                                 F.short(metric)))
    section.lead = ("Which searched parameters matter: parallel coordinates of the trials "
                    "(coloured by the headline metric), Optuna's hyperparameter importance "
                    "(PED-ANOVA on the stored trials; it asks which values the best 10% share), "
                    "and the spread of outcomes per grid.")
    return section


# --- 8. sweep health --------------------------------------------------------------------

def health_section(run: D.RunData) -> H.Section:
    section = H.Section("health", "8. Sweep health", note="no trial has finished yet")
    tl = G.timeline(run.trials)
    if not tl.empty:
        section.blocks.append(F.timeline_figure(tl))
    hist = G.durations(run.trials)
    if not hist.empty:
        stats = G.duration_stats(run.trials)
        section.blocks.append(F.histogram_figure(
            hist, f"Trial durations (median {stats['median']:.1f}s, p95 {stats['p95']:.1f}s, "
                  f"max {stats['max']:.1f}s)", "seconds"))
    fails = G.failures(run.trials)
    if not run.trials.empty:
        section.blocks.append(H.failures_html(fails) if not fails.empty else
                              H.note("no trial failed"))
    if section.blocks:
        section.lead = "Progress over time, how long trials take, and why any failed."
    return section


# --- the page ----------------------------------------------------------------------------

def build_sections(run: D.RunData) -> list[H.Section]:
    """Every section, in page order."""
    pairs = D.run_pairs(run)
    curation = curation_section(run, pairs=pairs)  # only for a run that read a curated dataset
    return [summary_section(run), encoders_section(run), table_section(run, pairs),
            scaling_section(run, pairs), layers_section(run, pairs), sensitivity_section(run, pairs),
            search_section(run), health_section(run), neighbourhood_section(run),
            *([curation] if curation else [])]


def render_html(run: D.RunData, refresh: float | None = None) -> str:
    name = run.spec.get("name", run.run_dir.name)
    header = ("<p class='lead'>Alignment of frozen vision and language encoders with small "
              "trained heads (STRUCTURE). Each trial trains one pair of heads on one layer pair "
              "and evaluates zero-shot classification and retrieval.</p>")
    if refresh:
        header += H.note(f"The sweep is running: this page reloads every {int(refresh)} s.")
    return H.page(f"structure-sweep report: {name}", header, build_sections(run), refresh)


def write_report(run_dir: str | Path, output: str | Path | None = None, *,
                 refresh: float | None = None) -> Path:
    """Write the report of ``run_dir`` (default ``RUN_DIR/report.html``); return its path."""
    run = D.load_run(run_dir)
    output = Path(output) if output else Path(run_dir) / "report.html"
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(render_html(run, refresh), encoding="utf-8")
    tmp.replace(output)  # a browser never sees a half-written page
    return output.resolve()


def sweep_finished(run_dir: str | Path) -> bool:
    """True when every planned trial is stored (plan.json exists and nothing is pending)."""
    run = D.load_run(run_dir)
    counts = G.trial_counts(run)
    return counts["planned"] > 0 and counts["pending"] == 0


def watch(run_dir: str | Path, output: str | Path | None = None, interval: float = 30.0,
          max_rounds: int | None = None, log=print) -> Path:
    """Rewrite the report every ``interval`` s until the sweep finishes (or Ctrl-C).

    While it runs the page reloads itself; the last write has no reload tag.
    """
    rounds = 0
    try:
        while not _ready(run_dir) or not sweep_finished(run_dir):
            if _ready(run_dir):
                log(f"report: {write_report(run_dir, output, refresh=interval)} (watching)")
            rounds += 1
            if max_rounds is not None and rounds >= max_rounds:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        log("stopped watching")
    return write_report(run_dir, output)


def _ready(run_dir: str | Path) -> bool:
    # A sweep that has not written its store yet has nothing to report.
    return (Path(run_dir) / "results").is_dir()
