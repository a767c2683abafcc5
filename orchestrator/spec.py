"""The sweep spec: YAML -> typed, validated :class:`SweepSpec`.

Everything that can be wrong with a spec is caught here, before any Ray work:
unknown keys, wrong types, unknown encoders, datasets, heads or search
dimensions. Errors name the file, the key path and the allowed values.
The ``search:`` grids are typed in :mod:`orchestrator.grids`, the ``tune:``
block in :mod:`orchestrator.tune_settings`; this module holds the rest, the
checks across sections, and loading/saving (``RUN_DIR/spec.json``).

String values may use ``${VAR}`` / ``${VAR:-default}`` (:mod:`orchestrator.env_vars`);
:func:`check_runnable` rejects a variable still unset when a sweep starts,
naming the key and the variable.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from orchestrator.config import SpecError, _convert, check_device, check_finite, check_min, from_dict
from orchestrator.data_spec import DataSpec, DatasetRef, UnpairedSpec  # noqa: F401 -- re-exported
from orchestrator.durable import atomic_write_bytes
from orchestrator.encoders import DTYPES as ENCODER_DTYPES
from orchestrator.env_vars import substitute_env, unresolved_variables
from orchestrator.grids import Grid, check_closed_form, check_head
from orchestrator.pair_rules import ROLES, check_pair_rules, is_rule_word, parse_search
from orchestrator.train_data import check_train_data
from orchestrator.schema import SPEC_FILE, choose_headline, default_mode, metric_names
from orchestrator.tune_settings import TuneSpec
from orchestrator.validation import World, check_world
from trials.config import TrialConfig
from trials.registry import did_you_mean

DTYPES = Literal[ENCODER_DTYPES]  # the encoders' list, one place
METRIC_NAMES = Literal["mutual_knn", "cycle_knn", "cka", "unbiased_cka", "cknna"]  # trials.similarity.METRICS
K_RULES = Literal["rice", "sqrt", "sturges"]


@dataclass
class EncoderSpec:
    """One frozen encoder and where/how it runs."""

    name: str
    pool: Optional[str] = None
    dtype: DTYPES = "float32"
    device: str = "cpu"
    batch_size: int = 64
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    options: dict = field(default_factory=dict)
    label: Optional[str] = None  # how results and encoder_pairs name it; default: name

    @property
    def title(self) -> str:
        return self.label or self.name

    def __post_init__(self):
        from orchestrator.encoders import UnknownEncoderError, split_name

        if self.label is not None and (not self.label.strip() or is_rule_word(self.label)):
            raise SpecError(f"label {self.label!r} is empty or an encoder-pair rule word "
                            "(all, top, topK); choose another", path="label")
        try:
            split_name(self.name)
        except UnknownEncoderError as err:
            raise SpecError(str(err), path="name") from None
        check_device(self.device, "device")
        check_min(self.batch_size, 1, "batch_size")
        check_min(self.num_gpus, 0, "num_gpus")
        check_min(self.num_cpus, 0, "num_cpus")  # Ray accepts an actor that reserves no CPU


def _parse_candidates(value: Any, path: str) -> Union[EncoderSpec, list[EncoderSpec]]:
    """One encoder (a mapping) or a list of candidates, each with its own options."""
    if not isinstance(value, list):
        return _one_encoder(value, path)
    if not value:
        raise SpecError("an empty list of candidates; name at least one encoder", path=path)
    return [_one_encoder(v, f"{path}[{i}]") for i, v in enumerate(value)]


def _one_encoder(value: Any, path: str) -> EncoderSpec:
    if isinstance(value, dict):
        return from_dict(EncoderSpec, value, path=path)
    raise SpecError(f"expected an encoder (a mapping with keys name, options, ...), got {value!r}", path=path)


_CANDIDATES = {"parse": _parse_candidates, "expects": "an encoder (a mapping) or a list of candidates"}


@dataclass
class EncodersSpec:
    """The image and text encoders: one each, or lists of candidates (see orchestrator.pair_rules)."""

    image: Union[EncoderSpec, list[EncoderSpec]] = field(metadata=_CANDIDATES)
    text: Union[EncoderSpec, list[EncoderSpec]] = field(metadata=_CANDIDATES)

    def __post_init__(self):
        for role in ROLES:  # results, encoder_pairs rows and grids name candidates by title
            titles = [e.title for e in self.candidates(role)]
            for i, title in enumerate(titles):
                if title in titles[:i]:
                    raise SpecError(f"two {role} candidates are both {title!r}: give each a distinct "
                                    "`label:`", path=self.path(role, i))

    def candidates(self, role: str) -> list[EncoderSpec]:
        value = getattr(self, role)
        return list(value) if isinstance(value, list) else [value]

    def path(self, role: str, index: int) -> str:
        """The key path of a candidate: ``image`` for a lone encoder, ``image[1]`` in a list."""
        return f"{role}[{index}]" if isinstance(getattr(self, role), list) else role

    @property
    def single(self) -> bool:
        """One image and one text encoder: one encoder pair."""
        return all(len(self.candidates(role)) == 1 for role in ROLES)


@dataclass
class SimilaritySpec:
    """How layer similarity is scored (METHOD.md §6).

    ``selection``: which data a similarity-based layer rule (``similar``,
    ``topK``, ``bins``) is scored on. ``per_trial`` (the official order, the
    default): each training subsample (n_train, seed) scores its own
    ``min(n_samples, N)`` pairs, drawn from the subsample with the trial's seed,
    with ``k`` by its rule at that size (an integer k is clipped to the sample).
    ``oracle``: one matrix on ``n_samples`` pairs of the FULL training split
    (drawn with ``seed``), the same for every trial: data a low-data trial was
    not given, kept as a labelled comparison. ``seed`` is the oracle's only.
    """

    metric: METRIC_NAMES = "mutual_knn"
    k: Union[int, K_RULES] = "rice"
    n_samples: int = 5000
    normalize: bool = True
    seed: int = 0
    selection: Literal["per_trial", "oracle"] = "per_trial"

    def __post_init__(self):
        # k against the sample size needs the training split: orchestrator.validation
        if isinstance(self.k, int):
            check_min(self.k, 1, "k")
        check_min(self.n_samples, 1, "n_samples")
        check_min(self.seed, 0, "seed")


@dataclass
class EncoderSelectionSpec:
    """Encoder-pair selection (freeze-align §3.1; :mod:`orchestrator.encoder_pairs`): every
    (image, text) candidate pair scored on ``probe`` before any trial, by ``metric`` on raw
    features (``cka``: linear CKA without eps, freeze-align's ``linear_CKA``). ``per_layer``
    ranks pairs by their best layer pair, ``freeze_align`` by the paper's last-layer
    embeddings; ``top``: the K of a grid's ``top`` rule."""

    probe: DatasetRef
    metric: METRIC_NAMES = "cka"
    protocol: Literal["per_layer", "freeze_align"] = "per_layer"
    top: int = 1
    n_samples: int = 5000
    k: Union[int, K_RULES] = "rice"
    normalize: bool = False
    seed: int = 0

    def __post_init__(self):
        check_min(self.top, 1, "top")
        check_min(self.n_samples, 4, "n_samples")
        check_min(self.seed, 0, "seed")
        if isinstance(self.k, int):
            check_min(self.k, 1, "k")


@dataclass
class TokensSpec:
    """Token features, for token heads (``head: token_projector``; orchestrator.token_features).

    ``memory_budget_gb``: a trial whose token sets (train, val and evaluation
    sets of its two layers, on disk) are larger reads them streamed, with its
    resident memory bounded by a few batches, instead of memory-mapped.
    """

    memory_budget_gb: float = 4.0

    def __post_init__(self):
        check_finite(self.memory_budget_gb, "memory_budget_gb")
        check_min(self.memory_budget_gb, 0, "memory_budget_gb")


@dataclass
class SweepSpec:
    """A whole sweep; build it with :func:`load_spec` (or :func:`load_run_spec`)."""

    name: str
    encoders: EncodersSpec
    data: DataSpec
    search: list[Grid] = field(metadata={  # their union; YAML: one grid or a list
        "parse": parse_search, "expects": "a grid (a mapping of dimension -> values) or a list of grids"})
    training: dict = field(default_factory=dict)
    similarity: SimilaritySpec = field(default_factory=SimilaritySpec)
    encoder_selection: Optional[EncoderSelectionSpec] = field(default=None, metadata={  # freeze-align §3.1
        "parse": lambda v, at: None if v is None else _convert(v, EncoderSelectionSpec, at)})
    tune: TuneSpec = field(default_factory=TuneSpec, metadata={"parse": TuneSpec.parse})
    tokens: TokensSpec = field(default_factory=TokensSpec)
    output_dir: Optional[str] = None  # default: runs/<name>
    cache_dir: Optional[str] = None  # default: $STRUCTURE_SWEEP_CACHE or ~/.cache/structure-sweep
    source: str = ""  # the file it came from (set by load_spec)
    # The mapping it was validated from (variables substituted): what resume
    # re-validates and check_runnable scans; set by the loader, not a spec key.
    raw: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        from_dict(TrialConfig, self.training, path="training")
        for key in ("image_layer", "text_layer"):  # every grid's layer rule would overwrite it
            if key in self.training:
                raise SpecError("layer pairs are chosen per grid: remove it and write "
                                "`layers: [image_layer, text_layer]` (or a rule: similar, last, "
                                "all, ...) in the grids", path=f"training.{key}")
        if "head" in self.training:
            check_head(self.training["head"], "training.head")
        for i, grid in enumerate(self.search):
            _check_merged(grid, self.training, f"search[{i}]")
            check_closed_form(grid, self.training, f"search[{i}]")
        _check_num_samples(self)
        check_pair_rules(self)
        check_train_data(self)
        _check_token_heads(self)
        search = self.tune.search_config
        search.metric, search.mode = _objective(self)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name).resolve()

    def resolved(self) -> dict:
        """Every value, defaults filled in, grids in the spec's own spelling."""
        return {**dataclasses.asdict(self), "search": [g.to_dict() for g in self.search],
                "tune": self.tune.to_dict()}


# --- checks across sections -----------------------------------------------------

def _check_merged(grid: Grid, training: dict, path: str) -> None:
    """Every combination as the planner builds it: the training defaults, then the
    preset's values, then the grid's. A grid's values alone may each be fine while
    their mix is not (``head: linear`` under ``training.head_options: {rank: 4}``),
    and the planner would only find out once Ray is up."""
    for combo in grid.combinations():
        values = {**training, **combo.values}
        from_dict(TrialConfig, values, path=path)
        for key, dim in grid.sample.items():
            for example in dim.examples():
                from_dict(TrialConfig, {**values, key: example}, path=path)


def _check_token_heads(spec: "SweepSpec") -> None:
    """Token heads read token features, which the token stage extracts for the layer
    pairs of planned trials: a grid search; an Optuna trial's layers are known too late."""
    from trials.head_options import needs_tokens

    if spec.tune.search_config.search == "grid":
        return
    for i, grid in enumerate(spec.search):
        for combo in grid.combinations():
            head = {**spec.training, **combo.values}.get("head", TrialConfig.head)
            if needs_tokens(head):
                raise SpecError(f"head {head!r} reads token features, extracted for the layer pairs "
                                "of planned trials: it needs `tune.search: grid` (the default); "
                                "search its options with list dimensions instead of Optuna",
                                path=f"search[{i}]")


def _check_num_samples(spec: "SweepSpec") -> None:
    """``num_samples`` only draws sampled dimensions (or Optuna trials); on a
    grid search without them every repeat would be the same trial."""
    tune = spec.tune.search_config
    if tune.search != "grid":
        return
    advice = ("num_samples only applies to sampled dimensions ({choice|uniform|loguniform|randint: "
              "...}) or to tune.search: optuna. Remove it, or repeat with a `seed: [0, 1, ...]` dimension")
    for i, grid in enumerate(spec.search):
        n = grid.num_samples
        if n is not None and n > 1 and not grid.sample:
            raise SpecError(f"num_samples: {n} has no effect on a grid without sampled dimensions "
                            f"(every repeat is the same trial); {advice}", path=f"search[{i}].num_samples")
    if tune.num_samples > 1 and not any(g.sample for g in spec.search):
        raise SpecError(f"num_samples: {tune.num_samples} has no effect: no grid has a sampled "
                        f"dimension and tune.search is 'grid'; {advice}", path="tune.num_samples")


def _objective(spec: "SweepSpec") -> tuple[str, str]:
    """(metric, mode) Optuna optimises; checked against the spec's evaluation sets.

    Default metric: the headline metric (:func:`orchestrator.schema.choose_headline`,
    the rule the report and ``status`` use) among the names this spec produces.
    Default mode: "min" for a metric whose name contains "loss", else "max".
    """
    zs = [r.name for r in spec.data.zero_shot]
    ret = [r.name for r in spec.data.retrieval]
    valid = metric_names(zs, ret)
    metric, mode = spec.tune.search_config.metric, spec.tune.search_config.mode
    if metric is None:
        metric = choose_headline(valid) or "best_val_loss"
    elif metric not in valid:
        sets = f"zero-shot sets: {zs or 'none'}; retrieval sets: {ret or 'none'}"
        raise SpecError(f"unknown metric {metric!r}{did_you_mean(metric, valid)}; {sets}. "
                        "Valid names: 'zs/<set>/<top1|top1_macro|top5>', "
                        "'ret/<set>/<official|standard>/<I2T|T2I>/<R@k|P@k|MAP@k>' (k = 1, 5, 10) "
                        f"or 'best_val_loss'; for this spec: {', '.join(valid)}",
                        path="tune.metric")
    return metric, mode or default_mode(metric)


# --- loading -------------------------------------------------------------------

def check_runnable(spec: SweepSpec) -> World:
    """Reject, before any Ray work, a spec whose variables are still unset, or that
    the world contradicts (:func:`orchestrator.validation.check_world`: layer
    counts, dataset sizes and paths, model names); returns what was learnt."""
    missing = unresolved_variables(spec.raw)
    if missing:
        where = "; ".join(f"{p} uses ${{{v}}}" for p, v in missing)
        names = " ".join(sorted({f"{v}=..." for _, v in missing}))
        raise SpecError(f"environment variables not set: {where}. Set them (e.g. `export {names}`) "
                        "to the dataset/model paths, or write the paths into the spec",
                        source=spec.source)
    return check_world(spec)


def _validate(data: Any, source: str) -> SweepSpec:
    if not isinstance(data, dict):
        raise SpecError("a spec must be a YAML mapping", source=source)
    try:
        check_finite(data)
        spec = from_dict(SweepSpec, data)
    except SpecError as err:
        raise SpecError(err.reason, path=err.path, source=source) from None
    spec.source, spec.raw = source, data
    return spec


def load_spec(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """Parse and validate a spec file (safe YAML: no Python objects)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}", source=str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise SpecError(f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at offset {err.start}); "
                        "save the spec as UTF-8", source=str(path)) from None
    except yaml.YAMLError as err:
        raise SpecError(f"not valid YAML: {_yaml_problem(err)}", source=str(path)) from None
    if not isinstance(data, dict):
        raise SpecError("a spec must be a YAML mapping", source=str(path))
    data = substitute_env({**data, **(overrides or {})})
    return _validate(data, str(path))


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error in one line: what and where (its own text spans several)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    context = getattr(err, "context", None)
    return f"{problem}{where}" + (f" ({context})" if context else "")


def save_spec(spec: SweepSpec, run_dir: Path) -> None:
    """RUN_DIR/spec.json: the resolved spec, plus the raw one that resume reloads."""
    resolved = {**spec.resolved(), "raw": {**spec.raw, "output_dir": str(run_dir)}}
    atomic_write_bytes(run_dir / SPEC_FILE, json.dumps(resolved, indent=2, default=str).encode())


def load_run_spec(run_dir: str | Path) -> SweepSpec:
    """The spec a run directory was started with (for ``structure-sweep resume``)."""
    run_dir = Path(run_dir)
    file = run_dir / SPEC_FILE
    if not file.is_file():
        raise FileNotFoundError(f"{run_dir} has no {SPEC_FILE}: is it a run directory written "
                                "by `structure-sweep run`?")
    saved = json.loads(file.read_text())
    if not isinstance(saved.get("raw"), dict):
        raise SpecError("no 'raw' spec to resume from; run the spec again with --out", source=str(file))
    spec = _validate({**saved["raw"], "output_dir": str(run_dir.resolve())}, str(file))
    spec.source = saved.get("source") or str(file)
    return spec
