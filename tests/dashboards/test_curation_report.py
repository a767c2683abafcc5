"""dashboards.curation: the curated set's coverage data, apart from its drawing."""

import pandas as pd
import pytest

from dashboards import data as D
from dashboards.curation import coverage_frames, coverage_summary, curation_section, split_table
from dashboards.report import build_sections
from orchestrator.results import ResultsStore

CURATED = [20, 20, 20, 5]  # the last concept's tail was too weak to fill
NEAREST = [22, 19, 19, 5]
RANDOM = [40, 20, 4, 0]  # the pool's long tail


def curation_rows(selection="sel", control="ctl", written_at=1.0, role="train", scale=1):
    return [{"row_key": f"{selection}/{control}/{c}", "dataset": "curated", "role": role,
             "method": "concept_balanced", "selection_key": selection, "control_key": control,
             "concept": c, "concept_name": f"class {c}", "curated": CURATED[c] * scale,
             "curated_nearest": NEAREST[c] * scale, "random_nearest": RANDOM[c] * scale,
             "per_concept": 20, "n_selected": 65 * scale, "written_at": written_at}
            for c in range(4)]


def test_frames_keep_the_latest_selection_per_dataset():
    table = pd.DataFrame(curation_rows("old", written_at=1.0, scale=2) + curation_rows("new", written_at=2.0)
                         + curation_rows("v", role="val", written_at=0.5))
    frames = coverage_frames(table)
    assert list(frames) == ["train/curated", "val/curated"]
    assert frames["train/curated"]["curated"].tolist() == CURATED  # not the older selection's
    assert frames["train/curated"]["concept_name"].tolist() == [f"class {c}" for c in range(4)]
    assert coverage_frames(pd.DataFrame()) == {}


def test_summary_counts_coverage_and_spread():
    summary = coverage_summary(coverage_frames(pd.DataFrame(curation_rows()))["train/curated"])
    random = summary.set_index("subset").loc["random (equal size): nearest prototype"]
    assert (random["captions"], random["concepts covered"], random["min"], random["max"]) == (64, 3, 0, 40)
    counts = pd.Series(RANDOM, dtype=float)
    assert random["cv"] == pytest.approx(counts.std(ddof=0) / counts.mean())
    curated = summary.set_index("subset").loc["curated: assigned concept"]
    assert curated["concepts covered"] == 4 and curated["cv"] < random["cv"]


def test_section_only_for_runs_that_read_curated_data(toy_run):
    assert "curation" not in [s.key for s in build_sections(D.load_run(toy_run))]
    ResultsStore(toy_run).write("curation", curation_rows())
    run = D.load_run(toy_run)
    sections = build_sections(run)
    assert sections[-1].key == "curation" and sections[-1].figures == 1
    assert "<table>" in sections[-1].blocks[1] and "64" in sections[-1].blocks[1]
    assert curation_section(run, pd.DataFrame()) is None


def test_split_table_sets_each_method_on_each_training_split_side_by_side():
    rows = [(head, lam, split, seed, acc) for head, lam, split, seed, acc in [
        ("linear", 0.0, "", 0, 0.50), ("linear", 0.0, "", 1, 0.54),  # the curated set (data.train)
        ("linear", 0.0, "method=random", 0, 0.40), ("linear", 0.0, "method=random", 1, 0.42),
        ("linear", 10.0, "", 0, 0.60), ("mlp", 0.0, "method=random", 0, 0.30)]]
    done = pd.DataFrame([{"config/head": h, "config/structure_lambda": lam, "train_data": s, "config/seed": seed,
                          "config/image_layer": 2, "config/text_layer": 2, "zs/x/top1": acc}
                         for h, lam, s, seed, acc in rows])
    table = split_table(done, "zs/x/top1", {"last": (2, 2)})
    assert list(table.columns) == ["data.train", "method=random"]
    expected = done.assign(split=done["train_data"].replace("", "data.train"))
    for (head, lam, split), group in expected.groupby(["config/head", "config/structure_lambda", "split"]):
        method = f"{head} + last" + (" + R_S" if lam > 0 else "")
        assert table.loc[method, split] == pytest.approx(group["zs/x/top1"].mean())
        assert table.attrs["counts"].loc[method, split] == len(group)
    assert pd.isna(table.loc["mlp + last", "data.train"]) and table.attrs["counts"].loc["mlp + last", "data.train"] == 0
    assert split_table(done.assign(train_data=""), "zs/x/top1", {}).empty  # one split: nothing to compare
    assert split_table(done.drop(columns=["train_data"]), "zs/x/top1", {}).empty
