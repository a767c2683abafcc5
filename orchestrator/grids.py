"""Search grids: the entries of a spec's ``search:`` as typed :class:`Grid` objects.

A grid maps a dimension to a value, a list of values (every combination runs)
or a sampled distribution (``num_samples`` seeded draws per combination).
``layers`` (layer rules) and ``preset`` (trials/presets.py) are dimensions too;
a preset unfolds here into trial values (:func:`unfold`).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from orchestrator.config import SpecError, from_dict
from trials.config import TrialConfig
from trials.presets import get_preset, list_presets
from trials.registry import did_you_mean
from trials.selection import LayerRule, is_layer_pair, parse_rule

TRIAL_FIELDS = {f.name for f in dataclasses.fields(TrialConfig)} - {"image_layer", "text_layer"}
GRID_KEYS = ("name", "layers", "preset", "num_samples")
SAMPLERS = ("choice", "uniform", "loguniform", "randint")


@dataclass(frozen=True)
class Sampled:
    """A sampled dimension: ``{choice: [..]}``, ``{uniform: [lo, hi]}``,
    ``{loguniform: [lo, hi]}`` or ``{randint: [lo, hi]}`` (hi exclusive)."""

    kind: str
    args: tuple

    def sample(self, rng) -> Any:
        import numpy as np

        if self.kind == "choice":
            return self.args[rng.integers(len(self.args))]
        lo, hi = self.args
        if self.kind == "uniform":
            return float(rng.uniform(lo, hi))
        if self.kind == "loguniform":
            return float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        return int(rng.integers(lo, hi))

    def tune_domain(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)

    def examples(self) -> list:
        return list(self.args) if self.kind == "choice" else [self.args[0]]


@dataclass(frozen=True)
class Combination:
    """One point of a grid: its layer rule and its TrialConfig values."""

    layers: LayerRule
    values: dict  # TrialConfig fields, the preset's unfolded
    preset: Optional[str] = None


@dataclass
class Grid:
    """One entry of ``search:``, validated (build it with :meth:`parse`)."""

    name: str
    layers: list[LayerRule] = field(default_factory=list)  # none: the presets' rules, else similar
    presets: list[str] = field(default_factory=list)
    dims: dict[str, list] = field(default_factory=dict)  # TrialConfig field -> values
    sample: dict[str, Sampled] = field(default_factory=dict)
    num_samples: Optional[int] = None  # None: tune.num_samples
    # The spec's order of the list dimensions ("layers", "preset", fields): a
    # combination's index seeds its draws, so this order is part of trial identity.
    order: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.order:
            self.order = (("layers",) if self.layers else ()) + (("preset",) if self.presets else ()) \
                + tuple(self.dims)

    @classmethod
    def parse(cls, value: Any, path: str) -> Grid:
        """A grid from its spec mapping; a :class:`SpecError` names the key and what is allowed."""
        if not isinstance(value, dict):
            raise SpecError("a grid must be a mapping of dimension -> values", path=path)
        _check_keys(value, path)
        num_samples = _num_samples(value.get("num_samples"), f"{path}.num_samples")
        sample = {k: _sampled(v, f"{path}.{k}") for k, v in value.items()
                  if k in TRIAL_FIELDS and _is_sampled(v)}
        axes = {k: _as_list(k, v, f"{path}.{k}") for k, v in value.items()
                if k not in sample and k not in ("name", "num_samples")}
        grid = cls(name=_name(value, path), sample=sample, num_samples=num_samples,
                   layers=[_rule(v, f"{path}.layers") for v in axes.get("layers", [])],
                   presets=axes.get("preset", []), order=tuple(axes),
                   dims={k: v for k, v in axes.items() if k in TRIAL_FIELDS})
        grid._check(path)
        return grid

    def _check(self, path: str) -> None:
        """Heads, presets, and every fixed combination as TrialConfig values."""
        sampled_heads = list(self.sample["head"].args) if "head" in self.sample else []
        for head in self.dims.get("head", []) + sampled_heads:
            check_head(head, f"{path}.head")
        for preset in self.presets:
            if preset not in list_presets():
                raise SpecError(f"unknown preset {preset!r}{did_you_mean(preset, list_presets())}; "
                                f"presets: {', '.join(list_presets())}", path=f"{path}.preset")
        for values in _product(self.dims):
            from_dict(TrialConfig, values, path=path)
        for key, dim in self.sample.items():
            for example in dim.examples():
                from_dict(TrialConfig, {key: example}, path=path)

    def axes(self) -> dict[str, list]:
        """The list dimensions in the spec's order: ``layers``, ``preset`` and fields."""
        values = {"layers": self.layers, "preset": self.presets, **self.dims}
        return {k: values[k] for k in self.order}

    def combinations(self) -> list[Combination]:
        """Every combination of the list dimensions, presets unfolded."""
        return [unfold(point) for point in _product(self.axes())]

    def layer_rules(self) -> list[LayerRule]:
        """The rules this grid's trials use: its own, else its presets' (default similar)."""
        if self.layers:
            return list(self.layers)
        return sorted({unfold({"preset": p}).layers for p in self.presets or [None]}, key=str)

    def sample_count(self, default: int) -> int:
        """``num_samples``: the grid's own, else ``default`` (``tune.num_samples``)."""
        return self.num_samples or default

    def draw_count(self, default: int) -> int:
        """Draws per combination: identical repeats of an unsampled grid would be one trial."""
        return self.sample_count(default) if self.sample else 1

    def to_dict(self) -> dict:
        """This grid in the spec's own spelling (the resolved spec in spec.json)."""
        axes = self.axes()
        if "layers" in axes:
            axes["layers"] = [list(r.pair) if r.kind == "pair" else str(r) for r in self.layers]
        if "head_options" in axes:  # one mapping, never a list (see _as_list)
            (axes["head_options"],) = axes["head_options"]
        sampled = {k: {dim.kind: list(dim.args)} for k, dim in self.sample.items()}
        extra = {} if self.num_samples is None else {"num_samples": self.num_samples}
        return {"name": self.name, **axes, **sampled, **extra}


def parse_grids(value: Any, path: str) -> list[Grid]:
    """``search:``: one grid (a mapping) or a list of grids."""
    grids = [value] if isinstance(value, dict) else value
    if not isinstance(grids, list):
        raise SpecError(f"expected a grid (a mapping of dimension -> values) or a list of grids, "
                        f"got {value!r}", path=path)
    if not grids:
        raise SpecError("needs at least one grid", path=path)
    parsed = [Grid.parse(g, f"{path}[{i}]") for i, g in enumerate(grids)]
    _check_unique_names(parsed, path)
    return parsed


def _check_unique_names(grids: list[Grid], path: str) -> None:
    """Results, reports and Optuna studies are keyed by grid name: two grids of one
    name would mix their rows (and plan.json could not tell them apart)."""
    first: dict[str, int] = {}
    for i, grid in enumerate(grids):
        if grid.name in first:
            raise SpecError(f"grid name {grid.name!r} is already used by {path}[{first[grid.name]}]; "
                            f"grid names must be unique: rename one (e.g. name: {grid.name}-2)",
                            path=f"{path}[{i}].name")
        first[grid.name] = i


def check_closed_form(grid: Grid, training: dict, path: str) -> None:
    """Reject a grid that varies a field its closed-form head ignores.

    A head fitted in closed form (:func:`trials.head_options.is_closed_form`)
    ignores the loss and optimiser fields (``CLOSED_FORM_IGNORED``): every value
    of such a dimension runs one and the same trial (a λ sweep over CSA runs CSA
    without R_S each time), which a sweep should not silently pretend to vary.
    """
    from trials.config import CLOSED_FORM_IGNORED
    from trials.head_options import is_closed_form

    seen: dict[tuple[str, str], set] = {}
    for combo in grid.combinations():
        values = {**training, **combo.values}
        head = values.get("head", TrialConfig.head)
        if not is_closed_form(head):
            continue
        kept = json.dumps({k: v for k, v in values.items() if k not in CLOSED_FORM_IGNORED},
                          sort_keys=True, default=str) + str(combo.layers)
        for name in CLOSED_FORM_IGNORED:
            if name in grid.sample:
                _closed_form_error(head, name, "sampled values", f"{path}.{name}")
            seen.setdefault((kept, name), set()).add(json.dumps(values.get(name), default=str))
            if len(seen[(kept, name)]) > 1:
                _closed_form_error(head, name, "values", f"{path}.{name}")


def _closed_form_error(head: str, name: str, what: str, path: str) -> None:
    raise SpecError(
        f"head {head!r} is fitted in closed form and ignores {name} (and every other loss and "
        f"optimiser field), so all {what} of this dimension run one and the same {head} trial; "
        f"set the head's own options in head_options instead (CSA's R_S is head_options: "
        f"{{refine: true, lambda_rs: 10}}), or vary {name} in a grid of trained heads "
        f"(e.g. head: linear)", path=path)


def unfold(point: dict) -> Combination:
    """A grid point's trial values, in increasing precedence: the preset's, then
    the point's own; its rule: the point's, else the preset's, else similar."""
    point = dict(point)
    preset, rule = point.pop("preset", None), point.pop("layers", None)
    if preset is None:
        return Combination(rule if rule is not None else parse_rule("similar"), point)
    p = get_preset(preset)
    values = {"head": p["head"], "head_options": p["head_options"], "out_dim": p["out_dim"],
              **p["loss"], **p["train"], **point}
    return Combination(rule if rule is not None else parse_rule(p["layer_rule"]), values, preset)


def check_head(name: str, path: str) -> None:
    from trials.head_options import HEAD_OPTIONS  # torch-free: validation loads no torch

    if name not in HEAD_OPTIONS:
        raise SpecError(f"unknown head {name!r}{did_you_mean(name, HEAD_OPTIONS.names())}; "
                        f"heads: {', '.join(HEAD_OPTIONS.names())}", path=path)


# --- parsing helpers ----------------------------------------------------------------

def _check_keys(grid: dict, path: str) -> None:
    for key in grid:
        if key not in TRIAL_FIELDS and key not in GRID_KEYS:
            raise SpecError(f"unknown search dimension {key!r}{did_you_mean(key, TRIAL_FIELDS)}; allowed: "
                            f"{', '.join(GRID_KEYS + tuple(sorted(TRIAL_FIELDS)))}",
                            path=f"{path}.{key}")


def _num_samples(value: Any, path: str) -> Optional[int]:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise SpecError(f"expected an integer >= 1, got {value!r}", path=path)
    return value


def _name(grid: dict, path: str) -> str:
    """The grid's name (a one-element list reads too); default ``grid[i]``."""
    if "name" not in grid:
        return path.replace("search", "grid")
    name = grid["name"]
    name = name[0] if isinstance(name, list) and len(name) == 1 else name
    if not isinstance(name, str):
        raise SpecError("a grid's name is one string", path=f"{path}.name")
    return name


def _as_list(key: str, value: Any, path: str) -> list:
    """A dimension's values: a list is every value, anything else one value
    (``head_options`` is one mapping; ``layers: [i, j]`` is one pair). An empty
    list is an error: the grid would expand to no trial and vanish from the sweep."""
    one = not isinstance(value, list) or key == "head_options" or (key == "layers" and is_layer_pair(value))
    if value == []:
        raise SpecError("an empty list: this grid would plan no trial at all (and silently drop "
                        "out of the count); give at least one value, or remove the key", path=path)
    return [value] if one else value


def _rule(value: Any, path: str) -> LayerRule:
    try:
        return parse_rule(value)
    except ValueError as err:
        raise SpecError(str(err), path=path) from None


def _is_sampled(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SAMPLERS


def _sampled(value: dict, path: str) -> Sampled:
    kind, args = next(iter(value.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise SpecError("choice needs a non-empty list of values", path=path)
        return Sampled(kind, tuple(args))
    numeric = isinstance(args, list) and len(args) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if not numeric or not args[0] < args[1]:
        raise SpecError(f"{kind} needs [low, high] with low < high, got {args!r}", path=path)
    if kind == "loguniform" and args[0] <= 0:
        raise SpecError("loguniform needs low > 0", path=path)
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise SpecError("randint needs integer bounds", path=path)
    return Sampled(kind, tuple(args))


def _product(axes: dict[str, list]) -> list[dict]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]
