"""One token trial: subsample pairs, train freeze-align's token projector, evaluate.

The token twin of :func:`trials.trial.run_trial`, for a head that reads token
features (``trials.head_options.needs_tokens``): same subsampling, same
config, same metric names, but every set is a :class:`trials.tokens.TokenSource`
read batch by batch (never all tokens at once), so a source that streams
from disk trains and evaluates without fitting in memory.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from trials.config import TrialConfig
from trials.evaluate import (
    retrieval_metrics,
    zero_shot_logits,
    zero_shot_metrics,
    zero_shot_weights,
)
from trials.head_options import needs_tokens, parse_head_options
from trials.heads import HEADS, _seeded
from trials.neighbourhood import PROBE_ROWS, neighbourhood_agreement, record_stride
from trials.read_ahead import DEPTH, read_ahead
from trials.token_projector import (
    LearnableTemperatureLoss,
    TokenProjector,
    Tokens,
    pooled_original,
)
from trials.token_train import train_token_projector
from trials.tokens import TokenPairs, TokenSource
from trials.trial import EPOCH_ROWS, subsample

EVAL_BATCH = 256  # samples per evaluation batch (tokens of a batch: EVAL_BATCH × L × D)


@dataclass
class TokenZeroShotSet:
    """Images, their labels [M] and the prompts, class-major: ``templates`` rows per class."""

    image: TokenSource
    labels: np.ndarray
    prompts: TokenSource
    templates: int

    def __post_init__(self):
        if self.templates < 1 or len(self.prompts) % self.templates:
            raise ValueError(f"{len(self.prompts)} prompt rows do not split into classes of "
                             f"templates={self.templates}")


@dataclass
class TokenTrialData:
    """Token features of the trial's two layers: paired train/val sets and the eval sets
    (retrieval sets are :class:`trials.tokens.TokenPairs`: unique images, captions, caption -> image)."""

    train: TokenPairs
    val: TokenPairs
    zero_shot: dict[str, TokenZeroShotSet] = field(default_factory=dict)
    retrieval: dict[str, TokenPairs] = field(default_factory=dict)


def build_token_projector(name: str, image_dim: int, text_dim: int, out_dim: int, *,
                          seed: int | None = None, **options) -> TokenProjector:
    """Token head ``name``'s pair of heads; ``seed`` as in :func:`trials.heads.build_head`."""
    if not needs_tokens(name):
        raise ValueError(f"head {name!r} reads pooled features: build it with trials.heads.build_head")
    resolved = parse_head_options(name, options)
    with _seeded(seed):
        return HEADS.get(name)(image_dim, text_dim, out_dim, dropout_p=resolved.dropout_p)


def run_token_trial(data: TokenTrialData, config: TrialConfig, *, device: str = "cpu",
                    on_epoch: Callable[[int, dict], Optional[bool]] | None = None,
                    depth: int = DEPTH) -> dict:
    """Train one token projector and evaluate it; returns the metrics of :func:`trials.trial.run_trial`.

    Pairs are subsampled as ``run_trial`` does (the first ``n_train`` caption
    rows of a permutation seeded with ``seed``). Unsupported for tokens:
    ``lr=None`` (no LR finder), ``mixup_alpha`` and ``fixed_structure``.
    ``depth`` is the read-ahead depth (0: no background thread); it changes
    no number. ``EPOCH_ROWS`` rows carry ``val_clip_loss``, the learned
    ``temperature`` and, on recorded epochs, ``nbr_image``/``nbr_text``
    between the pooled frozen features and the head outputs.
    """
    start = time.perf_counter()
    _check_supported(config)
    options = parse_head_options(config.head, config.head_options)
    rows = subsample(len(data.train), config.n_train, config.seed).numpy()
    train = TokenPairs(data.train.image, _Rows(data.train.text, rows), data.train.text_to_image[rows])
    model = build_token_projector(config.head, data.train.image.dim, data.train.text.dim, config.out_dim,
                                  seed=config.seed, **config.head_options)
    loss_fn = LearnableTemperatureLoss(config.loss_options(), learnable=options.learn_temperature)
    recorder = _Recorder(model, data.val, config, device, depth, on_epoch)
    result = train_token_projector(model, loss_fn, train, data.val, config.train_config(device),
                                   schedule=options.schedule, mixed_precision=options.mixed_precision,
                                   on_epoch=recorder, depth=depth)
    if not math.isfinite(result.best_val_loss):
        raise FloatingPointError(f"training diverged: the validation loss was never finite in "
                                 f"{len(result.history)} epochs (lr={result.lr:g}); lower `lr`")
    model.eval()
    best = result.history[result.best_epoch]
    with torch.no_grad():
        metrics = _evaluate(data, model, device, depth)
    return {"best_val_loss": result.best_val_loss, "best_val_clip_loss": best["val_clip_loss"],
            "best_epoch": result.best_epoch, "epochs_run": len(result.history), "lr_used": result.lr,
            "stopped": result.stopped, EPOCH_ROWS: recorder.rows, **metrics,
            "n_train_used": len(rows), "train_seconds": time.perf_counter() - start}


def _check_supported(config: TrialConfig) -> None:
    if not needs_tokens(config.head):
        raise ValueError(f"head {config.head!r} reads pooled features: run it with trials.trial.run_trial")
    for name, value in (("mixup_alpha", config.mixup_alpha), ("fixed_structure", config.fixed_structure)):
        if value:
            raise ValueError(f"{name}={value!r} is not supported for a token head; allowed values: 0 / False")


class _Rows:
    """The rows ``rows`` of a token source, as a source of their own (the training subsample)."""

    def __init__(self, source: TokenSource, rows: np.ndarray):
        self.source, self.rows = source, np.asarray(rows, np.int64)
        self.dim, self.num_prefix = source.dim, source.num_prefix

    def __len__(self) -> int:
        return len(self.rows)

    def lengths(self) -> np.ndarray:
        return self.source.lengths()[self.rows]

    def gather(self, rows: np.ndarray):
        return self.source.gather(self.rows[np.asarray(rows, np.int64)])


class _Recorder:
    """The loop's ``on_epoch``: keeps every ``record_stride`` epoch's row, with the neighbourhood
    agreement of the pooled frozen features and the head outputs on the first val pairs."""

    def __init__(self, model, val: TokenPairs, config, device, depth, forward):
        self.model, self.device, self.depth, self.forward = model, device, depth, forward
        self.stride, self.rows = record_stride(config.epochs), []
        self.probe = np.arange(min(PROBE_ROWS, len(val)))
        self.images = np.unique(val.text_to_image[self.probe])  # each probe image once
        self.val = val

    def __call__(self, epoch: int, row: dict) -> Optional[bool]:
        if epoch % self.stride == 0:
            mode = self.model.training
            self.model.eval()
            with torch.no_grad():
                row = {**row, "nbr_image": self._agreement(self.val.image, self.images, self.model.image, True),
                       "nbr_text": self._agreement(self.val.text, self.probe, self.model.text, False)}
            self.model.train(mode)
            self.rows.append(dict(row))
        return self.forward(epoch, row) if self.forward is not None else None

    def _agreement(self, source, rows, head, image: bool) -> float:
        frozen, aligned = [], []
        for tokens in _token_batches(source, rows, self.device, self.depth):
            frozen.append(pooled_original(tokens, image))
            aligned.append(head(tokens).float())
        return neighbourhood_agreement(torch.cat(frozen), torch.cat(aligned))


def _token_batches(source: TokenSource, rows: np.ndarray, device, depth):
    """``Tokens`` of ``source``'s ``rows`` on ``device``, EVAL_BATCH at a time, read ahead."""
    chunks = [rows[start:start + EVAL_BATCH] for start in range(0, len(rows), EVAL_BATCH)]
    for tokens in read_ahead(lambda chunk: Tokens.from_numpy(source.gather(chunk)), chunks, depth):
        yield tokens.to(device)


def embed(head, source: TokenSource, device, depth: int = DEPTH) -> torch.Tensor:
    """``head``'s outputs [N, E] (float32) for every sample of ``source``, in batches."""
    outputs = [head(t).float() for t in _token_batches(source, np.arange(len(source)), device, depth)]
    return torch.cat(outputs) if outputs else torch.empty(0, 0, device=device)


def _evaluate(data: TokenTrialData, model: TokenProjector, device, depth) -> dict:
    metrics: dict[str, float] = {}
    for name, zs in data.zero_shot.items():
        prompts = embed(model.text, zs.prompts, device, depth)
        weights = zero_shot_weights(prompts.reshape(len(zs.prompts) // zs.templates, zs.templates, -1))
        logits = zero_shot_logits(embed(model.image, zs.image, device, depth), weights)
        labels = torch.tensor(np.asarray(zs.labels), device=logits.device)
        for key, value in zero_shot_metrics(logits, labels).items():
            metrics[f"zs/{name}/{key}"] = float(value)
    for name, ret in data.retrieval.items():
        image_emb, text_emb = embed(model.image, ret.image, device, depth), embed(model.text, ret.text, device, depth)
        for protocol in ("official", "standard"):
            result = retrieval_metrics(image_emb, text_emb, ret.text_to_image, protocol=protocol)
            for direction, values in result.items():
                for key, value in values.items():
                    metrics[f"ret/{name}/{protocol}/{direction}/{key}"] = float(value)
    return metrics
