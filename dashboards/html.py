"""The HTML of the report: page skeleton, sections and the plain tables.

plotly.js is inlined once in the page head, and every figure is a div that
calls it, so the file opens offline and stays one copy of the library big.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass, field

import pandas as pd
import plotly.graph_objects as go
from plotly.offline import get_plotlyjs

from dashboards.figures import short

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1500px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
.note{color:#666;font-style:italic} .lead{color:#444;max-width:70em}
table{border-collapse:collapse;margin:.8em 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4} td.name,th.name{text-align:left}
td.best{font-weight:bold;text-decoration:underline} td.base{color:#666}
dl.kv{display:grid;grid-template-columns:max-content auto;gap:.2em 1em} dl.kv dt{font-weight:bold}
pre{background:#f7f7f7;padding:.6em;overflow:auto;max-height:25em;font-size:.85em}
nav a{margin-right:1em}
"""


@dataclass
class Section:
    """One report section: figures and HTML fragments in order, or a one-line note."""

    key: str
    title: str
    blocks: list = field(default_factory=list)  # go.Figure or HTML strings
    lead: str = ""  # what the section shows, for a reader who did not run the sweep
    note: str = ""  # shown instead of the blocks when there is no data

    @property
    def figures(self) -> int:
        return sum(isinstance(b, go.Figure) for b in self.blocks)


def esc(value) -> str:
    return html.escape(str(value))


def page(title: str, header: str, sections: list[Section], refresh: float | None = None) -> str:
    """The whole document; ``refresh`` (seconds) makes an open browser reload it."""
    meta = f"<meta http-equiv='refresh' content='{int(refresh)}'>" if refresh else ""
    nav = "".join(f"<a href='#{s.key}'>{esc(s.title)}</a>" for s in sections)
    body = "".join(render_section(s) for s in sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'>{meta}<title>{esc(title)}</title>"
            f"<style>{CSS}</style><script>{get_plotlyjs()}</script></head><body>"
            f"<h1>{esc(title)}</h1>{header}<nav>{nav}</nav>{body}"
            f"<p class='note'>Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by "
            f"structure-sweep.</p></body></html>")


def render_section(section: Section) -> str:
    """A <section> whose data-figures attribute says how many plots it should render."""
    parts = [f"<section id='{section.key}' data-figures='{section.figures}'>",
             f"<h2>{esc(section.title)}</h2>"]
    if section.lead:
        parts.append(f"<p class='lead'>{section.lead}</p>")
    if not section.blocks:
        parts.append(f"<p class='note'>{esc(section.note or 'no data')}</p>")
    for block in section.blocks:
        parts.append(figure_html(block) if isinstance(block, go.Figure) else block)
    return "".join(parts) + "</section>"


def figure_html(fig: go.Figure) -> str:
    return fig.to_html(full_html=False, include_plotlyjs=False,
                       config={"displaylogo": False, "responsive": True})


def note(text: str) -> str:
    return f"<p class='note'>{esc(text)}</p>"


def bullets(title: str, items: list[str]) -> str:
    """A titled list of sentences; items are escaped."""
    return (f"<p><b>{esc(title)}</b></p><ul>"
            + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")


def key_values(pairs: list[tuple[str, str]]) -> str:
    """A definition list; values are escaped."""
    rows = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in pairs)
    return f"<dl class='kv'>{rows}</dl>"


def fmt(value, digits: int = 1, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value * scale:.{digits}f}"


def duration(seconds: float | None) -> str:
    """``3725`` -> ``1h 2m 5s``."""
    if seconds is None or math.isnan(seconds):
        return "—"
    s = int(round(seconds))
    return " ".join(f"{v}{u}" for v, u in ((s // 3600, "h"), (s // 60 % 60, "m"), (s % 60, "s"))
                    if v or u == "s")


def paper_table_html(table: pd.DataFrame, columns: list) -> str:
    """The paper-style table: accuracies in %, best of each column bold and underlined."""
    metric_cols = [c for c in columns if c.column in table]
    best = {c.column: table[c.column].max() for c in metric_cols}
    head1 = "".join(f"<th>{esc(c.dataset)}</th>" for c in metric_cols)
    head2 = "".join(f"<th>{'zero-shot top-1' if c.kind == 'zs' else 'R@1 ' + c.label}</th>"
                    for c in metric_cols)
    rows = []
    for method, row in table.iterrows():
        cells = "".join(
            f"<td class='{'best' if row[c.column] == best[c.column] else ''}'>"
            f"{fmt(row[c.column], scale=100)}</td>" for c in metric_cols)
        rows.append(f"<tr><td class='name'>{esc(method)}</td>{cells}"
                    f"<td>{_improv(row['improv_zs'])}</td><td>{_improv(row['improv_ret'])}</td>"
                    f"<td>{int(row['n_trials'])}</td></tr>")
    return (f"<table><tr><th class='name' rowspan='2'>method</th>{head1}"
            f"<th rowspan='2'>improv. zero-shot</th><th rowspan='2'>improv. retrieval</th>"
            f"<th rowspan='2'>trials</th></tr><tr>{head2}</tr>{''.join(rows)}</table>")


def _improv(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return "baseline" if value == 0 else f"{value:+.1f}%"


def efficiency_html(efficiency: pd.DataFrame, metric: str) -> str:
    """Label efficiency, one row per method, one column per N: pairs the baseline needs."""
    cells = efficiency.assign(text=[_needed(r) for _, r in efficiency.iterrows()])
    wide = cells.pivot_table(index=["method", "baseline"], columns="n_train", values="text",
                             aggfunc="first")
    head = "".join(f"<th>N = {int(n):,}</th>" for n in wide.columns)
    rows = "".join(f"<tr><td class='name'>{esc(m)}</td><td class='name'>{esc(b)}</td>"
                   + "".join(f"<td>{esc(v) if isinstance(v, str) else ''}</td>" for v in row)
                   + "</tr>" for (m, b), row in wide.iterrows())
    return (f"<p class='lead'>Pairs the baseline needs to reach each method's "
            f"{esc(short(metric))} at N (the ratio to N in brackets); ≤: its smallest N already "
            f"does; not reached: not within the sizes it was trained at.</p>"
            f"<table><tr><th class='name'>method</th><th class='name'>baseline</th>{head}</tr>"
            f"{rows}</table>")


def _needed(row) -> str:
    if row["how"] == "interpolated":
        return f"≈ {row['baseline_n']:,.0f} ({row['ratio']:.1f}×)"
    if row["how"] == "below":
        return f"≤ {row['baseline_n']:,.0f}"
    return "not reached"


def failures_html(failures: pd.DataFrame) -> str:
    """Failed trials grouped by error, the full text of one example in a <details>."""
    rows = "".join(
        f"<tr><td>{r['count']}</td><td class='name'>{esc(r['grids'])}</td>"
        f"<td class='name'><details><summary>{esc(r['error'][:200])}</summary>"
        f"<p>example trial {esc(r['example'])}</p><pre>{esc(r['detail'])}</pre></details></td></tr>"
        for _, r in failures.iterrows())
    return (f"<table><tr><th>trials</th><th class='name'>grids</th>"
            f"<th class='name'>error (last line; click for the full text)</th></tr>{rows}</table>")


def spec_html(spec: dict) -> str:
    """The resolved spec, collapsed."""
    import json

    text = json.dumps(spec, indent=2, sort_keys=False, default=str)
    return f"<details><summary>resolved spec (spec.json)</summary><pre>{esc(text)}</pre></details>"


def encoder_pairs_html(frame, metric: str, focus) -> str:
    """One row per encoder pair: its rank and scores, the best metric its trials reached."""
    def name(r) -> str:  # the pair the per-method sections show, in bold
        shown = focus and (r["image_encoder"], r["text_encoder"]) == tuple(focus)
        return f"<b>{esc(r['pair'])}</b>" if shown else esc(r["pair"])

    rows = "".join(
        f"<tr><td>{'' if r['rank'] != r['rank'] else int(r['rank'])}</td><td class='name'>{name(r)}</td>"
        f"<td>{fmt(r['score'], 4)}</td><td>{_layers(r)}</td><td>{fmt(r['last_score'], 4)}</td>"
        f"<td>{fmt(r['best'], 1, 100)}</td><td>{int(r['n_trials'])}</td></tr>"
        for _, r in frame.iterrows())
    return (f"<table><tr><th>rank</th><th class='name'>encoder pair</th><th>score</th>"
            f"<th>at layers</th><th>last layers</th><th>best {esc(metric)} (%)</th><th>trials</th>"
            f"</tr>{rows}</table>")


def _layers(row) -> str:
    if row["image_layer"] != row["image_layer"]:  # NaN: a pair the selection did not score
        return "—"
    return f"L{int(row['image_layer'])}/T{int(row['text_layer'])}"
