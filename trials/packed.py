"""Packed trials: trials that share shapes, trained as one batched computation.

:func:`run_pack` runs P trials of one :func:`pack_key` (same head and head
options, dimensions, number of training pairs, batch size and structure
options) as one stacked computation: head weights [P, ...], batches
[P, n, d], the loss of :mod:`trials.packed_loss`. Each member keeps what
makes it its own trial: its subsample and batch order (its seed), λ and
warm-up, temperature, learning rate (or its own LR-finder result), weight
decay, clipping, epochs and patience, early stopping and best-epoch restore,
and its layer pair: its own :class:`~trials.trial.TrialData` (training rows,
validation rows and their frozen R_S half, neighbourhood probe, evaluation
sets), of the same dimensions and row counts as the other members'. Members
that read one TrialData share its validation rows and their frozen half.
A member's results equal those of :func:`trials.trial.run_trial` on the same
config and data up to float rounding (checked within 1e-5 relative by
``tests/trials/test_packed.py``).

How members that stop are handled: they leave the stack (their tensors are
dropped with ``index_select`` at the end of the epoch), so the others go on
without computing for them; their best weights are written back to their own
modules. Members with ``lr=None`` run the LR finder of
:func:`trials.train.find_lr` alone first, on their own batches and the fused
loss, exactly as their trial alone would, then join the pack with the LR found.

What is not packed (:func:`unpackable` says why; :func:`pack_key` is None):
heads other than ``linear`` and ``res_low_rank`` with its official stuck gate
(see :mod:`trials.packed_heads`), the reference-only loss options (rbf or
spearman distance, textbook JS), FuseMix and fixed_structure. A member whose
data has unpaired extras runs alone (:func:`trials.trial.run_trial`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional, Sequence

import numpy as np
import torch

from trials.config import TrialConfig
from trials.fast_loop import FusedAlignmentLoss
from trials.heads import build_head
from trials.losses import AlignmentLoss
from trials.neighbourhood import validation_clip_loss
from trials.packed_heads import STACKED_PARAMETERS
from trials.packed_loop import OnMemberEpoch, PackMember, PackTrainer
from trials.train import find_lr
from trials.trial import EPOCH_ROWS, TrialData, _evaluate, _head_class_vectors, run_trial, subsample

# What each member of a pack may set for itself; every other TrialConfig field is shared.
MEMBER_FIELDS = ("seed", "lr", "temperature", "structure_lambda", "warmup_steps", "weight_decay",
                 "grad_clip", "patience", "epochs")
# Which features a member reads: its own TrialData in run_pack (the pack checks their shapes)
DATA_FIELDS = ("image_layer", "text_layer")


def unpackable(config: TrialConfig) -> list[str]:
    """Why ``config`` cannot train in a pack (empty: it can)."""
    reasons = []
    if config.head not in STACKED_PARAMETERS:
        reasons.append(f"head {config.head!r} (packed: {', '.join(STACKED_PARAMETERS)})")
    elif config.head == "res_low_rank" and config.head_options.get("gate_init", 0.0) != 0.0:
        reasons.append("res_low_rank with a trainable gate (gate_init > 0) draws dropout masks")
    if config.structure_distance != "cosine" or config.structure_divergence != "official":
        reasons.append("reference-only R_S options (distance other than cosine, or textbook JS)")
    if config.mixup_alpha > 0 or config.fixed_structure:
        reasons.append("FuseMix / fixed_structure")
    return reasons


def pack_key(config: TrialConfig) -> Optional[tuple]:
    """The shape signature of a trial: trials with equal keys can share a pack; None: never packed.

    The layer pair is not in it: trials on different layer pairs pack together when their
    data have the same dimensions and row counts (:func:`run_pack` checks)."""
    if unpackable(config):
        return None
    shared = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
              if f.name not in MEMBER_FIELDS + DATA_FIELDS}
    shared["head_options"] = tuple(sorted(config.head_options.items()))
    return tuple(sorted(shared.items()))


def member_bytes(config: TrialConfig, image_dim: int, text_dim: int, n_train: int) -> int:
    """An upper estimate of the memory one member adds to a pack (float32 bytes).

    Weights with their gradient, two AdamW moments and the best snapshot (5×);
    the member's training rows; R_S's n×n scratch matrices at the batch size
    (4L + 4 of them, as :mod:`trials.packed_loss` names them), counted once:
    the image and text terms reuse them; and with one batch an epoch, the frozen
    half of R_S of its rows, kept for the whole run (2L per modality).
    """
    n = min(n_train, config.n_train or n_train)
    batch = min(config.batch_size, n)
    weights = config.out_dim * (image_dim + text_dim + 2)
    kept = 4 * config.structure_levels if n <= config.batch_size else 0
    square = (4 * config.structure_levels + 4 + kept) * batch * batch
    return 4 * (5 * weights + n * (image_dim + text_dim) + square + 4 * batch * (image_dim + text_dim))


def run_pack(data: TrialData | Sequence[TrialData], configs: list[TrialConfig], *, device: str = "cpu",
             on_epoch: Optional[OnMemberEpoch] = None) -> list:
    """Train and evaluate every config as one pack; one result per config, in order.

    ``data`` is one :class:`TrialData` shared by every member, or one per config
    (members of different layer pairs): each member's subsample, validation,
    neighbourhood probe and evaluation read its own. They must have the same
    feature dimensions and numbers of training and validation rows (ValueError
    otherwise: group by them first). A member whose data has unpaired extras
    runs alone (:func:`trials.trial.run_trial`); the others still pack.

    Each result is what :func:`trials.trial.run_trial` returns for that config
    on its data (same keys, same numbers up to rounding), or the exception that
    member failed with (e.g. FloatingPointError: its validation loss was never
    finite); the other members go on. ``on_epoch(member, epoch, row)`` sees
    each member's epoch row (with ``val_clip_loss``) and may stop that member.
    All configs must share one non-None :func:`pack_key` (ValueError otherwise).
    ``train_seconds`` is the pack's wall time shared equally among its members.
    """
    keys = {pack_key(c) for c in configs}
    if None in keys or len(keys) > 1:
        raise ValueError("run_pack needs configs of one pack_key (see trials.packed.pack_key); got "
                         f"{len(keys)} keys" + (" including unpackable configs" if None in keys else ""))
    datas = _member_data(data, len(configs))
    results: list = [None] * len(configs)
    packed = []
    for i, (d, c) in enumerate(zip(datas, configs)):
        if d.extra_image is not None or d.extra_text is not None:  # R_S over extras: not packed
            results[i] = _alone(d, c, device, on_epoch, i)
        else:
            packed.append(i)
    if not packed:
        return results
    start = time.perf_counter()
    to = lambda a: torch.tensor(np.asarray(a, dtype=np.float32), device=device)  # noqa: E731
    members = [_member(datas[i], i, configs[i], to) for i in packed]
    vals: dict[int, tuple] = {}  # one copy of each distinct data's validation rows
    for i in packed:
        if id(datas[i]) not in vals:
            vals[id(datas[i])] = (to(datas[i].val_image), to(datas[i].val_text))
    PackTrainer(members, [vals[id(datas[i])] for i in packed], on_epoch).run()
    share = (time.perf_counter() - start) / len(members)
    for i, m in zip(packed, members):
        results[i] = _finish(m, datas[i], vals[id(datas[i])], to, share)
    return results


def data_shape(data: TrialData) -> tuple:
    """What members' data must share to train in one pack, as (name, value) pairs."""
    return (("image dim", np.shape(data.train_image)[1]), ("text dim", np.shape(data.train_text)[1]),
            ("val image dim", np.shape(data.val_image)[1]), ("val text dim", np.shape(data.val_text)[1]),
            ("training rows", len(data.train_image)), ("validation rows", len(data.val_image)))


def _member_data(data, p: int) -> list[TrialData]:
    """Each member's TrialData; ValueError where they cannot share a pack."""
    if isinstance(data, TrialData):
        return [data] * p
    datas = list(data)
    if len(datas) != p:
        raise ValueError(f"run_pack needs one TrialData or one per config: got {len(datas)} for {p} configs")
    shapes = {}
    for d in datas:
        if not isinstance(d, TrialData):
            raise ValueError(f"run_pack's data must be TrialData, got {type(d).__name__}")
        shapes.setdefault(data_shape(d), d)
    if len(shapes) > 1:
        first, *others = shapes
        differing = sorted({name for other in others for (name, v), (_, w) in zip(other, first) if v != w})
        raise ValueError(f"a pack's members must have data of one shape; they differ in {', '.join(differing)}: "
                         + "; ".join(", ".join(f"{name} {v}" for name, v in shape) for shape in shapes))
    return datas


def _alone(data, config, device, on_epoch, index):
    forward = None if on_epoch is None else (lambda epoch, row: on_epoch(index, epoch, row))
    try:
        return run_trial(data, config, device=device, on_epoch=forward)
    except Exception as error:  # noqa: BLE001 (each member's failure is its own result)
        return error


def _member(data: TrialData, index: int, config: TrialConfig, to) -> PackMember:
    """Subsample, heads and LR as :func:`trials.trial.run_trial` makes them for this config."""
    rows = subsample(len(data.train_image), config.n_train, config.seed).numpy()
    train = (to(np.asarray(data.train_image)[rows]), to(np.asarray(data.train_text)[rows]))
    device = train[0].device
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(config.seed)  # head initialisation, as run_trial
        heads = tuple(build_head(config.head, t.shape[1], config.out_dim, **config.head_options).to(device)
                      for t in train)
        generator = torch.Generator(device=device).manual_seed(config.seed)
        member = PackMember(index, config, heads, train, generator, len(rows), lr=config.lr)
        if config.lr is None:  # the LR finder alone, on the fused loss, as the trial's own loop
            torch.manual_seed(config.seed)  # dropout, as train_alignment
            loss = FusedAlignmentLoss.twin_of(AlignmentLoss(config.loss_options()))
            member.lr = find_lr(*heads, loss, *train, config.train_config(str(device)), generator=generator)
    return member


def _finish(member: PackMember, data: TrialData, val, to, seconds: float):
    """The member's result dict (best heads restored), or the exception it failed with."""
    config = member.config
    try:
        if not math.isfinite(member.best_val_loss):
            raise FloatingPointError(
                f"training diverged: the validation loss was never finite in {member.epochs_run} "
                f"epochs (lr={member.lr:g}); lower `lr` (or set it to null for the LR finder), "
                "`structure_lambda` or `temperature`")
        image_head, text_head = member.heads
        image_head.eval(), text_head.eval()
        clip_only = AlignmentLoss(config.loss_options(), structure_lambda=0.0)
        best_clip = validation_clip_loss(image_head, text_head, *val, config.batch_size, clip_only)
        summary = {"best_val_loss": member.best_val_loss, "best_val_clip_loss": best_clip,
                   "best_epoch": member.best_epoch, "epochs_run": member.epochs_run, "lr_used": member.lr,
                   "stopped": member.stopped, EPOCH_ROWS: member.rows}
        with torch.no_grad():
            metrics = _evaluate(data, image_head, text_head, _head_class_vectors(text_head), to)
        return {**summary, **metrics, "n_train_used": member.n_used, "train_seconds": seconds}
    except Exception as error:  # noqa: BLE001 (recorded for this member alone)
        return error


def _rng_devices(device: torch.device) -> list:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]
