"""Training-data variants: the training split's dataset options as a search dimension.

A grid's ``train_data`` maps options of ``data.train`` to a value or a list of
values; the grid trains every combination, each on the training split those
options give (the other splits stay as the spec has them)::

    search:
      - name: curation       # freeze-align §3.2: concept-balanced vs an equal-size random subset
        train_data: {method: [concept_balanced, random], per_concept: [500, 2000]}

Each variant is a :class:`TrainVariant`; with the encoder pair it decides which
features a trial reads (:class:`orchestrator.pair_rules.EncoderPair` carries
it), so each variant's training split is extracted once per encoder, has its
own layer similarity, and its trials are fingerprinted by its own feature keys.
A grid without ``train_data`` trains on ``data.train`` as written: its
trials keep their fingerprints. Values are scalars (numbers, strings,
booleans, null); a variant that sets an option to the value the spec already
gives it is that spec's own training split.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from orchestrator.config import SpecError

KEY = "train_data"  # the grid key
_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True)
class TrainVariant:
    """Overrides of ``data.train.options``, sorted by option name (none: the spec's own split)."""

    options: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        """``method=random, per_concept=500``; "" for the spec's own training split."""
        return ", ".join(f"{k}={v}" for k, v in self.options)

    def apply(self, ref):
        """``ref`` (a DatasetRef) with these options set, named ``<name>[<label>]`` (logs, the
        ``curation`` table): the features' keys hash the split's content, not its name."""
        if not self.options:
            return ref
        return dataclasses.replace(ref, name=f"{ref.name}[{self.label}]",
                                   options={**ref.options, **dict(self.options)})

    def relative_to(self, ref) -> TrainVariant:
        """This variant without the overrides ``ref`` already has (so an unchanged split is one)."""
        return TrainVariant(tuple((k, v) for k, v in self.options
                                  if k not in ref.options or ref.options[k] != v))

    def to_spec(self) -> dict:
        return dict(self.options)


DEFAULT = TrainVariant()


def parse_train_data(value: Any, path: str) -> list[TrainVariant]:
    """A grid's ``train_data``: option -> value or list of values; every combination, in order."""
    if not isinstance(value, dict) or not value:
        raise SpecError("expected a mapping of data.train option -> value or list of values, e.g. "
                        "{method: [concept_balanced, random]}", path=path)
    axes = {}
    for key, values in value.items():
        values = values if isinstance(values, list) else [values]
        if not values:
            raise SpecError("an empty list: this grid would train on no training split", path=f"{path}.{key}")
        for i, v in enumerate(values):
            if not isinstance(v, _SCALARS):
                raise SpecError(f"{v!r} is not a scalar; a training-data option varies over scalars "
                                "(numbers, strings, booleans, null)", path=f"{path}.{key}[{i}]")
        if len(set(map(repr, values))) != len(values):
            raise SpecError(f"a value is listed twice in {values!r}", path=f"{path}.{key}")
        axes[str(key)] = values
    return [TrainVariant(tuple(sorted(zip(axes, combo)))) for combo in itertools.product(*axes.values())]


def grid_variants(spec, grid) -> list[TrainVariant]:
    """The training splits a grid trains on, each relative to ``data.train`` (default: its own)."""
    written = getattr(grid, KEY, None) or [DEFAULT]
    return list(dict.fromkeys(v.relative_to(spec.data.train) for v in written))


def train_variants(spec) -> list[TrainVariant]:
    """Every training split some grid trains on, first named first (no grid: ``data.train``)."""
    return list(dict.fromkeys(v for grid in spec.search for v in grid_variants(spec, grid))) or [DEFAULT]


def train_refs(spec) -> list[tuple[TrainVariant, Any]]:
    """(variant, DatasetRef) of every training split the spec trains on."""
    return [(v, v.apply(spec.data.train)) for v in train_variants(spec)]


def check_train_data(spec) -> None:
    """Optuna searches one training split (its trials share one set of features)."""
    if spec.tune.search_config.search == "optuna" and len(train_variants(spec)) > 1:
        raise SpecError("tune.search: optuna searches one training split; move `train_data` "
                        "into data.train.options, or use grid search", path="search")
