"""Training of one pair of alignment heads: the official loop, readable (METHOD.md §5).

One function, :func:`train_alignment`. Features stay on ``config.device``
for the whole run; batches are drawn by index from a seeded generator (no
DataLoader); the loss is accumulated on the device and read once per epoch,
so nothing in the step loop waits for the host.

Randomness: batch order, the fixed-structure batch and the unimodal-extra
order come from one ``torch.Generator`` seeded with ``config.seed``; FuseMix
coefficients from a NumPy generator with the same seed; dropout from the
global RNG, seeded with ``config.seed`` inside ``torch.random.fork_rng`` so
the caller's RNG state is left untouched. A given seed gives the same run.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from trials import fast_loop
from trials._checks import check_choice
from trials.train_options import TrainConfig

LR_FINDER_START = 1e-7  # §5.2
LR_FINDER_SUBSET = 5000  # §5.2: the finder sees at most this many rows
IMPLS = ("auto", "fast", "reference")  # train_alignment's paths: see its docstring


@dataclass
class TrainResult:
    """Per-epoch history (python floats), the restored best epoch, the LR used, why it stopped."""

    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1  # -1: no epoch had a finite val loss; initial weights kept
    best_val_loss: float = math.inf
    lr: float = math.nan
    stopped: str = "max_epochs"  # "early_stopping" | "callback" | "diverged" | "max_epochs"


class EpochBook:
    """What every training loop does after an epoch: record its row, keep the best
    epoch's weights (a strictly lower validation loss, as the official trainer) and
    decide whether to stop: the caller's ``on_epoch`` returned True, the training
    loss diverged, or ``patience`` epochs in a row were worse than the best."""

    def __init__(self, modules, patience: int, result: TrainResult):
        self.modules, self.patience, self.result = modules, patience, result
        self.best_state, self.worse_epochs = _snapshot(modules), 0

    def end_epoch(self, epoch: int, row: dict, on_epoch=None) -> bool:
        """Book ``row`` (with ``train_loss``, ``val_loss``, ``lr``); True: stop now."""
        result, val_value = self.result, row["val_loss"]
        result.history.append(row)
        if val_value < result.best_val_loss:
            result.best_epoch, result.best_val_loss, self.best_state = epoch, val_value, _snapshot(self.modules)
        # early stopping (fork reconstruction): only a strictly worse loss counts;
        # ours: a non-finite one counts as worse too (the official never stops on NaN)
        self.worse_epochs = self.worse_epochs + 1 if not val_value <= result.best_val_loss else 0
        if on_epoch is not None and on_epoch(epoch, dict(row)):
            result.stopped = "callback"
        # ours: a non-finite training loss means the weights are gone; waiting `patience`
        # more epochs cannot bring them back (NaN lr: no step ran, nothing diverged)
        elif not math.isfinite(row["train_loss"]) and not math.isnan(row["lr"]):
            result.stopped = "diverged"
        elif self.worse_epochs >= self.patience:
            result.stopped = "early_stopping"
        else:
            return False
        return True

    def restore_best(self) -> None:
        _restore(self.modules, self.best_state)


# ------------------------------------------------------------------ the loop


def train_alignment(image_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module,
                    train_image: torch.Tensor, train_text: torch.Tensor,
                    val_image: torch.Tensor, val_text: torch.Tensor, config: TrainConfig, *,
                    extra_image: Optional[torch.Tensor] = None,
                    extra_text: Optional[torch.Tensor] = None,
                    on_epoch: Optional[Callable[[int, dict], Optional[bool]]] = None,
                    impl: str = "auto", frozen_gram: str = "auto") -> TrainResult:
    """Train both heads in place with AdamW on ``loss_fn`` (§5.3); restore the best-val weights.

    ``loss_fn`` is a fresh ``trials.losses.AlignmentLoss`` (its λ warm-up is
    stepped here, once per batch). ``extra_*`` are unpaired features added to
    the R_S term only. ``on_epoch(epoch, metrics)`` gets the epoch's history
    row; returning True stops training (``stopped="callback"``).

    ``impl`` picks how the loss is computed, never what: "reference" runs
    ``loss_fn`` itself (autograd over the formulas of ``trials.losses``);
    "fast" runs its fused twin (``trials.fast_loop``: analytic gradients,
    reused buffers, the frozen half of R_S cached for validation), equal to
    the reference up to float rounding; "auto" (default) is "fast" where the
    fused terms cover the options (cosine distance, official divergence) and
    "reference" elsewhere. Both run this same loop on the same batches.

    ``frozen_gram`` ("auto" | "on" | "off") is how the fast path gets a
    training batch's frozen similarity: from a Gram matrix of all training
    rows built once per trial, or recomputed per batch. "auto" builds it where
    the options allow it (mean or no centring, not centre-first, no FuseMix,
    fixed structure or extras) and it pays (enough epochs, within
    ``fast_loop.GRAM_CACHE_BYTES``); "on" builds it wherever the options
    allow it and raises elsewhere, the reference path included; see
    ``fast_loop.wants_gram``. Same numbers up to float rounding.
    """
    check_choice("impl", impl, IMPLS)
    device = torch.device(config.device)
    heads = (image_head.to(device), text_head.to(device))
    data = [_on(t, device) for t in (train_image, train_text, val_image, val_text)]
    extras = (_on(extra_image, device), _on(extra_text, device))
    gen = torch.Generator(device=device).manual_seed(config.seed)
    only_unimodal = getattr(loss_fn, "use_only_unimodal", False)
    fused = fast_loop.fused_twin(loss_fn, impl)
    gram = fast_loop.wants_gram(frozen_gram, fused, loss_fn, config, len(data[0]), impl=impl,
                                extras=any(x is not None for x in extras))
    if fused is not None:
        fast_loop.cache_validation(fused, data[2], data[3], config.batch_size)
    if gram:
        fused.cache_gram(data[0], data[1])
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(config.seed)  # dropout
        try:
            return _fit(heads, fused or loss_fn, data, extras, config, gen, on_epoch)
        finally:
            loss_fn.use_only_unimodal = only_unimodal  # fixed_structure flips it
            if fused is not None:
                loss_fn.steps = fused.steps  # the λ schedule advanced on the twin


def _fit(heads, loss_fn, data, extras, config, gen, on_epoch) -> TrainResult:
    train_image, train_text, val_image, val_text = data
    lr = config.lr
    if lr is None:
        lr = find_lr(*heads, loss_fn, train_image, train_text, config, generator=gen)
    optimizer = torch.optim.AdamW([p for h in heads for p in h.parameters()], lr=lr,
                                  betas=config.betas, eps=config.eps, weight_decay=config.weight_decay)
    scheduler = _scheduler(optimizer, config, len(train_image))
    mix_rng = np.random.default_rng(config.seed)
    result = TrainResult(lr=lr)
    book = EpochBook(heads, config.patience, result)
    for epoch in range(config.epochs):
        train_loss, last_lr = _train_epoch(heads, loss_fn, optimizer, scheduler, train_image,
                                           train_text, extras, config, gen, mix_rng)
        val_loss = _validate(heads, loss_fn, val_image, val_text, config.batch_size)
        train_value, val_value = torch.stack([train_loss, val_loss]).tolist()  # the epoch's one sync
        row = {"epoch": epoch, "train_loss": train_value, "val_loss": val_value, "lr": last_lr,
               "structure_lambda": float(loss_fn.structure_lambda)}
        if book.end_epoch(epoch, row, on_epoch):
            break
    book.restore_best()
    return result


def _train_epoch(heads, loss_fn, optimizer, scheduler, train_image, train_text, extras,
                 config, gen, mix_rng):
    """One pass over the shuffled pairs (§5.3 'Per batch'); returns (mean loss tensor, last LR)."""
    for head in heads:
        head.train()
    n, bs = len(train_image), config.batch_size
    perm = torch.randperm(n, generator=gen, device=train_image.device)
    fixed = _fixed_batch(train_image, train_text, perm, bs, gen, loss_fn) if config.fixed_structure else None
    chunks = [_extra_chunks(x, bs, gen) for x in extras]
    # the fast path with training Grams reads the batch's frozen similarity by row index
    gram = loss_fn if isinstance(loss_fn, fast_loop.FusedAlignmentLoss) and loss_fn.has_gram else None
    total, count, last_lr = torch.zeros((), device=train_image.device), 0, math.nan
    for start in range(0, n, bs):
        idx = perm[start:start + bs]
        if config.mixup_alpha > 0 and len(idx) < bs:
            continue  # FuseMix skips the incomplete batch
        x_img, x_txt = train_image[idx], train_text[idx]
        if gram is not None:
            gram.training_batch(x_img, x_txt, idx)
        if config.mixup_alpha > 0:
            x_img, x_txt = _fusemix(x_img, x_txt, train_image, train_text, perm, start, bs,
                                    mix_rng.beta(config.mixup_alpha, config.mixup_alpha))
        loss_fn.step()  # λ warm-up, before the batch (§3.1)
        optimizer.zero_grad(set_to_none=True)
        extra_kw = _extra_inputs(heads, fixed, chunks, start)
        loss = loss_fn(heads[0](x_img), heads[1](x_txt), x_img, x_txt, **extra_kw)["overall_loss"]
        loss.backward()
        _clip(heads, config)
        last_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        total, count = total + loss.detach() * len(idx), count + len(idx)
    return (total / count if count else torch.full_like(total, math.nan)), last_lr


@torch.no_grad()
def _validate(heads, loss_fn, val_image, val_text, batch_size) -> torch.Tensor:
    """Sample-weighted mean ``overall_loss`` over in-order batches, at the current λ (§5.3)."""
    for head in heads:
        head.eval()
    total = torch.zeros((), device=val_image.device)
    for start in range(0, len(val_image), batch_size):
        x_img, x_txt = val_image[start:start + batch_size], val_text[start:start + batch_size]
        loss = loss_fn(heads[0](x_img), heads[1](x_txt), x_img, x_txt)["overall_loss"]
        total = total + loss * len(x_img)
    return total / max(len(val_image), 1)


# ------------------------------------------------------------------ per-batch pieces


def _fusemix(x_img, x_txt, train_image, train_text, perm, start, bs, lam):
    """Mix a batch with the epoch's order rolled by bs//2, as ``torch.roll`` in the code (§5.3)."""
    rows = torch.arange(start, start + bs, device=perm.device)
    partner = perm[(rows - bs // 2) % len(perm)]
    return (lam * x_img + (1 - lam) * train_image[partner],
            lam * x_txt + (1 - lam) * train_text[partner])


def _fixed_batch(train_image, train_text, perm, bs, gen, loss_fn):
    """fixed_structure: one random batch per epoch replaces the paired batch in R_S (§5.3)."""
    loss_fn.use_only_unimodal = True  # the official 'hack': extras replace the batch
    rows = perm[torch.randperm(len(perm), generator=gen, device=perm.device)[:bs]]
    return train_image[rows], train_text[rows]


def _extra_chunks(extra, bs, gen):
    """Unimodal extras, reshuffled each epoch and split into batch-sized chunks (§5.3)."""
    if extra is None:
        return None
    return extra[torch.randperm(len(extra), generator=gen, device=extra.device)].split(bs)


def _extra_inputs(heads, fixed, chunks, start) -> dict:
    """(original, aligned) extras for R_S; chunk = sample offset mod #chunks, as the code."""
    if fixed is not None:  # the fixed batch goes through the heads at every step
        x_img, x_txt = fixed
        return {"extra_image": (x_img, heads[0](x_img)), "extra_text": (x_txt, heads[1](x_txt))}
    out = {}
    for key, head, chunk_list in zip(("extra_image", "extra_text"), heads, chunks):
        if chunk_list is not None:
            x = chunk_list[start % len(chunk_list)]
            out[key] = (x, head(x))
    return out


def _clip(heads, config) -> None:
    """Per-head gradient clipping (§5.3): each module's total norm, or each tensor's norm."""
    if not config.grad_clip:
        return
    for head in heads:
        if config.clip_mode == "module_norm":
            nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        else:
            _clip_per_parameter(head, config.grad_clip)


def _clip_per_parameter(head: nn.Module, clip: float) -> None:
    """DINO's ``clip_gradients``: scale each grad by min(1, clip/(‖g‖+1e-6)), without a host sync."""
    for p in head.parameters():
        if p.grad is not None:
            p.grad.mul_((clip / (p.grad.norm(2) + 1e-6)).clamp(max=1.0))


def _scheduler(optimizer, config, n_train):
    """Periodic cosine over optimiser steps, T_max = 50·max(⌊N/bs⌋, 1) (§5.3); warm-up ignored."""
    if config.scheduler == "none":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    t_max = config.scheduler_epoch_cycles * max(n_train // config.batch_size, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / t_max)))


# ------------------------------------------------------------------ LR finder (§5.2)


def find_lr(image_head: nn.Module, text_head: nn.Module, loss_fn: nn.Module,
            train_image: torch.Tensor, train_text: torch.Tensor, config: TrainConfig, *,
            generator: Optional[torch.Generator] = None) -> float:
    """The official LR range test (§5.2); the heads' weights are restored afterwards.

    AdamW from 1e-7, multiplied by (end/start)^(1/iters) after every step, on
    random batches of a ≤5000-row subset, with the loss at its current λ (the
    full λ_base before any ``step()``). The run is never interrupted on the
    device; the curve is read once and cut after the first divergence
    (loss > 5·min so far, or non-finite), which gives the official curve.
    """
    heads = (image_head, text_head)
    saved = _snapshot(heads)
    gen = generator or torch.Generator(device=train_image.device).manual_seed(config.seed)
    try:
        lrs, losses = _lr_range_test(heads, loss_fn, train_image, train_text, config, gen)
    finally:
        _restore(heads, saved)
    return lr_from_curve(lrs, losses, min_lr=LR_FINDER_START * 10, fallback=config.lr_finder_fallback)


def _lr_range_test(heads, loss_fn, train_image, train_text, config, gen):
    for head in heads:
        head.train()
    device = train_image.device
    subset = torch.randperm(len(train_image), generator=gen, device=device)[:LR_FINDER_SUBSET]
    bs = min(config.batch_size, len(subset))
    params = [p for h in heads for p in h.parameters()]
    optimizer = torch.optim.AdamW(params, lr=LR_FINDER_START, betas=config.betas, eps=config.eps,
                                  weight_decay=config.weight_decay)
    mult = (config.lr_finder_end / LR_FINDER_START) ** (1 / config.lr_finder_iters)
    lrs, losses = [], []
    for _ in range(config.lr_finder_iters):
        idx = subset[torch.randperm(len(subset), generator=gen, device=device)[:bs]]
        x_img, x_txt = train_image[idx], train_text[idx]
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(heads[0](x_img), heads[1](x_txt), x_img, x_txt)["overall_loss"]
        loss.backward()
        lrs.append(optimizer.param_groups[0]["lr"])
        losses.append(loss.detach())
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] *= mult
    return lrs, torch.stack(losses).float().tolist()  # float32, as the code's loss.item()


def _cut_at_divergence(lrs, losses):
    """Keep the curve up to and including the first loss > 5·min so far or non-finite."""
    best = math.inf
    for i, loss in enumerate(losses):
        best = min(best, loss)
        if loss > 5 * best or not math.isfinite(loss):
            return lrs[:i + 1], losses[:i + 1]
    return lrs, losses


def lr_from_curve(lrs, losses, *, min_lr: float = 1e-6, fallback: float = 1e-3) -> float:
    """The official suggestion rule (§5.2) on a recorded LR-finder curve.

    Cut the curve after the first divergence (loss > 5·min so far, or not
    finite); fewer than 2 points left -> ``fallback``. Smooth
    s_0 = loss_0, s_i = 0.05 s_{i-1} + 0.95 loss_i; g = ds/dlog10(lr) by
    central differences; steep = argmin g over 1 … min(argmin s, len-1)-1,
    else max(0, argmin s - 1); return max(lr_steep/5, min_lr).
    """
    lrs, losses = _cut_at_divergence(list(lrs), [float(x) for x in losses])
    if len(losses) <= 1:
        return fallback
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    smoothed = [losses[0]]
    for loss in losses[1:]:
        smoothed.append(smoothed[-1] * 0.05 + loss * (1 - 0.05))
    smoothed = np.array(smoothed)
    gradients = np.gradient(smoothed, np.log10(lrs))
    min_idx = int(np.argmin(smoothed))
    valid = list(range(1, min(min_idx, len(gradients) - 1)))
    steep = valid[int(np.argmin(gradients[valid]))] if valid else max(0, min_idx - 1)
    return max(float(lrs[steep]) / 5.0, min_lr)


# ------------------------------------------------------------------ helpers


def _on(x: Optional[torch.Tensor], device) -> Optional[torch.Tensor]:
    """Features as float32 on the device (the official originals are float32, §5.3)."""
    return None if x is None else torch.as_tensor(x).to(device=device, dtype=torch.float32)


def _rng_devices(device: torch.device) -> list:
    """The CUDA device whose RNG (dropout) ``fork_rng`` must save and restore."""
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _snapshot(heads) -> list[dict]:
    """Device-side copies of the heads' state (no host transfer)."""
    return [copy.deepcopy(h.state_dict()) for h in heads]


def _restore(heads, states) -> None:
    for head, state in zip(heads, states):
        head.load_state_dict(state)
