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


def count_plan(spec: SweepSpec, num_layers: Optional[tuple[int, int]]) -> TrialCount:
    """Per-grid counts (before deduplication) and the unique count the run trains."""
    tune = spec.tune.search_config
    if tune.search == "optuna":
        return TrialCount({g.name: g.sample_count(tune.num_samples) for g in spec.search},
                          optuna=True)
    count, settings = TrialCount({}), {}
    for grid in spec.search:
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
