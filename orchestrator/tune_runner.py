"""The Tune stage of a sweep: pending trials -> Tune trials -> results sink.

Runs in the driver. Two paths:

- grid: the planned trials not yet in the store, in waves of image layers
  whose features fit the feature budget; in each wave, tasks of up to
  ``tune.trials_per_task`` trials of one packable shape (any layer pairs)
  or of one layer pair, one Tune trial per task
  (``tune.grid_search`` over task indices).
- optuna: per grid, the samples still wanted, drawn by Optuna's TPE sampler
  (warm-started from the stored trials of that grid).

Both put the needed layers in Ray's object store once (a trial fetches them
zero-copy), share one :class:`~orchestrator.worker.WorkerPayload` and run
``tune.Tuner`` with at most ``tune.max_concurrent_trials`` trials at once and
the FIFO or ASHA scheduler. Tune's own experiment state is not used for
resume (the results store is), so it lives in a throw-away directory.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import tempfile
import threading
import time
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pandas as pd

from orchestrator.feature_store import FeatureStore
from trials.head_options import needs_tokens
from orchestrator.features import FeatureSet
from orchestrator.pair_rules import pair_label
from orchestrator.planning import PlannedTrial, optuna_space, param_space
from orchestrator.results import ResultsStore
from orchestrator.results_sink import ResultsSink
from orchestrator.schema import ASHA_METRIC, fair_objective, finished_statuses
from orchestrator.spec import SweepSpec
from orchestrator.status import write_plan
from orchestrator.tune_search import TaskQueue, optuna_searcher
from orchestrator.worker import OptunaGridTask, TrialTask, WorkerContext, WorkerPayload, layer_pair, trainable
from trials.packed import pack_key


@dataclass
class TuneTally:
    """What the Tune stage(s) of one sweep did."""

    planned: int = 0
    skipped: int = 0  # already finished in the store
    finished: int = 0  # done or stopped
    failed: int = 0
    stopped: int = 0  # early-stopped by the scheduler (counted in finished)
    seconds: float = 0.0  # wall time of the Tune runs

    def add(self, sink: ResultsSink) -> None:
        self.finished += sink.finished
        self.failed += sink.failed
        self.stopped += sink.stopped


@dataclass
class OptunaGrid:
    """One grid of an Optuna search and what the store already holds of it."""

    grid: dict
    name: str
    wanted: int  # samples the spec asks for
    finished: pd.DataFrame  # its finished rows: Optuna's warm start

    @property
    def skipped(self) -> int:
        return min(self.wanted, len(self.finished))

    @property
    def remaining(self) -> int:
        return self.wanted - self.skipped

    @property
    def planned(self) -> int:
        """Its trials in plan.json: stored ones beyond num_samples count too."""
        return self.remaining + len(self.finished)


class TuneRunner:
    """Runs the Tune stage(s) of one sweep; :attr:`tally` counts what happened."""

    def __init__(self, spec: SweepSpec, features: FeatureSet, store: FeatureStore,
                 results: ResultsStore, monitor, log=print, pair_features: dict | None = None):
        self.spec, self.features, self.store, self.results = spec, features, store, results
        # several encoder pairs or training splits: each trial's features are its pair's
        # (EncoderPair.key -> FeatureSet; PlannedTrial.features_key)
        self.pair_features = pair_features or {}
        self.monitor, self.log = monitor, log
        self.tally = TuneTally()
        # early-stopped trials count as finished only under ASHA; FIFO re-runs them in full
        self.asha = spec.tune.search_config.scheduler == "asha"

    # --- grid path --------------------------------------------------------------------

    def pending(self, planned: list[PlannedTrial]) -> list[PlannedTrial]:
        """The planned trials a run still has to do (not finished in the store)."""
        done = self.results.finished_fingerprints(include_stopped=self.asha)
        return [t for t in planned if t.fingerprint not in done]

    def run_grid(self, planned: list[PlannedTrial]) -> TuneTally:
        write_plan(self.spec.run_dir, [t.fingerprint for t in planned])
        pending = self.pending(planned)
        self.tally.planned, self.tally.skipped = len(planned), len(planned) - len(pending)
        self.log(f"[3/3] trials: {len(planned)} planned, {self.tally.skipped} already "
                 f"finished (skipped), {len(pending)} to run")
        self.monitor.planned(len(pending))
        budget = feature_budget(self.spec)
        all_waves = [(features, wave) for features, trials in self._by_pair(pending)
                     for wave in waves(trials, features, self.store, budget)]
        for number, (features, wave) in enumerate(all_waves, 1):
            if len(all_waves) > 1:
                pair = pair_label(*wave[0].features_key) if len(self.pair_features) > 1 else ""
                self.log(f"  wave {number}/{len(all_waves)}: {len(wave)} trials on image layers "
                         f"{sorted({t.config.image_layer for t in wave})}" + (f" ({pair})" if pair else ""))
            self._run_wave(wave, features)
        return self.tally

    def _by_pair(self, pending: list[PlannedTrial]) -> list[tuple[FeatureSet, list[PlannedTrial]]]:
        """Pending trials by encoder pair, with that pair's features: one Tune run (or more
        waves) per pair, so a trial's payload holds the features it reads."""
        groups: dict[tuple, list[PlannedTrial]] = defaultdict(list)
        for t in pending:
            groups[t.features_key if t.features_key in self.pair_features else None].append(t)
        return [(self.pair_features.get(key, self.features), trials) for key, trials in groups.items()]

    def _run_wave(self, wave: list[PlannedTrial], features: FeatureSet) -> None:
        n_pairs = len(features.train.text_to_image)
        groups = group_tasks(wave, self.spec.tune.run_config.trials_per_task)
        # longest first, so that the slots run out of work together, not one long task at the end
        tasks = tuple(TrialTask(tuple(group))
                      for group in sorted(groups, key=lambda g: task_cost(g, n_pairs), reverse=True))
        pooled = list(dict.fromkeys(layer_pair(t) for t in wave if not needs_tokens(t.config.head)))
        refs = put_layers(self.store, features, pooled)  # token heads read the token store
        payload = WorkerPayload(features, refs, self._context(), tasks=tasks)
        self._fit(payload, len(tasks), TaskQueue(len(tasks)), total=len(wave))
        # this wave's layers leave the object store (refs dropped) before the next are put

    # --- optuna path ------------------------------------------------------------------

    def run_optuna(self, similarity: np.ndarray) -> TuneTally:
        grids = optuna_grids(self.spec, self.results, include_stopped=self.asha)
        write_plan(self.spec.run_dir, [], optuna={g.name: g.planned for g in grids})
        self.tally.planned = sum(g.wanted for g in grids)
        self.tally.skipped = sum(g.skipped for g in grids)
        to_run = self.tally.planned - self.tally.skipped
        self.log(f"[3/3] trials: {self.tally.planned} planned (Optuna), {self.tally.skipped} "
                 f"already finished, {to_run} to run")
        self.monitor.planned(to_run)
        for grid in grids:
            if grid.remaining > 0:
                self._run_search(grid, similarity)
        return self.tally

    def _run_search(self, grid: OptunaGrid, similarity: np.ndarray) -> None:
        space = optuna_space(self.spec, grid.grid, similarity)
        refs = put_layers(self.store, self.features, [tuple(p) for p in space.pairs])
        payload = WorkerPayload(self.features, refs, self._context(),
                                optuna=OptunaGridTask(self.spec.training, grid.name, space))
        searcher = optuna_searcher(self.spec, param_space(space), grid.finished)
        self._fit(payload, grid.remaining, searcher, total=grid.remaining)

    # --- one Tune run -----------------------------------------------------------------

    def _context(self) -> WorkerContext:
        run = self.spec.tune.run_config
        return WorkerContext(device=run.trial_device, report_epochs=self.asha, pack=run.packing,
                             pack_size=run.pack_size,
                             objective=fair_objective(self.spec.tune.search_config.metric),
                             token_memory_budget_gb=self.spec.tokens.memory_budget_gb)

    def _fit(self, payload: WorkerPayload, num_samples: int, searcher, *, total: int) -> None:
        """One ``tune.Tuner`` run over ``payload``'s trials; rows go to the store."""
        import ray

        # One object for everything trials share; a trial's Tune config only picks its task.
        shared = ray.put(payload)
        sink = ResultsSink(self.results, total=total, describe=lambda c: payload.task(c).trials,
                           monitor=self.monitor, log=self.log,
                           flush_seconds=self.spec.tune.run_config.flush_seconds, scheduled_stops=self.asha)
        storage = tempfile.mkdtemp(prefix="structure-sweep-tune-")
        tuner = self._tuner(shared, num_samples, searcher, sink, storage)
        started = time.monotonic()
        try:
            with _quiet_logger("ray.tune"):  # our store replaces Tune's per-trial result files
                tuner.fit()
        finally:
            sink.flush()
            self.tally.seconds += time.monotonic() - started
            remove_in_background(storage)
        self.tally.add(sink)

    def _tuner(self, shared, num_samples: int, searcher, sink: ResultsSink, storage: str):
        from ray import tune

        spec = self.spec
        resources = {"cpu": spec.tune.run_config.cpus_per_trial, "gpu": spec.tune.run_config.gpus_per_trial}
        trainable_ = tune.with_parameters(trainable, shared=[shared])  # a list: Tune keeps the ref
        return tune.Tuner(
            tune.with_resources(trainable_, resources),
            tune_config=tune.TuneConfig(reuse_actors=True, num_samples=num_samples,
                                        search_alg=searcher, scheduler=asha_scheduler(spec),
                                        max_concurrent_trials=concurrency(spec)),
            run_config=tune.RunConfig(
                name="tune", storage_path=storage, verbose=0, callbacks=[sink],
                failure_config=tune.FailureConfig(max_failures=spec.tune.run_config.max_failures),
                sync_config=tune.SyncConfig(sync_artifacts=False),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
        )


# --- grid: waves and tasks ------------------------------------------------------------------

def feature_budget(spec: SweepSpec) -> float:
    """Bytes of features one wave may put in the object store."""
    import ray

    if spec.tune.run_config.feature_memory_gb is not None:
        return spec.tune.run_config.feature_memory_gb * 2**30
    return 0.5 * ray.cluster_resources().get("object_store_memory", float("inf"))


def waves(pending: list[PlannedTrial], features: FeatureSet, store: FeatureStore,
          budget: float) -> list[list[PlannedTrial]]:
    """Pending trials in waves of whole image layers whose features fit ``budget``.

    A full layer grid of a large dataset does not fit the object store at
    once; a wave holds its image layers (and the text layers they pair with)
    and is freed before the next. One image layer is the smallest wave.
    """
    by_layer = defaultdict(list)
    for t in pending:
        by_layer[t.config.image_layer].append(t)
    out: list[list[PlannedTrial]] = []
    for layer in sorted(by_layer):
        candidate = (out[-1] if out else []) + by_layer[layer]
        if out and layer_bytes(store, features, [layer_pair(t) for t in candidate]) <= budget:
            out[-1] = candidate
        else:
            out.append(list(by_layer[layer]))
    return out


def group_tasks(pending: list[PlannedTrial], size: int) -> list[list[PlannedTrial]]:
    """Tune trials of up to ``size`` planned trials. Trials of one packable shape
    (``trials.packed.pack_key``) come together whatever their layer pair, so a task's trials
    form as few packs as possible; the others come together by layer pair (one fetch)."""
    if size <= 1:
        return [[t] for t in pending]
    groups = defaultdict(list)
    for t in pending:
        key = pack_key(t.config)
        groups[("shape", key) if key is not None else ("pair", layer_pair(t))].append(t)
    # packable shapes first, then the by-pair groups (stable: in planned order)
    ordered = [group for _, group in sorted(groups.items(), key=lambda item: item[0][0] == "pair")]
    return [group[k:k + size] for group in ordered for k in range(0, len(group), size)]


def task_cost(trials: list[PlannedTrial], n_pairs: int) -> float:
    """A rough relative cost of training ``trials`` (of a split of ``n_pairs`` pairs), to order
    tasks: per trial, its epochs times the n×n work of its batches, thrice with R_S."""
    total = 0.0
    for t in trials:
        config = t.config
        n = min(config.n_train or n_pairs, n_pairs)
        batch = max(min(config.batch_size, n), 1)
        total += config.epochs * math.ceil(n / batch) * batch**2 * (3 if config.structure_lambda > 0 else 1)
    return total


# --- features in the object store -----------------------------------------------------------

def _layers_by_key(features: FeatureSet, pairs: list[tuple[int, int]]) -> dict[str, set[int]]:
    """The layers of each feature entry that trials on ``pairs`` read."""
    image_layers, text_layers = {p[0] for p in pairs}, {p[1] for p in pairs}
    image_keys = features.image_keys()  # unpaired keys only when the spec has them
    return {key: image_layers if key in image_keys else text_layers for key in features.keys()}


def layer_bytes(store: FeatureStore, features: FeatureSet, pairs: list[tuple[int, int]]) -> int:
    """Bytes that :func:`put_layers` puts for these layer pairs (float32 arrays)."""
    total = 0
    for key, layers in _layers_by_key(features, pairs).items():
        n, _, dim = store.manifest(key)["shape"]
        total += n * dim * 4 * len(layers)
    return total


def put_layers(store: FeatureStore, features: FeatureSet,
               pairs: list[tuple[int, int]]) -> dict[str, dict[int, object]]:
    """Each needed layer of each feature entry, once, in Ray's object store."""
    import ray

    return {key: {layer: ray.put(np.ascontiguousarray(store.layer(key, layer)))
                  for layer in layers}
            for key, layers in _layers_by_key(features, pairs).items()}


# --- Tune settings --------------------------------------------------------------------------

def concurrency(spec: SweepSpec) -> int:
    """Trials at once: ``tune.max_concurrent_trials``, else what the cluster fits."""
    import ray

    if spec.tune.run_config.max_concurrent_trials:
        return spec.tune.run_config.max_concurrent_trials
    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / spec.tune.run_config.cpus_per_trial
    if spec.tune.run_config.gpus_per_trial:
        slots = min(slots, resources.get("GPU", 0) / spec.tune.run_config.gpus_per_trial)
    return max(1, int(slots))


def asha_scheduler(spec: SweepSpec):
    """The ASHA scheduler of an ``asha`` spec, else None (FIFO). It ranks on the per-epoch
    CLIP part of the validation loss (``val_clip_loss``): ``val_loss`` adds λ·R_S and would
    stop λ > 0 trials for carrying the regulariser, not for aligning worse."""
    if spec.tune.search_config.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    asha = spec.tune.search_config.asha
    max_t = asha.max_t or int(spec.training.get("epochs", 1000))
    return ASHAScheduler(time_attr="epoch", metric=ASHA_METRIC, mode="min", max_t=max_t,
                         grace_period=asha.grace_period, reduction_factor=asha.reduction_factor,
                         stop_last_trials=False)  # a trial that reaches max_t finishes


def remove_in_background(path: str) -> threading.Thread:
    """Delete Tune's throw-away directory without holding up the driver: it holds a
    directory per Tune trial, ~2 ms each to remove on a busy disk (2 s per 1,000). Not
    a daemon thread: the interpreter waits for it before it exits."""
    thread = threading.Thread(target=shutil.rmtree, args=(path,), kwargs={"ignore_errors": True},
                              name="tune-storage-cleanup")
    thread.start()
    return thread


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- optuna: grids and the searcher ---------------------------------------------------------

def optuna_grids(spec: SweepSpec, results: ResultsStore, include_stopped: bool) -> list[OptunaGrid]:
    """Each grid of an Optuna spec with its stored finished trials."""
    stored = results.query("trials")
    out = []
    for grid in spec.search:
        name = grid.name
        mine = stored[stored["grid"] == name] if not stored.empty else stored
        finished = (mine[mine["status"].isin(finished_statuses(include_stopped))]
                    if not mine.empty else mine)
        out.append(OptunaGrid(grid, name, grid.sample_count(spec.tune.search_config.num_samples),
                              finished))
    return out
