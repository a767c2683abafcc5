"""Dataset registry: named sources of paired (image, caption) data and
zero-shot classification sets, each split loaded as a :class:`Split`.

A dataset is one decorated factory ``f(split, **options) -> Split``. Inputs in
a split are whatever the encoders take (PIL images, strings, or the planted
latents of the synthetic world); the feature store caches the encoders'
outputs under the split's ``fingerprint``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

_REGISTRY: dict[str, Callable[..., "Split"]] = {}


class DatasetError(ValueError):
    """A dataset that cannot be loaded; the message names it and the fix."""


@dataclass
class Split:
    """One split: unique images, caption rows, and optional class prompts."""

    images: Sequence[Any]
    texts: Sequence[Any]
    text_to_image: np.ndarray  # [len(texts)] image index of each caption row
    fingerprint: str
    labels: Optional[np.ndarray] = None  # [len(images)] class index
    class_names: Optional[list[str]] = None
    prompts: Optional[list[list[Any]]] = None  # [C][T] class-name x template texts

    def inputs(self, field: str) -> list:
        """The encoder inputs of ``field``: "images", "texts" or "prompts"."""
        if field == "prompts":
            return [t for per_class in self.prompts or [] for t in per_class]
        return list(getattr(self, field))


def register_dataset(name: str) -> Callable:
    def deco(factory: Callable[..., Split]) -> Callable[..., Split]:
        _REGISTRY[name] = factory
        return factory

    return deco


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def load_split(dataset: str, split: str, options: dict | None = None) -> Split:
    if dataset not in _REGISTRY:
        raise DatasetError(f"unknown dataset {dataset!r}; registered: {', '.join(dataset_names())}")
    return _REGISTRY[dataset](split, **(options or {}))


def fingerprint(*parts: Any) -> str:
    """A stable content hash of JSON-serialisable parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


# --- the planted synthetic world ---------------------------------------------------

SYNTHETIC_VERSION = 1
_SPLIT_OFFSETS = {"train": 1, "val": 2, "test": 3}


@register_dataset("synthetic")
def synthetic(split: str, *, size: int = 2000, n_classes: int = 10, latent_dim: int = 16,
              noise_dim: int = 32, captions_per_image: int = 1, templates: int = 4,
              class_spread: float = 1.2, caption_noise: float = 0.2, seed: int = 0) -> Split:
    """Paired samples of latent classes for the ``synthetic:`` encoders.

    An image input is ``[z, p]``: the sample's semantic latent ``z`` (its class
    centre plus spread) and an image-private nuisance ``p``. A caption input is
    ``[z + caption noise, p']`` with its own nuisance. The encoders mix ``z``
    and ``p`` per layer so that one planted layer of each carries the most
    shared structure. Class centres depend only on ``seed``, so every split
    sees the same classes; samples of each split are drawn independently.
    """
    if split not in _SPLIT_OFFSETS:
        raise DatasetError(f"synthetic dataset has splits {list(_SPLIT_OFFSETS)}, not {split!r}")
    centres = np.random.default_rng(seed).standard_normal((n_classes, latent_dim))
    rng = np.random.default_rng([seed, _SPLIT_OFFSETS[split]])
    labels = rng.integers(n_classes, size=size)
    z = centres[labels] + class_spread * rng.standard_normal((size, latent_dim))
    images = np.concatenate([z, rng.standard_normal((size, noise_dim))], axis=1)
    text_to_image = np.repeat(np.arange(size), captions_per_image)
    z_text = z[text_to_image] + caption_noise * rng.standard_normal((len(text_to_image), latent_dim))
    texts = np.concatenate([z_text, rng.standard_normal((len(text_to_image), noise_dim))], axis=1)
    prompt_z = centres[:, None] + caption_noise * rng.standard_normal((n_classes, templates, latent_dim))
    prompt_p = rng.standard_normal((n_classes, templates, noise_dim))
    prompts = np.concatenate([prompt_z, prompt_p], axis=2)
    options = dict(size=size, n_classes=n_classes, latent_dim=latent_dim, noise_dim=noise_dim,
                   captions_per_image=captions_per_image, templates=templates,
                   class_spread=class_spread, caption_noise=caption_noise, seed=seed)
    return Split(
        images=images.astype(np.float32), texts=texts.astype(np.float32),
        text_to_image=text_to_image, labels=labels,
        class_names=[f"class {c}" for c in range(n_classes)],
        prompts=[list(p) for p in prompts.astype(np.float32)],
        fingerprint=fingerprint("synthetic", SYNTHETIC_VERSION, split, options),
    )
