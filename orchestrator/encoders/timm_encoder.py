"""timm vision encoders: the pooled output of every transformer block.

Names (``build_encoder("timm:<rest>", ...)``):

* ``timm:vit_large_patch14_dinov2.lvd142m`` -- a timm registry name (with an
  optional pretrained tag); weights come from the Hugging Face cache
  (``HF_HOME``) or are downloaded.
* ``timm:timm/vit_small_patch16_224.augreg_in21k`` -- a Hub repo id
  (timm's ``hf-hub:`` source).
* ``timm:/path/to/folder`` -- a local folder in timm's Hub layout
  (``config.json`` + ``model.safetensors``), e.g. made by
  ``huggingface-cli download timm/<model> --local-dir /path/to/folder``.
* ``timm:/path/to/weights.safetensors`` (or ``.pth``/``.pt``/``.bin``) -- a
  bare weights file, loaded through timm's ``pretrained_cfg_overlay(file=...)``
  so the preprocessing stays the architecture's own. The architecture comes
  from ``arch="vit_large_patch14_dinov2.lvd142m"`` or from a ``config.json``
  beside the file.

Other options go to ``timm.create_model`` (``pretrained=False``,
``img_size=32``, ``patch_size=8``, ``depth=3``, ...).

Layers follow METHOD §7: layer ``i`` is the output of ``blocks[i]`` (after its
second residual add), **before** the final norm, taken with
``forward_intermediates(norm=False)``; there is no patch-embedding layer 0.

Pooling: ``"cls"`` (default when the model has a class token) is prefix token
0; ``"mean"`` is the mean over the patch tokens only -- prefix tokens (class,
distillation, register tokens) are excluded, like timm's ``global_pool="avg"``
and freeze-align's patch mean. ``"mean_all"`` is freeze-align's embedding
protocol for encoder-pair selection (its ``last_hidden_state.mean(dim=1)``):
the mean over ALL tokens, prefix included, and its last layer is taken
**after** the final norm (``model.norm``, as ``forward_features`` returns it);
its other layers are the same pre-norm block outputs as for ``"cls"``/``"mean"``.

Tokens (:meth:`TimmEncoder.encode_tokens`) use the same layer indices, the last
layer also after the final norm (freeze-align's projector reads
``forward_features``): pooled ``"cls"``/``"mean"`` features of the last layer
(pre-norm, METHOD §7) are not pooled last-layer tokens; ``"mean_all"`` is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import pathlib
from typing import Any

import numpy as np
import timm
import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config

from orchestrator.encoders import (
    _PATH_PREFIXES,
    Encoder,
    EncoderWeightsMissing,
    UnknownEncoderError,
    _jsonable,
    register_encoder,
    snapshot_commit,
    torch_dtype,
    weights_digest,
)

POOLS = ("cls", "mean", "mean_all")
# Part of identity(): change it whenever the meaning of a layer index changes.
LAYER_INDEXING = "timm-blocks-prenorm-v1: i = output of blocks[i], final norm not applied, no embedding layer"
TOKEN_LAYOUT = ("timm-tokens-v1: layer i = output of blocks[i]; the last layer after the final norm "
                "(forward_features); prefix = the num_prefix_tokens first tokens, local = patch tokens")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Files of a timm Hub-layout folder that determine the model.
_FOLDER_FILES = (".safetensors", ".bin", ".pth", ".json")
# Weight files a timm Hub repo may hold, in the order timm tries them.
_HUB_WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin",
                     "open_clip_pytorch_model.bin")


@dataclasses.dataclass
class _Source:
    """Where a model comes from: what ``create_model`` gets, and what the user asked."""

    name: str                 # the name as written after ``timm:``, for messages
    create_name: str          # first argument of timm.create_model
    kwargs: dict              # keyword arguments of timm.create_model
    options: dict             # the user's options, for identity()
    weights: dict = dataclasses.field(default_factory=dict)  # local weights, known before loading


@register_encoder("timm", describe="orchestrator.encoders.timm_config:describe_timm",
                  tokens="orchestrator.encoders.timm_config:timm_token_count")
def build_timm_encoder(rest: str, *, pool: str | None = None, dtype: str = "float32",
                       device: str = "cpu", **options: Any) -> "TimmEncoder":
    """Factory behind ``build_encoder("timm:<rest>")``."""
    if pool is not None and pool not in POOLS:  # fail before loading any weights
        raise ValueError(f"timm encoder: unknown pool {pool!r}, expected one of {list(POOLS)}")
    torch_dtype(dtype)
    source = _resolve_source(rest, options)
    return TimmEncoder(_create_model(source), source, pool=pool, dtype=dtype, device=device)


class TimmEncoder(Encoder):
    """A frozen timm token model (ViT, DeiT, EVA, DINOv2...) returning every block.

    ``encode`` takes PIL images (or HWC uint8 arrays), preprocessed with the
    model's pretrained data config, or an already preprocessed float tensor
    ``[B, C, H, W]``, used as is. The model runs in ``dtype`` (weights cast);
    pooling is done in float32 and the features come back as float32 numpy
    ``[B, num_layers, dim]``.
    """

    modality = "image"
    token_layout = TOKEN_LAYOUT

    def __init__(self, model: torch.nn.Module, source: _Source, *, pool: str | None,
                 dtype: str, device: str):
        _check_token_model(model, source.name)
        self.name = source.name
        self.pool = _resolve_pool(model, pool, source.name)
        self.dtype = dtype
        self.device = torch.device(device)
        self.num_layers = len(model.blocks)
        self.dim = int(model.feature_info[-1]["num_chs"])
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0))
        self.data_config = _data_config(model)
        self.transform = create_transform(**self.data_config)
        self._source = source
        # Hashed before the dtype cast, so random weights get one digest for every dtype.
        self._weights = _describe_weights(model, source)
        self.model = model.eval().requires_grad_(False).to(self.device, torch_dtype(dtype))

    def preprocess(self, batch: Any) -> torch.Tensor:
        """Pixels ``[B, C, H, W]`` float32 for the model.

        A floating-point tensor or array with 4 dimensions is taken as already
        preprocessed; anything else is a sequence of images (PIL, or HWC uint8
        arrays), converted to RGB and passed through the model's transform.
        """
        if _is_pixel_batch(batch):
            return torch.as_tensor(batch, dtype=torch.float32)
        images = [batch] if isinstance(batch, Image.Image) else list(batch)
        return torch.stack([self.transform(_to_rgb(image)) for image in images])

    @torch.inference_mode()
    def encode(self, batch: Any) -> np.ndarray:
        """Pooled features of every block, float32 numpy ``[B, num_layers, dim]``."""
        pixels = self.preprocess(batch).to(self.device, torch_dtype(self.dtype))
        blocks = self.model.forward_intermediates(
            pixels, return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True)
        if len(blocks) != self.num_layers:  # a timm change of what "all intermediates" means
            raise RuntimeError(f"timm:{self.name} returned {len(blocks)} blocks, expected {self.num_layers}")
        if self.pool == "mean_all":  # freeze-align's last layer: after the final norm
            blocks[-1] = tuple(self.model.norm(part) for part in _split_block(blocks[-1]))
        return torch.stack([self._pool(block) for block in blocks], dim=1).cpu().numpy()

    def _pool(self, block: Any) -> torch.Tensor:
        """[B, dim] float32 from one block's (patch tokens, prefix tokens)."""
        patches, prefix = _split_block(block)
        if self.pool == "cls":
            return prefix[:, 0].float()
        if self.pool == "mean_all":
            return torch.cat([prefix, patches], dim=1).float().mean(dim=1)
        return patches.float().mean(dim=1)

    @torch.inference_mode()
    def encode_tokens(self, batch: Any, layer: int) -> tuple[np.ndarray, list[np.ndarray]]:
        """Tokens of block ``layer`` (the last one after the final norm):
        prefix float32 ``[B, num_prefix, dim]`` and each image's patch tokens
        ``[P, dim]``. Blocks after ``layer`` are not run."""
        layer = self.resolve_layer(layer)
        pixels = self.preprocess(batch).to(self.device, torch_dtype(self.dtype))
        (block,) = self.model.forward_intermediates(
            pixels, indices=[layer], return_prefix_tokens=True, norm=layer == self.num_layers - 1,
            stop_early=True, output_fmt="NLC", intermediates_only=True)
        patches, prefix = (part.float().cpu().numpy() for part in _split_block(block))
        return prefix, list(patches)

    def identity(self) -> dict:
        """Model, weights, pooling, dtype, preprocessing and layer indexing (JSON-safe)."""
        return _jsonable({
            "encoder": "timm",
            "name": self._display_name(),
            "architecture": self.model.pretrained_cfg.get("architecture"),
            "weights": self._weights,
            "pool": self.pool,
            "dtype": self.dtype,
            "data_config": self.data_config,
            "options": self._source.options,
            "layers": LAYER_INDEXING,
            "num_layers": self.num_layers,
            "dim": self.dim,
        })

    def _display_name(self) -> str:
        """The name without local directories, so cache keys survive moving the weights."""
        return pathlib.Path(self.name).name if self._source.weights else self.name


# --- where the model comes from -------------------------------------------


def _resolve_source(rest: str, options: dict) -> _Source:
    """Turn ``rest`` (a timm name, Hub id, folder or file) into create_model arguments."""
    kwargs = dict(options)
    arch = kwargs.pop("arch", None)  # ours, not timm's: the architecture of a bare file
    path = _local_path(rest)
    if path is not None and path.is_dir():
        files = [p for p in path.iterdir() if p.is_file() and p.name.endswith(_FOLDER_FILES)]
        return _Source(rest, f"local-dir:{path}", {**kwargs, "pretrained": True}, dict(options),
                       {"source": "local-dir", "sha256": weights_digest(files)})
    if path is not None:
        overlay = {**(kwargs.pop("pretrained_cfg_overlay", None) or {}), "file": str(path)}
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
        return _Source(rest, arch or _architecture_beside(path), kwargs, dict(options),
                       {"source": "file", "sha256": weights_digest([path])})
    if arch is not None:
        raise ValueError(f"timm encoder: arch={arch!r} only applies to a local weights file, not {rest!r}")
    create_name = rest if ":" in rest or "/" not in rest else f"hf-hub:{rest}"
    kwargs.setdefault("pretrained", True)
    return _Source(rest, create_name, kwargs, dict(options))


def _local_path(rest: str) -> pathlib.Path | None:
    """The local file or folder ``rest`` names, None for a model name or Hub id."""
    text = rest.removeprefix("local-dir:")
    path = pathlib.Path(text).expanduser()
    looks_local = text != rest or text.startswith(_PATH_PREFIXES) or text.endswith(_WEIGHT_SUFFIXES)
    if path.exists() and (looks_local or "/" in text):
        return path.resolve()
    if looks_local:
        raise EncoderWeightsMissing(
            f"timm encoder: local weights {text!r} do not exist. Pass an existing timm folder "
            f"('timm:/path/to/folder' with config.json + model.safetensors) or weights file "
            f"('timm:/path/to/weights.safetensors' with arch='<timm model name>').")
    return None


def _architecture_beside(path: pathlib.Path) -> str:
    """The timm architecture of a bare weights file, from a config.json next to it."""
    config = path.parent / "config.json"
    if config.is_file():
        architecture = json.loads(config.read_text()).get("architecture")
        if architecture:
            return architecture
    raise ValueError(
        f"timm encoder: cannot tell the architecture of weights file {str(path)!r}: pass "
        f"arch='<timm model name>' (e.g. build_encoder('timm:{path}', "
        f"arch='vit_large_patch14_dinov2.lvd142m')) or put timm's config.json beside it.")


def _create_model(source: _Source) -> torch.nn.Module:
    """timm.create_model, with missing weights turned into a clear error."""
    _check_known(source)
    try:
        return timm.create_model(source.create_name, **source.kwargs)
    except OSError as err:  # hub/offline/URL/file errors are all OSError subclasses
        raise EncoderWeightsMissing(_missing_message(source, err)) from err


def _check_known(source: _Source) -> None:
    """Reject an unknown timm architecture before any download is tried."""
    name = source.create_name
    if ":" not in name and not timm.is_model(name):
        raise UnknownEncoderError(
            f"unknown timm model {name!r} (from 'timm:{source.name}'); list the known names with "
            f"timm.list_models('*pattern*', pretrained=True)")


def _missing_message(source: _Source, err: Exception) -> str:
    """Which weights are missing and the ways to provide them."""
    hub_id = _hub_id(source)
    download = f"`huggingface-cli download {hub_id}` (or `hf download {hub_id}`)" if hub_id else \
        "downloading them"
    return (
        f"timm encoder: weights of 'timm:{source.name}' are not available "
        f"({type(err).__name__}: {err}). With no network (or HF_HUB_OFFLINE=1) they must already be "
        f"on disk. Provide them by (1) pre-downloading on a machine with network, {download}, and "
        f"pointing HF_HOME at that cache; (2) passing a local copy: 'timm:/path/to/folder' (timm "
        f"Hub layout: config.json + model.safetensors) or 'timm:/path/to/weights.safetensors' with "
        f"arch='{source.create_name}'; or (3) pretrained=False for random weights.")


def _hub_id(source: _Source) -> str | None:
    """The Hub repo holding a model's weights, when timm knows one."""
    if source.create_name.startswith("hf-hub:"):
        return source.create_name.removeprefix("hf-hub:")
    try:
        return timm.models.get_pretrained_cfg(source.create_name).hf_hub_id
    except Exception:  # best effort, only for the message
        return None


# --- what the model is ----------------------------------------------------


def _check_token_model(model: torch.nn.Module, name: str) -> None:
    """Only token models give every block as one-width token sequences."""
    params = inspect.signature(getattr(model, "forward_intermediates", lambda: None)).parameters
    widths = {info["num_chs"] for info in getattr(model, "feature_info", [])}
    if not hasattr(model, "blocks") or "return_prefix_tokens" not in params or len(widths) != 1:
        raise ValueError(
            f"timm encoder: 'timm:{name}' ({type(model).__name__}) is not supported: it needs a token "
            f"model (ViT, DeiT, EVA, DINOv2, ...) whose forward_intermediates returns every block "
            f"as tokens of one width")


def _resolve_pool(model: torch.nn.Module, pool: str | None, name: str) -> str:
    """The pooling to use: "cls" needs a class token, which is also the default."""
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None))
    pool = pool or ("cls" if has_cls else "mean")
    if pool not in POOLS:
        raise ValueError(f"timm encoder: unknown pool {pool!r}, expected one of {list(POOLS)}")
    if pool == "cls" and not has_cls:
        raise ValueError(f"timm encoder: 'timm:{name}' has no class token; use pool='mean'")
    return pool


def _data_config(model: torch.nn.Module) -> dict:
    """The pretrained data config, with the input size the model was built for.

    ``resolve_data_config`` reads the pretrained config, which keeps e.g. 224
    when the model was created with ``img_size=32``; a fixed-size model
    rejects any other size, so its own size wins.
    """
    config = resolve_data_config(model=model)
    embed = getattr(model, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is not None and getattr(embed, "strict_img_size", False) \
            and not getattr(embed, "dynamic_img_size", False):
        config["input_size"] = (config["input_size"][0], *size)
    return config


def _describe_weights(model: torch.nn.Module, source: _Source) -> dict:
    """Which weights the model holds: a content hash, or the Hub id, tag and commit."""
    cfg = model.pretrained_cfg
    if source.weights:
        weights = {**source.weights, "tag": cfg.get("tag")}
    elif not source.kwargs.get("pretrained"):
        weights = {"source": "random-init", "sha256": _state_digest(model)}
    else:
        hub_id = cfg.get("hf_hub_id")
        weights = {"source": "hf-hub" if hub_id else "url", "hf_hub_id": hub_id, "tag": cfg.get("tag"),
                   "url": None if hub_id else cfg.get("url"), "revision": _hub_revision(hub_id, cfg)}
    checkpoint = source.kwargs.get("checkpoint_path")
    if checkpoint and source.kwargs.get("pretrained"):  # random-init already hashes the loaded state
        weights["checkpoint_sha256"] = weights_digest([checkpoint])
    return weights


def _hub_revision(hub_id: str | None, cfg: dict) -> str | None:
    """The commit of the cached weights file timm loaded, if it is in the hub cache."""
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    repo_id, _, revision = hub_id.partition("@")
    for filename in filter(None, (cfg.get("hf_hub_filename"), *_HUB_WEIGHT_FILES)):
        try:
            cached = try_to_load_from_cache(repo_id, filename, revision=revision or None)
        except Exception:  # best effort: an odd id must not break loading
            return None
        if isinstance(cached, str):
            return snapshot_commit(cached)
    return None


def _state_digest(model: torch.nn.Module) -> str:
    """sha256 of a model's state (names, dtypes, shapes, bytes): identifies random weights."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- small helpers --------------------------------------------------------


def _split_block(block: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(patch tokens, prefix tokens) of one intermediate (prefix [B, 0, D] if it has none)."""
    if isinstance(block, tuple):
        return block
    return block, block[:, :0]


def _is_pixel_batch(batch: Any) -> bool:
    """A 4-d floating-point tensor or array: already preprocessed pixels."""
    if isinstance(batch, torch.Tensor):
        return batch.ndim == 4 and batch.is_floating_point()
    return isinstance(batch, np.ndarray) and batch.ndim == 4 and np.issubdtype(batch.dtype, np.floating)


def _to_rgb(image: Any) -> Image.Image:
    """PIL RGB image from a PIL image of any mode or an HWC uint8 array."""
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    return image.convert("RGB")
