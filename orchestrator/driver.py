"""The sweep driver: spec -> [curated data] -> [encoder-pair selection] -> features -> layer similarity -> Ray Tune -> store.

:func:`run_sweep` is the whole pipeline of ``structure-sweep run`` and
``resume``. The results store is the one source of truth: finished trials (by
fingerprint) are skipped, so running a spec again, or resuming a run whose
driver died, only does what is missing. One driver at a time holds a run
directory (:func:`driver_lock`).

Placement: the encoder actors run first and are killed once the features are
cached, so trials may use every CPU/GPU of the cluster; trials ask for
``tune.cpus_per_trial``/``tune.gpus_per_trial`` (fractions allowed) and at
most ``tune.max_concurrent_trials`` run at once (see
:mod:`orchestrator.tune_runner`; the trial side is :mod:`orchestrator.worker`).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from orchestrator.cluster import LOOPBACK, ray_session
from orchestrator.curation_stage import curated_refs, record_curation
from orchestrator.durable import DiskFull
from orchestrator.encoder_pairs import Selection, check_probe_encoders, select_encoder_pairs
from orchestrator.feature_store import FeatureStore, default_cache_dir
from orchestrator.features import extract_pairs
from orchestrator.pair_rules import trained_pairs
from orchestrator.planning import optuna_space, plan_pairs
from orchestrator.results import ResultsStore
from orchestrator.schema import LOCK_FILE
from orchestrator.similarity_stage import LayerSimilarity
from orchestrator.spec import SweepSpec, check_runnable, save_spec
from orchestrator.token_features import extract_tokens
from orchestrator.tune_runner import TuneRunner
from trials.selection import select_layers

COMPACT_AT_FILES = 64  # compact a table at the end of a sweep once it has this many parts


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


def run_sweep(spec: SweepSpec, *, address: str | None = None, dashboard: bool = False,
              num_cpus: int | None = None, metrics_port: int | None = None,
              bind: str = LOOPBACK, log=print, on_progress=None) -> SweepOutcome:
    """Run what is missing of ``spec`` in its run directory, on the cluster at
    ``address`` (default: a private local one listening on ``bind``); see
    :func:`ray_session`. ``on_progress(SweepProgress)``: called after each trial
    event (a live display)."""
    check_runnable(spec)
    check_probe_encoders(spec)
    run_dir = spec.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    with driver_lock(run_dir):
        save_spec(spec, run_dir)
        results = ResultsStore(run_dir)
        results.recover()  # an interrupted compaction of an earlier driver
        results.check()  # a damaged part file is refused before any Ray work
        with ray_session(address, num_cpus=num_cpus, dashboard=dashboard,
                         metrics_port=metrics_port, bind=bind, log=log):
            outcome = _stages_with_clear_errors(spec, results, log, on_progress)
        if len(results.files("trials")) >= COMPACT_AT_FILES:
            results.compact("trials")
        return outcome


def _stages_with_clear_errors(spec: SweepSpec, results: ResultsStore, log,
                              on_progress=None) -> SweepOutcome:
    """:func:`_run_stages`, turning a full disk met anywhere below (Tune wraps
    errors of its callbacks, where results are flushed) into one error that
    names the file and says how this run continues once there is space."""
    try:
        return _run_stages(spec, results, log, on_progress)
    except Exception as err:  # noqa: BLE001 -- re-raised unless a full disk is behind it
        full = _cause_of_type(err, DiskFull)
        if full is None:
            raise
        clear = DiskFull(full.path, full)
        clear.fix = (f"free space on that filesystem (`df -h {full.path.parent}`), then "
                     f"`structure-sweep resume {spec.run_dir}`: stored trials are kept and "
                     "the trials whose rows were not written yet run again")
        raise clear from err


def _cause_of_type(err: BaseException, kind: type) -> BaseException | None:
    """The first exception of ``kind`` in ``err``'s chain (cause, context, Ray's ``cause``)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, kind):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__ or getattr(err, "cause", None)
    return None


def _run_stages(spec: SweepSpec, results: ResultsStore, log, on_progress=None) -> SweepOutcome:
    """Encoder-pair selection, features, layer similarity and the Tune stage, on a running cluster."""
    from orchestrator.monitoring import SweepMetrics

    cache_root = Path(spec.cache_dir) if spec.cache_dir else default_cache_dir()
    store = FeatureStore(cache_root / "features")
    monitor = SweepMetrics(spec.name, spec.tune.search_config.metric, spec.tune.search_config.mode,
                           on_change=on_progress)
    if curated_refs(spec):  # a data stage: the encoder actors then find the selections cached
        log("[0/3] curated data (concept-balanced selection, freeze-align §3.2)")
        record_curation(spec, results, log)
    selection = _select(spec, store, results, log)
    pairs = trained_pairs(spec, selection.ranking if selection else None)
    log(f"[1/3] features (cache: {cache_root})")
    extracted = extract_pairs(spec, pairs, str(store.root), log=log)
    computed = extracted.computed + (selection.probe.computed if selection else 0)
    cached = extracted.cached + (selection.probe.cached if selection else 0)
    monitor.features(cached, computed)
    log(f"[2/3] layer similarity ({spec.similarity.metric}, selection: {spec.similarity.selection})")
    similarity = {p: LayerSimilarity(store, results, extracted.sets[p], spec.similarity, log=log, pair=p)
                  for p in pairs}
    runner = TuneRunner(spec, extracted.sets[pairs[0]], store, results, monitor, log,
                        pair_features={p.key: extracted.sets[p] for p in pairs})
    if spec.tune.search_config.search == "grid":
        planned = plan_pairs(spec, extracted.sets, similarity, selection.ranking if selection else None)
        _log_similarity(similarity, log)
        fresh, found = extract_tokens(spec, pairs, extracted.sets, runner.pending(planned),
                                      str(store.root), log)
        computed, cached = computed + fresh, cached + found
        tally = runner.run_grid(planned)
    else:  # one encoder pair (checked when the spec loads)
        for grid in spec.search:  # every subsample's matrix before Tune starts (and fails early)
            optuna_space(spec, grid, similarity[pairs[0]])
        _log_similarity(similarity, log)
        tally = runner.run_optuna(similarity[pairs[0]])
    return SweepOutcome(spec.run_dir, tally.planned, tally.skipped, tally.finished, tally.failed,
                        computed, cached, stopped=tally.stopped, tune_seconds=tally.seconds)


def _select(spec: SweepSpec, store: FeatureStore, results: ResultsStore, log) -> Optional[Selection]:
    """The encoder-pair selection stage (freeze-align §3.1), when the spec asks for it."""
    settings = spec.encoder_selection
    if settings is None:
        return None
    log(f"[0/3] encoder-pair selection ({settings.metric}, {settings.protocol}) on "
        f"{settings.probe.dataset}/{settings.probe.split}: "
        f"{len(spec.encoders.candidates('image'))} image x {len(spec.encoders.candidates('text'))} "
        "text candidates")
    return select_encoder_pairs(spec, store, results, log)


def _log_similarity(similarities: dict, log) -> None:
    """Per encoder pair: matrices computed vs cached, and the most similar pair of each (N, seed);
    then store them."""
    for pair, similarity in similarities.items():
        similarity.flush()
        named = f"{pair.label}: " if len(similarities) > 1 else ""
        log(f"  {named}{similarity.summary()}")
        for m in sorted(similarity.scored(), key=lambda m: (m.selection != "oracle", m.n_train, m.seed)):
            (i, j), = select_layers(m.matrix, "similar", seed=m.seed)
            where = "whole split" if m.selection == "oracle" else f"N={m.n_train}, seed {m.seed}"
            log(f"  {named}most similar pair ({where}, {m.similarity_n} pairs scored): image layer {i}, "
                f"text layer {j} ({similarity.settings.metric} = {m.matrix[i, j]:.3f})")
