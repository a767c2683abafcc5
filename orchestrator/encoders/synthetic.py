"""``synthetic:image`` / ``synthetic:text``: the planted encoder pair.

Each layer ``l`` mixes the shared semantic latent ``z`` and the modality's
private nuisance ``p`` of an input ``[z, p]`` (see the ``synthetic`` dataset):
``h_l = a_l A z + sqrt(1 - a_l^2) B p`` and the feature is
``tanh(R_l h_l)``. The shared-structure weight ``a_l`` reaches ``peak`` at
``planted_layer`` and falls off with distance, so the planted (image, text)
layer pair is the most similar pair and the best one to align. ``A`` and ``B``
are shared by the layers of one encoder, so neighbouring layers resemble each
other as in a real network.
"""

from __future__ import annotations

import numpy as np

import inspect

from orchestrator.encoders import Encoder, EncoderInfo, EncoderOptionError, register_encoder

_MODALITIES = {"image": 11, "text": 23}  # seed offsets: the two encoders differ


class PlantedEncoder(Encoder):
    """A frozen, deterministic function of the planted latents."""

    model = None

    def __init__(self, modality: str, *, layers: int = 6, dim: int = 64, planted_layer: int = 3,
                 latent_dim: int = 16, noise_dim: int = 32, floor: float = 0.15, peak: float = 0.8,
                 width: float = 1.5, seed: int = 0):
        if not 0 <= planted_layer < layers:
            raise ValueError(f"planted_layer must be in [0, {layers}), got {planted_layer}")
        if not 0 <= floor <= peak <= 1:
            raise ValueError(f"need 0 <= floor <= peak <= 1, got floor={floor}, peak={peak}")
        self.modality, self.num_layers, self.dim = modality, layers, dim
        self.options = dict(layers=layers, dim=dim, planted_layer=planted_layer,
                            latent_dim=latent_dim, noise_dim=noise_dim, floor=floor, peak=peak,
                            width=width, seed=seed)
        rng = np.random.default_rng([seed, _MODALITIES[modality]])
        self.latent_dim = latent_dim
        self.shared = rng.standard_normal((latent_dim, dim)) / np.sqrt(latent_dim)
        self.private = rng.standard_normal((noise_dim, dim)) / np.sqrt(noise_dim)
        self.mixers = np.stack([np.linalg.qr(rng.standard_normal((dim, dim)))[0]
                                for _ in range(layers)])
        distance = np.arange(layers) - planted_layer
        self.strength = floor + (peak - floor) * np.exp(-(distance / width) ** 2)

    def encode(self, batch) -> np.ndarray:
        x = np.asarray(batch, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.latent_dim + self.private.shape[0]:
            raise ValueError(f"synthetic:{self.modality} takes planted inputs of width "
                             f"latent_dim + noise_dim = {self.latent_dim + self.private.shape[0]}, "
                             f"got shape {x.shape}: give the encoder and the synthetic dataset "
                             "the same latent_dim and noise_dim")
        z, p = x[:, : self.latent_dim] @ self.shared, x[:, self.latent_dim:] @ self.private
        a = self.strength[:, None, None]
        h = a * z[None] + np.sqrt(1 - a**2) * p[None]  # [L, B, D]
        features = np.tanh(np.einsum("lbd,lde->lbe", h, self.mixers))
        return features.transpose(1, 0, 2).astype(np.float32)

    def identity(self) -> dict:
        return {"encoder": f"synthetic:{self.modality}", "version": 1, **self.options}


def describe_synthetic(rest: str, pool, options: dict) -> EncoderInfo:
    """Built for real: a planted encoder is a few small matrices, and building it
    checks every option exactly as the run will."""
    if rest not in _MODALITIES:
        raise EncoderOptionError(f"synthetic encoder must be 'synthetic:image' or 'synthetic:text', "
                                 f"not 'synthetic:{rest}'", "name")
    allowed = [p for p in inspect.signature(PlantedEncoder).parameters if p != "modality"]
    for key in options:
        if key not in allowed:
            raise EncoderOptionError(f"synthetic encoder has no option {key!r}; options: "
                                     f"{', '.join(allowed)}", f"options.{key}")
    try:
        encoder = PlantedEncoder(rest, **options)
    except (TypeError, ValueError) as err:  # a value of the wrong type or out of range
        named = [key for key in options if key in str(err)]  # the option the message names
        raise EncoderOptionError(f"synthetic encoder: {err}", ".".join(["options", *named[:1]])) from None
    where = "options.layers" if "layers" in options else "the synthetic default"
    return EncoderInfo(encoder.num_layers, where)


@register_encoder("synthetic", describe=describe_synthetic)
def _build(rest: str, *, pool=None, dtype="float32", device="cpu", **options) -> PlantedEncoder:
    if rest not in _MODALITIES:
        raise ValueError(f"synthetic encoder must be 'synthetic:image' or 'synthetic:text', "
                         f"not 'synthetic:{rest}'")
    return PlantedEncoder(rest, **options)
