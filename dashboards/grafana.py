"""The Grafana dashboard of a sweep's Ray metrics, generated from the one table
of exported metrics (:data:`orchestrator.monitoring.METRICS`).

The result ships as ``dashboards/grafana/structure_sweep.json`` (a test checks
the shipped file is this module's output). Regenerate it after editing the
table or the panels::

    python -m dashboards.grafana                  # rewrite the shipped file
    python -m dashboards.grafana -o DIR/x.json    # write it elsewhere (e.g. Grafana's folder)
    python -m dashboards.grafana --check          # exit 1 if the shipped file is stale
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from orchestrator.monitoring import exported_name

SHIPPED = Path(__file__).parent / "grafana" / "structure_sweep.json"
UID = "structure-sweep"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SWEEP_FILTER = 'sweep=~"$sweep"'


def q(name: str, agg: str = "sum") -> str:
    """PromQL of one metric of the table, per sweep, filtered by the ``sweep`` variable."""
    return f"{agg} by (sweep) ({exported_name(name)}{{{SWEEP_FILTER}}})"


# ETA = pending / rate; "> 0" drops a zero rate (no ETA rather than +Inf)
ETA = (f"60 * {q('trials_pending')} / "
       f"sum by (sweep) ({exported_name('trials_per_minute')}{{{SWEEP_FILTER}}} > 0)")

# (title, panel type, unit, [(PromQL, legend)], description); laid out in this order
STATS = [
    ("Finished", "stat", "none", [(q("trials_finished"), "{{sweep}}")],
     "trials done or stopped early by this driver"),
    ("Failed", "stat", "none", [(q("trials_failed"), "{{sweep}}")],
     "trials failed after their retries"),
    ("Running", "stat", "none", [(q("trials_running"), "{{sweep}}")], "trials running now"),
    ("Pending", "stat", "none", [(q("trials_pending"), "{{sweep}}")],
     "trials of this run not yet ended"),
    ("Trials / min", "stat", "none", [(q("trials_per_minute"), "{{sweep}}")],
     "trials ended per minute over the last 10 minutes"),
    ("ETA", "stat", "s", [(ETA, "{{sweep}}")], "pending trials / rate"),
    ("Best metric", "stat", "none", [(q("best_metric", "max"), "{{sweep}}")],
     "best value so far of the sweep's objective (tune.metric; for a 'min' objective, "
     "the lowest)"),
    ("Feature cache", "stat", "none", [(q("feature_cache_hits"), "hits {{sweep}}"),
                                       (q("feature_cache_misses"), "misses {{sweep}}")],
     "feature entries read from cache (hits) or computed (misses)"),
]
SERIES = [
    ("Trials", "timeseries", "none",
     [(q("trials_finished"), "finished {{sweep}}"), (q("trials_failed"), "failed {{sweep}}"),
      (q("trials_running"), "running {{sweep}}"), (q("trials_pending"), "pending {{sweep}}")],
     "trial counts over time"),
    ("Trials per minute", "timeseries", "none", [(q("trials_per_minute"), "{{sweep}}")],
     "trials ended per minute over the last 10 minutes"),
    ("ETA", "timeseries", "s", [(ETA, "{{sweep}}")], "pending trials / rate"),
    ("Best metric", "timeseries", "none", [(q("best_metric", "max"), "{{sweep}}")],
     "best value so far of the sweep's objective"),
]


def panel(index: int, spec: tuple, grid: dict) -> dict:
    title, kind, unit, queries, description = spec
    return {
        "id": index + 1, "title": title, "type": kind, "description": description,
        "datasource": DATASOURCE, "gridPos": grid,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": ({"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                     "colorMode": "value", "graphMode": "area", "textMode": "auto"}
                    if kind == "stat" else {"legend": {"displayMode": "list", "placement": "bottom"}}),
        "targets": [{"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + k),
                     "datasource": DATASOURCE}
                    for k, (expr, legend) in enumerate(queries)],
    }


def panels() -> list[dict]:
    """Stats in one row of 3-wide tiles, then time series two to a row."""
    out = [panel(i, spec, {"x": 3 * i, "y": 0, "w": 3, "h": 5}) for i, spec in enumerate(STATS)]
    for k, spec in enumerate(SERIES):
        grid = {"x": 12 * (k % 2), "y": 5 + 8 * (k // 2), "w": 12, "h": 8}
        out.append(panel(len(out), spec, grid))
    return out


def variables() -> list[dict]:
    """A Prometheus data source picker and the sweeps seen in the data."""
    sweeps = f"label_values({exported_name('trials_pending')}, sweep)"
    return [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "includeAll": False, "multi": False, "refresh": 1},
        {"name": "sweep", "label": "Sweep", "type": "query", "datasource": DATASOURCE,
         "definition": sweeps, "query": {"query": sweeps, "refId": "sweeps"},
         "current": {"text": "All", "value": "$__all"}, "hide": 0, "includeAll": True,
         "multi": True, "allValue": ".*", "refresh": 2, "sort": 1},
    ]


def dashboard() -> dict:
    return {
        "uid": UID, "title": "structure-sweep", "tags": ["structure-sweep", "ray"],
        "description": "Trials, rate, ETA and best objective of structure-sweep runs "
                       "(metrics of orchestrator/monitoring.py)",
        "editable": True, "schemaVersion": 36, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timezone": "",
        "templating": {"list": variables()}, "panels": panels(),
        "annotations": {"list": []}, "links": [],
    }


def render() -> str:
    """The dashboard as the shipped file holds it (stable key order)."""
    return json.dumps(dashboard(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.grafana", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, default=SHIPPED)
    parser.add_argument("--check", action="store_true", help="exit 1 if OUTPUT is stale")
    args = parser.parse_args(argv)
    if args.check:
        stale = not args.output.is_file() or args.output.read_text() != render()
        print(f"{args.output}: {'stale; run python -m dashboards.grafana' if stale else 'up to date'}")
        return int(stale)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(render())
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
