"""Encoder registry: frozen models of one modality that return every layer.

An encoder name is ``<prefix>:<rest>`` (``timm:vit_small_patch16_224``,
``hf:sentence-transformers/all-MiniLM-L6-v2``, ``synthetic:image``). Each prefix
is registered once with :func:`register_encoder`; :func:`build_encoder` is the
one way to make an encoder from a name.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import json
import os
import pathlib
from typing import Any, Callable, Iterable

import numpy as np

from trials.registry import Registry

# Modules whose import registers the built-in prefixes (imported lazily so a
# spec can be validated without importing timm or transformers).
_BUILTIN_MODULES = {
    "timm": "orchestrator.encoders.timm_encoder",
    "hf": "orchestrator.encoders.hf_encoder",
    "synthetic": "orchestrator.encoders.synthetic",
}
# Compute dtypes an encoder may run in; features always come back as float32.
DTYPES = ("float32", "bfloat16", "float16")
# Name prefixes that mark a model reference as a local path, never a Hub id.
_PATH_PREFIXES = ("/", "./", "../", "~")


class UnknownEncoderError(ValueError):
    """An encoder name whose prefix no one registered."""


class EncoderOptionError(ValueError):
    """An encoder setting that cannot work; ``key`` names it relative to the
    encoder's spec entry (``pool``, ``options.arch``), so a spec error can point at it."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


# Prefix -> factory ``f(rest, *, pool, dtype, device, **options) -> Encoder``.
ENCODERS: Registry[Callable[..., "Encoder"]] = Registry("encoder prefix", error=UnknownEncoderError)


class EncoderWeightsMissing(RuntimeError):
    """The weights of a named encoder cannot be found locally or downloaded.

    The message names the model and says how to provide the weights (a cache
    under ``HF_HOME``, a local path, a pre-download command).
    """


class Encoder(abc.ABC):
    """A frozen encoder that returns pooled features of every layer.

    Subclasses set ``modality`` ("image" or "text"), ``num_layers``, ``dim``
    and ``model`` (the frozen torch module, or None for synthetic encoders).
    """

    modality: str
    num_layers: int
    dim: int
    model: Any = None

    @abc.abstractmethod
    def encode(self, batch: Any) -> np.ndarray:
        """Features of a batch as float32 numpy, shape [B, num_layers, dim]."""

    @abc.abstractmethod
    def identity(self) -> dict:
        """Everything besides the input data that determines the features:
        name, weights revision or hash, pooling, dtype, preprocessing, layer
        indexing. JSON-serialisable; it becomes part of the feature cache key."""

    # Prefix tokens (class, register, distillation) before the local ones; 0 for text.
    num_prefix: int = 0
    # What a token layer index means (part of token_identity(); change it when that changes).
    token_layout: str = ""

    def encode_tokens(self, batch: Any, layer: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Every token of one layer (same indexing as :meth:`encode`; negative
        counts from the end): ``(prefix [B, K, D], [local [L_i, D] per sample])``,
        float32 numpy. Encoders without tokens raise NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__} has no token features")

    def token_identity(self) -> dict:
        """What determines the token features: :meth:`identity` without the
        pooling, which tokens do not depend on (encoders that pool differently
        share their token entries)."""
        identity = {key: value for key, value in self.identity().items() if key != "pool"}
        return {**identity, "tokens": self.token_layout}

    def resolve_layer(self, layer: int) -> int:
        """``layer`` as an index in ``[0, num_layers)``; negative counts from the end."""
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(f"layer {layer} out of range for an encoder of {self.num_layers} layers "
                             f"(0..{self.num_layers - 1}, or -1..-{self.num_layers} from the end)")
        return layer % self.num_layers


def weights_digest(paths: Iterable[str | os.PathLike]) -> str:
    """sha256 over the base names and bytes of ``paths``, in name order.

    Identifies local weight files by content, so a copied or moved folder keeps
    its feature-cache key while an edited one gets a new key.
    """
    digest = hashlib.sha256()
    for path in sorted(map(pathlib.Path, paths), key=lambda p: p.name):
        digest.update(path.name.encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    """Plain JSON types (tuples become lists, paths and other objects strings)."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def torch_dtype(name: str) -> Any:
    """The torch dtype called ``name`` (one of :data:`DTYPES`), clear error otherwise."""
    if name not in DTYPES:
        raise ValueError(f"unknown encoder dtype {name!r}: expected one of {list(DTYPES)}")
    import torch  # lazily: specs are validated without importing torch

    return getattr(torch, name)


def snapshot_commit(path: str | os.PathLike | None) -> str | None:
    """The commit hash of a Hugging Face cache path (``.../snapshots/<hash>/...``).

    Files in the hub cache live under the commit they were downloaded at, so
    the path of any loaded file tells the exact revision; None elsewhere.
    """
    if not path:
        return None
    parts = pathlib.Path(path).parts
    for i, part in enumerate(parts[:-1]):
        if part == "snapshots" and len(parts[i + 1]) == 40:
            return parts[i + 1]
    return None


@dataclasses.dataclass(frozen=True)
class EncoderInfo:
    """What is known of an encoder without loading its weights: its number of
    layers (None: known only once it is loaded) and where that came from (or why
    it is unknown), plus a note on its weights when they cannot be checked."""

    num_layers: int | None
    source: str
    weights: str = ""


@dataclasses.dataclass(frozen=True)
class TokenCount:
    """Token features of an encoder, known without its weights: width ``dim``,
    ``num_prefix`` prefix tokens per sample, and local tokens per sample: a
    fixed ``local`` (images), or one length per text in ``lengths`` (texts
    tokenised), or at most ``local`` per text (``bound``: an upper bound when
    the tokenizer is not at hand). ``detail`` says what it depends on ("256 px")."""

    dim: int
    num_prefix: int
    local: int = 0
    lengths: Any = None
    bound: bool = False
    detail: str = ""


def has_token_features(name: str) -> bool:
    """Whether encoder ``name``'s prefix extracts token features (registered ``tokens=``)."""
    prefix, _ = split_name(name)
    _factory(prefix)
    return ENCODERS.meta(prefix).get("tokens") is not None


def count_tokens(name: str, options: dict | None = None, texts: Any = None) -> TokenCount | str:
    """The prefix's ``tokens(rest, options, texts)`` (registered as metadata, like
    ``describe``): token counts of ``name`` without loading its weights; a
    string saying why when they cannot be known before the run."""
    prefix, rest = split_name(name)
    _factory(prefix)
    count = ENCODERS.meta(prefix).get("tokens")
    if count is None:
        return f"encoder prefix {prefix!r} has no token features"
    if isinstance(count, str):  # "module:function", imported when first needed
        module, _, attr = count.partition(":")
        count = getattr(importlib.import_module(module), attr)
    return count(rest, dict(options or {}), texts)


def describe_encoder(name: str, *, pool: str | None = None, options: dict | None = None) -> EncoderInfo:
    """The prefix's cheap ``describe(rest, pool, options)`` (registered as metadata):
    layer count from the model's config, never its weights. Raises what building
    it would raise for a name or option that cannot work (UnknownEncoderError,
    EncoderWeightsMissing for a local path that does not exist, ValueError)."""
    prefix, rest = split_name(name)
    _factory(prefix)
    describe = ENCODERS.meta(prefix).get("describe")
    if describe is None:
        return EncoderInfo(None, f"unknown until run (encoder prefix {prefix!r} has no cheap description)")
    if isinstance(describe, str):  # "module:function", imported when first needed
        module, _, attr = describe.partition(":")
        describe = getattr(importlib.import_module(module), attr)
    return describe(rest, pool, dict(options or {}))


def register_encoder(prefix: str, **meta: Any) -> Callable:
    """Decorator: ``@register_encoder("timm")`` on a factory ``f(rest, **kw)``;
    a prefix registered twice is an error, and so is a built-in prefix taken
    by another module before its own module was (lazily) imported. Metadata
    ``describe=f(rest, pool, options) -> EncoderInfo`` (or its ``"module:name"``)
    tells validation the layer count without loading weights (:func:`describe_encoder`)."""
    add = ENCODERS.register(prefix, **meta)

    def deco(factory: Callable[..., Encoder]) -> Callable[..., Encoder]:
        home = _BUILTIN_MODULES.get(prefix, factory.__module__)
        if prefix not in ENCODERS and factory.__module__ != home:
            raise ValueError(f"encoder prefix {prefix!r} is built in (registered by {home})")
        return add(factory)

    return deco


def encoder_prefixes() -> list[str]:
    """Registered prefixes and the built-in ones not imported yet."""
    return sorted(set(ENCODERS.names()) | set(_BUILTIN_MODULES))


def split_name(name: str) -> tuple[str, str]:
    """``"timm:vit_b"`` -> ``("timm", "vit_b")``, with a clear error otherwise."""
    prefix, sep, rest = name.partition(":")
    if not sep or not rest or prefix not in encoder_prefixes():
        raise UnknownEncoderError(
            f"unknown encoder {name!r}: expected '<prefix>:<model>' with prefix one of "
            f"{encoder_prefixes()} (e.g. 'timm:vit_small_patch16_224', "
            f"'hf:sentence-transformers/all-MiniLM-L6-v2', 'synthetic:image')"
        )
    return prefix, rest


def build_encoder(name: str, *, pool: str | None = None, dtype: str = "float32",
                  device: str = "cpu", **options: Any) -> Encoder:
    """Make the encoder called ``name``; ``options`` go to the model factory."""
    prefix, rest = split_name(name)
    return _factory(prefix)(rest, pool=pool, dtype=dtype, device=device, **options)


def _factory(prefix: str) -> Callable[..., Encoder]:
    """The factory of ``prefix``, importing its built-in module on first use."""
    if prefix not in ENCODERS and prefix in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[prefix])
    return ENCODERS.get(prefix)
