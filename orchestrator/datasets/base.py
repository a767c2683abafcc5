"""The dataset registry and the Split every dataset returns (see the package
docstring). The built-in datasets import this module, never the package, so
the package can import them without an import cycle."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from orchestrator.keys import content_key
from trials.registry import Registry, did_you_mean


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names it and the fix."""


class DatasetOptionError(DatasetError):
    """A dataset reference that cannot work (a path that does not exist, ...);
    ``key`` names the culprit relative to the reference (``options.root``,
    ``split``), so a spec error can point at it."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class SplitIndex:
    """What is known of a split without loading it: its number of (image, caption)
    pairs (None: known only at run time) and how that was found out (or why not)."""

    pairs: Optional[int]
    source: str


# Name -> factory ``f(split, **options) -> Split``, with metadata ``kind``.
DATASETS: Registry[Callable[..., "Split"]] = Registry("dataset", error=DatasetError)
# The optional Split fields each kind of dataset promises to fill (every split
# has images, texts, text_to_image and fingerprint); zero-shot needs them.
KIND_FIELDS = {
    "paired": (),
    "classification": ("labels", "class_names", "prompts"),
}


@dataclass
class Split:
    """One split: unique images, caption rows, and optional class prompts.

    ``images`` may be a lazy sequence (:class:`~orchestrator.datasets.files.ImageFiles`,
    :class:`~orchestrator.datasets.files.LazyImages`): slicing it loads only
    that slice, so an encoder batch is the unit of image I/O.
    """

    images: Sequence[Any]
    texts: Sequence[Any]
    text_to_image: np.ndarray  # [len(texts)] image index of each caption row
    fingerprint: str
    labels: Optional[np.ndarray] = None  # [len(images)] class index
    class_names: Optional[list[str]] = None
    prompts: Optional[list[list[Any]]] = None  # [C][T] class-name x template texts
    # Narrower content keys of single fields (e.g. "images": the image files
    # alone, so splits that differ only in captions share image features).
    field_fingerprints: dict[str, str] = dataclass_field(default_factory=dict)

    def inputs(self, field: str) -> Sequence:
        """The encoder inputs of ``field`` ("images", "texts" or "prompts"),
        as a sliceable sequence (lazy sequences stay lazy)."""
        if field == "prompts":
            return [t for per_class in self.prompts or [] for t in per_class]
        return getattr(self, field)

    def field_fingerprint(self, field: str) -> str:
        """Content identity of one field's inputs.

        Text prompts depend only on class names and templates, so they are
        keyed by their own text: the train and test splits of a dataset (or
        two datasets with the same classes) share one cached prompt entry.
        """
        if field in self.field_fingerprints:
            return self.field_fingerprints[field]
        prompts = self.inputs("prompts") if field == "prompts" else None
        if prompts and all(isinstance(p, str) for p in prompts):
            return fingerprint("prompts", [len(p) for p in self.prompts], prompts)
        return self.fingerprint


def register_dataset(name: str, *, kind: str = "paired", index: Optional[Callable] = None) -> Callable:
    """Decorator: ``@register_dataset("coco")`` on a factory ``f(split, **options)``;
    ``kind`` says which fields its splits fill (:data:`KIND_FIELDS`). A name
    registered twice is an error. ``index(split, options, count) -> SplitIndex``
    checks a split's paths and, with ``count``, counts its pairs cheaply (from
    annotation files, never decoding an image): what validation knows before a run."""
    if kind not in KIND_FIELDS:
        raise ValueError(f"dataset {name!r}: kind must be one of {sorted(KIND_FIELDS)}, not {kind!r}")
    return DATASETS.register(name, kind=kind, index=index)


def dataset_names() -> list[str]:
    return DATASETS.names()


def load_split(dataset: str, split: str, options: dict | None = None) -> Split:
    """Load ``split`` of the registered ``dataset`` with its ``options``."""
    factory = DATASETS.get(dataset)
    try:
        return factory(split, **(options or {}))
    except TypeError as err:  # an unknown option: say which dataset got it
        if "unexpected keyword" not in str(err):
            raise
        raise DatasetError(f"dataset {dataset!r}: {err}") from err


def split_index(dataset: str, split: str, options: dict, *, count: bool) -> SplitIndex:
    """The registered dataset's cheap :class:`SplitIndex` of ``split``; DatasetError
    (DatasetOptionError naming the option) for what would fail when it is loaded."""
    _check_options(dataset, options)
    index = DATASETS.meta(dataset).get("index")
    if index is None:
        return SplitIndex(None, f"unknown until run (dataset {dataset!r} has no cheap index)")
    return index(split, dict(options), count)


def _check_options(dataset: str, options: dict) -> None:
    """Option names against the factory's keywords (a typo fails at load time otherwise)."""
    params = inspect.signature(DATASETS.get(dataset)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # passes its options on (torchvision classes): not checkable here
    allowed = [n for n in params if n != "split"]
    for key in options:
        if key not in allowed:
            raise DatasetOptionError(f"dataset {dataset!r} has no option {key!r}"
                                     f"{did_you_mean(key, allowed)}; options: {', '.join(allowed)}", f"options.{key}")


def fingerprint(*parts: Any) -> str:
    """A stable content hash of JSON-serialisable parts."""
    return content_key(list(parts), 24)

