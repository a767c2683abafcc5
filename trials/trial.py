"""One alignment trial: subsample pairs, train the heads, evaluate.

A trial is a plain function of in-memory features and a
:class:`trials.config.TrialConfig` (the flat config a sweep varies); the
orchestrator wraps it in Ray. A head fitted in closed form (registered so in
:mod:`trials.head_options`) is fitted instead of trained.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from trials.config import TrialConfig
from trials.evaluate import retrieval_metrics, zero_shot_logits, zero_shot_metrics, zero_shot_weights
from trials.head_options import is_closed_form
from trials.heads import HEADS, build_head
from trials.losses import AlignmentLoss
from trials.neighbourhood import EpochRecorder, record_stride, validation_clip_loss
from trials.train import train_alignment

EPOCH_ROWS = "epoch_rows"  # run_trial's list of recorded per-epoch rows (not a metric)


@dataclass
class ZeroShotSet:
    """Image features of one layer [M, Di], labels [M], prompt features [C, T, Dt]."""

    image: np.ndarray
    labels: np.ndarray
    prompts: np.ndarray


@dataclass
class RetrievalSet:
    """Unique image features [M, Di], caption features [K, Dt], caption -> image."""

    image: np.ndarray
    text: np.ndarray
    text_to_image: np.ndarray


@dataclass
class TrialData:
    """Features of the trial's two layers: paired train/val rows, eval sets and,
    optionally, unpaired image/text rows that enter the R_S term only (all of them,
    not subsampled with ``n_train``; a closed-form head has no R_S and ignores them)."""

    train_image: np.ndarray
    train_text: np.ndarray
    val_image: np.ndarray
    val_text: np.ndarray
    zero_shot: dict[str, ZeroShotSet] = field(default_factory=dict)
    retrieval: dict[str, RetrievalSet] = field(default_factory=dict)
    extra_image: Optional[np.ndarray] = None
    extra_text: Optional[np.ndarray] = None


def subsample(n_total: int, n_train: Optional[int], seed: int) -> torch.Tensor:
    """First ``n_train`` of a seeded permutation, as the official ``fit`` (§5.1)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n_total, generator=generator)
    return order if n_train is None else order[: min(n_train, n_total)]


def run_trial(data: TrialData, config: TrialConfig, *, device: str = "cpu",
              on_epoch: Callable[[int, dict], Optional[bool]] | None = None,
              impl: str = "auto") -> dict:
    """Train one pair of heads and evaluate them; returns flat metrics.

    ``impl`` is how the training loop computes its loss, never what (see
    :func:`trials.train.train_alignment`): "auto" runs the fused fast path
    where it covers the config, "reference" the autograd reference path. It
    is not part of the config: both give the same numbers up to rounding.

    Metric names: ``zs/<set>/<top1|top1_macro|f1_macro|top5|top5_macro>`` (top-5 with
    >= 5 classes; see ``trials.evaluate.zero_shot_metrics``),
    ``ret/<set>/<protocol>/<I2T|T2I>/<R@k|P@k|MAP@k>``, plus training summary
    (``best_val_clip_loss``: the CLIP part of the validation loss of the restored
    best epoch) and :data:`EPOCH_ROWS`, the rows of ``trials.neighbourhood.EpochRecorder``.
    ``on_epoch`` sees each epoch's row with ``val_clip_loss`` added.
    """
    start = time.perf_counter()
    # A copy: inputs may be read-only views (memory maps, Ray's object store).
    to = lambda a: torch.tensor(np.asarray(a, dtype=np.float32), device=device)  # noqa: E731
    index = subsample(len(data.train_image), config.n_train, config.seed)
    rows = index.numpy()  # subsample on the host: only the trial's rows are copied
    train_image, train_text = to(np.asarray(data.train_image)[rows]), to(np.asarray(data.train_text)[rows])
    torch.manual_seed(config.seed)  # head initialisation
    if is_closed_form(config.head):
        image_map, text_map, class_vectors, summary = _fit_closed_form(train_image, train_text, config)
    else:
        image_map, text_map, class_vectors, summary = _train_heads(train_image, train_text, data,
                                                                   config, to, on_epoch, impl)
    with torch.no_grad():
        metrics = _evaluate(data, image_map, text_map, class_vectors, to)
    return {**summary, **metrics, "n_train_used": len(index),
            "train_seconds": time.perf_counter() - start}


def _train_heads(train_image, train_text, data, config, to, on_epoch, impl):
    device = train_image.device
    image_head = build_head(config.head, train_image.shape[1], config.out_dim,
                            **config.head_options).to(device)
    text_head = build_head(config.head, train_text.shape[1], config.out_dim,
                           **config.head_options).to(device)
    loss_fn = AlignmentLoss(config.loss_options())
    # λ = 0: the CLIP term alone, the fair objective for schedulers (no λ·R_S)
    clip_only = AlignmentLoss(config.loss_options(), structure_lambda=0.0)
    train_config = config.train_config(str(device))
    val_image, val_text = to(data.val_image), to(data.val_text)
    recorder = EpochRecorder((image_head, text_head), val_image, val_text, train_config.batch_size,
                             clip_only, record_stride(train_config.epochs), forward=on_epoch)
    extra = {name: None if value is None else to(value)
             for name, value in (("extra_image", data.extra_image), ("extra_text", data.extra_text))}
    result = train_alignment(image_head, text_head, loss_fn, train_image, train_text,
                             val_image, val_text, train_config, on_epoch=recorder, impl=impl,
                             **extra)
    if not math.isfinite(result.best_val_loss):
        raise FloatingPointError(
            f"training diverged: the validation loss was never finite in {len(result.history)} "
            f"epochs (lr={result.lr:g}); lower `lr` (or set it to null for the LR finder), "
            "`structure_lambda` or `temperature`")
    image_head.eval(), text_head.eval()
    # the heads are the restored best epoch's: its CLIP-only loss is Optuna's fair objective
    best_clip = validation_clip_loss(image_head, text_head, val_image, val_text,
                                     train_config.batch_size, clip_only)
    summary = {"best_val_loss": result.best_val_loss, "best_val_clip_loss": best_clip,
               "best_epoch": result.best_epoch, "epochs_run": len(result.history),
               "lr_used": result.lr, "stopped": result.stopped, EPOCH_ROWS: recorder.rows}
    return image_head, text_head, _head_class_vectors(text_head), summary


def _fit_closed_form(train_image, train_text, config):
    """Fit the head in closed form: its fitting function is the head's registered code."""
    fit = HEADS.get(config.head)(train_image, train_text, config.out_dim, seed=config.seed,
                                 **config.head_options)
    summary = {"best_val_loss": float("nan"), "best_val_clip_loss": float("nan"), "best_epoch": 0,
               "epochs_run": 0, "lr_used": float("nan"), "stopped": "closed_form", EPOCH_ROWS: []}
    return fit.transform_x, fit.transform_y, fit.class_vectors, summary


def _head_class_vectors(text_map):
    """§8.1: the head maps each template; normalise, average, normalise."""
    def class_vectors(prompts: torch.Tensor) -> torch.Tensor:
        c, t, d = prompts.shape
        return zero_shot_weights(text_map(prompts.reshape(c * t, d)).reshape(c, t, -1))
    return class_vectors


def _evaluate(data: TrialData, image_map, text_map, class_vectors, to) -> dict:
    metrics: dict[str, float] = {}
    for name, zs in data.zero_shot.items():
        logits = zero_shot_logits(image_map(to(zs.image)), class_vectors(to(zs.prompts)))
        labels = torch.tensor(np.asarray(zs.labels), device=logits.device)
        for key, value in zero_shot_metrics(logits, labels).items():
            metrics[f"zs/{name}/{key}"] = float(value)
    for name, ret in data.retrieval.items():
        image_emb, text_emb = image_map(to(ret.image)), text_map(to(ret.text))
        for protocol in ("official", "standard"):
            result = retrieval_metrics(image_emb, text_emb, np.array(ret.text_to_image),
                                       protocol=protocol)
            for direction, values in result.items():
                for key, value in values.items():
                    metrics[f"ret/{name}/{protocol}/{direction}/{key}"] = float(value)
    return metrics
