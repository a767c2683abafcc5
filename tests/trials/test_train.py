"""trials.train: the LR-finder rule (METHOD.md §15.10), schedules (§15.12) and the loop's contract."""

import math

import pytest
import torch

import trials.train as train_module
from trials.evaluate import retrieval_metrics
from trials.heads import build_head
from trials.losses import AlignmentLoss
from trials.train import find_lr, lr_from_curve, train_alignment
from trials.train_options import TrainConfig


def _pairs(n, seed, d_img=24, d_txt=16, latent=6, noise=0.3):
    """Paired features sharing a latent code: linearly alignable, hence separable."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, generator=g)
    mix_img = torch.randn(latent, d_img, generator=torch.Generator().manual_seed(100))
    mix_txt = torch.randn(latent, d_txt, generator=torch.Generator().manual_seed(101))
    return (z @ mix_img + noise * torch.randn(n, d_img, generator=g),
            z @ mix_txt + noise * torch.randn(n, d_txt, generator=g))


def _heads(seed=0, out=8):
    return build_head("linear", 24, out, seed=seed), build_head("linear", 16, out, seed=seed + 1)


def _run(config, lam=0.0, warmup=0, train=None, val=None, **kwargs):
    train = train or _pairs(96, 1)
    val = val or _pairs(40, 2)
    heads = _heads()
    loss_fn = AlignmentLoss(structure_lambda=lam, warmup_steps=warmup)
    result = train_alignment(*heads, loss_fn, *train, *val, config, **kwargs)
    return result, heads, loss_fn


def _state(heads):
    return [t.clone() for h in heads for t in h.state_dict().values()]


# ------------------------------------------------------------------ LR finder (§5.2)


def test_lr_from_curve_matches_official(lr_finder_ref_case):
    lrs, lr, mult = [], 1e-7, (10.0 / 1e-7) ** (1 / 100)
    for _ in range(len(lr_finder_ref_case["scripted_losses"])):
        lrs.append(lr)  # the official finder multiplies the group's LR in place
        lr *= mult
    got = lr_from_curve(lrs, lr_finder_ref_case["scripted_losses"])
    assert got == pytest.approx(lr_finder_ref_case["suggested_lr"], rel=1e-12, abs=0)


def test_lr_from_curve_falls_back_when_the_first_loss_diverges():
    assert lr_from_curve([1e-7, 1e-6], [float("nan"), 1.0], fallback=3e-3) == 3e-3


def test_find_lr_restores_weights_and_does_not_step_lambda():
    heads = _heads()
    before = _state(heads)
    loss_fn = AlignmentLoss(structure_lambda=10.0, warmup_steps=5)
    lr = find_lr(*heads, loss_fn, *_pairs(64, 1), TrainConfig(batch_size=32, lr_finder_iters=30))
    assert 1e-6 <= lr <= 10.0
    assert all(torch.equal(a, b) for a, b in zip(before, _state(heads)))
    assert loss_fn.steps == 0 and loss_fn.structure_lambda == 10.0


# ------------------------------------------------------------------ the loop


def test_training_lowers_the_loss_and_beats_chance():
    val = _pairs(40, 2)
    config = TrainConfig(epochs=25, batch_size=32, lr=1e-2, patience=100)
    result, heads, _ = _run(config, lam=10.0, warmup=4, val=val)
    assert result.history[-1]["train_loss"] < 0.5 * result.history[0]["train_loss"]
    assert result.best_val_loss < 0.5 * result.history[0]["val_loss"]
    with torch.no_grad():
        ret = retrieval_metrics(heads[0](val[0]), heads[1](val[1]), torch.arange(40))
    assert ret["I2T"]["R@1"] > 0.5 and ret["T2I"]["R@1"] > 0.5  # chance is 1/40


def test_early_stopping_restores_the_best_weights():
    # 12 unrelated pairs: the heads overfit, so the val loss turns up and stays up
    g = torch.Generator().manual_seed(5)
    train = (torch.randn(12, 24, generator=g), torch.randn(12, 16, generator=g))
    val = (torch.randn(30, 24, generator=g), torch.randn(30, 16, generator=g))
    config = TrainConfig(epochs=200, batch_size=64, lr=3e-2, patience=3, scheduler="none")
    result, heads, loss_fn = _run(config, train=train, val=val)
    assert result.stopped == "early_stopping"
    assert len(result.history) == result.best_epoch + 1 + config.patience
    assert result.best_val_loss == min(row["val_loss"] for row in result.history)
    val_loss = train_module._validate(heads, loss_fn, *val, config.batch_size).item()
    assert val_loss == pytest.approx(result.best_val_loss, rel=1e-6)


def test_on_epoch_returning_true_stops():
    seen = []

    def on_epoch(epoch, metrics):
        seen.append((epoch, metrics))
        return epoch == 2

    result, _, _ = _run(TrainConfig(epochs=50, batch_size=32, lr=1e-2), on_epoch=on_epoch)
    assert result.stopped == "callback" and len(result.history) == 3
    assert [e for e, _ in seen] == [0, 1, 2]
    for _, metrics in seen:
        assert set(metrics) == {"epoch", "train_loss", "val_loss", "lr", "structure_lambda"}
        assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_a_non_finite_train_loss_stops_at_once_and_keeps_the_best_weights(monkeypatch):
    inner, calls = train_module._train_epoch, []

    def blow_up_at_epoch_2(heads, *args):
        calls.append(None)
        loss, lr = inner(heads, *args)
        if len(calls) == 3:  # as a too-large step would: NaN weights, NaN loss
            with torch.no_grad():
                heads[0].weight.fill_(math.nan)
            loss = torch.full_like(loss, math.nan)
        return loss, lr

    monkeypatch.setattr(train_module, "_train_epoch", blow_up_at_epoch_2)
    config = TrainConfig(epochs=50, batch_size=32, lr=1e-3, patience=20)
    result, heads, _ = _run(config)
    assert result.stopped == "diverged" and len(result.history) == 3  # not 2 + patience
    assert math.isnan(result.history[-1]["train_loss"]) and result.best_epoch in (0, 1)
    assert all(torch.isfinite(t).all() for t in _state(heads))  # the best epoch's weights


def test_fusemix_skipping_every_batch_is_not_divergence():
    # 96 pairs < batch 128: FuseMix skips the only (incomplete) batch, no step runs
    config = TrainConfig(epochs=3, batch_size=128, lr=1e-2, mixup_alpha=0.4)
    result, _, _ = _run(config)
    assert result.stopped == "max_epochs" and len(result.history) == 3


def test_same_seed_same_run_other_seed_other_run():
    config = TrainConfig(epochs=4, batch_size=32, lr=1e-2, seed=7)
    runs = [_run(config, lam=10.0, warmup=2) for _ in range(2)]
    assert runs[0][0].history == runs[1][0].history
    assert all(torch.equal(a, b) for a, b in zip(_state(runs[0][1]), _state(runs[1][1])))
    other = _run(TrainConfig(epochs=4, batch_size=32, lr=1e-2, seed=8), lam=10.0, warmup=2)
    assert other[0].history != runs[0][0].history


def test_lr_follows_the_periodic_cosine_and_lambda_warms_up_per_batch():
    # 96 pairs, batch 32: 3 steps per epoch; T_max = cycles * floor(96/32) = 6 steps
    config = TrainConfig(epochs=6, batch_size=32, lr=1e-2, scheduler_epoch_cycles=2)
    result, _, _ = _run(config, lam=10.0, warmup=7)
    for row in result.history:
        last_step = 3 * row["epoch"] + 2  # 0-based index of the epoch's last optimiser step
        assert row["lr"] == pytest.approx(0.5 * 1e-2 * (1 + math.cos(math.pi * last_step / 6)), abs=1e-15)
        assert row["structure_lambda"] == pytest.approx(10.0 * min(1.0, last_step / 7))


def test_per_parameter_clipping_scales_each_tensor():
    head = torch.nn.Linear(3, 2)
    head.weight.grad = torch.full((2, 3), 10.0)
    head.bias.grad = torch.tensor([0.1, 0.1])
    train_module._clip_per_parameter(head, 1.0)
    assert head.weight.grad.norm().item() == pytest.approx(1.0, rel=1e-5)
    assert torch.equal(head.bias.grad, torch.tensor([0.1, 0.1]))


@pytest.mark.parametrize("options", [dict(fixed_structure=True), dict(mixup_alpha=0.4),
                                     dict(clip_mode="per_parameter"), dict(lr=None, lr_finder_iters=20)])
def test_loop_variants_run(options):
    config = TrainConfig(**{"epochs": 3, "batch_size": 32, "lr": 1e-2, **options})
    result, _, loss_fn = _run(config, lam=10.0, warmup=1)
    assert all(math.isfinite(row["val_loss"]) for row in result.history)
    assert loss_fn.use_only_unimodal is False  # fixed_structure's switch is put back


def test_unimodal_extras_enter_the_regulariser():
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-2)
    plain, _, _ = _run(config, lam=10.0, warmup=1)
    extra_img, extra_txt = _pairs(50, 9)
    with_extra, _, _ = _run(config, lam=10.0, warmup=1, extra_image=extra_img, extra_text=extra_txt)
    assert with_extra.history[-1]["train_loss"] != plain.history[-1]["train_loss"]
    # one modality's extras alone also run (METHOD §9's unimodal-data ablation)
    image_only, _, _ = _run(config, lam=10.0, warmup=1, extra_image=extra_img)
    assert all(math.isfinite(row["train_loss"]) for row in image_only.history)
    assert image_only.history[-1]["train_loss"] not in (plain.history[-1]["train_loss"],
                                                        with_extra.history[-1]["train_loss"])


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="clip_mode"):
        TrainConfig(clip_mode="global")
    with pytest.raises(ValueError, match="scheduler"):
        TrainConfig(scheduler="onecycle")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync checks need CUDA")
@pytest.mark.parametrize("options, kwargs", [({"fixed_structure": True}, {}),
                                             ({}, {"frozen_gram": "on"})])  # batches read from the Gram
def test_no_host_sync_inside_the_step_loop(monkeypatch, options, kwargs):
    inner = train_module._train_epoch

    def strict(*args, **kwargs):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return inner(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(train_module, "_train_epoch", strict)
    config = TrainConfig(epochs=2, batch_size=32, lr=1e-2, device="cuda", **options)
    result, _, _ = _run(config, lam=10.0, warmup=1, **kwargs)
    assert len(result.history) == 2
