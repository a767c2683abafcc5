"""How many trials a spec plans, known before any Ray work.

The run (:func:`orchestrator.planning.plan_trials`) trains a trial once however
many grids name it: it keys trials by fingerprint, whose fields are the
TrialConfig's (a closed-form head's ignored fields left out) and the layer
pair. :func:`count_plan` follows the same rules with the same seeded draws, but
without features: pairs a rule names without layer similarity (``all``,
``last``, ``lastK``, ``[i, j]``) are concrete, while those of ``similar``,
``topK`` and ``bins`` stand as placeholders. Where such a placeholder might
coincide with another pair of the same settings the unique count is an upper
bound, and says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import numpy as np

from orchestrator.config import from_dict
from orchestrator.planning import _draws
from trials.config import TrialConfig
from trials.selection import LayerRule

if TYPE_CHECKING:
    from orchestrator.spec import SweepSpec

Token = tuple  # a concrete (i, j), or (rule, n): the n-th pair of a similarity rule


@dataclass
class TrialCount:
    per_grid: dict[str, Optional[int]]  # None: needs a layer count known only at run time
    exact: bool = True  # False: a 'bins' rule counts its upper bound
    unique: Optional[int] = None  # trials the run trains (None: not known here)
    unique_exact: bool = True  # False: an upper bound (similarity pairs may coincide)
    optuna: bool = False  # Optuna suggests trials at run time: per_grid is num_samples

    @property
    def total(self) -> Optional[int]:
        counts = list(self.per_grid.values())
        return None if None in counts else sum(counts)


@dataclass
class _Pairs:
    """The pairs planned for one setting of every other field."""

    concrete: set = field(default_factory=set)
    symbolic: set = field(default_factory=set)
    rules: set = field(default_factory=set)  # rules behind the symbolic tokens

    def add(self, rule: LayerRule, tokens: list[Token]) -> None:
        for token in tokens:
            if isinstance(token[0], str):
                self.symbolic.add(token)
                self.rules.add(str(rule))
            else:
                self.concrete.add(token)

    def size(self, full: Optional[int]) -> tuple[int, bool]:
        """(unique pairs, exact): a full concrete set absorbs every placeholder."""
        if full is not None and len(self.concrete) == full:
            return full, True
        n = len(self.concrete) + len(self.symbolic)
        exact = not self.symbolic or (not self.concrete and len(self.rules) == 1)
        return (n if full is None else min(n, full)), exact


def count_plan(spec: SweepSpec, num_layers: Optional[tuple[int, int]], grids=None) -> TrialCount:
    """Per-grid counts (before deduplication) and the unique count the run trains, on one
    encoder pair of ``num_layers``; ``grids``: those training it (default: every grid)."""
    tune, grids = spec.tune.search_config, spec.search if grids is None else grids
    if tune.search == "optuna":
        return TrialCount({g.name: g.sample_count(tune.num_samples) for g in grids}, optuna=True)
    count, settings = TrialCount({}), {}
    for grid in grids:
        count.per_grid[grid.name] = 0
        for index, combo in enumerate(grid.combinations()):
            tokens, exact = _tokens(combo.layers, num_layers)
            count.exact &= exact
            draws = _draws(spec, grid, index)
            if tokens is None or count.per_grid[grid.name] is None:
                count.per_grid[grid.name] = None
                continue
            count.per_grid[grid.name] += len(tokens) * len(draws)
            for draw in draws:
                key = _setting({**spec.training, **combo.values, **draw})
                settings.setdefault(key, _Pairs()).add(combo.layers, tokens)
    if count.total is not None:
        full = None if num_layers is None else num_layers[0] * num_layers[1]
        sizes = [pairs.size(full) for pairs in settings.values()]
        count.unique = sum(n for n, _ in sizes)
        count.unique_exact = count.exact and all(exact for _, exact in sizes)
    return count


def _tokens(rule: LayerRule, num_layers: Optional[tuple[int, int]]) -> tuple[Optional[list], bool]:
    """(the rule's pairs as tokens, whether their number is exact); None: unknown count."""
    if not rule.needs_similarity and num_layers is not None:
        return [tuple(p) for p in rule.resolve(np.zeros(num_layers))], True
    try:
        n, exact = rule.count(num_layers)
    except ValueError:  # 'all'/'lastK' without the layer counts
        return None, True
    if num_layers is not None:
        n = min(n, num_layers[0] * num_layers[1])
    return [(str(rule), i) for i in range(n)], exact


def _setting(values: dict) -> str:
    """Every fingerprint field but the layer pair, as one comparable string."""
    config = from_dict(TrialConfig, {**values, "image_layer": 0, "text_layer": 0})
    fields = config.fingerprint_fields()
    for name in ("image_layer", "text_layer"):
        fields.pop(name)
    return json.dumps(fields, sort_keys=True, default=str)


# --- encoder pairs -------------------------------------------------------------------------

def count_pairs(spec: SweepSpec, world) -> dict[str, TrialCount]:
    """Per encoder pair the grids train: an explicit pair by its label, a ``top`` rule's
    pairs by rank ("rank 1", ...: which pair is known once the selection ran), each
    counted on its own layer counts (a rank: those every candidate pair shares, if any);
    a pair on a training split a grid varies is its own entry ("a + b on method=random";
    "a + b on data.train" for the spec's own split, when grids vary it)."""
    from orchestrator.pair_rules import grid_slots
    from orchestrator.train_data import DEFAULT, train_variants

    grids_of: dict = {}
    for grid in spec.search:
        for slot in grid_slots(spec, grid):
            grids_of.setdefault(slot, []).append(grid)
    varied = train_variants(spec) != [DEFAULT]
    return {slot.label + (" on data.train" if varied and not slot.train.options else ""):
            count_plan(spec, _slot_layers(world, slot), grids) for slot, grids in grids_of.items()}


def _slot_layers(world, slot) -> Optional[tuple[int, int]]:
    """An EncoderPair's layer counts; a rank's: those every candidate pair shares, if any."""
    return world.layers_of(slot.image, slot.text) if hasattr(slot, "image") else world.num_layers


def combine(per_pair: dict[str, TrialCount]) -> TrialCount:
    """One count over encoder pairs: trials of different pairs never coincide, except that a
    rank may turn out to be a pair also named explicitly (then the unique count is a bound)."""
    counts = list(per_pair.values())
    per_grid: dict[str, Optional[int]] = {}
    for count in counts:
        for name, n in count.per_grid.items():
            known = per_grid.get(name, 0) is not None and n is not None
            per_grid[name] = per_grid.get(name, 0) + n if known else None
    mixed = any(k.startswith("rank ") for k in per_pair) and not all(k.startswith("rank ") for k in per_pair)
    uniques = [c.unique for c in counts]
    return TrialCount(per_grid, exact=all(c.exact for c in counts),
                      unique=None if None in uniques else sum(uniques),
                      unique_exact=all(c.unique_exact for c in counts) and not mixed,
                      optuna=any(c.optuna for c in counts))
