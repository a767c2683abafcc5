"""The driver's side of finished trials: a Tune callback that writes store rows.

Runs in the driver's Tune loop. Each Tune trial stands for the planned trials
of one task (``describe(tune_config)``); its final report (see
:func:`orchestrator.worker.final_report`) becomes one row per planned trial
in the ``trials`` table, with the trial's config, status and metrics, and
its recorded epochs (:data:`orchestrator.worker.EPOCHS_JSON`) become rows of
the ``epochs`` table (columns: :data:`orchestrator.schema.EPOCH_COLUMNS`).
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Callable, Sequence

from ray.tune import Callback

from orchestrator.planning import PlannedTrial
from orchestrator.progress import TrialLine
from orchestrator.results import ResultsStore
from orchestrator.schema import ASHA_METRIC, DONE, FAILED, STOPPED, config_column, epoch_row_key
from orchestrator.worker import EPOCHS_JSON, ERROR_CHARS, ROWS_JSON, TRIAL_COMPLETE, report_rows

COMPACT_EVERY_FILES = 256  # during a sweep: compact after this many new part files

Describe = Callable[[dict], Sequence[PlannedTrial]]  # Tune config -> its planned trials

# Columns of an ``epochs`` row taken from the trainer's per-epoch row.
_EPOCH_FIELDS = ("epoch", "train_loss", "val_loss", "val_clip_loss", "nbr_image", "nbr_text")

# Keys of a Tune result that are Tune's or the row's own, not metrics.
_TUNE_KEYS = {TRIAL_COMPLETE, ROWS_JSON, EPOCHS_JSON, "time_this_iter_s", "time_total_s", "timestamp",
              "training_iteration", "iterations_since_restore", "time_since_restore",
              "pid", "node_ip", "date", "done", "config", "trial_id", "experiment_tag",
              "checkpoint_dir_name", "should_checkpoint", "hostname", "fingerprint", "status",
              "error"}


class ResultsSink(Callback):
    """A Tune callback that writes one store row per finished, stopped or failed trial.

    Rows are buffered and flushed as one Parquet file at most every
    ``flush_seconds`` (checked on every step of Tune's loop), so a crash of
    the driver loses at most the trials of that window. ``scheduled_stops``:
    a trial ended by the scheduler (ASHA) after per-epoch reports is
    ``stopped``, not failed.
    """

    def __init__(self, results: ResultsStore, total: int, describe: Describe, monitor=None,
                 log=print, flush_seconds: float = 1.0, scheduled_stops: bool = False,
                 compact_every: int = COMPACT_EVERY_FILES):
        self.results, self.total, self.describe, self.log = results, total, describe, log
        self.compact_every, self.written = compact_every, 0  # parts since the last compaction
        self.monitor, self.scheduled_stops = monitor, scheduled_stops
        self.flush_seconds, self.last_flush = flush_seconds, time.monotonic()
        self.buffer: list[dict] = []
        self.epoch_buffer: list[dict] = []  # rows of the ``epochs`` table
        self.finished = self.failed = self.stopped = 0

    def __getstate__(self):
        # Tune pickles its callbacks into tuner.pkl, only for a Tune-level restore,
        # which this project never does (resume reads the store). The driver's log
        # and monitor (a live display: a terminal, locks) stay out of that copy.
        return {**self.__dict__, "log": print, "monitor": None, "buffer": [], "epoch_buffer": []}

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.monitor:
            self.monitor.trial_started()

    def on_trial_recover(self, iteration, trials, trial, **info):
        if self.monitor:
            self.monitor.trial_retried()
        self.log(f"  retrying a trial after: {_last_line(_error_text(trial))}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        planned = self.describe(trial.config)
        if not result.get(TRIAL_COMPLETE):
            if self.scheduled_stops and "val_loss" in result:
                last = {k: result.get(k) for k in ("val_loss", ASHA_METRIC, "epoch")}
                return self._add_all(trial, [(planned[0], STOPPED, last, "")])
            return self._add_failures(trial, planned, "trial ended without a final result")
        ended = []
        for one, row in zip(planned, report_rows(result)):
            status, error = row.pop("status", DONE), row.pop("error", "")
            self.epoch_buffer.extend(epoch_rows(one, row.pop(EPOCHS_JSON, None)))
            ended.append((one, status, row, error))
        self._add_all(trial, ended)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add_failures(trial, self.describe(trial.config), _error_text(trial))

    def on_step_end(self, iteration, trials, **info):
        if self.buffer and time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def on_experiment_end(self, trials, **info):
        self.flush()

    def _add_failures(self, trial, planned: Sequence[PlannedTrial], error: str):
        self._add_all(trial, [(one, FAILED, {}, error) for one in planned])

    def _add_all(self, trial, ended: list[tuple[PlannedTrial, str, dict, str]]):
        """The rows of one Tune trial's planned trials (planned, status, result, error):
        buffered and logged one by one, then told to the monitor as one event."""
        retries = int(getattr(trial, "num_failures", 0) or 0)
        for planned, status, result, error in ended:
            self._count(status)
            row = store_row(planned, status, result, error, retries=retries)
            self.buffer.append(row)
            self._log_row(row, status, error)
        if self.monitor:
            self.monitor.trials_ended([(status, result) for _, status, result, _ in ended])
        if time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def _count(self, status: str):
        if status == FAILED:
            self.failed += 1
        else:
            self.finished += 1
            self.stopped += status == STOPPED

    def _log_row(self, row: dict, status: str, error: str):
        """One line per ended trial, tagged (:class:`TrialLine`) so a progress
        display can fold finished ones into its counts and still print failures."""
        n = self.finished + self.failed
        if status == FAILED:
            return self.log(TrialLine(f"  [{n}/{self.total}] FAILED {row['fingerprint']}: "
                                      f"{_last_line(error)}", status))
        summary = ", ".join(f"{k[len('zs/'):]}={v:.3f}" for k, v in row.items()
                            if k.startswith("zs/") and k.endswith("/top1"))
        column = lambda field: row[config_column(field)]  # noqa: E731
        self.log(TrialLine(f"  [{n}/{self.total}] {status:<7} layers ({column('image_layer')},"
                           f"{column('text_layer')}) {column('head')} "
                           f"λ={column('structure_lambda'):g} n={column('n_train')} "
                           f"seed={column('seed')}  {summary}", status))

    def flush(self):
        # epochs first: a trial row present means its epoch rows are too (a crash between
        # the two writes leaves epoch rows of a trial that re-runs and rewrites them)
        self.results.write("epochs", self.epoch_buffer)
        written = self.results.write("trials", self.buffer)
        self.buffer, self.epoch_buffer, self.last_flush = [], [], time.monotonic()
        if written is not None:
            self.written += 1
            if self.written >= self.compact_every:  # a long sweep: keep the part count bounded
                self.results.compact("trials")
                self.results.compact("epochs")
                self.written = 0


def store_row(planned: PlannedTrial, status: str, result: dict, error: str,
              retries: int = 0) -> dict:
    """The ``trials`` row of one planned trial: identity, config columns, metrics."""
    # fields read as they are (dataclasses.asdict deep-copies each value): _scalar makes
    # dicts and lists JSON text, and TrialConfig nests no dataclass
    config = {f.name: getattr(planned.config, f.name) for f in dataclasses.fields(planned.config)}
    return {"fingerprint": planned.fingerprint, "grid": planned.grid, "status": status,
            "error": error, "retries": retries, "params": planned.params,
            "layer_rule": planned.layer_rule, "similarity_n": planned.similarity_n,
            "image_encoder": planned.image_encoder, "text_encoder": planned.text_encoder,
            "train_data": planned.train_data,
            **{config_column(k): _scalar(v) for k, v in config.items()},
            **{k: v for k, v in result.items() if _is_metric(k, v)}}


def epoch_rows(planned: PlannedTrial, epochs_json) -> list[dict]:
    """The ``epochs`` rows of one trial from its :data:`EPOCHS_JSON` text (None: none)."""
    config = planned.config
    return [{"row_key": epoch_row_key(planned.fingerprint, e["epoch"]),
             "fingerprint": planned.fingerprint,
             **{k: _number(e.get(k)) for k in _EPOCH_FIELDS},
             "structure_lambda": float(config.structure_lambda),
             "lambda_now": _number(e.get("structure_lambda")),
             "n_train": config.n_train, "seed": config.seed}
            for e in json.loads(epochs_json or "[]")]


def _number(value):
    return float("nan") if value is None else value


def _is_metric(key: str, value) -> bool:
    return key not in _TUNE_KEYS and isinstance(value, (int, float, str, bool))


def _scalar(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _last_line(error: str) -> str:
    """The last line of an error text: a traceback ends with the exception."""
    lines = (error or "").strip().splitlines()
    return lines[-1] if lines else "(no error text)"


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text()[-ERROR_CHARS:] if path else str(getattr(trial, "error_msg", ""))
    except OSError:
        return str(getattr(trial, "error_msg", "") or path)
