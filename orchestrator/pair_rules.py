"""Candidate encoders and the encoder pairs a sweep trains (the spec side; torch-free).

``encoders.image`` and ``encoders.text`` each name one encoder or a list of
candidates; every (image, text) candidate pair is an :class:`EncoderPair`, a
dimension of the search like a layer pair. A grid says which pairs it trains
with ``encoder_pairs`` (:class:`PairRule`):

* ``[image, text]``: one pair, each side a candidate's label (its ``label:``,
  else its ``name``) or its index in the list;
* ``topK`` (``top``: K = ``encoder_selection.top``): the K best pairs of the
  encoder-pair selection stage (:mod:`orchestrator.encoder_pairs`);
* ``all``: every candidate pair.

A grid without ``encoder_pairs`` trains ``top`` when the spec has an
``encoder_selection``, else ``all`` (a single-encoder spec: its one pair).
Which pairs ``top`` means is known only after the selection stage ran, so
validation counts trials per rank ("rank 1", "rank 2", ...).

A grid's ``train_data`` (:mod:`orchestrator.train_data`) varies the training
split too: an EncoderPair then also names the split it trains on, since the
two together decide the features a trial reads.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from orchestrator.config import SpecError
from orchestrator.grids import Grid, parse_grids
from orchestrator.train_data import (
    DEFAULT,
    TrainVariant,
    grid_variants,
    parse_train_data,
)
from orchestrator.train_data import KEY as TRAIN_KEY

if TYPE_CHECKING:
    from orchestrator.spec import EncodersSpec, SweepSpec

KEY = "encoder_pairs"  # the grid key
ROLES = ("image", "text")
_RULE = re.compile(r"all|top(\d*)")
# encoder_selection.protocol freeze_align: the encoder kinds whose probe embedding it defines
# (orchestrator.encoder_pairs.probe_encoder): timm images (pool mean_all), hf texts (masked mean)
FREEZE_ALIGN_KINDS = {"image": ("timm", "synthetic"), "text": ("hf", "synthetic")}


@dataclass(frozen=True)
class EncoderPair:
    """One image candidate with one text candidate (indices into the spec's lists), and the
    training split they train on (``train``: the spec's own unless a grid varies it)."""

    image: int
    text: int
    image_label: str
    text_label: str
    train: TrainVariant = DEFAULT

    @property
    def labels(self) -> tuple[str, str]:
        return self.image_label, self.text_label

    @property
    def key(self) -> tuple[str, str, str]:
        """What tells apart the feature sets of a sweep: the encoders' labels and the split's."""
        return self.image_label, self.text_label, self.train.label

    @property
    def label(self) -> str:
        return pair_label(*self.key)

    def on(self, train: TrainVariant) -> EncoderPair:
        return dataclasses.replace(self, train=train)


def pair_label(image: str, text: str, train: str = "") -> str:
    """"img + txt", and " on <training split>" where a grid varies it."""
    return f"{image} + {text} on {train}" if train else f"{image} + {text}"


@dataclass(frozen=True)
class PairRule:
    """A grid's ``encoder_pairs`` entry: ``pair`` (as written), ``top`` (k=0: the
    selection's ``top``) or ``all``."""

    kind: str
    pair: tuple = ()
    k: int = 0

    def __str__(self) -> str:
        if self.kind == "pair":
            return f"[{self.pair[0]}, {self.pair[1]}]"
        return f"top{self.k or ''}" if self.kind == "top" else "all"

    def to_spec(self) -> Any:
        return list(self.pair) if self.kind == "pair" else str(self)


def is_rule_word(value: Any) -> bool:
    return isinstance(value, str) and _RULE.fullmatch(value) is not None


def parse_pair_rules(value: Any, path: str) -> list[PairRule]:
    """``encoder_pairs``: a rule word, one ``[image, text]`` pair, or a list of them."""
    if value == []:
        raise SpecError("an empty list: this grid would train no encoder pair", path=path)
    if _is_pair(value) or not isinstance(value, list):
        value = [value]
    return [_parse_rule(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _is_pair(value: Any) -> bool:
    """A two-item list of labels/indices, neither a rule word: one pair, not two rules."""
    return (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)
            and not any(is_rule_word(v) for v in value))


def _parse_rule(value: Any, path: str) -> PairRule:
    if _is_pair(value):
        return PairRule("pair", tuple(value))
    match = _RULE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise SpecError(f"{value!r} is not an encoder-pair rule; allowed: [image, text] (labels or "
                        "indices of the candidates), topK (the K best pairs of encoder_selection), "
                        "top, all; a list of pairs is written [[image, text], ...]", path=path)
    k = int(match.group(1)) if match.group(1) else 0
    if value.startswith("top") and match.group(1) and k < 1:
        raise SpecError(f"{value!r}: K must be >= 1", path=path)
    return PairRule("top" if value.startswith("top") else "all", k=k)


@dataclass
class PairedGrid(Grid):
    """A grid and the encoder pairs it trains (empty: the spec's default rule), and the
    training splits it trains them on (empty: ``data.train``)."""

    encoder_pairs: list[PairRule] = field(default_factory=list)
    train_data: list[TrainVariant] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = super().to_dict()
        if self.encoder_pairs:
            out[KEY] = [r.to_spec() for r in self.encoder_pairs]
        if self.train_data:
            out[TRAIN_KEY] = {k: list(dict.fromkeys(dict(v.options)[k] for v in self.train_data))
                              for k, _ in self.train_data[0].options}
        return out


def parse_search(value: Any, path: str) -> list[Grid]:
    """``search:`` as :func:`orchestrator.grids.parse_grids` reads it, plus each grid's
    ``encoder_pairs`` and ``train_data`` (taken out before the grid is parsed: they
    are not trial fields)."""
    raw = [value] if isinstance(value, dict) else value
    if not isinstance(raw, list):
        return parse_grids(value, path)  # its own error
    own = [g if isinstance(g, dict) else {} for g in raw]
    rules = [parse_pair_rules(g[KEY], f"{path}[{i}].{KEY}") if KEY in g else [] for i, g in enumerate(own)]
    data = [parse_train_data(g[TRAIN_KEY], f"{path}[{i}].{TRAIN_KEY}") if TRAIN_KEY in g else []
            for i, g in enumerate(own)]
    stripped = [{k: v for k, v in g.items() if k not in (KEY, TRAIN_KEY)} if isinstance(g, dict) else g
                for g in raw]
    grids = parse_grids(stripped, path)
    return [PairedGrid(**{f.name: getattr(g, f.name) for f in dataclasses.fields(Grid)},
                       encoder_pairs=r, train_data=d)
            if r or d else g for g, r, d in zip(grids, rules, data)]  # a plain Grid: neither


# --- candidates and pairs -------------------------------------------------------------

def all_pairs(encoders: EncodersSpec) -> list[EncoderPair]:
    """Every (image, text) candidate pair, image-major, in the spec's order."""
    images, texts = encoders.candidates("image"), encoders.candidates("text")
    return [EncoderPair(i, j, a.title, b.title) for i, a in enumerate(images) for j, b in enumerate(texts)]


def resolve_pair(encoders: EncodersSpec, written: tuple, path: str = "") -> EncoderPair:
    """The pair ``[image, text]`` names (labels or indices), or a SpecError naming the choices."""
    index = [_candidate_index(encoders, role, ref, path) for role, ref in zip(ROLES, written)]
    return next(p for p in all_pairs(encoders) if (p.image, p.text) == tuple(index))


def _candidate_index(encoders: EncodersSpec, role: str, ref, path: str) -> int:
    titles = [e.title for e in encoders.candidates(role)]
    if isinstance(ref, int) and -len(titles) <= ref < len(titles):
        return ref % len(titles)
    if isinstance(ref, str) and ref in titles:
        return titles.index(ref)
    raise SpecError(f"{ref!r} names no {role} candidate; {role} candidates: "
                    + ", ".join(f"{i}: {t!r}" for i, t in enumerate(titles)), path=path)


def grid_rules(spec: SweepSpec, grid: Grid) -> list[PairRule]:
    """The grid's own rules, else the default (module docstring)."""
    own = getattr(grid, KEY, None)
    if own:
        return list(own)
    return [PairRule("top")] if spec.encoder_selection is not None else [PairRule("all")]


def top_k(spec: SweepSpec, rule: PairRule) -> int:
    return rule.k or spec.encoder_selection.top


def grid_pairs(spec: SweepSpec, grid: Grid, ranking: Optional[list[EncoderPair]]) -> list[EncoderPair]:
    """The pairs a grid trains, in rule order, each once and on each of its training splits;
    ``ranking``: the selection's, best first."""
    return [pair.on(v) for pair in _encoder_pairs(spec, grid, ranking) for v in grid_variants(spec, grid)]


def _encoder_pairs(spec: SweepSpec, grid: Grid, ranking: Optional[list[EncoderPair]]) -> list[EncoderPair]:
    out: list[EncoderPair] = []
    for rule in grid_rules(spec, grid):
        if rule.kind == "pair":
            out.append(resolve_pair(spec.encoders, rule.pair))
        elif rule.kind == "all":
            out.extend(all_pairs(spec.encoders))
        else:
            if ranking is None:
                raise ValueError(f"grid {grid.name!r}: {rule} needs the encoder-pair selection's ranking")
            out.extend(ranking[:top_k(spec, rule)])
    return list(dict.fromkeys(out))


def trained_pairs(spec: SweepSpec, ranking: Optional[list[EncoderPair]]) -> list[EncoderPair]:
    """Every pair some grid trains, first named first."""
    return list(dict.fromkeys(p for grid in spec.search for p in grid_pairs(spec, grid, ranking)))


@dataclass(frozen=True)
class RankSlot:
    """The ``rank``-th best pair of the selection (which one is known only once it ran), on
    training split ``train``: what validation counts for a ``top`` rule."""

    rank: int
    train: TrainVariant = DEFAULT

    @property
    def label(self) -> str:
        return f"rank {self.rank} on {self.train.label}" if self.train.options else f"rank {self.rank}"

    def on(self, train: TrainVariant) -> RankSlot:
        return dataclasses.replace(self, train=train)


def grid_slots(spec: SweepSpec, grid: Grid) -> list:
    """What validation can know of a grid's pairs, on each of its training splits:
    EncoderPairs, and a RankSlot per rank of a ``top`` rule."""
    return [slot.on(v) for slot in _encoder_slots(spec, grid) for v in grid_variants(spec, grid)]


def _encoder_slots(spec: SweepSpec, grid: Grid) -> list:
    slots: list = []
    for rule in grid_rules(spec, grid):
        if rule.kind == "pair":
            slots.append(resolve_pair(spec.encoders, rule.pair))
        elif rule.kind == "all":
            slots.extend(all_pairs(spec.encoders))
        else:
            slots.extend(RankSlot(k) for k in range(1, top_k(spec, rule) + 1))
    return list(dict.fromkeys(slots))


def check_pair_rules(spec: SweepSpec) -> None:
    """Every grid's pairs exist, ``top`` has a selection to rank by and at most as many
    pairs as there are; Optuna searches one encoder pair (its space is one pair's layers)."""
    _check_protocol(spec)
    n_pairs = len(all_pairs(spec.encoders))
    for i, grid in enumerate(spec.search):
        path = f"search[{i}].{KEY}"
        for rule in grid_rules(spec, grid):
            if rule.kind == "pair":
                resolve_pair(spec.encoders, rule.pair, path)
            elif rule.kind == "top":
                _check_top(spec, rule, n_pairs, path)
    if spec.tune.search_config.search == "optuna":
        slots = {tuple(map(str, _encoder_slots(spec, g))) for g in spec.search}
        if len(slots) != 1 or len(next(iter(slots))) != 1:
            raise SpecError("tune.search: optuna searches one encoder pair; give every grid the same "
                            "single pair (encoder_pairs: top1, or [image, text]), or use grid search",
                            path="search")


def _check_top(spec: SweepSpec, rule: PairRule, n_pairs: int, path: str) -> None:
    if spec.encoder_selection is None:
        raise SpecError(f"{rule} takes the best pairs of the encoder-pair selection: add "
                        "encoder_selection: {probe: <dataset ref>, metric: cka, top: K}, or name "
                        "pairs ([image, text]) or all", path=path)
    if top_k(spec, rule) > n_pairs:
        raise SpecError(f"{rule} asks for {top_k(spec, rule)} pairs, but the candidates make only "
                        f"{n_pairs}", path=path)


def _check_protocol(spec: SweepSpec) -> None:
    """``freeze_align`` embeds the probe its own way, defined for some encoder kinds only."""
    if spec.encoder_selection is None or spec.encoder_selection.protocol != "freeze_align":
        return
    for role in ROLES:
        for i, encoder in enumerate(spec.encoders.candidates(role)):
            kind = encoder.name.partition(":")[0]
            if kind not in FREEZE_ALIGN_KINDS[role]:
                raise SpecError(f"encoder_selection.protocol freeze_align defines the {role} embedding of "
                                f"{' and '.join(FREEZE_ALIGN_KINDS[role])} encoders, not {kind!r} "
                                f"({encoder.name}); use protocol: per_layer",
                                path=f"encoders.{spec.encoders.path(role, i)}")
