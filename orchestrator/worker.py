"""The trial worker: what runs inside one Tune trial, on a worker process.

A Tune trial runs one :class:`TrialTask`: one or more planned trials, each
layer pair among them fetched once. :func:`run_task` is the
whole worker, a plain function of the task, the sweep's features and a
``fetch(key, layer)`` that returns one layer's array, so it runs and is
tested without Ray. :func:`trainable` is the thin Tune wrapper: it fetches
from Ray's object store (zero-copy) and reports through ``tune.report``.

Trials of a task that share shapes (:func:`trials.packed.pack_key`, and
equal feature shapes, whatever their layer pairs) train as packs, one
batched computation each (:func:`trials.packed.run_pack`): the
same numbers as one by one, one row per trial with its own fingerprint. A
pack holds at most ``tune.pack_size`` trials (default: the whole group),
capped by :func:`pack_cap`'s memory budget. Per-epoch reports (ASHA) need one
trial per Tune trial, so tasks that report epochs never pack; ASHA already
forces ``trials_per_task: 1``.

Everything trials of one Tune run share (feature keys, object refs, the
tasks or the Optuna space, the device) is one :class:`WorkerPayload`, put in
the object store once by the driver and fetched once per trial process; the
Tune config of a trial only selects its task.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from orchestrator.features import FeatureSet, Fetch, trial_data
from orchestrator.planning import OptunaSpace, PlannedTrial, materialize
from orchestrator.schema import ASHA_METRIC, DONE, FAILED
from trials.head_options import needs_tokens
from trials.packed import data_shape, member_bytes, pack_key, run_pack
from trials.token_trial import TokenTrialData, run_token_trial
from trials.trial import EPOCH_ROWS, TrialData, run_trial

# Errors of a trial's own inputs (training diverged, CSA rank errors, bad head
# options): a retry would fail the same way, so they become a failed row at once.
DETERMINISTIC_ERRORS = (ValueError, FloatingPointError)
ERROR_CHARS = 4000  # the tail of a traceback kept in a failed row
# Share of free device memory (GPU) or available RAM (CPU) one pack may plan to use
PACK_MEMORY_SHARE = {"cuda": 0.5, "cpu": 0.25}

# Keys of a trial's final report (read back by orchestrator.results_sink).
TRIAL_COMPLETE = "trial_complete"  # present only in the final report
ROWS_JSON = "rows_json"  # every row of a task, as one JSON text
EPOCHS_JSON = "epochs_json"  # in each row: the trial's recorded epoch rows, as JSON text
#   (text, not a list: Tune's loggers flatten results; the sink writes them to ``epochs``)

Train = Callable[..., dict]  # run_trial's signature: (data, config, *, device, on_epoch)
Report = Callable[[dict], None]


@dataclass(frozen=True)
class WorkerContext:
    """How trials run: on which device, whether they report every epoch
    (``val_loss`` and ``val_clip_loss``, the latter ASHA's metric), whether
    trials of one shape train as packs, and at most how many per pack
    (None: every trial of the group, within the memory cap); ``objective``:
    the metric a searcher learns from (a number in :func:`final_report`)."""

    device: str = "cpu"
    report_epochs: bool = False
    pack: bool = True
    pack_size: Optional[int] = None
    objective: Optional[str] = None
    token_memory_budget_gb: float = 4.0  # token sets beyond it are streamed (spec: tokens.memory_budget_gb)


@dataclass(frozen=True)
class TrialTask:
    """The planned trials of one Tune trial, on one layer pair or several (a pack of one
    shape may span layer pairs: each member reads its own)."""

    trials: tuple[PlannedTrial, ...]

    def __post_init__(self):
        if not self.trials:
            raise ValueError("a TrialTask needs at least one trial")

    @property
    def pairs(self) -> list[tuple[int, int]]:
        """The (image layer, text layer) pairs its trials read, in task order."""
        return list(dict.fromkeys(layer_pair(t) for t in self.trials))


def layer_pair(trial: PlannedTrial) -> tuple[int, int]:
    """(image layer, text layer): the features a trial reads."""
    return trial.config.image_layer, trial.config.text_layer


@dataclass(frozen=True)
class OptunaGridTask:
    """One Optuna grid: what turns a Tune config (Optuna's suggestion) into a trial."""

    training: dict  # the spec's training defaults
    grid: str
    space: OptunaSpace

    def task(self, suggestion: dict, features: FeatureSet) -> TrialTask:
        trial = materialize(self.training, self.grid, self.space, suggestion, features)
        return TrialTask((trial,))


@dataclass(frozen=True)
class WorkerPayload:
    """What every trial of one Tune run shares. Grid runs list their ``tasks``
    (a trial's Tune config is ``{"task": index}``); Optuna runs give ``optuna``."""

    features: FeatureSet
    refs: dict[str, dict[int, Any]]  # store key -> layer -> ObjectRef of its array
    context: WorkerContext
    tasks: tuple[TrialTask, ...] = ()
    optuna: Optional[OptunaGridTask] = None

    def task(self, config: dict) -> TrialTask:
        """The task a Tune config stands for (the same in the driver and the worker)."""
        if self.optuna is not None:
            return self.optuna.task(config, self.features)
        return self.tasks[config["task"]]


def run_task(task: TrialTask, features: FeatureSet, fetch: Fetch,
             context: WorkerContext = WorkerContext(), *, report: Optional[Report] = None,
             train: Train = run_trial) -> list[dict]:
    """Run every trial of ``task`` on its layer pair; one row per trial.

    Each layer pair is fetched once for the whole task. A trial failing with a
    :data:`DETERMINISTIC_ERRORS` error becomes a failed row. Any other error
    (worker death, CUDA OOM: maybe transient) is raised for a one-trial task,
    so Tune retries it; in a task of several it is a failed row, so the
    others are kept. Each row carries its recorded epochs as :data:`EPOCHS_JSON`.
    ``report`` receives per-epoch ``val_loss`` and ``val_clip_loss`` when
    ``context.report_epochs``; ``train`` is the trial function.
    """
    started = time.time()
    inputs = _TaskInputs(features, fetch, context, train)
    on_epoch = _epoch_reporter(report) if context.report_epochs and report else None
    packing = (context.pack and train is run_trial and on_epoch is None and len(task.trials) > 1
               and any(pack_key(t.config) is not None for t in task.trials))
    outcomes: dict[int, tuple] = {}  # trial index -> (status, error, metrics, start, end, seconds)
    units = plan_packs(task.trials, inputs.pooled, context) if packing else [[i] for i in range(len(task.trials))]
    for unit in units:
        if len(unit) > 1:
            outcomes.update(_run_pack(unit, task.trials, inputs.pooled, context.device))
        for i in unit:  # single trials, and the members of a pack that failed as a whole
            if i not in outcomes:
                t0 = time.time()
                data, trial_fn = inputs.of(task.trials[i])
                status, error, metrics = _attempt(task.trials[i], data, context.device, on_epoch, trial_fn,
                                                  reraise=len(task.trials) == 1)
                end = time.time()
                outcomes[i] = (status, error, metrics, t0, end, end - t0)
    rows, host = [], socket.gethostname()
    for i, trial in enumerate(task.trials):
        status, error, metrics, t0, end, seconds = outcomes[i]
        metrics[EPOCHS_JSON] = json.dumps(metrics.pop(EPOCH_ROWS, []))
        rows.append({"fingerprint": trial.fingerprint, "status": status, "error": error,
                     **metrics, "started_at": t0, "finished_at": end, "host": host,
                     "trial_seconds": seconds + (t0 - started if i == 0 else 0.0)})  # 1st: with the fetch
    return rows


class _TaskInputs:
    """A task's layer pairs, each read once and only if a trial needs it: pooled features
    for pooled heads (trained by ``train``), token sets for token heads."""

    def __init__(self, features: FeatureSet, fetch: Fetch, context: WorkerContext, train: Train):
        self.features, self.fetch, self.context, self.train = features, fetch, context, train
        self._pooled: dict[tuple[int, int], TrialData] = {}
        self._tokens: dict[tuple[int, int], TokenTrialData] = {}

    def of(self, trial: PlannedTrial) -> tuple[Any, Train]:
        """(the trial's data, the function that runs it)."""
        pair = layer_pair(trial)
        if needs_tokens(trial.config.head):
            if pair not in self._tokens:
                from orchestrator.token_features import token_trial_data

                self._tokens[pair] = token_trial_data(self.features, *pair, self.context.token_memory_budget_gb)
            return self._tokens[pair], run_token_trial
        return self.pooled(trial), self.train

    def pooled(self, trial: PlannedTrial) -> TrialData:
        """The pooled features of the trial's layer pair."""
        pair = layer_pair(trial)
        if pair not in self._pooled:
            self._pooled[pair] = trial_data(self.features, self.fetch, *pair)
        return self._pooled[pair]


def plan_packs(trials: tuple[PlannedTrial, ...], data_of: Callable[[PlannedTrial], TrialData],
               context: WorkerContext) -> list[list[int]]:
    """The task's trials as units to run, by index: packs of equal :func:`~trials.packed.pack_key`
    and equal data shapes (on any layer pairs; at most ``context.pack_size`` and :func:`pack_cap`
    each) and single trials, in task order. ``data_of(trial)`` is its layer pair's data."""
    groups: dict[Any, list[int]] = {}
    for i, trial in enumerate(trials):
        key = pack_key(trial.config)
        groups.setdefault(("alone", i) if key is None else (key, data_shape(data_of(trial))), []).append(i)
    units = []
    for members in groups.values():
        first = trials[members[0]]
        size = min(context.pack_size or len(members), pack_cap(first.config, data_of(first), context.device))
        units += [members[k:k + size] for k in range(0, len(members), max(size, 1))]
    return sorted(units)


def pack_cap(config, data: TrialData, device: str) -> int:
    """How many members of ``config``'s shape fit the memory budget: a share
    (:data:`PACK_MEMORY_SHARE`) of the free GPU memory, or of the available RAM."""
    kind = torch.device(device).type
    if kind == "cuda":
        free = torch.cuda.mem_get_info(torch.device(device))[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    share = PACK_MEMORY_SHARE.get(kind, PACK_MEMORY_SHARE["cpu"])
    per_member = member_bytes(config, data.train_image.shape[1], data.train_text.shape[1], len(data.train_image))
    return max(1, int(share * free // per_member))


def _run_pack(members: list[int], trials, data_of: Callable[[PlannedTrial], TrialData],
              device: str) -> dict[int, tuple]:
    """Outcomes of one pack by trial index; empty when the pack failed as a whole (e.g. out of
    memory): its members then run one by one, as they would unpacked."""
    t0 = time.time()
    data = [data_of(trials[i]) for i in members]  # members of one layer pair share its rows
    try:
        results = run_pack(data, [trials[i].config for i in members], device=device)
    except Exception:  # noqa: BLE001 (the fallback is the unpacked path, with its own error rules)
        return {}
    end = time.time()
    share = (end - t0) / len(members)
    outcomes = {}
    for i, result in zip(members, results):
        if isinstance(result, Exception):
            error = "".join(traceback.format_exception(result))[-ERROR_CHARS:]
            outcomes[i] = (FAILED, error, {}, t0, end, share)
        else:
            outcomes[i] = (DONE, "", result, t0, end, share)
    return outcomes


def _attempt(trial: PlannedTrial, data: Any, device: str, on_epoch, train: Train,
             reraise: bool) -> tuple[str, str, dict]:
    """(status, error, metrics) of one trial."""
    try:
        return DONE, "", train(data, trial.config, device=device, on_epoch=on_epoch)
    except DETERMINISTIC_ERRORS:  # the same inputs fail the same way: record, don't retry
        return FAILED, traceback.format_exc()[-ERROR_CHARS:], {}
    except Exception:
        if reraise:
            raise  # Tune retries it (max_failures), then records it as failed
        return FAILED, traceback.format_exc()[-ERROR_CHARS:], {}


def _epoch_reporter(report: Report):
    def on_epoch(epoch: int, metrics: dict) -> None:
        report({"val_loss": metrics["val_loss"], ASHA_METRIC: metrics[ASHA_METRIC],
                "epoch": epoch + 1})
    return on_epoch


def final_report(rows: list[dict], objective: Optional[str] = None) -> dict:
    """The last ``tune.report`` of a task: every row as one JSON text, and the
    ``objective`` of a one-row task (what Optuna learns from) as a number.

    Rows travel as text, not as numbers of the result, because Tune keeps
    running statistics of every number a trial reports and serialises them
    (pickling each) whenever it saves its experiment state: ~3 ms of the
    driver per Tune trial for a row's metrics. The store is read from the text.
    """
    report = {TRIAL_COMPLETE: True, ROWS_JSON: json.dumps(rows)}
    value = rows[0].get(objective) if objective and len(rows) == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        report[objective] = value
    return report


def report_rows(result: dict) -> list[dict]:
    """The rows of a :func:`final_report` (read by the driver's results sink)."""
    return json.loads(result[ROWS_JSON]) if ROWS_JSON in result else [result]


# --- the Tune wrapper -------------------------------------------------------------------

_PAYLOADS: dict = {}  # per trial process: the current run's payload, fetched once


def _payload(ref) -> WorkerPayload:
    import ray

    key = ref.hex()
    if key not in _PAYLOADS:
        _PAYLOADS.clear()  # a new Tune run (wave or grid): drop the last one's payload
        _PAYLOADS[key] = ray.get(ref)
    return _PAYLOADS[key]


def trainable(config: dict, shared: list) -> None:
    """The Tune function trainable: ``run_task`` on object-store features.

    ``shared`` is ``[ObjectRef of a WorkerPayload]`` (a list, so that
    ``tune.with_parameters`` passes the ref rather than the payload itself).
    """
    import ray
    from ray import tune

    payload = _payload(shared[0])
    rows = run_task(payload.task(config), payload.features,
                    lambda key, layer: ray.get(payload.refs[key][layer]),
                    payload.context, report=tune.report)
    tune.report(final_report(rows, payload.context.objective))
