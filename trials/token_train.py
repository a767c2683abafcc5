"""Training of freeze-align's token projector on token features (METHOD.md §4.5).

:func:`train_token_projector` is the pooled loop of :mod:`trials.train` for
heads that read tokens: epochs over shuffled batches, a validation pass per
epoch, early stopping on the validation loss and the best epoch restored.
What differs is where batches come from: each is gathered from a
:class:`trials.tokens.TokenPairs` on the host, through :func:`trials.read_ahead.read_ahead`
(the next batches load in a background thread), then copied to the device.
Batch order comes from a CPU ``torch.Generator`` seeded with the trial's
seed and is drawn before loading, so reading ahead changes no number.

freeze-align's optimiser: AdamW (betas and eps at their defaults, as timm's
``create_optimizer`` that the ALBEF-derived code calls), with weight decay
on every parameter except 1-D ones and biases (timm's grouping; the 0-d
temperature decays). Its LR schedule is :func:`freeze_align_lr`.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from trials.read_ahead import DEPTH, read_ahead
from trials.token_projector import (
    LearnableTemperatureLoss,
    TokenProjector,
    Tokens,
    pooled_original,
)
from trials.tokens import TokenPairs
from trials.train import EpochBook, TrainResult, _rng_devices
from trials.train_options import TrainConfig

BETAS, EPS = (0.9, 0.999), 1e-8  # torch's AdamW defaults, which timm's factory keeps
# The official schedular config (dinov2-arl-wds-combined.yaml) and ALBEF's stepping
WARMUP_LR = MIN_LR = 1e-5
WARMUP_EPOCHS = 10  # the scheduler's warm-up length, in its own steps
WARMUP_STEP_SIZE = 100  # epoch 0 steps the scheduler every 100 iterations


def freeze_align_lr(base_lr: float, epochs: int, epoch: int, step: int) -> float:
    """The LR of iteration ``step`` of ``epoch`` under the official schedule, read literally.

    timm's ``CosineLRScheduler(t_initial=epochs, lr_min=1e-5, warmup_t=10,
    warmup_lr_init=1e-5, cycle_limit=1)``, stepped as ALBEF's loop does: in
    epoch 0 ``step(i // 100)`` after iterations i = 0, 100, ..., 1000; before
    each later epoch e, ``step(e + 10)``. So the warm-up covers epoch 0's first
    1000 iterations and the cosine restarts at t = 11 (METHOD.md §4.5).
    """
    if epoch == 0:
        t = 0 if step == 0 else min((step - 1) // WARMUP_STEP_SIZE, WARMUP_EPOCHS)
    else:
        t = epoch + WARMUP_EPOCHS
    if t < WARMUP_EPOCHS:
        return WARMUP_LR + t * (base_lr - WARMUP_LR) / WARMUP_EPOCHS
    if t < epochs:
        return MIN_LR + 0.5 * (base_lr - MIN_LR) * (1 + math.cos(math.pi * t / epochs))
    return MIN_LR


def optimizer_groups(modules, weight_decay: float) -> list[dict]:
    """timm's ``add_weight_decay``: no decay on 1-D parameters and biases."""
    decay, no_decay = [], []
    for module in modules:
        for name, param in module.named_parameters():
            if param.requires_grad:
                (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class _Run:
    """One training run's fixed parts: model, loss, optimiser, data and how to load it."""

    def __init__(self, model, loss_fn, train, val, config, schedule, mixed_precision, depth):
        self.model, self.loss_fn, self.train, self.val, self.config = model, loss_fn, train, val, config
        self.device = torch.device(config.device)
        self.optimizer = torch.optim.AdamW(optimizer_groups((model, loss_fn), config.weight_decay),
                                           lr=config.lr, betas=BETAS, eps=EPS)
        self.schedule, self.depth = schedule, depth
        amp = mixed_precision and self.device.type == "cuda"
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else nullcontext

    def batches(self, pairs: TokenPairs, rows: np.ndarray):
        """(image, text) ``Tokens`` on the device, batch by batch, the loading read ahead."""
        pin = self.device.type == "cuda"
        load = lambda chunk: tuple(Tokens.from_numpy(b, pin) for b in pairs.gather(chunk))
        chunks = [rows[start:start + self.config.batch_size] for start in range(0, len(rows), self.config.batch_size)]
        for image, text in read_ahead(load, chunks, self.depth):
            yield image.to(self.device, non_blocking=pin), text.to(self.device, non_blocking=pin)

    def losses(self, image: Tokens, text: Tokens) -> dict:
        """The loss terms of one batch (heads under autocast, the loss in float32)."""
        self.loss_fn.clamp_temperature()
        with self.autocast():
            a_img, a_txt = self.model.image(image), self.model.text(text)
        return self.loss_fn(a_img.float(), a_txt.float(), pooled_original(image, True),
                            pooled_original(text, False))


def train_token_projector(model: TokenProjector, loss_fn: LearnableTemperatureLoss,
                          train: TokenPairs, val: TokenPairs, config: TrainConfig, *,
                          schedule: str = "freeze_align", mixed_precision: bool = True,
                          on_epoch: Optional[Callable[[int, dict], Optional[bool]]] = None,
                          depth: int = DEPTH) -> TrainResult:
    """Train ``model`` and ``loss_fn``'s temperature in place; restore the best-val epoch.

    ``config.lr`` must be set (no LR finder). ``schedule`` "freeze_align" is
    :func:`freeze_align_lr`, "none" a constant LR. ``mixed_precision``: bf16
    autocast on CUDA. ``on_epoch(epoch, row)`` sees each epoch's row (with
    ``val_clip_loss`` and ``temperature``); returning True stops training.
    ``depth`` is the read-ahead depth (0: load in this thread).
    """
    if config.lr is None:
        raise ValueError("lr=None (the LR finder) is not supported for a token head; set lr "
                         "(freeze-align: 1e-3)")
    model.to(config.device), loss_fn.to(config.device)
    run = _Run(model, loss_fn, train, val, config, schedule, mixed_precision, depth)
    gen = torch.Generator().manual_seed(config.seed)  # on the host: batches are gathered there
    with torch.random.fork_rng(devices=_rng_devices(run.device)):
        torch.manual_seed(config.seed)  # dropout
        return _fit(run, gen, on_epoch)


def _fit(run: _Run, gen, on_epoch) -> TrainResult:
    config, modules = run.config, (run.model, run.loss_fn)
    result = TrainResult(lr=config.lr)
    book = EpochBook(modules, config.patience, result)
    for epoch in range(config.epochs):
        train_loss, last_lr = _train_epoch(run, epoch, torch.randperm(len(run.train), generator=gen))
        val_loss, val_clip = _validate(run)
        train_value, val_value, clip_value, temp = torch.stack(
            [train_loss, val_loss, val_clip, run.loss_fn.temp.detach()]).tolist()  # the epoch's one sync
        row = {"epoch": epoch, "train_loss": train_value, "val_loss": val_value, "lr": last_lr,
               "structure_lambda": float(run.loss_fn.structure_lambda), "val_clip_loss": clip_value,
               "temperature": temp}
        if book.end_epoch(epoch, row, on_epoch):
            break
    book.restore_best()
    return result


def _train_epoch(run: _Run, epoch: int, perm: torch.Tensor):
    """One pass over the shuffled pairs; returns (sample-weighted mean loss tensor, last LR)."""
    run.model.train()
    total, count, last_lr = torch.zeros((), device=run.device), 0, math.nan
    for step, (image, text) in enumerate(run.batches(run.train, perm.numpy())):
        if run.schedule == "freeze_align":
            for group in run.optimizer.param_groups:
                group["lr"] = freeze_align_lr(run.config.lr, run.config.epochs, epoch, step)
        run.loss_fn.step()  # λ warm-up, before the batch (§3.1)
        run.optimizer.zero_grad(set_to_none=True)
        loss = run.losses(image, text)["overall_loss"]
        loss.backward()
        if run.config.grad_clip:
            for module in (run.model.image, run.model.text):
                nn.utils.clip_grad_norm_(module.parameters(), run.config.grad_clip)
        last_lr = run.optimizer.param_groups[0]["lr"]
        run.optimizer.step()
        total, count = total + loss.detach() * len(image.mask), count + len(image.mask)
    return (total / count if count else torch.full_like(total, math.nan)), last_lr


@torch.no_grad()
def _validate(run: _Run):
    """Sample-weighted mean (overall, CLIP) loss over in-order validation batches, at the current λ."""
    run.model.eval()
    totals = torch.zeros(2, device=run.device)
    for image, text in run.batches(run.val, np.arange(len(run.val))):
        out = run.losses(image, text)
        totals += torch.stack([out["overall_loss"], out["clip_loss"]]) * len(image.mask)
    overall, clip = totals / max(len(run.val), 1)
    return overall, clip
