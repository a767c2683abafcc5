"""The Parquet results store: atomic part files, dedup, skip of finished trials."""

import pandas as pd

from orchestrator.results import ResultsStore, headline_metric


def row(fp, status="done", **extra):
    return {"fingerprint": fp, "status": status, "error": "", **extra}


def test_write_read_roundtrip(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", **{"zs/x/top1": 0.5}), row("b", **{"zs/x/top1": 0.7})])
    frame = store.read("trials")
    assert sorted(frame["fingerprint"]) == ["a", "b"]
    assert frame.set_index("fingerprint").loc["b", "zs/x/top1"] == 0.7
    assert not list((tmp_path / "results" / "trials").glob(".*"))  # no temp files left


def test_duplicates_count_once_and_success_outranks_failure(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", status="failed", error="boom")])
    store.write("trials", [row("a", **{"zs/x/top1": 0.9}), row("b")])
    store.write("trials", [row("b")])  # e.g. a flush retried after a crash
    frame = store.read("trials")
    assert len(frame) == 2
    assert frame.set_index("fingerprint").loc["a", "status"] == "done"
    assert store.finished_fingerprints() == {"a", "b"}


def test_failed_trials_are_not_finished(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", status="failed", error="NaN loss")])
    assert store.finished_fingerprints() == set()


def test_parts_with_different_columns_are_unified(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", **{"zs/x/top1": 0.5})])
    store.write("trials", [row("b", **{"ret/y/official/I2T/R@1": 0.25})])
    frame = store.read("trials")
    assert set(frame.columns) >= {"zs/x/top1", "ret/y/official/I2T/R@1"}
    assert pd.isna(frame.set_index("fingerprint").loc["b", "zs/x/top1"])


def test_temp_files_of_a_crashed_writer_are_ignored(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a")])
    (tmp_path / "results" / "trials" / ".part-dead.parquet.tmp").write_bytes(b"PAR1 truncated")
    assert list(store.read("trials")["fingerprint"]) == ["a"]


def test_empty_store_reads_empty(tmp_path):
    assert ResultsStore(tmp_path).read("trials").empty
    assert ResultsStore(tmp_path).finished_fingerprints() == set()


def test_headline_metric_prefers_zero_shot():
    frame = pd.DataFrame({"ret/c/official/I2T/R@1": [0.1], "zs/b/top1": [0.2], "zs/a/top5": [0.3]})
    assert headline_metric(frame) == "zs/b/top1"
    assert headline_metric(frame.drop(columns="zs/b/top1")) == "ret/c/official/I2T/R@1"
