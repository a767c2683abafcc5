"""The shipped Grafana dashboard: queries name exported metrics only, and the
file is what the generator writes (from the one METRICS table)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

from dashboards import grafana
from orchestrator.monitoring import COUNTER, METRICS, PREFIX, exported_name

ROOT = Path(__file__).parents[2]
SERIES = re.compile(rf"\bray_{PREFIX}[a-z_]+")


def shipped() -> dict:
    return json.loads((resources.files("dashboards") / "grafana" / "structure_sweep.json").read_text())


def queries(board: dict) -> list[str]:
    exprs = [t["expr"] for p in board["panels"] for t in p["targets"]]
    return exprs + [v["query"]["query"] for v in board["templating"]["list"] if v["type"] == "query"]


def test_exported_names_follow_rays_prometheus_naming():
    assert exported_name("trials_finished") == "ray_structure_sweep_trials_finished_total"
    assert exported_name("trials_pending") == "ray_structure_sweep_trials_pending"
    for name, (kind, _) in METRICS.items():
        assert exported_name(name).endswith("_total") == (kind == COUNTER), name


def test_every_query_names_exported_metrics_and_every_metric_has_a_panel():
    board = shipped()
    exported = {exported_name(name) for name in METRICS}
    used = set()
    for expr in queries(board):
        names = set(SERIES.findall(expr))
        assert names, f"a query that reads no sweep metric: {expr}"
        assert names <= exported, f"{expr} names {sorted(names - exported)}, not exported"
        used |= names
    assert used == exported, f"metrics without a panel: {sorted(exported - used)}"


def test_panels_use_the_datasource_and_sweep_variables():
    board = shipped()
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["sweep"]["query"]["query"] == \
        "label_values(ray_structure_sweep_trials_pending, sweep)"
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert 'sweep=~"$sweep"' in target["expr"], target["expr"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    titles = {p["title"] for p in board["panels"]}
    assert {"Finished", "Failed", "Running", "Pending", "Trials / min", "ETA", "Best metric",
            "Feature cache"} <= titles


def test_the_shipped_file_is_the_generators_output(tmp_path):
    assert grafana.SHIPPED.read_text() == grafana.render(), \
        "stale dashboards/grafana/structure_sweep.json: run python -m dashboards.grafana"
    out = tmp_path / "dash" / "x.json"
    assert grafana.main(["-o", str(out)]) == 0 and json.loads(out.read_text()) == shipped()
    assert grafana.main(["--check"]) == 0
    out.write_text("{}")
    assert grafana.main(["--check", "-o", str(out)]) == 1


def test_the_generator_and_the_metrics_table_load_without_ray():
    code = ("import json, sys, dashboards.grafana; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'ray')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120,
                         capture_output=True, text=True).stdout
    assert json.loads(out.splitlines()[-1]) == []


def test_the_wheel_takes_the_dashboards_directory_whole():
    """Hatch's ``only-include`` ships every file under ``dashboards/`` (the JSON too)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    wheel = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["hatch"]["build"]
    assert "dashboards" in wheel["targets"]["wheel"]["only-include"]
    assert grafana.SHIPPED.is_relative_to(ROOT / "dashboards")
