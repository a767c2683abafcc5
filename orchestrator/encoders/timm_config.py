"""What validation knows of a ``timm:`` encoder without its weights.

The layer count comes from the architecture built on PyTorch's meta device
(shapes only: no memory, no weights), with the model's own arguments: a
registry name as is, a local folder or file, or a Hub id through the
``config.json`` in the local Hugging Face cache (validate never downloads).
Registered as the ``timm`` prefix's ``describe`` (see
:func:`orchestrator.encoders.describe_encoder`).
"""

from __future__ import annotations

import json
import pathlib

import timm

from orchestrator.encoders import (
    EncoderInfo,
    EncoderOptionError,
    EncoderWeightsMissing,
    TokenCount,
)
from orchestrator.encoders.timm_encoder import (
    POOLS,
    _architecture_beside,
    _check_token_model,
    _data_config,
    _hub_id,
    _hub_revision,
    _local_path,
    _resolve_pool,
    _Source,
)
from trials.registry import did_you_mean

# Options of ours or about weights: not architecture arguments of create_model.
_NOT_MODEL_ARGS = ("arch", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path",
                   "cache_dir")


def describe_timm(rest: str, pool: str | None, options: dict) -> EncoderInfo:
    """The layer count of ``timm:<rest>`` from its architecture built on the meta
    device (no weights, no memory): a registry name as is, a local folder or
    file or a cached Hub id through its ``config.json``."""
    if pool is not None and pool not in POOLS:
        raise EncoderOptionError(f"timm encoder: unknown pool {pool!r}, expected one of {list(POOLS)}", "pool")
    found = _meta_model(rest, options)
    if isinstance(found, EncoderInfo):
        return found
    model, where = found
    try:
        _resolve_pool(model, pool, rest)
    except ValueError as err:  # "cls" on a model without a class token
        raise EncoderOptionError(str(err), "pool") from None
    return EncoderInfo(len(model.blocks), where, _weights_note(rest, options))


def timm_token_count(rest: str, options: dict, texts=None) -> TokenCount | str:
    """Tokens per image of ``timm:<rest>`` from its meta-device architecture: the
    prefix tokens and the patch grid of the input size its preprocessing gives;
    a string saying why when that cannot be known without weights."""
    found = _meta_model(rest, options)
    if isinstance(found, EncoderInfo):
        return found.source
    model, _ = found
    height, width = _data_config(model)["input_size"][1:]
    embed = model.patch_embed
    if getattr(embed, "dynamic_img_size", False):
        grid = embed.dynamic_feat_size((height, width))
    else:
        grid = embed.grid_size
    return TokenCount(dim=int(model.embed_dim), num_prefix=int(model.num_prefix_tokens),
                      local=int(grid[0] * grid[1]), detail=f"{height} px" if height == width else f"{height}x{width} px")


def _meta_model(rest: str, options: dict):
    """(the architecture on the meta device, where it came from), or EncoderInfo
    saying why it cannot be built without weights."""
    found = _architecture_of(rest, options)
    if isinstance(found, EncoderInfo):
        return found
    arch, model_args, where = found
    kwargs = {**model_args, **{k: v for k, v in options.items() if k not in _NOT_MODEL_ARGS}}
    try:
        model = timm.create_model(arch, pretrained=False, device="meta", **kwargs)
    except Exception as err:  # noqa: BLE001 -- whatever it is, the run tells; validation cannot
        return EncoderInfo(None, f"unknown until run: timm could not build {arch!r} without weights "
                                 f"({type(err).__name__}: {err})")
    _check_token_model(model, rest)
    return model, where


def _architecture_of(rest: str, options: dict) -> tuple[str, dict, str] | EncoderInfo:
    """(architecture, model_args, where from) of ``rest``; EncoderInfo when unknowable."""
    path = _local_path(rest)  # a local path that does not exist raises EncoderWeightsMissing
    if path is not None and path.is_file() and options.get("arch"):
        _check_name(options["arch"], {"pretrained": False}, "options.arch")
        return options["arch"], {}, f"timm's {options['arch']} (options.arch)"
    if path is not None:
        config = path / "config.json" if path.is_dir() else path.parent / "config.json"
        if path.is_file() and not config.is_file():
            _architecture_beside(path)  # raises the "pass arch=..." error
        return _read_config(config, "config.json of the local model")
    if options.get("arch") is not None:
        raise EncoderOptionError(f"timm encoder: arch={options['arch']!r} only applies to a local weights "
                                 f"file, not {rest!r}", "options.arch")
    if "/" in rest or rest.startswith("hf-hub:"):
        return _cached_hub_config(rest.removeprefix("hf-hub:"))
    _check_name(rest, options, "name")
    return rest, {}, f"timm's {rest.partition('.')[0]} architecture"


def _read_config(config: pathlib.Path, where: str) -> tuple[str, dict, str]:
    if not config.is_file():
        raise EncoderWeightsMissing(f"timm encoder: {str(config.parent)!r} has no config.json (timm "
                                    f"Hub layout: config.json + model.safetensors)")
    data = json.loads(config.read_text())
    return data["architecture"], dict(data.get("model_args") or {}), where


def _cached_hub_config(repo: str) -> tuple[str, dict, str] | EncoderInfo:
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json")
    if not isinstance(cached, str):
        return EncoderInfo(None, f"unknown until run: the config.json of Hub model {repo!r} is not in "
                                 f"the local Hugging Face cache (validate never downloads)")
    return _read_config(pathlib.Path(cached), "config.json in the Hugging Face cache")


def _check_name(name: str, options: dict, key: str) -> None:
    """An architecture timm knows, and a pretrained tag it has weights for."""
    if not timm.is_model(name):
        close = did_you_mean(name, timm.list_models() + timm.list_pretrained())
        raise EncoderOptionError(f"unknown timm model {name!r}{close}; list the known names with "
                                 f"timm.list_models('*pattern*', pretrained=True)", key)
    arch, _, tag = name.partition(".")
    if tag and options.get("pretrained", True) and name not in timm.list_pretrained(f"{arch}.*"):
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        raise EncoderOptionError(f"timm model {arch!r} has no pretrained tag {tag!r}"
                                 f"{did_you_mean(tag, tags)}; its tags: {', '.join(tags) or 'none'}", key)


def _weights_note(rest: str, options: dict) -> str:
    """Whether pretrained Hub weights are in the local cache (else: downloaded at run time)."""
    if _local_path(rest) is not None or not options.get("pretrained", True):
        return ""
    source = _Source(rest, rest if ":" in rest or "/" not in rest else f"hf-hub:{rest}", {}, {})
    hub_id = _hub_id(source)
    if not hub_id:
        return "weights downloaded from their URL at run time unless cached"
    if _hub_revision(hub_id, {}):
        return f"weights in the local Hugging Face cache ({hub_id})"
    return (f"weights of {hub_id} are not in the local Hugging Face cache: known only at run time "
            f"(downloaded then; offline, the run stops with how to provide them)")
