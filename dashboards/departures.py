"""Which departures from the official code a run's trials used, for the report's summary.

The departures are named in one registry, :mod:`orchestrator.departures`;
this module counts, from the stored trials (their ``config/*`` columns and
the layer-selection columns) and the run's resolved spec, how many finished
trials used each (:func:`departure_counts`), and draws the table
(:func:`departures_html`).
"""

from __future__ import annotations

import json
from collections import Counter

import pandas as pd

from dashboards import html as H
from orchestrator.departures import DEPARTURES, NOT_DEPARTURES, trial_departures

# Row columns besides config/* that decide whether a departure was in effect
CONTEXT = ("similarity_n", "layer_rule", "text_encoder")
COLUMNS = ["name", "key", "value", "default", "meaning", "official", "trials"]


def departure_counts(trials: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """One row per departure that at least one of ``trials`` used (registry order), with
    ``trials`` = how many; ``attrs["n_trials"]`` = how many trials were read."""
    counts = Counter()
    for row, n in _distinct_settings(trials).items():
        counts.update({name: n for name in trial_departures(dict(row), spec)})
    rows = [{"name": d.name, "key": d.key, "value": d.value, "default": d.default,
             "meaning": d.meaning, "official": d.official, "trials": counts[d.name]}
            for d in DEPARTURES if counts[d.name]]
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame.attrs["n_trials"] = len(trials)
    return frame


def _distinct_settings(trials: pd.DataFrame) -> Counter:
    """Each distinct setting of the deciding columns (as (column, value) pairs) -> its trial
    count: a grid of thousands of trials holds a handful of settings."""
    columns = [c for c in trials.columns if c.startswith("config/") or c in CONTEXT]
    if trials.empty or not columns:
        return Counter()
    values = trials[columns].astype(object).where(trials[columns].notna(), None)
    return Counter(tuple(zip(columns, map(_hashable, row))) for row in values.itertuples(index=False))


def _hashable(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def departures_html(frame: pd.DataFrame) -> str:
    """The table "Departures from the official code in this run", or its one-line answer."""
    n = frame.attrs.get("n_trials", 0)
    title = "<p><b>Departures from the official code in this run</b></p>"
    if not n:
        return title + H.note("no finished trial yet")
    aside = H.note("Not departures: " + "; ".join(f"{d.key}: {d.why}" for d in NOT_DEPARTURES) + ".")
    if frame.empty:
        return (title + H.note(f"none: every trial ran the official behaviour ({n:,} finished "
                               "trials)") + aside)
    rows = "".join(
        f"<tr><td class='name'>{H.esc(r['name'])}</td>"
        f"<td class='name'><code>{H.esc(r['key'])}</code> = {H.esc(r['value'])}"
        f"{' (the default)' if r['default'] else ''}</td>"
        f"<td>{r['trials']:,} of {n:,}</td><td class='name'>{H.esc(r['meaning'])}</td>"
        f"<td class='name'>{H.esc(r['official'])}</td></tr>" for _, r in frame.iterrows())
    return (f"{title}<table><tr><th class='name'>departure</th><th class='name'>set by</th>"
            f"<th>finished trials</th><th class='name'>what it does</th>"
            f"<th class='name'>the official behaviour it replaces (METHOD.md)</th></tr>{rows}</table>"
            + aside)
