"""The results sink without Tune: Tune's trial objects stood in by plain namespaces."""

from __future__ import annotations

from types import SimpleNamespace

from orchestrator.planning import PlannedTrial
from orchestrator.progress import SweepProgress, TrialLine
from orchestrator.results import ResultsStore
from orchestrator.results_sink import ResultsSink, store_row
from orchestrator.schema import DONE, FAILED, STOPPED, config_column
from orchestrator.worker import final_report
from trials.config import TrialConfig

PLANNED = [PlannedTrial("a", "g", TrialConfig(image_layer=1, text_layer=2, head_options={})),
           PlannedTrial("b", "g", TrialConfig(image_layer=1, text_layer=2, seed=1), params='{"x": 1}')]


def sink_for(tmp_path, **kwargs) -> tuple[ResultsSink, list[str]]:
    lines = []
    sink = ResultsSink(ResultsStore(tmp_path), total=len(PLANNED), describe=lambda c: PLANNED,
                       log=lines.append, flush_seconds=3600, **kwargs)
    return sink, lines


def tune_trial(last_result: dict, failures: int = 0):
    return SimpleNamespace(config={"task": 0}, last_result=last_result, num_failures=failures,
                           error_file=None, error_msg="worker died")


def test_a_final_report_becomes_one_row_per_planned_trial(tmp_path):
    sink, lines = sink_for(tmp_path)
    rows = [{"fingerprint": "a", "status": DONE, "error": "", "zs/x/top1": 0.5, "host": "h"},
            {"fingerprint": "b", "status": FAILED, "error": "ValueError: boom"}]
    sink.on_trial_complete(0, [], tune_trial({**final_report(rows), "time_total_s": 1.0}, 1))
    sink.flush()
    frame = ResultsStore(tmp_path).query("trials").set_index("fingerprint")
    assert list(frame["status"]) == [DONE, FAILED] and list(frame["retries"]) == [1, 1]
    assert frame.loc["a", "zs/x/top1"] == 0.5 and frame.loc["b", "error"] == "ValueError: boom"
    assert frame.loc["b", "params"] == '{"x": 1}' and frame.loc["b", config_column("seed")] == 1
    assert "time_total_s" not in frame.columns and "trial_complete" not in frame.columns
    assert (sink.finished, sink.failed, sink.stopped) == (1, 1, 0)
    assert lines[-1] == "  [2/2] FAILED b: ValueError: boom"  # the error's last line, as text


def test_trial_lines_are_tagged_for_a_progress_display_and_events_reach_the_monitor(tmp_path):
    progress = SweepProgress("zs/x/top1")  # what SweepMetrics forwards the events to
    sink, lines = sink_for(tmp_path, monitor=progress)
    progress.planned(2)
    sink.on_trial_start(0, [], tune_trial({}))
    rows = [{"fingerprint": "a", "status": DONE, "error": "", "zs/x/top1": 0.5},
            {"fingerprint": "b", "status": FAILED, "error": "Traceback...\nValueError: boom"}]
    sink.on_trial_complete(0, [], tune_trial(final_report(rows)))
    assert [(type(line), line.status) for line in lines] == [(TrialLine, DONE), (TrialLine, FAILED)]
    assert lines[0].startswith("  [1/2] done    layers (1,2) linear") and lines[0].endswith("x/top1=0.500")
    assert lines[1].endswith("FAILED b: ValueError: boom")
    assert (progress.done, progress.failed, progress.pending, progress.best) == (1, 1, 0, 0.5)


def test_a_trial_cut_short_by_asha_is_stopped_else_failed(tmp_path):
    for scheduled, status in ((True, STOPPED), (False, FAILED)):
        sink, _ = sink_for(tmp_path / status, scheduled_stops=scheduled)
        sink.on_trial_complete(0, [], tune_trial({"val_loss": 0.7, "epoch": 4}))
        sink.flush()
        frame = ResultsStore(tmp_path / status).query("trials")
        assert set(frame["status"]) == {status}
        assert len(frame) == (1 if scheduled else 2)  # a stop is the task's first trial
        assert sink.stopped == int(scheduled)


def test_an_errored_trial_fails_every_planned_trial_of_its_task(tmp_path):
    sink, _ = sink_for(tmp_path)
    sink.on_trial_error(0, [], tune_trial({}, failures=3))
    sink.flush()
    frame = ResultsStore(tmp_path).query("trials")
    assert set(frame["status"]) == {FAILED} and set(frame["error"]) == {"worker died"}
    assert sink.failed == 2


def test_store_row_has_identity_config_columns_and_metrics_only():
    row = store_row(PLANNED[0], DONE, {"zs/x/top1": 0.5, "training_iteration": 1,
                                        "nested": {"no": 1}}, "", retries=2)
    assert row["fingerprint"] == "a" and row["grid"] == "g" and row["retries"] == 2
    assert row[config_column("image_layer")] == 1 and row[config_column("head_options")] == "{}"
    assert row["zs/x/top1"] == 0.5
    assert "training_iteration" not in row and "nested" not in row


def test_tune_can_pickle_the_sink_with_a_live_display_attached(tmp_path):
    import threading

    from ray import cloudpickle

    lock = threading.RLock()  # what a rich console holds: not picklable
    sink, _ = sink_for(tmp_path, monitor=SweepProgress())
    sink.log = lambda line, lock=lock: None
    sink.monitor.on_change = lambda p, lock=lock: None
    copy = cloudpickle.loads(cloudpickle.dumps(sink))  # as Tune writes tuner.pkl
    assert copy.monitor is None and copy.total == sink.total and sink.log is not print


def test_recorded_epochs_reach_the_epochs_table_with_the_trials_row(tmp_path):
    import json

    from orchestrator.worker import EPOCHS_JSON
    epochs = [{"epoch": e, "train_loss": 1.0, "val_loss": 2.0 - e, "val_clip_loss": 1.5 - e,
               "structure_lambda": 0.5 * e, "nbr_image": 0.4, "nbr_text": 0.3} for e in (0, 1)]
    rows = [{"fingerprint": "a", "status": DONE, "error": "", "zs/x/top1": 0.5,
             EPOCHS_JSON: json.dumps(epochs)},
            {"fingerprint": "b", "status": FAILED, "error": "boom", EPOCHS_JSON: "[]"}]
    sink, _ = sink_for(tmp_path)
    sink.on_trial_complete(0, [], tune_trial(final_report(rows)))
    sink.on_trial_complete(0, [], tune_trial(final_report(rows)))  # a duplicate: deduplicated
    sink.flush()
    store = ResultsStore(tmp_path)
    assert EPOCHS_JSON not in store.query("trials").columns
    frame = store.query("epochs").sort_values("epoch")
    assert list(frame["row_key"]) == ["a/0", "a/1"] and set(frame["fingerprint"]) == {"a"}
    assert list(frame["val_clip_loss"]) == [1.5, 0.5] and list(frame["lambda_now"]) == [0.0, 0.5]
    assert list(frame["nbr_image"]) == [0.4, 0.4] and list(frame["nbr_text"]) == [0.3, 0.3]
    assert set(frame["structure_lambda"]) == {PLANNED[0].config.structure_lambda}
    assert set(frame["seed"]) == {0}
