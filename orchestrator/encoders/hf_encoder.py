"""Hugging Face text encoders: the pooled hidden state of every layer.

Names (``build_encoder("hf:<rest>", ...)``): a Hub id
(``hf:sentence-transformers/all-roberta-large-v1``, loaded from the cache under
``HF_HOME`` or downloaded) or a local directory (``hf:/path/to/dir``: a
``save_pretrained`` folder, or a sentence-transformers folder, which holds the
Hugging Face model at its root). Other options go to
``AutoModel.from_pretrained`` (``revision``, ``trust_remote_code``, ...).

Layers follow METHOD §7: ``output_hidden_states=True`` gives the embedding
output (layer 0) and the output of every transformer layer, so a 24-layer
model has 25 layers.

Pooling, always over the tokens the attention mask keeps:

* ``"mean"`` (default; the official ``avg``): masked mean over all tokens,
  special tokens (``[CLS]``/``<s>``, ``[SEP]``/``</s>``) included;
* ``"cls"``: the first real token -- token 0 with right padding, and still the
  ``[CLS]``/``<s>`` token (not a pad) with left padding;
* ``"last"``: the last real token, whatever the padding side.

``"mean"`` of the last layer is sentence-transformers' ``Pooling(mean)``
(before its ``Normalize`` module, which models like all-MiniLM-L6-v2 add).

Tokens (:meth:`HFEncoder.encode_tokens`): every token the attention mask keeps
(special tokens included, as the masked mean pools them), no prefix tokens;
the same layer indices, the last layer being ``last_hidden_state`` (after any
final norm the model has).

Tokenisation: ``padding_side="left"`` (the official default) or ``"right"``,
padding to the longest text of the batch, truncation only when
``max_length`` is set, pad token set to EOS when the tokenizer has none.

Positions (``positions``): with ``"mask"`` (default), models that take
absolute position ids from a plain ``arange`` (BERT, MiniLM, GPT-2) get ids
counted from each text's first real token, so a text's features do not depend
on the padding side or on the other texts of its batch. Models that already
count positions past pads themselves (RoBERTa, XLM-R, MPNet: their embeddings
have a ``padding_idx``) are left alone. ``"model"`` never passes position ids,
which reproduces the official run exactly for BERT-like models with left
padding (positions shifted by the pads).
"""

from __future__ import annotations

import inspect
import os
import pathlib
from typing import Any, Sequence

import numpy as np
import torch
from transformers import AutoModel, AutoTokenizer

from orchestrator.encoders import (
    _PATH_PREFIXES,
    Encoder,
    EncoderInfo,
    EncoderOptionError,
    EncoderWeightsMissing,
    TokenCount,
    _jsonable,
    register_encoder,
    snapshot_commit,
    torch_dtype,
    weights_digest,
)

POOLS = ("mean", "cls", "last")
PADDING_SIDES = ("left", "right")
POSITIONS = ("mask", "model")
# Part of identity(): change it whenever the meaning of a layer index changes.
LAYER_INDEXING = "hf-hidden-states-v1: 0 = embedding output, i = output of layer i"
TOKEN_LAYOUT = "hf-tokens-v1: hidden_states[i] rows the attention mask keeps; the last = last_hidden_state"
# Files of a local model directory that determine its features (weights,
# config, tokenizer); other weight formats (ONNX, TF, Rust) are never loaded.
_HASHED_SUFFIXES = (".safetensors", ".bin", ".json", ".txt", ".model")
# from_pretrained options that the tokenizer needs too.
_TOKENIZER_OPTIONS = ("revision", "trust_remote_code", "cache_dir", "token", "subfolder")


def _quiet_progress_bars() -> None:
    """No tqdm bars when loading (they flood the logs of Ray workers).

    An explicit ``HF_HUB_DISABLE_PROGRESS_BARS=0`` from the user is respected.
    """
    if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1").lower() in ("0", "false", "no", "off"):
        return
    import huggingface_hub.utils
    import transformers.utils.logging

    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()


_quiet_progress_bars()


def describe_hf(rest: str, pool: str | None, options: dict) -> EncoderInfo:
    """The layer count of ``hf:<rest>`` from its ``config.json`` (AutoConfig: a local
    folder, or the local Hugging Face cache; validate never downloads)."""
    for key, value, allowed in (("pool", pool or "mean", POOLS),
                                ("options.padding_side", options.get("padding_side", "left"), PADDING_SIDES),
                                ("options.positions", options.get("positions", "mask"), POSITIONS)):
        if value not in allowed:
            raise EncoderOptionError(f"hf encoder: unknown {key.split('.')[-1]} {value!r}, expected "
                                     f"one of {list(allowed)}", key)
    local = _local_dir(rest)  # a path that does not exist raises EncoderWeightsMissing
    from transformers import AutoConfig

    kwargs = {k: options[k] for k in _TOKENIZER_OPTIONS if k in options}
    try:
        config = AutoConfig.from_pretrained(str(local or rest), local_files_only=True, **kwargs)
    except (OSError, ValueError) as err:
        if local is not None:  # loading it fails the same way
            raise EncoderWeightsMissing(_missing_message(rest, local, err)) from None
        return EncoderInfo(None, f"unknown until run: 'hf:{rest}' is not in the local Hugging Face "
                                 "cache (validate never downloads)")
    where = "config.json of the local folder" if local else "config.json in the Hugging Face cache"
    return EncoderInfo(int(config.get_text_config().num_hidden_layers) + 1,
                       f"{where}: num_hidden_layers + 1 (layer 0 = embeddings)")


def hf_token_count(rest: str, options: dict, texts: Sequence[str] | None = None) -> TokenCount | str:
    """Tokens of ``hf:<rest>`` without its weights: ``hidden_size`` from the local
    config.json, each text's length from the local tokenizer (truncated at
    ``max_length``); with no texts or no local tokenizer, an upper bound of
    ``max_length`` (else ``max_position_embeddings``) tokens per text."""
    from transformers import AutoConfig

    local = _local_dir(rest)
    kwargs = {k: options[k] for k in _TOKENIZER_OPTIONS if k in options}
    try:
        config = AutoConfig.from_pretrained(str(local or rest), local_files_only=True, **kwargs)
    except (OSError, ValueError):
        return f"'hf:{rest}' is not in the local Hugging Face cache (validate never downloads)"
    text_config, max_length = config.get_text_config(), options.get("max_length")
    bound = max_length or int(getattr(text_config, "max_position_embeddings", 512))
    count = TokenCount(dim=int(text_config.hidden_size), num_prefix=0, local=bound, bound=True,
                       detail=f"at most {bound} tokens per text")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local or rest), local_files_only=True, **kwargs)
    except (OSError, ValueError):
        return count
    if texts is None:
        return count
    limits = dict(truncation=True, max_length=max_length) if max_length else {}
    lengths = np.array([len(ids) for ids in tokenizer(list(texts), **limits)["input_ids"]], np.int64)
    return TokenCount(dim=count.dim, num_prefix=0, lengths=lengths, detail="tokenizer lengths")


@register_encoder("hf", describe=describe_hf, tokens=hf_token_count)
def build_hf_encoder(rest: str, *, pool: str | None = None, dtype: str = "float32",
                     device: str = "cpu", padding_side: str = "left", max_length: int | None = None,
                     positions: str = "mask", **options: Any) -> "HFEncoder":
    """Factory behind ``build_encoder("hf:<rest>")``."""
    pool = pool or "mean"
    _check_choice("pool", pool, POOLS)  # all checks before any download
    _check_choice("padding_side", padding_side, PADDING_SIDES)
    _check_choice("positions", positions, POSITIONS)
    torch_dtype(dtype)
    local = _local_dir(rest)
    tokenizer, model = _load(rest, local, dtype, options)
    return HFEncoder(rest, tokenizer, model, local=local, pool=pool, padding_side=padding_side,
                     max_length=max_length, positions=positions, dtype=dtype, device=device,
                     options=options)


class HFEncoder(Encoder):
    """A frozen Hugging Face model returning every hidden state, pooled.

    ``encode`` takes a list of strings (or one string) and returns float32
    numpy ``[B, num_layers, dim]``; the model runs in ``dtype`` and pooling is
    done in float32.
    """

    modality = "text"
    token_layout = TOKEN_LAYOUT

    def __init__(self, name: str, tokenizer: Any, model: torch.nn.Module, *,
                 local: pathlib.Path | None, pool: str, padding_side: str, max_length: int | None,
                 positions: str, dtype: str, device: str, options: dict):
        self.name = name
        self.pool = pool
        self.padding_side = padding_side
        self.max_length = max_length
        self.positions = positions
        self.dtype = dtype
        self.device = torch.device(device)
        self.tokenizer = _prepare_tokenizer(tokenizer, padding_side)
        text_config = model.config.get_text_config()
        self.num_layers = int(text_config.num_hidden_layers) + 1
        self.dim = int(text_config.hidden_size)
        self.model = model.eval().requires_grad_(False).to(self.device)
        self._inputs = set(inspect.signature(model.forward).parameters)
        self._mask_positions = positions == "mask" and _needs_position_ids(model, self._inputs)
        self._weights = _describe_weights(name, local, model, options)
        self._options = options

    def tokenize(self, texts: str | Sequence[str]) -> dict:
        """Tokens of a batch, padded to its longest text, on the model's device."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        limits = dict(truncation=True, max_length=self.max_length) if self.max_length else {}
        tokens = self.tokenizer(texts, padding="longest", return_tensors="pt", **limits)
        return {k: v.to(self.device) for k, v in tokens.items() if k in self._inputs}

    @torch.inference_mode()
    def encode(self, texts: str | Sequence[str]) -> np.ndarray:
        """Pooled features of every layer, float32 numpy ``[B, num_layers, dim]``."""
        tokens = self.tokenize(texts)
        hidden = self._forward(tokens).hidden_states
        mask = tokens["attention_mask"]
        return torch.stack([pool_tokens(h, mask, self.pool) for h in hidden], dim=1).cpu().numpy()

    @torch.inference_mode()
    def encode_tokens(self, texts: str | Sequence[str], layer: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Tokens of hidden state ``layer`` (the last: ``last_hidden_state``): an
        empty prefix ``[B, 0, dim]`` and each text's kept tokens ``[L_i, dim]``,
        in order (padding dropped, whatever its side). float32."""
        layer = self.resolve_layer(layer)
        tokens = self.tokenize(texts)
        out = self._forward(tokens)
        hidden = out.last_hidden_state if layer == self.num_layers - 1 else out.hidden_states[layer]
        hidden, mask = hidden.float().cpu().numpy(), tokens["attention_mask"].bool().cpu().numpy()
        return np.zeros((len(hidden), 0, self.dim), np.float32), [h[m] for h, m in zip(hidden, mask)]

    def _forward(self, tokens: dict) -> Any:
        """The model's output with every hidden state (position ids from the mask if needed)."""
        if self._mask_positions:  # ids count from each text's first real token
            tokens = {**tokens, "position_ids": (tokens["attention_mask"].cumsum(dim=1) - 1).clamp(min=0)}
        out = self.model(**tokens, output_hidden_states=True)
        if len(out.hidden_states) != self.num_layers:
            raise RuntimeError(f"hf:{self.name} returned {len(out.hidden_states)} hidden states, "
                               f"expected {self.num_layers}")
        return out

    def identity(self) -> dict:
        """Model, revision or weights hash, pooling, tokenisation and dtype (JSON-safe)."""
        return _jsonable({
            "encoder": "hf",
            **self._weights,
            "model_type": self.model.config.model_type,
            "pool": self.pool,
            "padding_side": self.padding_side,
            "max_length": self.max_length,
            "positions": self.positions,
            "dtype": self.dtype,
            "layers": LAYER_INDEXING,
            "num_layers": self.num_layers,
            "dim": self.dim,
            "options": self._options,
        })


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, D] float32 from hidden states [B, T, D] and attention mask [B, T].

    "mean" averages the masked-in tokens; "cls" / "last" take the first / last
    masked-in token, which is right for either padding side.
    """
    hidden = hidden.float()
    if pool == "mean":
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    if pool == "cls":
        index = mask.argmax(dim=1)  # argmax returns the first maximum
    else:
        index = mask.shape[1] - 1 - mask.flip(dims=(1,)).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), index]


# --- loading ----------------------------------------------------------------


def _local_dir(rest: str) -> pathlib.Path | None:
    """The local model directory ``rest`` names, None for a Hub id."""
    path = pathlib.Path(rest).expanduser()
    if path.is_dir():
        return path.resolve()
    if rest.startswith(_PATH_PREFIXES):
        raise EncoderWeightsMissing(
            f"hf encoder: local model directory {rest!r} does not exist. Pass a directory made by "
            f"save_pretrained (or a sentence-transformers folder): 'hf:/path/to/dir', or a Hub id.")
    return None


def _load(rest: str, local: pathlib.Path | None, dtype: str, options: dict) -> tuple[Any, Any]:
    """Tokenizer and model; a model that is neither cached nor downloadable is a clear error."""
    source = str(local) if local else rest
    tokenizer_options = {k: options[k] for k in _TOKENIZER_OPTIONS if k in options}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **tokenizer_options)
        # dtype explicitly: transformers 5 defaults to the checkpoint's dtype ("auto").
        model = AutoModel.from_pretrained(source, dtype=torch_dtype(dtype), **options)
    except OSError as err:  # offline, not cached, no such repo, missing files
        raise EncoderWeightsMissing(_missing_message(rest, local, err)) from err
    return tokenizer, model


def _missing_message(rest: str, local: pathlib.Path | None, err: Exception) -> str:
    """Which model is missing and the ways to provide it."""
    if local:
        return (f"hf encoder: cannot load 'hf:{rest}' from its local directory "
                f"({type(err).__name__}: {err}). It needs config.json, the weights "
                f"(model.safetensors or pytorch_model.bin) and the tokenizer files.")
    from huggingface_hub import constants

    return (
        f"hf encoder: model 'hf:{rest}' is not available ({type(err).__name__}: {err}). With no "
        f"network (or HF_HUB_OFFLINE=1) it must already be in the Hugging Face cache "
        f"({constants.HF_HUB_CACHE}). Provide it by (1) pre-downloading on a machine with network, "
        f"`huggingface-cli download {rest}` (or `hf download {rest}`), and setting HF_HOME to that "
        f"cache; or (2) passing a local directory: 'hf:/path/to/dir' (a save_pretrained or "
        f"sentence-transformers folder).")


def _prepare_tokenizer(tokenizer: Any, padding_side: str) -> Any:
    """Set the padding side, and EOS as pad token when there is none (METHOD §7)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"hf encoder: tokenizer {tokenizer.name_or_path!r} has neither a pad "
                             f"nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _needs_position_ids(model: torch.nn.Module, inputs: set[str]) -> bool:
    """Whether position ids must be passed to make positions skip pads.

    Embeddings with a ``padding_idx`` (RoBERTa family) already count positions
    past pads from the input ids; passing ``arange``-style ids would break them.
    """
    embeddings = getattr(model, "embeddings", None)
    return "position_ids" in inputs and getattr(embeddings, "padding_idx", None) is None


def _describe_weights(name: str, local: pathlib.Path | None, model: Any, options: dict) -> dict:
    """The model's name and exact weights: a Hub commit, or a hash of a local directory."""
    commit = getattr(model.config, "_commit_hash", None)  # transformers < 5 records it
    if local is not None:
        commit = commit or snapshot_commit(local)
        digest = None if commit else weights_digest(
            p for p in local.iterdir() if p.is_file() and p.name.endswith(_HASHED_SUFFIXES))
        return {"name": local.name, "revision": commit, "weights_sha256": digest}
    return {"name": name, "revision": commit or _hub_commit(name, options.get("revision")),
            "weights_sha256": None}


def _hub_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit of the cached config.json of a Hub model (what was just loaded)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # best effort: an odd id must not break loading
        return revision
    return snapshot_commit(cached) if isinstance(cached, str) else revision


def _check_choice(key: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"hf encoder: unknown {key} {value!r}, expected one of {list(allowed)}")
