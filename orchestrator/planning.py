"""From a validated spec and its layer similarity to the list of trials.

Layer rules become concrete layer pairs here, each on the similarity matrix
of its trial's own training subsample (``similarity.selection: per_trial``,
the official order) or on the one whole-split matrix (``oracle``); see
:mod:`orchestrator.similarity_stage`. Which rule named a trial's pair and how
many pairs scored that choice are recorded on the :class:`PlannedTrial`
(``layer_rule``, ``similarity_n``), never in its fingerprint: a (config,
layers) keeps its fingerprint whichever rule picks it. Sampled dimensions are drawn
(seeded, so a re-run draws the same values); each trial gets a fingerprint of
everything that determines its result (its TrialConfig, the feature keys of
its two layers and evaluation sets, the trial code version), so a re-run can
skip what is stored and two grids asking for the same trial run it once.

Several candidate encoders make the encoder pair a dimension too
(:func:`plan_pairs`): each grid plans its trials on every pair its
``encoder_pairs`` names (:mod:`orchestrator.pair_rules`), with that pair's
features and similarity; the pair's labels ride on the PlannedTrial. So does
the label of the training split, where a grid varies it (``train_data``,
:mod:`orchestrator.train_data`).

Optuna grids are not planned ahead: :func:`optuna_space` describes what Optuna
chooses from and :func:`materialize` turns one of its suggestions into a
TrialConfig, the same way in the trial and in the driver.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np

from orchestrator.config import from_dict
from orchestrator.grids import Grid, Sampled, unfold
from orchestrator.keys import content_key
from orchestrator.pair_rules import grid_pairs
from orchestrator.similarity_stage import FixedSimilarity
from orchestrator.spec import SweepSpec
from trials.config import TRIAL_CODE_VERSION, TrialConfig
from trials.selection import LayerRule

if TYPE_CHECKING:
    from orchestrator.features import FeatureSet


@dataclass
class PlannedTrial:
    fingerprint: str
    grid: str
    config: TrialConfig
    params: str = ""  # Optuna's suggestion (JSON) for optuna grids
    layer_rule: str = ""  # the layer rule that named its pair, canonical (str(LayerRule))
    similarity_n: int = 0  # training pairs that scored that choice; 0: the rule needs no similarity
    image_encoder: str = ""  # the encoder pair's labels (orchestrator.pair_rules.EncoderPair)
    text_encoder: str = ""
    train_data: str = ""  # its training split's TrainVariant label ("": data.train as written)

    @property
    def encoder_pair(self) -> tuple[str, str]:
        return self.image_encoder, self.text_encoder

    @property
    def features_key(self) -> tuple[str, str, str]:
        """Its EncoderPair's ``key``: which of a sweep's feature sets it reads."""
        return self.image_encoder, self.text_encoder, self.train_data

    def as_param(self) -> dict:
        return {"fingerprint": self.fingerprint, "grid": self.grid,
                "config": dataclasses.asdict(self.config), "params": self.params,
                "layer_rule": self.layer_rule, "similarity_n": self.similarity_n,
                "image_encoder": self.image_encoder, "text_encoder": self.text_encoder,
                "train_data": self.train_data}


def similarity_source(spec: SweepSpec, similarity, features: Optional[FeatureSet] = None):
    """What layer rules resolve against: a :class:`LayerSimilarity` as is, or a bare
    [Li, Lj] matrix as the oracle of the spec's settings (:class:`FixedSimilarity`)."""
    if hasattr(similarity, "for_trial"):
        return similarity
    n_total = len(features.train.text_to_image) if features is not None else None
    return FixedSimilarity(similarity, spec.similarity, n_total)


_DEFAULTS = TrialConfig()


def _subsample(values: dict) -> tuple[Optional[int], int]:
    """(n_train, seed) of a trial's values: the training subsample its selection scores."""
    return values.get("n_train", _DEFAULTS.n_train), values.get("seed", _DEFAULTS.seed)


def resolve_rule(rule: LayerRule, source, n_train, seed) -> tuple[list, int]:
    """(pairs, similarity_n) a rule names for a trial on subsample (n_train, seed).

    A rule that needs no similarity (``all``, ``last``, ``lastK``, ``[i, j]``)
    gets similarity_n 0, and the subsample's matrix is still prepared when it
    can be (``matching``), so the report can put the trial beside the matrix
    of its own data.
    """
    if not rule.needs_similarity:
        scored = source.matching(n_train, seed)  # None: too few pairs to score
        return rule.resolve(np.zeros(scored.matrix.shape if scored else source.num_layers)), 0
    scored = source.for_trial(n_train, seed)  # a subsample too small to score raises, named
    return rule.resolve(scored.matrix, seed=scored.seed), scored.similarity_n


def fingerprint(config: TrialConfig, features: FeatureSet) -> str:
    i, j = config.image_layer, config.text_layer
    inputs = {"layers": [i, j], "features": features.keys(), "code": TRIAL_CODE_VERSION}
    return content_key([config.fingerprint_fields(), inputs], 20)


def _draws(spec: SweepSpec, grid: Grid, combo_index: int) -> list[dict]:
    """The sampled values of one grid combination: seeded, so a re-run draws the same."""
    if not grid.sample:
        return [{}]
    key = f"{spec.tune.search_config.seed}/{grid.name}/{combo_index}".encode()
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))
    return [{k: dim.sample(rng) for k, dim in sorted(grid.sample.items())}
            for _ in range(grid.draw_count(spec.tune.search_config.num_samples))]


def plan_trials(spec: SweepSpec, features: FeatureSet, similarity) -> list[PlannedTrial]:
    """Every trial of every grid on one encoder pair, deduplicated by fingerprint (first grid wins).

    ``similarity``: a :class:`~orchestrator.similarity_stage.LayerSimilarity` (each
    trial's rule resolves on its own subsample's matrix, or the oracle's), or
    one [Li, Lj] matrix used for every trial (:func:`similarity_source`).
    """
    source, planned = similarity_source(spec, similarity, features), {}
    for grid in spec.search:
        _plan_grid(spec, grid, features, source, planned)
    return list(planned.values())


def plan_pairs(spec: SweepSpec, features: dict, similarity: dict, ranking=None) -> list[PlannedTrial]:
    """Every trial of every grid on each encoder pair the grid trains (``encoder_pairs``).

    ``features``/``similarity``: per :class:`~orchestrator.pair_rules.EncoderPair`;
    ``ranking``: the selection stage's pairs, best first (for ``top`` rules). A
    trial's fingerprint hashes its pair's feature keys, which carry both
    encoders' identities, so one config on two pairs is two trials.
    """
    planned: dict[str, PlannedTrial] = {}
    for grid in spec.search:
        for pair in grid_pairs(spec, grid, ranking):
            source = similarity_source(spec, similarity[pair], features[pair])
            _plan_grid(spec, grid, features[pair], source, planned, pair.key)
    return list(planned.values())


def _plan_grid(spec: SweepSpec, grid: Grid, features: FeatureSet, source, planned: dict,
               key: tuple[str, str, str] = ("", "", "")) -> None:
    """Add one grid's trials on one encoder pair to ``planned`` (by fingerprint, first kept);
    ``key``: the pair's (image label, text label, training split label)."""
    for index, combo in enumerate(grid.combinations()):
        for draw in _draws(spec, grid, index):
            values = {**spec.training, **combo.values, **draw}
            pairs, n_scored = resolve_rule(combo.layers, source, *_subsample(values))
            for i, j in pairs:
                config = from_dict(TrialConfig, {**values, "image_layer": i, "text_layer": j})
                fp = fingerprint(config, features)
                planned.setdefault(fp, PlannedTrial(fp, grid.name, config, layer_rule=str(combo.layers),
                                                    similarity_n=n_scored, image_encoder=key[0],
                                                    text_encoder=key[1], train_data=key[2]))


# --- Optuna grids ----------------------------------------------------------------------

@dataclass
class OptunaSpace:
    """What Optuna chooses from for one grid (see :func:`optuna_space`)."""

    choices: dict[str, list]  # dimension -> values, ``preset`` included, in the spec's order
    sample: dict[str, Sampled]
    pairs: list[list[int]]  # [i, j]: every pair a trial of the grid may train
    # "n_train/seed" of a subsample (or "*": any) -> its slots [i, j, layer_rule, similarity_n]
    slots: dict[str, list[list]] = dataclasses.field(default_factory=dict)
    encoders: tuple[str, str] = ("", "")  # the one encoder pair's labels (an Optuna spec has one)
    train_data: str = ""  # and its one training split's label

    def slot(self, index: int, n_train, seed) -> list:
        """The ``index``-th pair the rules name on subsample (n_train, seed)."""
        slots = self.slots.get("*") or self.slots[_slot_key(n_train, seed)]
        return slots[index % len(slots)]

    @property
    def n_slots(self) -> int:
        return max((len(v) for v in self.slots.values()), default=len(self.pairs))


def _slot_key(n_train, seed) -> str:
    return f"{n_train}/{seed}"


def optuna_space(spec: SweepSpec, grid: Grid, similarity) -> OptunaSpace:
    """What Optuna chooses from for one grid.

    Every list dimension becomes a categorical choice (``preset`` included),
    sampled dimensions keep their distribution, and the layer pair is a
    categorical over slots: slot k is the k-th pair the grid's layer rules (or
    its presets' rules) name, in order, duplicates dropped. With the oracle, or
    rules that need no similarity, the slots are one list for every trial.
    Per trial, they are resolved on each subsample the grid can draw (its
    ``n_train`` and ``seed`` must then be listed, not sampled from a range):
    slot k is the k-th pair on the trial's own data (modulo their count, where
    the rules name fewer pairs).
    """
    choices = {k: v for k, v in grid.axes().items() if k != "layers"}
    source, rules = similarity_source(spec, similarity), grid.layer_rules()
    subsamples = None
    if source.selection == "per_trial":
        subsamples = _optuna_subsamples(spec, grid, choices, any(r.needs_similarity for r in rules))
        if subsamples is None:  # no rule needs similarity: only the layer counts matter
            source = FixedSimilarity(np.zeros(source.num_layers), spec.similarity)
    if subsamples is None:
        slots = {"*": _slots(rules, source, None, None)}
    else:
        slots = {_slot_key(n, s): _slots(rules, source, n, s) for n, s in subsamples}
    pairs = list(dict.fromkeys((v[0], v[1]) for listed in slots.values() for v in listed))
    pair = getattr(similarity, "pair", None)  # a LayerSimilarity knows its encoder pair
    return OptunaSpace(choices, dict(grid.sample), [list(p) for p in pairs], slots,
                       pair.labels if pair is not None else ("", ""),
                       pair.train.label if pair is not None else "")


def _slots(rules: list[LayerRule], source, n_train, seed) -> list[list]:
    """[i, j, layer_rule, similarity_n] of every pair the rules name, first rule first."""
    named: dict[tuple, list] = {}
    for rule in rules:
        pairs, n_scored = resolve_rule(rule, source, n_train, seed)
        for i, j in pairs:
            named.setdefault((i, j), [i, j, str(rule), n_scored])
    return list(named.values())


def _optuna_subsamples(spec: SweepSpec, grid: Grid, choices: dict, strict: bool) -> Optional[list]:
    """Every (n_train, seed) a trial of an Optuna grid can have; None where one is sampled
    from a range (an error if ``strict``: a rule needs each subsample's similarity)."""
    def values(name: str) -> Optional[list]:
        if name in choices:
            return list(choices[name])
        if name not in grid.sample:
            return [spec.training.get(name, getattr(_DEFAULTS, name))]
        if grid.sample[name].kind == "choice":
            return list(grid.sample[name].args)
        if strict:
            raise ValueError(f"grid {grid.name!r}: per-trial layer selection scores each training "
                             f"subsample, so {name} must be listed (a value, a list or "
                             "{choice: [...]}), not sampled from a range; or set "
                             "similarity.selection: oracle")
        return None

    n_trains, seeds = values("n_train"), values("seed")
    if n_trains is None or seeds is None:
        return None
    return [(n, s) for n in n_trains for s in seeds]


def param_space(space: OptunaSpace) -> dict:
    """The Tune search space of :func:`optuna_space` (index-encoded categoricals)."""
    from ray import tune

    out = {f"c__{k}": tune.choice(list(range(len(v)))) for k, v in space.choices.items()
           if len(v) > 1}
    out.update({f"s__{k}": dim.tune_domain() for k, dim in space.sample.items()})
    if space.n_slots > 1:
        out["pair"] = tune.choice(list(range(space.n_slots)))
    return out


def materialize(spec_training: dict, grid_name: str, space: OptunaSpace, suggestion: dict,
                features: FeatureSet) -> PlannedTrial:
    """The trial Optuna's ``suggestion`` (a :func:`param_space` point) stands for."""
    combo = unfold({k: v[suggestion.get(f"c__{k}", 0)] for k, v in space.choices.items()})
    sampled = {k: suggestion[f"s__{k}"] for k in space.sample}
    values = {**spec_training, **combo.values, **sampled}
    if space.slots:
        i, j, rule, n_scored = space.slot(suggestion.get("pair", 0), *_subsample(values))
    else:  # a space built before slots existed
        (i, j), rule, n_scored = space.pairs[suggestion.get("pair", 0)], "", 0
    config = from_dict(TrialConfig, {**values, "image_layer": i, "text_layer": j})
    params = json.dumps({k: suggestion[k] for k in sorted(suggestion)}, default=float)
    return PlannedTrial(fingerprint(config, features), grid_name, config, params,
                        layer_rule=rule, similarity_n=n_scored, image_encoder=space.encoders[0],
                        text_encoder=space.encoders[1], train_data=space.train_data)


def count_trials(spec: SweepSpec, num_layers: tuple[int, int] | None) -> tuple[int, bool]:
    """(trials a spec expands to before deduplication, whether that is exact).

    Layer counts are needed for 'all' and 'lastK'; 'binsN' counts as its upper
    bound (N + 1 pairs); an Optuna grid counts its num_samples.
    """
    total, exact, tune = 0, True, spec.tune.search_config
    for grid in spec.search:
        if tune.search == "optuna":
            total += grid.sample_count(tune.num_samples)
            continue
        draws = grid.draw_count(tune.num_samples)
        for combo in grid.combinations():
            n, rule_exact = combo.layers.count(num_layers)
            total, exact = total + n * draws, exact and rule_exact
    return total, exact
