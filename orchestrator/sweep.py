"""The sweep driver: spec -> features -> layer similarity -> Ray Tune -> store.

:func:`run_sweep` is the whole pipeline of ``structure-sweep run``. Finished
trials (by fingerprint) are skipped, so running a spec again only does what is
missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray.tune import Callback

from orchestrator.cluster import ray_session
from orchestrator.feature_store import FeatureStore
from orchestrator.features import FeatureSet, extract_features, trial_data
from orchestrator.planning import PlannedTrial, plan_trials
from orchestrator.results import ResultsStore
from orchestrator.similarity_stage import similarity_stage
from orchestrator.spec import SweepSpec
from orchestrator.status import write_plan
from trials.trial import TrialConfig, run_trial


@dataclass
class SweepOutcome:
    run_dir: Path
    planned: int
    skipped: int
    finished: int
    failed: int
    features_computed: int
    features_cached: int


def default_cache_dir() -> Path:
    return Path(os.environ.get("STRUCTURE_SWEEP_CACHE", Path.home() / ".cache" / "structure-sweep"))


def run_sweep(spec: SweepSpec, *, address: str | None = None, dashboard: bool = False,
              num_cpus: int | None = None, log=print) -> SweepOutcome:
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    _save_spec(spec, run_dir)
    cache_root = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    store, results = FeatureStore(cache_root / "features"), ResultsStore(run_dir)
    with ray_session(address, num_cpus=num_cpus, dashboard=dashboard, log=log):
        log(f"[1/3] features (cache: {cache_root})")
        features = extract_features(spec, str(store.root), log=log)
        log("[2/3] layer similarity")
        similarity = similarity_stage(store, results, features, spec.similarity, log=log)
        best = np.unravel_index(np.argmax(similarity), similarity.shape)
        log(f"  most similar pair: image layer {best[0]}, text layer {best[1]} "
            f"({spec.similarity.metric} = {similarity[best]:.3f})")
        planned = plan_trials(spec, features, similarity)
        write_plan(run_dir, [t.fingerprint for t in planned])
        done = results.finished_fingerprints()
        pending = [t for t in planned if t.fingerprint not in done]
        log(f"[3/3] trials: {len(planned)} planned, {len(planned) - len(pending)} already "
            f"finished (skipped), {len(pending)} to run")
        finished, failed = _run_tune(spec, pending, features, store, results, log) if pending else (0, 0)
    return SweepOutcome(run_dir, len(planned), len(planned) - len(pending), finished, failed,
                        features.computed, features.cached)


def _save_spec(spec: SweepSpec, run_dir: Path) -> None:
    resolved = dataclasses.asdict(spec)
    (run_dir / "spec.json").write_text(json.dumps(resolved, indent=2, default=str))


# --- Ray Tune -----------------------------------------------------------------------

def _run_tune(spec: SweepSpec, pending: list[PlannedTrial], features: FeatureSet,
              store: FeatureStore, results: ResultsStore, log) -> tuple[int, int]:
    import ray
    from ray import tune

    refs = _put_layers(store, features, pending)
    trainable = tune.with_parameters(_trainable, features=features, refs=refs,
                                     device=spec.tune.device, report_epochs=False)
    resources = {"cpu": spec.tune.cpus_per_trial, "gpu": spec.tune.gpus_per_trial}
    sink = ResultsSink(results, total=len(pending), log=log)
    concurrency = spec.tune.max_concurrent_trials or max(1, int(ray.cluster_resources().get("CPU", 1)))
    tuner = tune.Tuner(
        tune.with_resources(trainable, resources),
        param_space={"trial": tune.grid_search([t.as_param() for t in pending])},
        tune_config=tune.TuneConfig(reuse_actors=True, max_concurrent_trials=concurrency),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(spec.run_dir / "tune"), verbose=0, callbacks=[sink],
            failure_config=tune.FailureConfig(max_failures=spec.tune.max_failures),
            checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
    )
    with _quiet_logger("ray.tune"):  # our store replaces Tune's per-trial result files
        tuner.fit()
    sink.flush()
    return sink.finished, sink.failed


@contextlib.contextmanager
def _quiet_logger(name: str):
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _put_layers(store: FeatureStore, features: FeatureSet, pending: list[PlannedTrial]) -> dict:
    """Each needed layer of each feature entry, once, in Ray's object store."""
    import ray

    image_layers = {t.config.image_layer for t in pending}
    text_layers = {t.config.text_layer for t in pending}
    image_keys = {features.train.image, features.val.image,
                  *(s.image for s in (*features.zero_shot.values(), *features.retrieval.values()))}
    refs: dict[str, dict[int, object]] = {}
    for key in features.keys():
        layers = image_layers if key in image_keys else text_layers
        refs[key] = {layer: ray.put(np.ascontiguousarray(store.layer(key, layer)))
                     for layer in layers}
    return refs


def _trainable(param: dict, features: FeatureSet, refs: dict, device: str, report_epochs: bool):
    """One Tune trial: fetch two layers (zero-copy), run the trial, report once."""
    import ray
    from ray import tune

    trial = param["trial"]
    config = TrialConfig(**trial["config"])
    data = trial_data(features, lambda key, layer: ray.get(refs[key][layer]),
                      config.image_layer, config.text_layer)
    on_epoch = (lambda epoch, m: tune.report({**m, "epoch": epoch})) if report_epochs else None
    started = time.time()
    metrics = run_trial(data, config, device=device, on_epoch=on_epoch)
    tune.report({**metrics, "started_at": started, "finished_at": time.time(),
                 "host": socket.gethostname(), "trial_complete": True})


class ResultsSink(Callback):
    """A Tune callback that writes one store row per finished or failed trial.

    Rows are buffered and flushed as one Parquet file at most every
    ``flush_seconds``, so a crash loses at most the trials of that window.
    """

    def __init__(self, results: ResultsStore, total: int, log=print, flush_seconds: float = 2.0):
        self.results, self.total, self.log = results, total, log
        self.flush_seconds, self.last_flush = flush_seconds, time.monotonic()
        self.buffer: list[dict] = []
        self.finished = self.failed = 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = dict(trial.last_result or {})
        if not result.get("trial_complete"):
            return self._record_failure(trial, "trial ended without a final result")
        self.finished += 1
        self._add(trial, "done", result, "")
        summary = ", ".join(f"{k.split('/')[-1]}={v:.3f}" for k, v in result.items()
                            if k.startswith("zs/") and k.endswith("/top1"))
        cfg = trial.config["trial"]["config"]
        self.log(f"  [{self.finished + self.failed}/{self.total}] done  layers "
                 f"({cfg['image_layer']},{cfg['text_layer']}) {cfg['head']} "
                 f"λ={cfg['structure_lambda']:g} n={cfg['n_train']} seed={cfg['seed']}  {summary}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._record_failure(trial, _error_text(trial))

    def _record_failure(self, trial, error: str):
        self.failed += 1
        self._add(trial, "failed", {}, error)
        self.log(f"  [{self.finished + self.failed}/{self.total}] FAILED "
                 f"{trial.config['trial']['fingerprint']}: {error.strip().splitlines()[-1:]}")

    def _add(self, trial, status: str, result: dict, error: str):
        param = trial.config["trial"]
        row = {"fingerprint": param["fingerprint"], "grid": param["grid"], "status": status,
               "error": error,
               **{f"config/{k}": _scalar(v) for k, v in param["config"].items()},
               **{k: v for k, v in result.items() if _is_metric(k, v)}}
        self.buffer.append(row)
        if time.monotonic() - self.last_flush > self.flush_seconds:
            self.flush()

    def on_experiment_end(self, trials, **info):
        self.flush()

    def flush(self):
        self.results.write("trials", self.buffer)
        self.buffer, self.last_flush = [], time.monotonic()


_TUNE_KEYS = {"trial_complete", "time_this_iter_s", "time_total_s", "timestamp",
              "training_iteration", "iterations_since_restore", "time_since_restore",
              "pid", "node_ip", "date", "done", "config", "trial_id", "experiment_tag",
              "checkpoint_dir_name", "should_checkpoint"}


def _is_metric(key: str, value) -> bool:
    return key not in _TUNE_KEYS and isinstance(value, (int, float, str, bool))


def _scalar(value):
    return json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value


def _error_text(trial) -> str:
    path = getattr(trial, "error_file", None) or ""
    try:
        return Path(path).read_text()[-4000:] if path else str(getattr(trial, "error_msg", ""))
    except OSError:
        return str(path)
