"""The planted synthetic world of the ``synthetic:`` encoders (the offline demo)."""

from __future__ import annotations

import numpy as np

import inspect

from orchestrator.datasets.base import (
    DatasetError,
    DatasetOptionError,
    Split,
    SplitIndex,
    fingerprint,
    register_dataset,
)

SYNTHETIC_VERSION = 1
_SPLIT_OFFSETS = {"train": 1, "val": 2, "test": 3}


def synthetic_index(split: str, options: dict, count: bool) -> SplitIndex:
    """Its size is an option: ``size`` images x ``captions_per_image`` pairs."""
    if split not in _SPLIT_OFFSETS:
        raise DatasetOptionError(f"synthetic dataset has splits {list(_SPLIT_OFFSETS)}, not {split!r}",
                                 "split")
    defaults = {k: p.default for k, p in inspect.signature(synthetic).parameters.items()}
    size, per_image = (options.get(k, defaults[k]) for k in ("size", "captions_per_image"))
    for key, value in (("size", size), ("captions_per_image", per_image)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DatasetOptionError(f"synthetic dataset: {key} must be an integer >= 1, "
                                     f"got {value!r}", f"options.{key}")
    where = "options.size" if "size" in options else f"default size {size}"
    return SplitIndex(size * per_image, where + (f" x captions_per_image {per_image}" if per_image > 1 else ""))


@register_dataset("synthetic", kind="classification", index=synthetic_index)
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
