"""A curated dataset trained through real sweeps on a local Ray cluster (freeze-align §3.2).

The curation ``method`` is one run per value (dataset options are not search
dimensions: one spec, one training split), as ``search_spaces/paper/freeze_align.yaml``
runs it: the concept-balanced run makes the selection, the random control's run and a
re-run find it cached, and a re-run plans nothing new.
"""

import copy

import yaml

from dashboards import data as D
from dashboards.report import build_sections
from orchestrator.driver import run_sweep
from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec

POOL = {"dataset": "synthetic", "options": {"size": 400, "n_classes": 4}}


def _spec(root, tiny, method):
    tiny["data"]["train"] = {"dataset": "curated", "split": "train", "options": {
        "pool": POOL, "per_concept": 20, "max": 60, "batch": 64, "method": method,
        "cache_dir": str(root / "cache")}}
    tiny["search"] = [{"name": "grid", "layers": [[1, 2]], "seed": [0, 1]}]
    tiny["training"]["epochs"] = 2
    file = root / f"{method}.yaml"
    file.write_text(yaml.safe_dump({**tiny, "name": f"curated-{method}", "output_dir": str(root / method),
                                    "cache_dir": str(root / "cache")}))
    return load_spec(file)


def _curation_lines(lines):
    return [line for line in lines if line.strip().startswith("curated train/")]


def test_curated_data_trains_and_a_rerun_reuses_the_selection(ray_cluster, tmp_path, tiny):
    balanced_spec = _spec(tmp_path, copy.deepcopy(tiny), "concept_balanced")
    lines = []
    first = run_sweep(balanced_spec, log=lines.append)
    assert (first.planned, first.finished, first.failed) == (2, 2, 0)
    (line,) = _curation_lines(lines)
    assert "selection computed" in line and "80 of 400 captions" in line
    trials = ResultsStore(balanced_spec.run_dir).query("trials")
    assert (trials["status"] == "done").all() and set(trials["n_train_used"]) == {80}  # 4 concepts x 20
    coverage = ResultsStore(balanced_spec.run_dir).query("curation")
    assert len(coverage) == 4 and coverage["curated"].tolist() == [20] * 4
    assert coverage["random_nearest"].sum() == 80 and set(coverage["method"]) == {"concept_balanced"}
    assert "curation" in [s.key for s in build_sections(D.load_run(balanced_spec.run_dir))]

    control_spec = _spec(tmp_path, copy.deepcopy(tiny), "random")
    lines = []
    control = run_sweep(control_spec, log=lines.append)
    assert (control.planned, control.finished, control.failed) == (2, 2, 0)
    (line,) = _curation_lines(lines)
    assert "selection cached" in line  # the control's size comes from the cached selection
    control_trials = ResultsStore(control_spec.run_dir).query("trials")
    assert set(control_trials["n_train_used"]) == {80}  # the same size, other captions
    assert set(control_trials["fingerprint"]).isdisjoint(trials["fingerprint"])

    lines = []
    again = run_sweep(balanced_spec, log=lines.append)
    assert (again.skipped, again.finished, again.features_computed) == (2, 0, 0)
    (line,) = _curation_lines(lines)
    assert "selection cached" in line and "coverage stored" in line
    assert len(ResultsStore(balanced_spec.run_dir).query("curation")) == 4  # no duplicate rows
    cached = sorted(p.name for p in (tmp_path / "cache" / "curated").iterdir())
    assert len(cached) == 1 and cached[0].endswith(".npz")  # one selection, scored once
