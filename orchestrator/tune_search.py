"""Which Tune trials a Tune run creates: the task queue of a grid run, Optuna's searcher.

A grid run's Tune trials are its tasks, ``{"task": 0}`` to ``{"task": n - 1}``
(see :class:`orchestrator.worker.WorkerPayload`). :class:`TaskQueue` hands
them out in order. ``tune.grid_search(list(range(n)))`` gives the same
configs, but Tune's variant generator deep-copies the whole unresolved space,
grid list included, for every trial it creates: O(n²), 1.4 s of the driver's
time for 1,080 tasks.
"""

from __future__ import annotations

import json
import math

from ray.tune.search import Searcher

from orchestrator.schema import fair_objective
from orchestrator.spec import SweepSpec


class TaskQueue(Searcher):
    """Tune configs ``{"task": i}`` for i = 0 .. ``n`` - 1, each once, in order."""

    def __init__(self, n: int):
        super().__init__()
        self.n, self.next = n, 0

    def suggest(self, trial_id: str):
        if self.next >= self.n:
            return Searcher.FINISHED
        self.next += 1
        return {"task": self.next - 1}

    def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
        pass  # nothing to learn: the store records every result

    def get_state(self) -> dict:
        return {"n": self.n, "next": self.next}

    def set_state(self, state: dict) -> None:
        self.n, self.next = state["n"], state["next"]

    def save(self, checkpoint_path: str) -> None:
        # Tune saves its searcher with the experiment state; resume reads the store, not this
        with open(checkpoint_path, "w") as f:
            json.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path) as f:
            self.set_state(json.load(f))


def _warm_start(finished, metric: str) -> dict:
    """Optuna's points_to_evaluate/evaluated_rewards from stored trials with a value."""
    points, rewards = [], []
    if not finished.empty and metric in finished.columns:
        for _, row in finished.iterrows():
            value = row[metric]
            if row.get("params") and isinstance(value, float) and not math.isnan(value):
                points.append(json.loads(row["params"]))
                rewards.append(value)
    return {"points_to_evaluate": points, "evaluated_rewards": rewards} if points else {}


def optuna_searcher(spec: SweepSpec, space: dict, finished):
    """A seeded TPE searcher over ``space`` (a Tune search space), told the stored trials."""
    from optuna.samplers import TPESampler
    from ray.tune.search.optuna import OptunaSearch

    class _FinalOnly(OptunaSearch):
        """Optuna learns from final results; per-epoch reports (val_loss) are ASHA's."""

        def on_trial_result(self, trial_id, result):
            if self.metric in result:
                super().on_trial_result(trial_id, result)

    # best_val_loss contains λ·R_S: Optuna learns from its CLIP part instead (same mode, min)
    metric, mode = fair_objective(spec.tune.search_config.metric), spec.tune.search_config.mode
    # A resumed search draws a fresh random stream (same seed would repeat old draws).
    seed = spec.tune.search_config.seed + len(finished)
    return _FinalOnly(space, metric=metric, mode=mode, sampler=TPESampler(seed=seed),
                      **_warm_start(finished, metric))
