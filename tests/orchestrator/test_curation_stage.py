"""The driver's curated-data stage: the selection made once, its coverage stored once."""

from types import SimpleNamespace

import numpy as np

from orchestrator.curation_stage import curated_refs, record_curation
from orchestrator.datasets import load_split
from orchestrator.results import ResultsStore
from orchestrator.spec import DatasetRef

POOL = {"dataset": "synthetic", "options": {"size": 400, "n_classes": 4, "templates": 3}}


def spec_with(tmp_path, method="concept_balanced", seed=3):
    curated = DatasetRef("curated", "train", options={
        "pool": POOL, "per_concept": 20, "max": 60, "batch": 64, "method": method, "seed": seed,
        "cache_dir": str(tmp_path / "cache")})
    val = DatasetRef("synthetic", "val", options={"size": 100})
    return SimpleNamespace(data=SimpleNamespace(train=curated, val=val, retrieval=[], unpaired=None), search=[])


def nearest(vectors, prototypes):
    """Independent: the nearest prototype by cosine, counted per concept."""
    v = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    p = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    return np.bincount((v @ p.T).argmax(1), minlength=len(p))


def test_rows_hold_both_subsets_counts(tmp_path):
    spec, results, lines = spec_with(tmp_path, method="random"), ResultsStore(tmp_path / "run"), []
    assert [role for role, _ in curated_refs(spec)] == ["train"]
    record_curation(spec, results, lines.append)
    rows = results.query("curation").sort_values("concept")
    assert len(rows) == 4 and set(rows["method"]) == {"random"} and set(rows["n_selected"]) == {80}
    assert rows["curated"].tolist() == [20] * 4 and rows["concept_name"].tolist() == [f"class {c}" for c in range(4)]
    pool = load_split("synthetic", "train", POOL["options"])
    prototypes = np.stack([np.mean([p[:16] / np.linalg.norm(p[:16]) for p in pool.prompts[c]], axis=0)
                           for c in range(4)])  # the {from: prompts} default, computed here
    balanced = load_split("curated", "train", {**spec.data.train.options, "method": "concept_balanced"})
    control = load_split("curated", "train", dict(spec.data.train.options))  # the random split itself
    assert rows["curated_nearest"].tolist() == nearest(balanced.texts[:, :16], prototypes).tolist()
    assert rows["random_nearest"].tolist() == nearest(control.texts[:, :16], prototypes).tolist()
    assert rows["random_nearest"].sum() == 80
    assert "selection computed" in lines[0] and "coverage computed" in lines[0]


def test_a_rerun_finds_the_selection_cached_and_writes_nothing(tmp_path):
    spec, results = spec_with(tmp_path), ResultsStore(tmp_path / "run")
    record_curation(spec, results, lambda line: None)
    lines = []
    record_curation(spec, results, lines.append)
    assert "selection cached" in lines[0] and "coverage stored" in lines[0]
    assert len(results.files("curation")) == 1 and len(results.query("curation")) == 4
    other_seed = spec_with(tmp_path, seed=4)  # another control: its own rows, the selection still cached
    record_curation(other_seed, results, lines.append)
    assert "selection cached" in lines[1] and len(results.query("curation")) == 8
