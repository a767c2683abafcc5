"""The sweep driver: spec -> features -> layer similarity -> Ray Tune -> store.

:func:`run_sweep` is the whole pipeline of ``structure-sweep run`` and
``resume``. The results store is the one source of truth: finished trials (by
fingerprint) are skipped, so running a spec again, or resuming a run whose
driver died, only does what is missing. Tune's own experiment state is not
used for resume, so it is kept minimal (no periodic experiment checkpoints,
no per-trial logger files, a throw-away local storage directory).

Placement: the encoder actors run first and are killed once the features are
cached, so trials may use every CPU/GPU of the cluster; trials ask for
``tune.cpus_per_trial``/``tune.gpus_per_trial`` (fractions allowed) and at
most ``tune.max_concurrent_trials`` run at once. Features reach trials only
through Ray's object store: each needed layer is ``ray.put`` once by the
driver and fetched zero-copy by the trial.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import time
import traceback
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray.tune import Callback

from orchestrator.cluster import ray_session
from orchestrator.feature_store import FeatureStore
from orchestrator.features import FeatureSet, extract_features, trial_data
from orchestrator.planning import (PlannedTrial, materialize, optuna_space, param_space,
                                   plan_trials)
from orchestrator.results import ResultsStore
from orchestrator.schema import LOCK_FILE, finished_statuses
from orchestrator.similarity_stage import similarity_stage
from orchestrator.spec import SweepSpec, check_runnable, save_spec
from orchestrator.status import write_plan
from trials.config import TrialConfig
from trials.trial import run_trial

COMPACT_AT_FILES = 64  # compact a table at the end of a sweep once it has this many parts
COMPACT_EVERY_FILES = 256  # during a sweep: compact after this many new part files


@dataclass
class SweepOutcome:
    run_dir: Path
    planned: int
    skipped: int
    finished: int
    failed: int
    features_computed: int
    features_cached: int
    stopped: int = 0  # early-stopped by the scheduler (counted in finished)
    tune_seconds: float = 0.0  # wall time of the Tune stage(s)


def default_cache_dir() -> Path:
    return Path(os.environ.get("STRUCTURE_SWEEP_CACHE", Path.home() / ".cache" / "structure-sweep"))


def run_sweep(spec: SweepSpec, *, address: str | None = None, dashboard: bool = False,
              num_cpus: int | None = None, metrics_port: int | None = None,
              log=print) -> SweepOutcome:
    check_runnable(spec)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with driver_lock(run_dir):
        return _run_sweep(spec, run_dir, address=address, dashboard=dashboard, num_cpus=num_cpus,
                          metrics_port=metrics_port, log=log)


class RunDirBusy(RuntimeError):
    """Another driver holds the run directory."""


@contextlib.contextmanager
def driver_lock(run_dir: Path):
    """An exclusive, non-blocking flock on RUN_DIR/.driver.lock for a whole sweep:
    two drivers on one run directory would run the same trials twice and race
    on plan.json/spec.json. The kernel releases it when the driver dies."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise RunDirBusy(f"another structure-sweep run is using {run_dir} (pid {holder}); "
                             "wait for it to finish or stop it, or pass another --out") from None
        try:
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run_sweep(spec: SweepSpec, run_dir: Path, *, address, dashboard, num_cpus, metrics_port,
               log) -> SweepOutcome:
    save_spec(spec, run_dir)
    cache_root = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    store, results = FeatureStore(cache_root / "features"), ResultsStore(run_dir)
    results.recover()  # an interrupted compaction of an earlier driver
    with ray_session(address, num_cpus=num_cpus, dashboard=dashboard,
                     metrics_port=metrics_port, log=log):
        from orchestrator.monitoring import SweepMetrics

        monitor = SweepMetrics(spec.name, spec.tune.search_config.metric, spec.tune.search_config.mode)
        log(f"[1/3] features (cache: {cache_root})")
        features = extract_features(spec, str(store.root), log=log)
        monitor.features(features.cached, features.computed)
        log("[2/3] layer similarity")
        similarity = similarity_stage(store, results, features, spec.similarity, log=log)
        best = np.unravel_index(np.argmax(similarity), similarity.shape)
        log(f"  most similar pair: image layer {best[0]}, text layer {best[1]} "
            f"({spec.similarity.metric} = {similarity[best]:.3f})")
        runner = _Runner(spec, features, store, results, monitor, log)
        if spec.tune.search_config.search == "grid":
            outcome = runner.grid(plan_trials(spec, features, similarity))
        else:
            outcome = runner.optuna(similarity)
    if len(results.files("trials")) >= COMPACT_AT_FILES:
        results.compact("trials")
    return SweepOutcome(run_dir, *outcome, features.computed, features.cached,
                        stopped=runner.stopped, tune_seconds=runner.tune_seconds)


class _Runner:
    """Runs the Tune stage(s) of one sweep and counts what happened."""

    def __init__(self, spec, features, store, results, monitor, log):
        self.spec, self.features, self.store, self.results = spec, features, store, results
        self.monitor, self.log = monitor, log
        self.finished = self.failed = self.stopped = 0
        self.tune_seconds = 0.0
        # early-stopped trials count as finished only under ASHA; FIFO re-runs them in full
        self._asha = spec.tune.search_config.scheduler == "asha"

    def grid(self, planned: list[PlannedTrial]) -> tuple[int, int, int, int]:
        write_plan(self.spec.run_dir, [t.fingerprint for t in planned])
        done = self.results.finished_fingerprints(include_stopped=self._asha)
        pending = [t for t in planned if t.fingerprint not in done]
        self.log(f"[3/3] trials: {len(planned)} planned, {len(planned) - len(pending)} already "
                 f"finished (skipped), {len(pending)} to run")
        self.monitor.planned(len(pending))
        waves = _waves(pending, self.features, self.store, self._feature_budget())
        for number, wave in enumerate(waves, 1):
            if len(waves) > 1:
                self.log(f"  wave {number}/{len(waves)}: {len(wave)} trials on image layers "
                         f"{sorted({t.config.image_layer for t in wave})}")
            tasks = _batch(wave, self.spec.tune.run_config.trials_per_task)
            refs = _put_layers(self.store, self.features, wave)
            self._tune(refs, {"task": _grid_search(len(tasks))}, 1, None,
                       tasks=[[t.as_param() for t in task] for task in tasks], total=len(wave))
            del refs  # this wave's layers leave the object store before the next are put
        return len(planned), len(planned) - len(pending), self.finished, self.failed

    def _feature_budget(self) -> float:
        """Bytes of features one wave may put in the object store."""
        import ray

        if self.spec.tune.run_config.feature_memory_gb is not None:
            return self.spec.tune.run_config.feature_memory_gb * 2**30
        return 0.5 * ray.cluster_resources().get("object_store_memory", float("inf"))

    def optuna(self, similarity: np.ndarray) -> tuple[int, int, int, int]:
        stored = self.results.query("trials")
        planned = skipped = 0
        spaces = []
        for grid in self.spec.search:
            name = grid.name
            wanted = grid.sample_count(self.spec.tune.search_config.num_samples)
            mine = stored[stored["grid"] == name] if not stored.empty else stored
            finished = (mine[mine["status"].isin(finished_statuses(self._asha))]
                        if not mine.empty else mine)
            planned, skipped = planned + wanted, skipped + min(wanted, len(finished))
            spaces.append((grid, name, wanted - min(wanted, len(finished)), finished))
        write_plan(self.spec.run_dir, [], optuna={g[1]: g[2] + len(g[3]) for g in spaces})
        self.log(f"[3/3] trials: {planned} planned (Optuna), {skipped} already finished, "
                 f"{planned - skipped} to run")
        self.monitor.planned(planned - skipped)
        for grid, name, remaining, finished in spaces:
            if remaining <= 0:
                continue
            space = optuna_space(self.spec, grid, similarity)
            pairs = [tuple(p) for p in space.pairs]
            refs = _put_layers(self.store, self.features, pairs=pairs)
            searcher = self._optuna_searcher(param_space(space), finished)
            self._tune(refs, {}, remaining, searcher, total=remaining,
                       optuna={"training": self.spec.training, "grid": name, "space": space})
        return planned, skipped, self.finished, self.failed

    def _optuna_searcher(self, space: dict, finished):
        from ray.tune.search.optuna import OptunaSearch

        metric, mode = self.spec.tune.search_config.metric, self.spec.tune.search_config.mode
        points, rewards = [], []
        if not finished.empty and metric in finished.columns:  # warm start from the store
            for _, row in finished.iterrows():
                value = row[metric]
                if row.get("params") and isinstance(value, float) and not math.isnan(value):
                    points.append(json.loads(row["params"]))
                    rewards.append(value)
        kwargs = {"points_to_evaluate": points, "evaluated_rewards": rewards} if points else {}
        from optuna.samplers import TPESampler

        class _FinalOnly(OptunaSearch):
            """Optuna learns from final results; per-epoch reports (val_loss) are ASHA's."""

            def on_trial_result(self, trial_id, result):
                if self.metric in result:
                    super().on_trial_result(trial_id, result)

        # A resumed search draws a fresh random stream (same seed would repeat old draws).
        seed = self.spec.tune.search_config.seed + len(finished)
        return _FinalOnly(space, metric=metric, mode=mode, sampler=TPESampler(seed=seed), **kwargs)

    def _tune(self, refs, space, num_samples, searcher, *, total, tasks=None, optuna=None):
        from ray import tune

        spec = self.spec
        context = {"device": spec.tune.run_config.trial_device,
                   "report_epochs": spec.tune.search_config.scheduler == "asha"}
        import ray

        # One object for everything trials share; each trial process fetches it once
        # (see _shared), the Tune config of a trial is just its task index.
        payload = ray.put({"features": self.features, "refs": refs, "tasks": tasks,
                           "optuna": optuna, "context": context})
        trainable = tune.with_parameters(_trainable, shared=[payload])
        resources = {"cpu": spec.tune.run_config.cpus_per_trial, "gpu": spec.tune.run_config.gpus_per_trial}
        describe = (lambda config: tasks[config["task"]]) if tasks is not None else \
            (lambda config: [materialize(optuna["training"], optuna["grid"], optuna["space"],
                                         config, self.features).as_param()])
        sink = ResultsSink(self.results, total=total, describe=describe, monitor=self.monitor,
                           log=self.log, flush_seconds=spec.tune.run_config.flush_seconds,
                           scheduled_stops=spec.tune.search_config.scheduler == "asha")
        storage = tempfile.mkdtemp(prefix="structure-sweep-tune-")
        tuner = tune.Tuner(
            tune.with_resources(trainable, resources),
            param_space=space,
            tune_config=tune.TuneConfig(reuse_actors=True, num_samples=num_samples,
                                        search_alg=searcher, scheduler=self._scheduler(),
                                        max_concurrent_trials=_concurrency(spec)),
            run_config=tune.RunConfig(
                name="tune", storage_path=storage, verbose=0, callbacks=[sink],
                failure_config=tune.FailureConfig(max_failures=spec.tune.run_config.max_failures),
                sync_config=tune.SyncConfig(sync_artifacts=False),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
        )
        started = time.monotonic()
        try:
            with _quiet_logger("ray.tune"):  # our store replaces Tune's per-trial result files
                tuner.fit()
        finally:
            sink.flush()
            self.tune_seconds += time.monotonic() - started
            shutil.rmtree(storage, ignore_errors=True)
        self.finished += sink.finished
        self.failed += sink.failed
        self.stopped += sink.stopped

    def _scheduler(self):
        if self.spec.tune.search_config.scheduler != "asha":
            return None
        from ray.tune.schedulers import ASHAScheduler

        asha = self.spec.tune.search_config.asha
        max_t = asha.max_t or int(self.spec.training.get("epochs", 1000))
        return ASHAScheduler(time_attr="epoch", metric="val_loss", mode="min", max_t=max_t,
                             grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                             stop_last_trials=False)  # a trial that reaches max_t finishes


def _grid_search(n: int):
    from ray import tune

    return tune.grid_search(list(range(n)))


def _concurrency(spec: SweepSpec) -> int:
    import ray

    run = spec.tune.run_config
    if run.max_concurrent_trials:
        return run.max_concurrent_trials
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / run.cpus_per_trial
    if run.gpus_per_trial:
        slots = min(slots, resources.get("GPU", 0) / run.gpus_per_trial)
    return max(1, int(slots))


def _layer_bytes(store: FeatureStore, features: FeatureSet, pending: list[PlannedTrial]) -> int:
    """Bytes that _put_layers puts for these trials (one array per key and layer)."""
    image_layers = {t.config.image_layer for t in pending}
    text_layers = {t.config.text_layer for t in pending}
    image_keys = _image_keys(features)
    total = 0
    for key in features.keys():
        n, _, dim = store.manifest(key)["shape"]
        total += n * dim * 4 * len(image_layers if key in image_keys else text_layers)
    return total


def _waves(pending: list[PlannedTrial], features: FeatureSet, store: FeatureStore,
           budget: float) -> list[list[PlannedTrial]]:
    """Pending trials in waves of whole image layers whose features fit ``budget``.

    A full layer grid of a large dataset does not fit the object store at
    once; a wave holds its image layers (and the text layers they pair with)
    and is freed before the next. One image layer is the smallest wave.
    """
    by_layer = defaultdict(list)
    for t in pending:
        by_layer[t.config.image_layer].append(t)
    waves: list[list[PlannedTrial]] = []
    for layer in sorted(by_layer):
        candidate = (waves[-1] if waves else []) + by_layer[layer]
        if waves and _layer_bytes(store, features, candidate) <= budget:
            waves[-1] = candidate
        else:
            waves.append(list(by_layer[layer]))
    return waves


def _batch(pending: list[PlannedTrial], size: int) -> list[list[PlannedTrial]]:
    """Tune trials of up to ``size`` planned trials sharing one layer pair."""
    if size <= 1:
        return [[t] for t in pending]
    by_pair = defaultdict(list)
    for t in pending:
        by_pair[(t.config.image_layer, t.config.text_layer)].append(t)
    return [group[k:k + size] for group in by_pair.values() for k in range(0, len(group), size)]


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _image_keys(features: FeatureSet) -> set[str]:
    splits = (features.train, features.val, *features.zero_shot.values(), *features.retrieval.values())
    return {s.image for s in splits}


def _put_layers(store: FeatureStore, features: FeatureSet, pending: list[PlannedTrial] = (),
                pairs: list[tuple[int, int]] = ()) -> dict:
    """Each needed layer of each feature entry, once, in Ray's object store."""
    import ray

    pairs = list(pairs) + [(t.config.image_layer, t.config.text_layer) for t in pending]
    image_layers, text_layers = {p[0] for p in pairs}, {p[1] for p in pairs}
    image_keys = _image_keys(features)
    refs: dict[str, dict[int, object]] = {}
    for key in features.keys():
        layers = image_layers if key in image_keys else text_layers
        refs[key] = {layer: ray.put(np.ascontiguousarray(store.layer(key, layer)))
                     for layer in layers}
    return refs


# --- inside a Tune trial ---------------------------------------------------------------

# Errors of a trial's own inputs (training diverged, CSA rank errors, bad head
# options): a retry would fail the same way, so they become a failed row at once.
DETERMINISTIC_ERRORS = (ValueError, FloatingPointError)

_SHARED: dict = {}  # per trial process: the sweep's shared payload, fetched once


def _shared(ref) -> dict:
    import ray

    key = ref.hex()
    if key not in _SHARED:
        _SHARED.clear()
        _SHARED[key] = ray.get(ref)
    return _SHARED[key]


def _trainable(param: dict, shared: list):
    """One Tune trial: fetch two layers (zero-copy), run its trial(s), report once.

    A task of several planned trials (``tune.trials_per_task``) shares the
    fetched features and reports every row; a failing trial in it is recorded
    as failed without failing the others.
    """
    import ray
    from ray import tune

    started = time.time()
    payload = _shared(shared[0])
    features, refs, tasks = payload["features"], payload["refs"], payload["tasks"]
    optuna, context = payload["optuna"], payload["context"]
    if tasks is not None:
        trials = tasks[param["task"]]
    else:
        trials = [materialize(optuna["training"], optuna["grid"], optuna["space"], param,
                              features).as_param()]
    first = TrialConfig(**trials[0]["config"])
    data = trial_data(features, lambda key, layer: ray.get(refs[key][layer]),
                      first.image_layer, first.text_layer)
    on_epoch = None
    if context["report_epochs"]:
        on_epoch = lambda epoch, m: tune.report({"val_loss": m["val_loss"],  # noqa: E731
                                                 "epoch": epoch + 1})
    rows, host = [], socket.gethostname()
    for trial in trials:
        t0 = time.time()
        try:
            metrics = run_trial(data, TrialConfig(**trial["config"]), device=context["device"],
                                on_epoch=on_epoch)
            status, error = "done", ""
        except DETERMINISTIC_ERRORS:  # the same inputs fail the same way: record, don't retry
            metrics, status, error = {}, "failed", traceback.format_exc()[-4000:]
        except Exception:
            if len(trials) == 1:
                raise  # maybe transient (worker death, CUDA OOM): Tune retries it, then records it
            metrics, status, error = {}, "failed", traceback.format_exc()[-4000:]
        end = time.time()
        rows.append({"fingerprint": trial["fingerprint"], "status": status, "error": error,
                     **metrics, "started_at": t0, "finished_at": end, "host": host,
                     "trial_seconds": end - (started if len(rows) == 0 else t0)})
    if len(rows) == 1:
        tune.report({**rows[0], "trial_complete": True})
    else:
        tune.report({"trial_complete": True, "rows_json": json.dumps(rows)})


# --- in the driver ------------------------------------------------------------------------

class ResultsSink(Callback):
    """A Tune callback that writes one store row per finished, stopped or failed trial.

    Rows are buffered and flushed as one Parquet file at most every
    ``flush_seconds`` (checked on every step of Tune's loop), so a crash of
    the driver loses at most the trials of that window.
    """

    def __init__(self, results: ResultsStore, total: int, describe, monitor=None, log=print,
                 flush_seconds: float = 1.0, scheduled_stops: bool = False,
                 compact_every: int = COMPACT_EVERY_FILES):
        self.results, self.total, self.describe, self.log = results, total, describe, log
        self.compact_every, self.written = compact_every, 0  # parts since the last compaction
        self.monitor, self.scheduled_stops = monitor, scheduled_stops
        self.flush_seconds, self.last_flush = flush_seconds, time.monotonic()
        self.buffer: list[dict] = []
        self.finished = self.failed = self.stopped = 0

    def on_trial_start(self, iteration, trials, trial, **info):
        if self.monitor:
            self.monitor.trial_started()

    def on_trial_recover(self, iteration, trials, trial, **info):
        if self.monitor:
            self.monitor.trial_retried()
        self.log(f"  retrying a trial after: {_error_text(trial).strip().splitlines()[-1:]}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        planned = self.describe(trial.config)
        if not result.get("trial_complete"):
            if self.scheduled_stops and "val_loss" in result:
                return self._add(trial, planned[0], "stopped",
                                 {"val_loss": result["val_loss"], "epoch": result.get("epoch")}, "")
            return self._add_failures(trial, planned, "trial ended without a final result")
        rows = json.loads(result["rows_json"]) if "rows_json" in result else [result]
        for param, row in zip(planned, rows):
            self._add(trial, param, row.pop("status", "done"), row, row.pop("error", ""))

    def on_trial_error(self, iteration, trials, trial, **info):
        self._add_failures(trial, self.describe(trial.config), _error_text(trial))

    def on_step_end(self, iteration, trials, **info):
        if self.buffer and time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def on_experiment_end(self, trials, **info):
        self.flush()

    def _add_failures(self, trial, planned: list[dict], error: str):
        for param in planned:
            self._add(trial, param, "failed", {}, error)

    def _add(self, trial, param: dict, status: str, result: dict, error: str):
        if status == "failed":
            self.failed += 1
        else:
            self.finished += 1
            self.stopped += status == "stopped"
        if self.monitor:
            self.monitor.trial_ended(status, result)
        row = {"fingerprint": param["fingerprint"], "grid": param["grid"], "status": status,
               "error": error, "retries": int(getattr(trial, "num_failures", 0) or 0),
               "params": param.get("params", ""),
               **{f"config/{k}": _scalar(v) for k, v in param["config"].items()},
               **{k: v for k, v in result.items() if _is_metric(k, v)}}
        self.buffer.append(row)
        self._log_row(row, status, error)
        if time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def _log_row(self, row: dict, status: str, error: str):
        n = self.finished + self.failed
        if status == "failed":
            return self.log(f"  [{n}/{self.total}] FAILED {row['fingerprint']}: "
                            f"{error.strip().splitlines()[-1:]}")
        summary = ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in row.items()
                            if k.startswith("zs/") and k.endswith("/top1"))
        self.log(f"  [{n}/{self.total}] {status:<7} layers ({row['config/image_layer']},"
                 f"{row['config/text_layer']}) {row['config/head']} "
                 f"λ={row['config/structure_lambda']:g} n={row['config/n_train']} "
                 f"seed={row['config/seed']}  {summary}")

    def flush(self):
        written = self.results.write("trials", self.buffer)
        self.buffer, self.last_flush = [], time.monotonic()
        if written is not None:
            self.written += 1
            if self.written >= self.compact_every:  # a long sweep: keep the part count bounded
                self.results.compact("trials")
                self.written = 0


_TUNE_KEYS = {"trial_complete", "rows_json", "time_this_iter_s", "time_total_s", "timestamp",
              "training_iteration", "iterations_since_restore", "time_since_restore",
              "pid", "node_ip", "date", "done", "config", "trial_id", "experiment_tag",
              "checkpoint_dir_name", "should_checkpoint", "hostname", "fingerprint", "status", "error"}


def _is_metric(key: str, value) -> bool:
    return key not in _TUNE_KEYS and isinstance(value, (int, float, str, bool))


def _scalar(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text()[-4000:] if path else str(getattr(trial, "error_msg", ""))
    except OSError:
        return str(getattr(trial, "error_msg", "") or path)
