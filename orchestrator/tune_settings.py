"""The ``tune:`` block: how Ray Tune schedules a sweep's trials.

One flat mapping in YAML (the documented keys), two concerns in code, as Ray
Tune splits ``TuneConfig`` from ``RunConfig``: :class:`SearchConfig` (what is
tried and optimised) and :class:`RunConfig` (where and how trials run).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from orchestrator.config import SpecError, check_device, check_min, from_flat


@dataclass
class AshaSpec:
    """ASHA early stopping on the per-epoch validation loss (``tune.scheduler: asha``)."""

    grace_period: int = 5  # epochs every trial runs before it may be stopped
    reduction_factor: float = 3.0
    max_t: Optional[int] = None  # default: the trials' ``epochs``

    def __post_init__(self):
        check_min(self.grace_period, 1, "grace_period")
        check_min(self.reduction_factor, 1, "reduction_factor", strict=True)  # 1 would stop nothing
        check_min(self.max_t, 1, "max_t")


@dataclass
class SearchConfig:
    """What is tried and what is optimised."""

    search: Literal["grid", "optuna"] = "grid"
    scheduler: Literal["fifo", "asha"] = "fifo"
    metric: Optional[str] = None  # Optuna's objective; default: the headline metric
    mode: Optional[Literal["max", "min"]] = None  # default: "min" for a *loss* metric, else "max"
    num_samples: int = 1  # per grid combination (grid) or per grid (optuna)
    seed: int = 0  # of sampled dimensions and of Optuna's sampler
    asha: AshaSpec = field(default_factory=AshaSpec)

    def __post_init__(self):
        if self.num_samples < 1:
            raise SpecError(f"must be >= 1, got {self.num_samples}", path="num_samples")
        check_min(self.seed, 0, "seed")  # numpy's and Optuna's seeds are non-negative


@dataclass
class RunConfig:
    """Where and how trials run: resources, concurrency, retries, result flushing."""

    max_concurrent_trials: int = 0  # 0: as many as the cluster's CPUs/GPUs allow
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # fractions share a GPU between trials
    max_failures: int = 1  # retries of a failed trial before it is recorded as failed
    device: str = "auto"  # where a trial trains its heads; auto: cuda if gpus_per_trial > 0
    trials_per_task: int = 1  # >1: cheap trials of one shape (or one layer pair) run in one Tune trial
    # auto: the trials of a task that share shapes (trials.packed.pack_key) train as one
    # batched computation; the same numbers (within 1e-5), so on by default. off: one by one.
    pack: Literal["auto", "off"] = "auto"
    pack_size: Optional[int] = None  # most trials per pack; null: the task's, capped by memory
    flush_seconds: float = 1.0  # results are written at least this often
    # Features one wave of trials may hold in Ray's object store (GB); past it
    # the grid runs in waves of image layers. null: half the object store.
    feature_memory_gb: Optional[float] = None

    def __post_init__(self):
        if self.trials_per_task < 1:
            raise SpecError(f"must be >= 1, got {self.trials_per_task}", path="trials_per_task")
        check_min(self.pack_size, 1, "pack_size")
        if self.max_failures < 0:
            raise SpecError("must be >= 0", path="max_failures")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise SpecError("cpus_per_trial must be > 0 and gpus_per_trial >= 0", path="cpus_per_trial")
        check_min(self.max_concurrent_trials, 0, "max_concurrent_trials",
                  hint="0 runs as many trials at once as the cluster's CPUs/GPUs allow")
        check_min(self.flush_seconds, 0, "flush_seconds", strict=True)
        check_min(self.feature_memory_gb, 0, "feature_memory_gb", strict=True)
        check_device(self.device, "device")

    @property
    def packing(self) -> bool:
        return self.pack == "auto"

    @property
    def trial_device(self) -> str:
        if self.device != "auto":
            return self.device
        return "cuda" if self.gpus_per_trial > 0 else "cpu"


@dataclass
class TuneSpec:
    """The ``tune:`` block, parsed from one flat mapping (:meth:`parse`)."""

    search_config: SearchConfig = field(default_factory=SearchConfig)
    run_config: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        if self.search_config.scheduler == "asha" and self.run_config.trials_per_task > 1:
            raise SpecError("ASHA stops single trials; use trials_per_task: 1", path="trials_per_task")

    @classmethod
    def parse(cls, value: Any, path: str) -> TuneSpec:
        return from_flat(cls, value, path=path)

    def to_dict(self) -> dict:
        """The flat mapping, as written in a spec."""
        return {**dataclasses.asdict(self.search_config), **dataclasses.asdict(self.run_config)}
