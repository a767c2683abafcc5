"""What ``structure-sweep validate`` prints for a spec that passed every check:
the trials it plans (per grid, in total, and unique when that differs), the
encoders' layer counts and where they came from, the training split's size,
and what only the run can tell."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.env_vars import unresolved_variables
from orchestrator.trial_counts import TrialCount
from orchestrator.validation import World

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec


def report_lines(spec: SweepSpec, world: World, count: TrialCount) -> list[str]:
    lines = [f"{spec.source}: OK, {_headline(spec, world, count)}"]
    lines += [f"  grid {name!r}: " + (f"{n} trial(s)" if n is not None else "needs the layer counts")
              for name, n in count.per_grid.items()]
    lines.append("  encoders: " + "; ".join(
        f"{role} {getattr(spec.encoders, role).name}: "
        + (f"{info.num_layers} layers ({info.source})" if info.num_layers is not None else "layers unknown")
        for role, info in world.encoders.items()))
    train = spec.data.train
    if world.train.pairs is not None:
        lines.append(f"  training split: {train.dataset}/{train.split}, {world.train.pairs} pairs "
                     f"({world.train.source})")
    later = world.notes + _run_time_only(spec, count)
    lines += ["  known only at run time:"] + [f"    - {note}" for note in later] if later else []
    missing = sorted({v for _, v in unresolved_variables(spec.raw)})
    if missing:
        lines.append(f"note: set {', '.join(missing)} before `structure-sweep run` (paths are checked then)")
    return lines


def _headline(spec: SweepSpec, world: World, count: TrialCount) -> str:
    grids = f"{len(spec.search)} grid(s)"
    if count.optuna:
        return f"{count.total} Optuna trials in {grids} (num_samples per grid)"
    if count.total is None:
        return (f"{grids}; the trial count depends on the encoders' layer counts "
                "(known once the models load)")
    layers = world.num_layers
    text = f"{'' if count.exact else 'up to '}{count.total} trials in {grids}" + (
        f" ({layers[0]} image x {layers[1]} text layers)" if layers else "")
    if count.unique is None or count.unique == count.total:
        return text
    bound = "" if count.unique_exact else "at most "
    return (f"{text}, {bound}{count.unique} unique: the run trains a trial once however many "
            "times the grids name it")


def _run_time_only(spec: SweepSpec, count: TrialCount) -> list[str]:
    notes = []
    rules = sorted({str(r) for g in spec.search for r in g.layer_rules() if r.needs_similarity})
    if rules:
        names = ", ".join(repr(r) for r in rules)
        notes.append(f"the layer pairs of {names}: picked by the run's layer similarity"
                     + ("" if count.unique_exact else "; where one is also named by another rule "
                        "(e.g. 'last') the run trains that trial once, so the unique count is an upper bound"))
    if count.optuna:
        notes.append("which trials Optuna suggests (and whether any repeat)")
    return notes
