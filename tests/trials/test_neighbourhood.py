"""trials.neighbourhood: neighbourhood agreement, the fair (λ-free) objective, epoch rows."""

import math

import pytest
import torch

import trials.trial as trial_module
from trials.config import TrialConfig
from trials.losses import AlignmentLoss
from trials.neighbourhood import (MAX_RECORDED_EPOCHS, PROBE_ROWS, neighbourhood_agreement,
                                  record_stride)
from trials.train import TrainResult
from trials.trial import EPOCH_ROWS, run_trial

from tests.trials.test_trial import CONFIG, make_data


def test_agreement_is_one_for_identical_and_rotated_spaces_and_low_for_random():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(0))
    rotation = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(1)))[0]
    assert neighbourhood_agreement(x, x) == pytest.approx(1.0)
    assert neighbourhood_agreement(x, x @ rotation) == pytest.approx(1.0)  # cosine kNN is rotation-free
    noise = torch.randn(200, 8, generator=torch.Generator().manual_seed(2))
    assert neighbourhood_agreement(x, noise) < 0.2  # chance is k/(n-1) = 0.05
    assert math.isnan(neighbourhood_agreement(x[:1], x[:1]))


def test_stride_keeps_epoch_rows_bounded():
    assert record_stride(15) == 1 and record_stride(1000) == 1000 // MAX_RECORDED_EPOCHS


def _fixed_model_train():
    """A stand-in trainer that never updates the heads: one epoch, validated with the
    trial's own loss (CLIP + λ·R_S), reported through on_epoch."""
    def train(image_head, text_head, loss_fn, train_image, train_text, val_image, val_text,
              config, on_epoch=None, **_):  # impl, extras: the same for this stand-in
        total, bs = 0.0, config.batch_size
        with torch.no_grad():  # the trainer's validation: in-order batches, sample-weighted
            for s in range(0, len(val_image), bs):
                x_i, x_t = val_image[s:s + bs], val_text[s:s + bs]
                total += float(loss_fn(image_head(x_i), text_head(x_t), x_i, x_t)["overall_loss"]) * len(x_i)
        row = {"epoch": 0, "train_loss": 0.0, "val_loss": total / len(val_image), "lr": 0.0,
               "structure_lambda": loss_fn.structure_lambda}
        on_epoch(0, dict(row))
        return TrainResult(history=[row], best_epoch=0, best_val_loss=row["val_loss"], lr=0.0)
    return train


def test_asha_objective_is_unchanged_by_lambda_on_a_fixed_model(monkeypatch):
    monkeypatch.setattr(trial_module, "train_alignment", _fixed_model_train())
    reported = {}
    for lam in (0.0, 10.0):  # same seed: the same initial (fixed) heads
        seen = []
        metrics = run_trial(make_data(), TrialConfig(**{**CONFIG, "structure_lambda": lam}),
                            on_epoch=lambda epoch, row: seen.append(row))
        reported[lam] = (seen[0], metrics)
    (row0, m0), (row10, m10) = reported[0.0], reported[10.0]
    assert row0["val_loss"] != row10["val_loss"]  # λ·R_S is in the trainer's loss ...
    assert row0["val_clip_loss"] == row10["val_clip_loss"]  # ... not in the objective
    assert row0["val_clip_loss"] == pytest.approx(row0["val_loss"])  # λ=0: they agree
    assert m0["best_val_clip_loss"] == m10["best_val_clip_loss"]


def test_clip_only_loss_matches_the_trainers_clip_term():
    data = make_data()
    val_i, val_t = torch.tensor(data.val_image), torch.tensor(data.val_text)
    heads = torch.nn.Linear(12, 8), torch.nn.Linear(10, 8)
    from trials.neighbourhood import validation_clip_loss
    full = AlignmentLoss(structure_lambda=10.0)
    with torch.no_grad():
        expected = full(heads[0](val_i), heads[1](val_t), val_i, val_t)["clip_loss"]
    got = validation_clip_loss(*heads, val_i, val_t, 1000, AlignmentLoss(structure_lambda=0.0))
    assert got == pytest.approx(float(expected), rel=1e-6)


def test_a_trial_records_neighbourhood_rows_every_epoch_on_short_runs():
    metrics = run_trial(make_data(), TrialConfig(**CONFIG, n_train=200))
    rows = metrics[EPOCH_ROWS]
    assert [r["epoch"] for r in rows] == list(range(metrics["epochs_run"]))
    for row in rows:
        assert 0 <= row["nbr_image"] <= 1 and 0 <= row["nbr_text"] <= 1
        assert math.isfinite(row["val_clip_loss"]) and "val_loss" in row
    assert PROBE_ROWS >= 100  # the whole toy validation split is the probe set
    assert math.isfinite(metrics["best_val_clip_loss"])
