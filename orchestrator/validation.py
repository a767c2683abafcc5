"""World checks: what a spec says, against what can be known without Ray.

The spec's own checks (types, ranges, names: :mod:`orchestrator.spec`) run when
it loads; :func:`check_world` runs after them and before any Ray work (from
:func:`orchestrator.spec.check_runnable`, and in ``structure-sweep validate``).
It looks at the world cheaply: encoder names and layer counts from model
configs (never weights), dataset paths and the training split's size from
annotation files (never images), then at the values that depend on them:
explicit layer pairs, ``n_train``, the similarity ``k``. What cannot be known
yet (a Hub model not in the local cache, a path behind an unset variable) is
said in :attr:`World.notes` instead. Every rejection is a :class:`SpecError`
naming the file, the key path and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

from orchestrator.config import SpecError
from orchestrator.datasets import DatasetError, DatasetOptionError, SplitIndex, split_index
from orchestrator.encoders import (
    EncoderInfo,
    EncoderOptionError,
    EncoderWeightsMissing,
    UnknownEncoderError,
    describe_encoder,
    has_token_features,
)
from orchestrator.env_vars import unresolved_variables
from orchestrator.feature_store import default_cache_dir

if TYPE_CHECKING:
    from orchestrator.spec import DatasetRef, SweepSpec

# kNN metrics and their least k: trials.similarity.METRICS' ``uses_k``/``min_k``,
# restated here because that module loads torch and validation must not
# (tests/orchestrator/test_validation.py keeps the two in step).
KNN_MIN_K = {"mutual_knn": 1, "cycle_knn": 1, "cknna": 2}
_RULE_SAMPLES = 100  # below this many samples a named k rule may not fit: compute it


@dataclass
class World:
    """What :func:`check_world` found out: layer counts, the training split's size,
    and the things only the run can tell."""

    candidates: dict[str, list[EncoderInfo]]  # "image"/"text" -> per candidate, in the spec's order
    train: SplitIndex
    notes: list[str] = field(default_factory=list)
    # the training splits grids vary (``train_data``): TrainVariant -> its SplitIndex
    variants: dict = field(default_factory=dict)
    tokens: list[str] = field(default_factory=list)  # token-cache estimates (token heads only)

    @property
    def encoders(self) -> dict[str, EncoderInfo]:
        """Each role's first candidate (a single-encoder spec: its two encoders)."""
        return {role: infos[0] for role, infos in self.candidates.items()}

    def layers_of(self, image: int, text: int) -> Optional[tuple[int, int]]:
        """The layer counts of candidate pair (image, text), None where one is unknown."""
        counts = (self.candidates["image"][image].num_layers, self.candidates["text"][text].num_layers)
        return None if None in counts else counts

    @property
    def num_layers(self) -> Optional[tuple[int, int]]:
        """The layer counts every candidate pair shares, else None."""
        counts = {self.layers_of(i, j) for i in range(len(self.candidates["image"]))
                  for j in range(len(self.candidates["text"]))}
        return counts.pop() if len(counts) == 1 else None


def check_world(spec: SweepSpec) -> World:
    """The checks of the module docstring; SpecError on the first problem."""
    try:
        notes: list[str] = []
        world = World(_encoders(spec, notes), _data(spec, notes), notes)
        world.variants = _train_variants(spec)
        _check_layer_pairs(spec, world)
        _check_n_train(spec, world)
        _check_k(spec, world)
        world.tokens = _token_cache(spec, world)
    except SpecError as err:
        raise SpecError(err.reason, path=err.path, source=spec.source) from None
    return world


# --- token cache ---------------------------------------------------------------------------

def _token_cache(spec: SweepSpec, world: World) -> list[str]:
    """The token cache of the training split per encoder (one token layer each; evaluation
    sets add to it), and a SpecError when it cannot fit the cache directory's free space."""
    from orchestrator.token_size import estimate_tokens, human_bytes, token_space_error

    head = _token_head(spec)
    if head is None:
        return []
    for role in ("image", "text"):
        for i, enc in enumerate(spec.encoders.candidates(role)):
            if not has_token_features(enc.name):
                raise SpecError(f"head {head!r} reads token features, and encoder {enc.name!r} has none "
                                "(timm and hf encoders have them): use one of those, or a pooled head",
                                path=f"encoders.{spec.encoders.path(role, i)}.name")
    n = world.train.pairs
    if n is None:
        return [f"token cache: unknown until the training split's size is known ({world.train.source})"]
    lines, total = [], 0
    for role in ("image", "text"):
        for i, enc in enumerate(spec.encoders.candidates(role)):
            estimate = estimate_tokens(enc.name, enc.options, num_samples=n, label=enc.title)
            if isinstance(estimate, str):
                lines.append(f"token cache of {role} encoder {enc.title}: {estimate}")
                continue
            total += estimate.bytes
            lines.append(f"token cache: {estimate.message('training pair')}")
    cache_dir = spec.cache_dir or str(default_cache_dir())
    error = total and token_space_error(total, cache_dir, what="the training split's token cache")
    if error:
        raise SpecError(f"{error} (one token layer per encoder: {'; '.join(lines)})", path="cache_dir")
    return lines + ([f"token cache: {human_bytes(total)} in all for one token layer per encoder "
                     f"(fits the free space of {cache_dir})"] if total else [])


def _token_head(spec: SweepSpec) -> Optional[str]:
    """The first head of the spec's trials that reads token features, if any."""
    from trials.config import TrialConfig
    from trials.head_options import needs_tokens

    heads = ({**spec.training, **combo.values}.get("head", TrialConfig.head)
             for grid in spec.search for combo in grid.combinations())
    return next((head for head in heads if needs_tokens(head)), None)


# --- encoders ---------------------------------------------------------------------------

def _encoders(spec: SweepSpec, notes: list[str]) -> dict[str, list[EncoderInfo]]:
    found: dict[str, list[EncoderInfo]] = {}
    for role in ("image", "text"):
        found[role] = []
        for i, enc in enumerate(spec.encoders.candidates(role)):
            path, unset = f"encoders.{spec.encoders.path(role, i)}", _unset(enc.name, enc.options)
            info = EncoderInfo(None, f"unknown until {unset} set") if unset else _describe(enc, path)
            if info.num_layers is None:
                notes.append(f"{role} encoder {enc.name}: layer count {info.source}")
            if info.weights:
                notes.append(f"{role} encoder {enc.name}: {info.weights}")
            found[role].append(info)
    return found


def _describe(enc, path: str) -> EncoderInfo:
    try:
        return describe_encoder(enc.name, pool=enc.pool, options=enc.options)
    except EncoderOptionError as err:
        raise SpecError(str(err), path=f"{path}.{err.key}") from None
    except (UnknownEncoderError, EncoderWeightsMissing, ValueError) as err:
        raise SpecError(str(err), path=f"{path}.name") from None


def _check_layer_pairs(spec: SweepSpec, world: World) -> None:
    """Explicit ``[i, j]`` pairs within the layers (negative indices count from the end) of
    every candidate: a grid's pair must exist in each encoder pair it may train."""
    for g, grid in enumerate(spec.search):
        for rule in grid.layer_rules():
            if rule.kind != "pair":
                continue
            for role, index in zip(("image", "text"), rule.pair):
                for enc, info in zip(spec.encoders.candidates(role), world.candidates[role]):
                    _check_layer_index(rule.pair, role, index, enc.name, info, f"search[{g}].layers")


def _check_layer_index(pair, role: str, index: int, name: str, info: EncoderInfo, path: str) -> None:
    n = info.num_layers
    if n is not None and not -n <= index < n:
        raise SpecError(f"layer pair {list(pair)} is out of range: the {role} encoder {name} has {n} "
                        f"layers ({info.source}); allowed {role} layers: 0..{n - 1} (or -{n}..-1 "
                        "from the end)", path=path)


# --- data --------------------------------------------------------------------------------

def _data_refs(spec: SweepSpec) -> Iterator[tuple[str, DatasetRef]]:
    yield "data.train", spec.data.train
    yield "data.val", spec.data.val
    for kind in ("zero_shot", "retrieval"):
        for i, ref in enumerate(getattr(spec.data, kind)):
            yield f"data.{kind}[{i}]", ref
    if spec.data.unpaired is not None:
        for role in ("image", "text"):
            ref = getattr(spec.data.unpaired, role)
            if ref is not None:
                yield f"data.unpaired.{role}", ref
    if spec.encoder_selection is not None:
        yield "encoder_selection.probe", spec.encoder_selection.probe


def _data(spec: SweepSpec, notes: list[str]) -> SplitIndex:
    """Every set's paths; the training split's size (the only one a value depends on)."""
    train, waiting = SplitIndex(None, "unknown until run"), []
    for path, ref in _data_refs(spec):
        unset = _unset(ref.options)
        if unset:
            waiting.append(path)
            index = SplitIndex(None, f"unknown until {unset} set")
        else:
            index = _index(ref, path, count=path == "data.train")
        train = index if path == "data.train" else train
    if waiting:
        notes.append(f"the paths of {', '.join(waiting)}: checked once their variables are set")
    if train.pairs is None:
        notes.append(f"training split size {train.source}: " + (
            "`run` checks n_train and similarity.k against it once they are set" if waiting else
            "n_train and similarity.k cannot be checked against it"))
    return train


def _train_variants(spec: SweepSpec) -> dict:
    """Each training split a grid's ``train_data`` makes, its options checked and its size
    counted like ``data.train``'s (a wrong option is named at its grid's key)."""
    from orchestrator.train_data import grid_variants

    found: dict = {}
    for g, grid in enumerate(spec.search):
        for variant in grid_variants(spec, grid):
            if not variant.options or variant in found or _unset(spec.data.train.options):
                continue
            try:
                found[variant] = _index(variant.apply(spec.data.train), "", count=True)
            except SpecError as err:
                key = err.path.rpartition("options.")[2]
                raise SpecError(f"{err.reason} (in the training split of {variant.label})",
                                path=f"search[{g}].train_data" + (f".{key}" if key else "")) from None
    return found


def _index(ref: DatasetRef, path: str, count: bool) -> SplitIndex:
    try:
        return split_index(ref.dataset, ref.split, ref.options, count=count)
    except DatasetOptionError as err:
        raise SpecError(str(err), path=f"{path}.{err.key}") from None
    except DatasetError as err:
        raise SpecError(str(err), path=path) from None


def _split_index(world: World, variant) -> Optional[SplitIndex]:
    """The size index of a training split (None: a varied one whose options wait for variables)."""
    return world.variants.get(variant) if variant.options else world.train


def _n_train_values(spec: SweepSpec, g: int) -> Iterator[tuple[str, int]]:
    """(key path, value) of every n_train a trial of grid ``g`` may get; randint's largest draw."""
    grid = spec.search[g]
    if spec.training.get("n_train") is not None:  # checked even where a grid sets its own
        yield "training.n_train", spec.training["n_train"]
    for value in grid.dims.get("n_train", []):
        if value is not None:
            yield f"search[{g}].n_train", value
    dim = grid.sample.get("n_train")
    if dim is not None:
        values = dim.args if dim.kind == "choice" else [dim.args[1] - 1]
        yield from ((f"search[{g}].n_train", v) for v in values if isinstance(v, int))


def _check_n_train(spec: SweepSpec, world: World) -> None:
    """Every grid's n_train within each training split it trains on."""
    from orchestrator.train_data import grid_variants

    for g, grid in enumerate(spec.search):
        for variant in grid_variants(spec, grid):
            index = _split_index(world, variant)
            pairs = index.pairs if index is not None else None
            for path, value in _n_train_values(spec, g) if pairs is not None else ():
                if value > pairs:
                    ref = variant.apply(spec.data.train)
                    raise SpecError(
                        f"n_train={value} is larger than the training split: {ref.dataset}/{ref.split}"
                        + (f" with {variant.label}" if variant.options else "")
                        + f" has {pairs} pairs ({index.source}), so the trial would train on {pairs} "
                        f"pairs while its row says {value}; use n_train <= {pairs}, or null for every pair",
                        path=path)


def _check_k(spec: SweepSpec, world: World) -> None:
    """kNN metrics need 1 <= k < the rows scored (min of n_samples and the training pairs,
    of the smallest training split the grids train on)."""
    from orchestrator.train_data import train_variants

    sim = spec.similarity
    if sim.metric not in KNN_MIN_K:
        return
    indexes = (_split_index(world, v) for v in train_variants(spec))
    known = [i for i in indexes if i is not None and i.pairs is not None]
    smallest = min(known, key=lambda i: i.pairs, default=world.train)
    pairs = smallest.pairs
    n = sim.n_samples if pairs is None else min(sim.n_samples, pairs)
    k = sim.k if isinstance(sim.k, int) or n >= _RULE_SAMPLES else _rule_k(n, sim.k)
    if isinstance(k, int) and not KNN_MIN_K[sim.metric] <= k <= n - 1:
        sample = f"similarity.n_samples={sim.n_samples}" + (
            f" and {pairs} training pairs ({smallest.source})" if pairs is not None else "")
        named = f"k={k}" if k == sim.k else f"k={sim.k!r} (k={k} at {n} rows)"
        raise SpecError(f"{named} does not fit the similarity sample: {sim.metric} scores "
                        f"{n} rows (the smaller of {sample}), which allows k in "
                        f"[{KNN_MIN_K[sim.metric]}, {n - 1}]; lower k or score more rows",
                        path="similarity.k")


def _rule_k(n: int, rule: str) -> int:
    from trials.similarity import topk_from_rule  # loads torch: only for a tiny sample

    return topk_from_rule(n, rule)


def _unset(*values) -> str:
    """"${A} is" / "${A}, ${B} are": the variables still unset in ``values`` ("": none)."""
    names = sorted({v for value in values for _, v in unresolved_variables(value)})
    if not names:
        return ""
    return ", ".join(f"${{{v}}}" for v in names) + (" is" if len(names) == 1 else " are")
