"""The Parquet results store: atomic part files, dedup, skip of finished trials."""

import pandas as pd

from orchestrator.results import ResultsStore
from orchestrator.schema import headline_metric


def row(fp, status="done", **extra):
    return {"fingerprint": fp, "status": status, "error": "", **extra}


def test_write_read_roundtrip(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", **{"zs/x/top1": 0.5}), row("b", **{"zs/x/top1": 0.7})])
    frame = store.query("trials")
    assert sorted(frame["fingerprint"]) == ["a", "b"]
    assert frame.set_index("fingerprint").loc["b", "zs/x/top1"] == 0.7
    assert not list((tmp_path / "results" / "trials").glob(".*"))  # no temp files left


def test_duplicates_count_once_and_success_outranks_failure(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", status="failed", error="boom")])
    store.write("trials", [row("a", **{"zs/x/top1": 0.9}), row("b")])
    store.write("trials", [row("b")])  # e.g. a flush retried after a crash
    frame = store.query("trials")
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
    frame = store.query("trials")
    assert set(frame.columns) >= {"zs/x/top1", "ret/y/official/I2T/R@1"}
    assert pd.isna(frame.set_index("fingerprint").loc["b", "zs/x/top1"])


def test_rows_of_one_flush_keep_all_their_columns(tmp_path):
    store = ResultsStore(tmp_path)  # e.g. a stopped trial flushed before a finished one
    store.write("trials", [row("a", status="stopped", val_loss=3.0), row("b", **{"zs/x/top1": 0.8})])
    frame = store.query("trials").set_index("fingerprint")
    assert frame.loc["b", "zs/x/top1"] == 0.8 and frame.loc["a", "val_loss"] == 3.0
    assert pd.isna(frame.loc["a", "zs/x/top1"]) and pd.isna(frame.loc["b", "val_loss"])


def test_temp_files_of_a_crashed_writer_are_ignored(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a")])
    (tmp_path / "results" / "trials" / ".part-dead.parquet.tmp").write_bytes(b"PAR1 truncated")
    assert list(store.query("trials")["fingerprint"]) == ["a"]


def test_empty_store_reads_empty(tmp_path):
    assert ResultsStore(tmp_path).query("trials").empty
    assert ResultsStore(tmp_path).finished_fingerprints() == set()


def test_headline_metric_prefers_zero_shot():
    frame = pd.DataFrame({"ret/c/official/I2T/R@1": [0.1], "zs/b/top1": [0.2], "zs/a/top5": [0.3]})
    assert headline_metric(frame) == "zs/b/top1"
    assert headline_metric(frame.drop(columns="zs/b/top1")) == "ret/c/official/I2T/R@1"


def test_query_filters_and_columns(tmp_path):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a", **{"config/head": "linear", "zs/x/top1": 0.1}),
                           row("b", status="stopped", **{"config/head": "csa", "zs/x/top1": 0.2}),
                           row("c", status="failed", **{"config/head": "linear"})])
    frame = store.query("trials", {"config/head": "linear", "status": ["done", "stopped"]},
                        columns=["fingerprint", "zs/x/top1"])
    assert list(frame.columns) == ["fingerprint", "zs/x/top1"] and list(frame["fingerprint"]) == ["a"]
    assert store.finished_fingerprints() == {"a", "b"}  # early-stopped trials are not re-run
    assert store.query("trials", {"no/such/column": 1}).empty


def test_compaction_merges_files_and_keeps_every_row_once(tmp_path):
    store = ResultsStore(tmp_path)
    for i in range(5):
        store.write("trials", [row(f"t{i}"), row(f"t{i + 1}")])  # overlapping keys
    merged = store.compact("trials")
    assert store.files("trials") == [merged]
    assert sorted(store.query("trials")["fingerprint"]) == [f"t{i}" for i in range(6)]
    assert len(store.query("trials", dedup=False)) == 6  # duplicates dropped by compaction


def _interrupted_compaction(tmp_path, committed: bool):
    """State left by a compaction killed after its manifest (and maybe its rename)."""
    import json

    store = ResultsStore(tmp_path)
    store.write("trials", [row("a")])
    store.write("trials", [row("b")])
    inputs = store.files("trials")
    directory = store.table_dir("trials")
    merged = store.query("trials")
    import pyarrow as pa
    import pyarrow.parquet as pq

    target = directory / ("part-cX.parquet" if committed else ".part-cX.parquet.tmp")
    pq.write_table(pa.Table.from_pandas(merged, preserve_index=False), target)
    (directory / "_compaction.json").write_text(json.dumps(
        {"output": "part-cX.parquet", "inputs": [f.name for f in inputs]}))
    if committed:
        inputs[0].unlink()  # killed half-way through deleting the inputs
    return store, directory


def test_interrupted_compaction_is_finished_when_committed(tmp_path):
    store, directory = _interrupted_compaction(tmp_path, committed=True)
    assert sorted(store.query("trials")["fingerprint"]) == ["a", "b"]  # readable meanwhile
    store.recover()
    assert [f.name for f in store.files("trials")] == ["part-cX.parquet"]
    assert not (directory / "_compaction.json").exists()
    assert sorted(store.query("trials")["fingerprint"]) == ["a", "b"]


def test_interrupted_compaction_is_undone_when_not_committed(tmp_path):
    store, directory = _interrupted_compaction(tmp_path, committed=False)
    store.recover()
    assert len(store.files("trials")) == 2 and not list(directory.glob(".part-*"))
    assert sorted(store.query("trials")["fingerprint"]) == ["a", "b"]


def test_compaction_and_query_at_100k_rows(tmp_path):
    """Correctness at scale; the speed of the same work is benchmarks/bench_results_store.py."""
    store = ResultsStore(tmp_path)
    metrics = {f"zs/set{k}/top1": 0.5 for k in range(10)}
    config = {f"config/f{k}": k for k in range(25)}
    for part in range(100):
        store.write("trials", [row(f"{part}-{i}", **config, **metrics) for i in range(1000)])
    store.compact("trials")
    frame = store.query("trials", {"status": "done"}, columns=["fingerprint", "zs/set0/top1"])
    assert len(frame) == 100_000
    assert len(store.finished_fingerprints()) == 100_000


def test_stopped_trials_count_as_finished_only_for_asha_runs(tmp_path):
    """The store's side; the runner's (FIFO re-runs them) is in test_tune_runner.py."""
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a"), row("s", status="stopped"), row("f", status="failed")])
    assert store.finished_fingerprints() == {"a", "s"}
    assert store.finished_fingerprints(include_stopped=False) == {"a"}


def test_query_retries_once_when_a_compaction_removes_a_listed_file(tmp_path, monkeypatch):
    store = ResultsStore(tmp_path)
    store.write("trials", [row("a")])
    store.write("trials", [row("b")])
    stale = store.files("trials")
    store.compact("trials")  # between the reader's listing and its reads
    listings = iter([stale])
    real = ResultsStore.files
    monkeypatch.setattr(ResultsStore, "files", lambda self, t: next(listings, None) or real(self, t))
    assert sorted(store.query("trials")["fingerprint"]) == ["a", "b"]


def test_results_sink_compacts_during_a_long_sweep(tmp_path):
    from orchestrator.results_sink import ResultsSink

    store = ResultsStore(tmp_path)
    sink = ResultsSink(store, total=10, describe=None, log=lambda *a: None, compact_every=4)
    for i in range(10):
        sink.buffer = [row(f"t{i}")]
        sink.flush()
        assert len(store.files("trials")) <= 4
    sink.flush()  # nothing buffered: no file, no count
    assert sink.written == 2 and len(store.files("trials")) == 3
    assert sorted(store.query("trials")["fingerprint"]) == sorted(f"t{i}" for i in range(10))
