"""What ``structure-sweep validate`` prints for a spec that passed every check:
the trials it plans (per grid, in total, and unique when that differs), the
encoders' layer counts and where they came from, the training split's size,
and what only the run can tell."""

from __future__ import annotations

from typing import TYPE_CHECKING

from orchestrator.env_vars import unresolved_variables
from orchestrator.pair_rules import RankSlot
from orchestrator.pair_rules import grid_slots as _slots
from orchestrator.train_data import DEFAULT, train_variants
from orchestrator.trial_counts import TrialCount, combine, count_pairs
from orchestrator.validation import World

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec


def report_lines(spec: SweepSpec, world: World, count: TrialCount) -> list[str]:
    """``count``: :func:`~orchestrator.trial_counts.count_plan`'s; a sweep of several encoder
    pairs (or with an encoder selection) is counted here per pair instead."""
    per_pair = count_pairs(spec, world) if _by_pair(spec) else {}
    count = combine(per_pair) if per_pair else count
    lines = [f"{spec.source}: OK, {_headline(spec, world, count)}"]
    lines += [f"  grid {name!r}: " + (f"{n} trial(s)" if n is not None else "needs the layer counts")
              for name, n in count.per_grid.items()]
    lines += _pair_lines(spec, per_pair)
    lines.append("  encoders: " + "; ".join(
        f"{role} {enc.name}" + (f" ({enc.label})" if enc.label else "") + ": "
        + (f"{info.num_layers} layers ({info.source})" if info.num_layers is not None else "layers unknown")
        for role, infos in world.candidates.items()
        for enc, info in zip(spec.encoders.candidates(role), infos)))
    train = spec.data.train
    if world.train.pairs is not None:
        lines.append(f"  training split: {train.dataset}/{train.split}, {world.train.pairs} pairs "
                     f"({world.train.source})")
    lines += _variant_lines(spec, world)
    lines += [f"  {line}" for line in world.tokens]
    later = world.notes + _run_time_only(spec, count)
    lines += ["  known only at run time:"] + [f"    - {note}" for note in later] if later else []
    missing = sorted({v for _, v in unresolved_variables(spec.raw)})
    if missing:
        lines.append(f"note: set {', '.join(missing)} before `structure-sweep run` (paths are checked then)")
    return lines


def _by_pair(spec: SweepSpec) -> bool:
    return (not spec.encoders.single or spec.encoder_selection is not None
            or train_variants(spec) != [DEFAULT])


def _variant_lines(spec: SweepSpec, world: World) -> list[str]:
    """The training splits grids vary (``train_data``), with their sizes where known."""
    variants = [v for v in train_variants(spec) if v.options]
    if not variants:
        return []
    lines = [f"  training splits the grids vary (train_data): {len(variants)}"]
    for v in variants:
        index = world.variants.get(v)
        size = f"{index.pairs} pairs ({index.source})" if index and index.pairs is not None else \
            f"size {index.source if index else 'unknown until run'}"
        lines.append(f"    {v.label}: {size}")
    return lines


def _pair_lines(spec: SweepSpec, per_pair: dict[str, TrialCount]) -> list[str]:
    """The trial count per encoder pair (and training split); ranks are the selection stage's."""
    if not per_pair:
        return []
    split = " and training split" if train_variants(spec) != [DEFAULT] else ""
    lines = [f"  per encoder pair{split} ({len(spec.encoders.candidates('image'))} image x "
             f"{len(spec.encoders.candidates('text'))} text candidates):"]
    for label, n in per_pair.items():
        total = n.unique if n.unique is not None else n.total
        lines.append(f"    {label}: " + ("needs the layer counts" if total is None else
                                         f"{'' if n.unique_exact else 'at most '}{total} trial(s)"))
    sel = spec.encoder_selection
    if sel is not None:
        lines.append(f"  encoder selection: {sel.metric} ({sel.protocol}) on {sel.probe.dataset}/"
                     f"{sel.probe.split}, up to {sel.n_samples} probe rows, ranks every pair before any trial")
    return lines


def _headline(spec: SweepSpec, world: World, count: TrialCount) -> str:
    grids = f"{len(spec.search)} grid(s)"
    if count.optuna:
        return f"{count.total} Optuna trials in {grids} (num_samples per grid)"
    if count.total is None:
        return (f"{grids}; the trial count depends on the encoders' layer counts "
                "(known once the models load)")
    layers = world.num_layers
    pairs = _pair_count(spec) if _by_pair(spec) else ""
    text = f"{'' if count.exact else 'up to '}{count.total} trials in {grids}{pairs}" + (
        f" ({layers[0]} image x {layers[1]} text layers)" if layers else "")
    if count.unique is None or count.unique == count.total:
        return text
    bound = "" if count.unique_exact else "at most "
    return (f"{text}, {bound}{count.unique} unique: the run trains a trial once however many "
            "times the grids name it")


def _pair_count(spec: SweepSpec) -> str:
    """' on N encoder pairs' ('up to N' where a rank of the selection may be a named pair)."""
    from orchestrator.pair_rules import all_pairs

    slots = {_encoders_of(slot) for grid in spec.search for slot in _slots(spec, grid)}
    ranks = {s for s in slots if isinstance(s, RankSlot)}
    named = slots - ranks
    n = min(len(all_pairs(spec.encoders)), len(named) + len(ranks))
    bound = "up to " if named and ranks else ""
    return f" on {bound}{n} encoder pair{'s' if n != 1 else ''}"


def _encoders_of(slot):
    """A slot without its training split: (image, text) indices, or its rank."""
    return slot.on(DEFAULT) if isinstance(slot, RankSlot) else (slot.image, slot.text)


def _run_time_only(spec: SweepSpec, count: TrialCount) -> list[str]:
    notes = []
    if spec.encoder_selection is not None and any(
            isinstance(slot, RankSlot) for g in spec.search for slot in _slots(spec, g)):
        notes.append("which encoder pairs the ranks are: ranked by the encoder-pair selection")
    rules = sorted({str(r) for g in spec.search for r in g.layer_rules() if r.needs_similarity})
    if rules:
        names = ", ".join(repr(r) for r in rules)
        notes.append(f"the layer pairs of {names}: picked by the run's layer similarity"
                     + ("" if count.unique_exact else "; where one is also named by another rule "
                        "(e.g. 'last') the run trains that trial once, so the unique count is an upper bound"))
    if count.optuna:
        notes.append("which trials Optuna suggests (and whether any repeat)")
    return notes
