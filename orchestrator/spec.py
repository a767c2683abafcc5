"""The sweep spec: YAML -> typed, validated :class:`SweepSpec`.

Everything that can be wrong with a spec is caught here, before any Ray work:
unknown keys, wrong types, unknown encoders, datasets, heads or search
dimensions. Errors name the file, the key path and the allowed values.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from orchestrator.config import SpecError, did_you_mean, from_dict
from trials.config import TrialConfig
from trials.presets import get_preset, list_presets

# Layer rules a grid may use; "topK" (e.g. "top3") is also accepted.
LAYER_RULES = ("all", "last", "best")
DTYPES = Literal["float32", "bfloat16", "float16"]


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

    def __post_init__(self):
        from orchestrator.encoders import UnknownEncoderError, split_name

        try:
            split_name(self.name)
        except UnknownEncoderError as err:
            raise SpecError(str(err), path="name") from None


@dataclass
class EncodersSpec:
    image: EncoderSpec
    text: EncoderSpec


@dataclass
class DatasetRef:
    """A split of a registered dataset; ``options`` go to the dataset (paths...)."""

    dataset: str
    split: str = "train"
    name: Optional[str] = None  # label in results; defaults to the dataset name
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        from orchestrator.datasets import dataset_names

        if self.dataset not in dataset_names():
            raise SpecError(f"unknown dataset {self.dataset!r}{did_you_mean(self.dataset, dataset_names())}; registered: "
                            f"{', '.join(dataset_names())}", path="dataset")
        self.name = self.name or self.dataset


@dataclass
class DataSpec:
    """Paired train/val data and the evaluation sets."""

    train: DatasetRef
    val: DatasetRef
    zero_shot: list[DatasetRef] = field(default_factory=list)
    retrieval: list[DatasetRef] = field(default_factory=list)


@dataclass
class SimilaritySpec:
    """How layer similarity is scored (METHOD.md §6)."""

    metric: Literal["mutual_knn", "cycle_knn", "cka", "unbiased_cka", "cknna"] = "mutual_knn"
    k: Union[int, Literal["rice", "sqrt", "sturges"]] = "rice"
    n_samples: int = 5000
    normalize: bool = True
    seed: int = 0


@dataclass
class TuneSpec:
    """How Ray Tune schedules the trials."""

    search: Literal["grid"] = "grid"
    scheduler: Literal["fifo"] = "fifo"
    max_concurrent_trials: int = 0  # 0: one per CPU of the cluster
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 1
    device: str = "cpu"  # where a trial trains its heads


@dataclass
class SweepSpec:
    name: str
    encoders: EncodersSpec
    data: DataSpec
    search: Union[list[dict], dict]  # one grid, or a list of grids (their union)
    training: dict = field(default_factory=dict)
    similarity: SimilaritySpec = field(default_factory=SimilaritySpec)
    tune: TuneSpec = field(default_factory=TuneSpec)
    output_dir: Optional[str] = None  # default: runs/<name>
    cache_dir: Optional[str] = None  # default: $STRUCTURE_SWEEP_CACHE or ~/.cache/structure-sweep
    source: str = ""  # the file it came from (set by load_spec)

    def __post_init__(self):
        _trial_overrides(self.training, "training")
        if "head" in self.training:
            _check_head(self.training["head"], "training.head")
        if isinstance(self.search, dict):
            self.search = [self.search]
        self.search = [_check_grid(g, f"search[{i}]") for i, g in enumerate(self.search)]
        if not self.search:
            raise SpecError("needs at least one grid", path="search")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir or Path("runs") / self.name).resolve()


# --- search grids -------------------------------------------------------------

TRIAL_FIELDS = {f.name for f in dataclasses.fields(TrialConfig)} - {"image_layer", "text_layer"}
GRID_KEYS = ("name", "layers", "preset")


def _trial_overrides(values: dict, path: str) -> TrialConfig:
    """Validate a mapping of TrialConfig fields (unknown keys, types)."""
    return from_dict(TrialConfig, values, path=path)


def _check_grid(grid: Any, path: str) -> dict:
    """A grid maps dimension -> value or list of values (every combination runs)."""
    if not isinstance(grid, dict):
        raise SpecError("a grid must be a mapping of dimension -> values", path=path)
    for key in grid:
        if key not in TRIAL_FIELDS and key not in GRID_KEYS:
            raise SpecError(f"unknown search dimension {key!r}{did_you_mean(key, TRIAL_FIELDS)}; allowed: "
                            f"{', '.join(GRID_KEYS + tuple(sorted(TRIAL_FIELDS)))}",
                            path=f"{path}.{key}")
    grid = {k: (v if isinstance(v, list) and k not in ("head_options",) else [v])
            for k, v in grid.items()}
    grid.setdefault("name", [path.replace("search", "grid")])
    if "layers" in grid:
        grid["layers"] = [_check_layers(v, f"{path}.layers") for v in grid["layers"]]
    for head in grid.get("head", []):
        _check_head(head, f"{path}.head")
    for preset in grid.get("preset", []):
        if preset not in list_presets():
            raise SpecError(f"unknown preset {preset!r}{did_you_mean(preset, list_presets())}; "
                            f"presets: {', '.join(list_presets())}", path=f"{path}.preset")
    for combo in _combinations({k: v for k, v in grid.items() if k in TRIAL_FIELDS}):
        _trial_overrides(combo, path)
    return grid


def _check_head(name: str, path: str) -> None:
    from trials.heads import list_heads  # imports torch: only when a spec names a head

    if name not in list_heads():
        raise SpecError(f"unknown head {name!r}{did_you_mean(name, list_heads())}; "
                        f"heads: {', '.join(list_heads())}", path=path)


def _check_layers(value: Any, path: str) -> Union[str, tuple]:
    """'all' | 'last' | 'best' | 'topK' | [i, j] (an explicit layer pair)."""
    if isinstance(value, str) and (value in LAYER_RULES or _top_k(value)):
        return value
    if (isinstance(value, list) and len(value) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        return tuple(value)
    raise SpecError(f"{value!r} is not a layer choice; expected one of {', '.join(LAYER_RULES)}, "
                    "'topK' (e.g. 'top3') or an [image_layer, text_layer] pair", path=path)


def _top_k(rule: str) -> int:
    return int(rule[3:]) if rule.startswith("top") and rule[3:].isdigit() else 0


def _combinations(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*grid.values())]


def expand_grid(grid: dict) -> list[dict]:
    """Every combination of one grid, presets unfolded into trial values.

    Each combination has ``name``, ``layers`` (a rule, from the grid or the
    preset, default "best") and TrialConfig values, in increasing precedence:
    the preset's, then the grid's own dimensions.
    """
    return [_unfold_preset(combo) for combo in _combinations(grid)]


def _unfold_preset(combo: dict) -> dict:
    preset = combo.pop("preset", None)
    if preset is None:
        return {"layers": "best", **combo}
    p = get_preset(preset)
    values = {"head": p["head"], "head_options": p["head_options"], "out_dim": p["out_dim"],
              **p["loss"], **p["train"]}
    return {"layers": p["layer_rule"], **values, "preset": preset, **combo}


# --- loading -------------------------------------------------------------------

def load_spec(path: str | Path, overrides: dict | None = None) -> SweepSpec:
    """Parse and validate a spec file (safe YAML: no Python objects)."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"spec file not found: {path}", source=str(path))
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SpecError(f"not valid YAML: {err}", source=str(path)) from None
    if not isinstance(data, dict):
        raise SpecError("a spec must be a YAML mapping", source=str(path))
    data = {**data, **(overrides or {})}
    try:
        spec = from_dict(SweepSpec, data)
    except SpecError as err:
        raise SpecError(err.reason, path=err.path, source=str(path)) from None
    spec.source = str(path)
    return spec
