"""The training loop of a pack: :func:`trials.train.train_alignment`'s loop, for P members at once.

Everything a member sees is what its trial alone sees in :mod:`trials.train`:
its own batch order (a ``torch.Generator`` seeded with its seed), λ warm-up,
periodic cosine schedule, per-head gradient clipping and AdamW, the
in-order validation batches, its strict best-epoch rule and patience. The
pack only shares the step counter (members start together) and, among
members that read the same validation set, its rows and their frozen R_S
half; members of different layer pairs each read their own set (the sets
stacked, [sets, n_val, d], each member indexing its own). Per-step scalars
(λ, 1 − lr·wd, −lr/(1 − β1^t)) are made on the host in double, as torch's
optimiser and scheduler make them, and moved to the device once per epoch;
the epoch's losses are read once per epoch. Members that stop leave the
stack at the end of the epoch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from trials.config import TrialConfig
from trials.neighbourhood import NEIGHBOURS, PROBE_ROWS, record_stride
from trials.similarity import _DIAG_FILL
from trials.packed_heads import HeadStack
from trials.packed_loss import FrozenSide, PackedAlignmentLoss, frozen_side

# Bytes of the frozen half of R_S on validation batches a pack caches (as trials.fast_loop)
VALIDATION_CACHE_BYTES = 2 * 1024**3

OnMemberEpoch = Callable[[int, int, dict], Optional[bool]]  # (member, epoch, row) -> stop?


@dataclass
class PackMember:
    """One trial of a pack: its config, modules, rows and RNG, and the state of its early stopping."""

    index: int  # its position in the caller's list
    config: TrialConfig
    heads: tuple  # (image, text) nn.Modules; the best weights are written back into them
    train: tuple  # (image, text) rows of its subsample, on the device
    generator: torch.Generator
    n_used: int
    lr: float = math.nan
    epochs_run: int = 0
    rows: list = field(default_factory=list)  # recorded epoch rows, as EpochRecorder keeps them
    best_epoch: int = -1
    best_val_loss: float = math.inf
    worse_epochs: int = 0
    stopped: str = ""  # "" while it trains

    def lam(self, steps: int) -> float:
        """``AlignmentLoss.structure_lambda`` after ``steps`` calls of ``step()``."""
        base, warmup = float(self.config.structure_lambda), self.config.warmup_steps
        if steps == 0 or warmup <= 0:
            return base
        return base * min(1.0, (steps - 1) / warmup)


class PackTrainer:
    """Trains the members of one pack until each has stopped; :meth:`run` is the whole loop."""

    def __init__(self, members: list[PackMember], val, on_epoch: Optional[OnMemberEpoch] = None):
        """``val``: the (image, text) validation rows, [n_val, d] each: one pair shared by every
        member, or a sequence of one pair per member (members of different layer pairs). Pairs
        that are the same tensors are one validation set: computed for once and shared."""
        first = members[0].config
        self.active, self.on_epoch = list(members), on_epoch
        self.val_sets, self.source = _distinct_sets(val, len(members))
        self.shared = len(self.val_sets) == 1  # one validation set: [n_val, d] rows seen by all
        self.val = self.val_sets[0] if self.shared else \
            [torch.stack([s[k] for s in self.val_sets]) for k in (0, 1)]  # [sets, n_val, d]
        self.device = self.val[0].device
        self.train_config = first.train_config(str(self.device))  # the shared optimiser settings
        self.stack = HeadStack(first.head, [m.heads[0] for m in members], [m.heads[1] for m in members])
        self.rows = [torch.stack([m.train[k] for m in members]) for k in (0, 1)]
        self.loss = PackedAlignmentLoss(
            normalize_latents=first.normalize_latents, paper_sum=first.paper_sum,
            structure_options=dict(levels=first.structure_levels, weighting=first.structure_weighting,
                                   margin=first.structure_margin, centering=first.structure_centering,
                                   center_first=first.structure_center_first))
        self.steps = 0  # optimiser steps so far, the same for every member still training
        self._frozen: dict[tuple, tuple] = {}
        self._frozen_bytes = 0
        self._whole: Optional[tuple] = None  # see _whole_frozen
        self.frozen_options = {k: v for k, v in self.loss.structure_options.items()
                               if k in ("levels", "centering", "center_first")}  # what frozen_side reads
        self._member_tensors()
        # the probe's neighbourhoods in the frozen spaces: per validation set, the same every epoch
        self.probe = [v[..., :PROBE_ROWS, :] for v in self.val]
        self.k = min(NEIGHBOURS, self.probe[0].shape[-2] - 1)
        self.frozen_knn = [_knn_masks(F.normalize(p.float(), dim=-1)[None] if self.shared else
                                      F.normalize(p.float(), dim=-1), self.k) if self.k >= 1 else None
                           for p in self.probe]

    def _member_tensors(self) -> None:
        """Per-member constants on the device, remade when members leave (one small transfer)."""
        self.temperature = torch.tensor([m.config.temperature for m in self.active], dtype=torch.float64,
                                        device=self.device)
        self.clip = torch.tensor([float(m.config.grad_clip) for m in self.active], device=self.device)
        self.source_index = torch.tensor(self.source, device=self.device)  # each member's validation set

    def _per_member(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows of the validation sets ([sets, n, ...]) as each member's ([P, n, ...]); shared
        rows ([n, ...], or a [1, ...] mask) are returned as they are, seen by every member."""
        return rows if self.shared else rows.index_select(0, self.source_index)

    def run(self) -> None:
        epoch = 0
        while self.active:
            table, lambdas, corrections, last_lrs = self._schedule()
            train_loss = self._train_epoch(table, lambdas, corrections)
            val_loss, val_clip = self._validate(table[-1, 0], lambdas[-1])
            values = torch.stack([train_loss, val_loss, val_clip]).tolist()  # the epoch's one read
            self._end_epoch(epoch, *values, last_lrs)
            epoch += 1

    # --- one epoch ---------------------------------------------------------------------

    def _schedule(self):
        """This epoch's per-step scalars, as torch's LambdaLR, AdamW and the λ warm-up make them.

        Returns a [steps + 1, 3, P] float32 table (λ, 1 − lr·wd, −lr/(1 − β1^t); the
        last row's λ is the validation's), λ per step as Python floats, √(1 − β2^t)
        per step, and each member's last learning rate (the epoch row's ``lr``).
        """
        config, n = self.train_config, len(self.rows[0][0])
        beta1, beta2 = config.betas
        t_max = config.scheduler_epoch_cycles * max(n // config.batch_size, 1)
        table, lambdas, corrections, lrs = [], [], [], []
        for k in range(self.steps, self.steps + math.ceil(n / config.batch_size)):
            factor = 1.0 if config.scheduler == "none" else 0.5 * (1 + math.cos(math.pi * k / t_max))
            lrs = [m.lr * factor for m in self.active]
            lambdas.append([m.lam(k + 1) for m in self.active])
            correction1 = 1 - beta1 ** (k + 1)
            table.append([lambdas[-1], [1 - lr * m.config.weight_decay for lr, m in zip(lrs, self.active)],
                          [-(lr / correction1) for lr in lrs]])
            corrections.append((1 - beta2 ** (k + 1)) ** 0.5)
        end = self.steps + len(lambdas)
        lambdas.append([m.lam(end) for m in self.active])
        table.append([lambdas[-1], lambdas[-1], lambdas[-1]])
        as_tensor = torch.tensor(table, dtype=torch.float64).to(self.device, torch.float32)
        return as_tensor, lambdas, corrections, lrs

    def _train_epoch(self, table, lambdas, corrections) -> torch.Tensor:
        config, p = self.train_config, len(self.active)
        n = self.rows[0].shape[1]
        order = torch.stack([torch.randperm(n, generator=m.generator, device=self.device) for m in self.active])
        member = torch.arange(p, device=self.device)[:, None]
        clipping = any(m.config.grad_clip for m in self.active)
        total, count = torch.zeros(p, device=self.device), 0
        for step, start in enumerate(range(0, n, config.batch_size)):
            idx = order[:, start:start + config.batch_size]
            x_img, x_txt = self.rows[0][member, idx], self.rows[1][member, idx]
            # one batch of all rows: R_S reads them in stored order, whose frozen half never changes
            whole = n <= config.batch_size and any(lam > 0 for lam in lambdas[step])
            loss, _ = self.loss(self.stack.forward(0, x_img), self.stack.forward(1, x_txt), x_img, x_txt,
                                self.temperature, lambdas[step], table[step, 0],
                                frozen=self._whole_frozen() if whole else None,
                                order=torch.argsort(idx, dim=1) if whole else None)
            grads = list(torch.autograd.grad(loss.sum(), self.stack.params))  # members never mix
            if clipping:
                self.stack.clip_(grads, self.clip)
            self.stack.adamw_(grads, table[step, 1], table[step, 2], corrections[step], config.betas,
                              config.eps)
            total, count = total + loss.detach() * idx.shape[1], count + idx.shape[1]
        self.steps += len(corrections)
        return total / count

    def _whole_frozen(self) -> tuple:
        """The frozen half of R_S of every member's whole training subsample, in stored order:
        with one batch an epoch, R_S reads the batch in that order (as the trial alone does with
        its Gram, ``trials.fast_loop``), so it is the same every epoch and made once."""
        if self._whole is None:
            self._whole = tuple(frozen_side(rows, self.temperature, **self.frozen_options) for rows in self.rows)
        return self._whole

    @torch.no_grad()
    def _validate(self, lambda_t: torch.Tensor, lambdas: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample-weighted mean loss and its CLIP part over the in-order validation batches."""
        p, bs, n_val = len(self.active), self.train_config.batch_size, self.val[0].shape[-2]
        total, clip_total = torch.zeros(p, device=self.device), torch.zeros(p, device=self.device)
        for start in range(0, n_val, bs):
            x_img, x_txt = (v[..., start:start + bs, :] for v in self.val)  # [n, d] or [sets, n, d]
            frozen = self._val_frozen(start, x_img, x_txt) if any(lam > 0 for lam in lambdas) else None
            x_img, x_txt = self._per_member(x_img), self._per_member(x_txt)
            loss, clip = self.loss(self.stack.forward(0, x_img), self.stack.forward(1, x_txt), x_img, x_txt,
                                   self.temperature, lambdas, lambda_t, frozen=frozen)
            size = x_img.shape[-2]
            total, clip_total = total + loss * size, clip_total + clip * size
        count = max(n_val, 1)
        return total / count, clip_total / count

    def _val_frozen(self, start: int, x_img, x_txt) -> tuple:
        """The frozen half of R_S of one validation batch for every member: one per validation
        set and temperature, made once per pack (within :data:`VALIDATION_CACHE_BYTES`) and
        shared as views when every member has the same."""
        sides = [self._frozen_for(source, start, x_img, x_txt, m.config.temperature)
                 for source, m in zip(self.source, self.active)]
        if all(s is sides[0] for s in sides):
            return tuple(side.expand(len(sides)) for side in sides[0])
        return tuple(FrozenSide.cat([s[k] for s in sides]) for k in (0, 1))

    def _frozen_for(self, source: int, start: int, x_img, x_txt, temperature: float) -> tuple:
        key = (source, start, temperature)
        if key in self._frozen:
            return self._frozen[key]
        t = torch.tensor([temperature], dtype=torch.float64, device=self.device)
        rows = (x_img, x_txt) if self.shared else (x_img[source], x_txt[source])
        sides = tuple(frozen_side(x[None], t, **self.frozen_options) for x in rows)
        size = sum(side.nbytes() for side in sides)
        if self._frozen_bytes + size <= VALIDATION_CACHE_BYTES:
            self._frozen[key], self._frozen_bytes = sides, self._frozen_bytes + size
        return sides

    # --- after the epoch: each member's own bookkeeping ---------------------------------

    def _end_epoch(self, epoch: int, train_losses, val_losses, val_clips, last_lrs) -> None:
        improved = []
        probe = self._probe_outputs(epoch)
        for i, m in enumerate(self.active):
            train_value, val_value = train_losses[i], val_losses[i]
            row = {"epoch": epoch, "train_loss": train_value, "val_loss": val_value, "lr": last_lrs[i],
                   "structure_lambda": m.lam(self.steps)}
            m.epochs_run += 1
            if val_value < m.best_val_loss:  # strict, as the official trainer
                m.best_epoch, m.best_val_loss = epoch, val_value
                improved.append(i)
            m.worse_epochs = m.worse_epochs + 1 if not val_value <= m.best_val_loss else 0
            row = self._record(m, i, epoch, row, val_clips[i], probe)
            if self.on_epoch is not None and self.on_epoch(m.index, epoch, dict(row)):
                m.stopped = "callback"
            elif not math.isfinite(train_value) and not math.isnan(last_lrs[i]):
                m.stopped = "diverged"
            elif m.worse_epochs >= m.config.patience:
                m.stopped = "early_stopping"
            elif epoch + 1 >= m.config.epochs:
                m.stopped = "max_epochs"
        if improved:
            self.stack.keep_best_(torch.tensor(improved, device=self.device))
        self._drop_stopped()

    def _record(self, member: PackMember, i: int, epoch: int, row: dict, val_clip: float, probe) -> dict:
        """``trials.neighbourhood.EpochRecorder``'s row: val_clip_loss, and nbr on recorded epochs."""
        record = epoch % record_stride(member.config.epochs) == 0
        if record or self.on_epoch is not None:
            row = {**row, "val_clip_loss": val_clip}
        if record:
            row["nbr_image"], row["nbr_text"] = probe[0][i], probe[1][i]
            member.rows.append(dict(row))
        return row

    @torch.no_grad()
    def _probe_outputs(self, epoch: int):
        """``trials.neighbourhood.neighbourhood_agreement`` of every member's heads on the probe
        rows (image, text lists of floats), when some member records this epoch."""
        if not any(epoch % record_stride(m.config.epochs) == 0 for m in self.active):
            return None
        if self.k < 1:  # fewer than two probe rows: no neighbour exists
            return [[math.nan] * len(self.active)] * 2
        scores = []
        for k, frozen in enumerate(self.frozen_knn):
            aligned = F.normalize(self.stack.forward(k, self._per_member(self.probe[k])).float(), dim=-1)
            both = self._per_member(frozen) & _knn_masks(aligned, self.k)
            scores.append(both.sum(2).double().mean(1) / self.k)
        return torch.stack(scores).tolist()

    def _drop_stopped(self) -> None:
        """Members that stopped get their best weights back and leave the stack."""
        keep = [i for i, m in enumerate(self.active) if not m.stopped]
        if len(keep) == len(self.active):
            return
        for i, m in enumerate(self.active):
            if m.stopped:
                self.stack.write_best(i, *m.heads)
        self.active = [self.active[i] for i in keep]
        if self.active:
            index = torch.tensor(keep, device=self.device)
            self.stack.select_(index)
            self.rows = [r.index_select(0, index) for r in self.rows]
            if self._whole is not None:
                self._whole = tuple(side.select(index) for side in self._whole)
            self.source = [self.source[i] for i in keep]
            self._member_tensors()
            self._forget_frozen(set(self.source))

    def _forget_frozen(self, sources: set) -> None:
        """Drop the cached frozen sides of validation sets no member still reads."""
        for key in [key for key in self._frozen if key[0] not in sources]:
            self._frozen_bytes -= sum(side.nbytes() for side in self._frozen.pop(key))


def _distinct_sets(val, p: int) -> tuple[list[tuple], list[int]]:
    """(the distinct validation sets, each member's set index) of a shared pair or P pairs."""
    if isinstance(val[0], torch.Tensor):
        return [tuple(val)], [0] * p
    if len(val) != p:
        raise ValueError(f"one validation pair per member: got {len(val)} for {p} members")
    sets, source, seen = [], [], {}
    for pair in val:
        key = (id(pair[0]), id(pair[1]))
        if key not in seen:
            seen[key] = len(sets)
            sets.append(tuple(pair))
        source.append(seen[key])
    shapes = {tuple(t.shape for t in pair) for pair in sets}
    if len(shapes) > 1:
        raise ValueError(f"a pack's validation sets must have one shape, got {sorted(shapes)}")
    return sets, source


def _knn_masks(x: torch.Tensor, k: int) -> torch.Tensor:
    """``trials.similarity``'s kNN membership per member: [P, n, d] -> bool [P, n, n], self excluded."""
    gram = torch.bmm(x, x.transpose(1, 2))
    gram.diagonal(dim1=1, dim2=2).fill_(_DIAG_FILL)
    indices = gram.topk(k, dim=2).indices
    return torch.zeros(gram.shape, dtype=torch.bool, device=x.device).scatter_(2, indices, True)
