"""Dataset registry: named sources of paired (image, caption) data and
zero-shot classification sets, each split loaded as a :class:`Split`.

A dataset is one decorated factory ``f(split, **options) -> Split``. Inputs in
a split are whatever the encoders take (PIL images, strings, or the planted
latents of the synthetic world); real images are a lazy sequence (paths or
loaders) read one encoder batch at a time. The feature store caches the
encoders' outputs under the split's ``fingerprint``, a cheap hash of the
split's content identity (never of where the files live).

Built in: ``synthetic`` (the planted pair), ``coco``, ``flickr30k``, ``pairs``
(a CSV/Parquet table of image path + caption), ``image_folder``
(``root/<class>/<image>``) and the torchvision-backed classification sets
(``cifar10``, ``cifar100``, ``stl10``, ``food101``, ``pets``, ``flowers``,
``dtd``, ``mnist``). Importing this package imports neither torch nor
torchvision, so a spec is validated without them.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, Callable, Optional, Sequence

import numpy as np

from orchestrator.keys import content_key

_REGISTRY: dict[str, Callable[..., "Split"]] = {}


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names it and the fix."""


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


def register_dataset(name: str) -> Callable:
    """Decorator: ``@register_dataset("coco")`` on a factory ``f(split, **options)``."""

    def deco(factory: Callable[..., Split]) -> Callable[..., Split]:
        _REGISTRY[name] = factory
        return factory

    return deco


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def load_split(dataset: str, split: str, options: dict | None = None) -> Split:
    """Load ``split`` of the registered ``dataset`` with its ``options``."""
    if dataset not in _REGISTRY:
        raise DatasetError(f"unknown dataset {dataset!r}; registered: {', '.join(dataset_names())}")
    try:
        return _REGISTRY[dataset](split, **(options or {}))
    except TypeError as err:  # an unknown option: say which dataset got it
        if "unexpected keyword" not in str(err):
            raise
        raise DatasetError(f"dataset {dataset!r}: {err}") from err


def fingerprint(*parts: Any) -> str:
    """A stable content hash of JSON-serialisable parts."""
    return content_key(list(parts), 24)


# Importing these registers the built-in datasets (after the names above exist).
from orchestrator.datasets import captions, classification, synthetic  # noqa: E402,F401
from orchestrator.datasets.synthetic import SYNTHETIC_VERSION  # noqa: E402,F401
