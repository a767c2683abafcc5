"""The fast path of train_alignment against the reference path (the oracle): same numbers.

Over 20 epochs, every epoch's training and validation loss, the best epoch and
the final weights must agree within 1e-5 relative, for each option the fast
path covers, with the training batches' frozen similarity recomputed per batch
and read from the training Gram; options it does not cover fall back to the
reference path.
"""

import math
import re

import pytest
import torch

from trials import fast_loop
from trials.heads import build_head
from trials.losses import AlignmentLoss
from trials.frozen_gram import FrozenGram
from trials.train import train_alignment
from trials.train_options import TrainConfig

RTOL = 1e-5


def _pairs(n, seed, d_img=24, d_txt=16, latent=6, noise=0.3):
    """Paired features sharing a latent code, so training makes progress."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, generator=g)
    mix_img = torch.randn(latent, d_img, generator=torch.Generator().manual_seed(100))
    mix_txt = torch.randn(latent, d_txt, generator=torch.Generator().manual_seed(101))
    return (z @ mix_img + noise * torch.randn(n, d_img, generator=g),
            z @ mix_txt + noise * torch.randn(n, d_txt, generator=g))


def _run(impl, loss_options, train_options, head="linear", extras=False, frozen_gram="auto"):
    heads = (build_head(head, 24, 8, seed=0), build_head(head, 16, 8, seed=1))
    loss_fn = AlignmentLoss(**{"warmup_steps": 3, **loss_options})
    config = TrainConfig(**{"epochs": 20, "batch_size": 64, "lr": 1e-2, "patience": 100, **train_options})
    extra = dict(zip(("extra_image", "extra_text"), _pairs(50, 9))) if extras else {}
    result = train_alignment(*heads, loss_fn, *_pairs(150, 1), *_pairs(70, 2), config, impl=impl,
                             frozen_gram=frozen_gram, **extra)
    return result, [t.detach().clone() for h in heads for t in h.state_dict().values()], loss_fn


def _assert_same_run(loss_options, train_options, frozen_gram="off", **kwargs):
    """The fast path (per-batch frozen side by default) against the reference, epoch by epoch."""
    ref, ref_weights, ref_loss = _run("reference", loss_options, train_options, **kwargs)
    fast, fast_weights, fast_loss = _run("fast", loss_options, train_options, frozen_gram=frozen_gram, **kwargs)
    assert len(fast.history) == len(ref.history)
    for ref_row, fast_row in zip(ref.history, fast.history):
        for key in ("train_loss", "val_loss"):
            assert fast_row[key] == pytest.approx(ref_row[key], rel=RTOL, nan_ok=True), (ref_row["epoch"], key)
        assert fast_row["lr"] == ref_row["lr"] and fast_row["structure_lambda"] == ref_row["structure_lambda"]
    assert (fast.best_epoch, fast.stopped, fast.lr) == (ref.best_epoch, ref.stopped, pytest.approx(ref.lr, rel=RTOL))
    for r, f in zip(ref_weights, fast_weights):
        assert (f - r).norm() <= RTOL * r.norm() + 1e-12
    assert fast_loss.steps == ref_loss.steps  # the twin's λ schedule is handed back


CASES = {
    "defaults": ({}, {}),
    "levels2_inverse": (dict(structure_levels=2, structure_weighting="inverse"), {}),
    # standard centring at T=0.05 makes logits of ±160, where the reference itself drifts by 4e-5
    # over 20 epochs when x xᵀ/T is computed as x xᵀ·(1/T): compared at T=0.5, and for 3 epochs at 0.05
    "levels3_standard": (dict(structure_levels=3, structure_centering="standard", temperature=0.5), {}),
    "standard_3_epochs": (dict(structure_centering="standard"), dict(epochs=3)),
    "center_first": (dict(structure_center_first=True, structure_levels=2), {}),
    "no_centering_margin": (dict(structure_centering="none", structure_margin=0.05), {}),
    "margin_clips_everything": (dict(structure_margin=1e3), {}),
    "lambda0": (dict(structure_lambda=0.0), {}),
    "temperature_no_normalize": (dict(temperature=0.2, normalize_latents=False), {}),
    "paper_sum": (dict(paper_sum=True, structure_lambda=3.0), {}),
    "batch_divides_n": ({}, dict(batch_size=50)),
    "per_parameter_clip": ({}, dict(clip_mode="per_parameter")),
    "no_clip_no_scheduler": ({}, dict(grad_clip=0.0, scheduler="none")),
    "fusemix": ({}, dict(mixup_alpha=0.4)),
    "fixed_structure": ({}, dict(fixed_structure=True)),
    "lr_finder": ({}, dict(lr=None, lr_finder_iters=30)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fast_path_equals_the_reference(case):
    loss_options, train_options = CASES[case]
    _assert_same_run(loss_options, train_options)


def test_fast_path_equals_the_reference_with_extras_and_dropout():
    _assert_same_run(dict(structure_levels=2), {}, extras=True)
    _assert_same_run({}, {}, head="mlp")  # dropout draws from the same seeded RNG on both paths


# the frozen similarity of every training batch read from the Grams: 150 rows in batches of 64
# (the last one short), λ warmed up over 3 steps
GRAM_CASES = {
    "mean": ({}, {}, "linear"),
    "mean_levels2_inverse": (dict(structure_levels=2, structure_weighting="inverse"), {}, "linear"),
    "none_levels2_margin": (dict(structure_centering="none", structure_levels=2, structure_margin=0.05), {}, "linear"),
    "none_paper_sum": (dict(structure_centering="none", paper_sum=True, normalize_latents=False), {}, "linear"),
    "one_batch": ({}, dict(batch_size=200), "linear"),
    "lr_finder": ({}, dict(lr=None, lr_finder_iters=30), "linear"),  # the finder's batches: recomputed
    "mlp_dropout_batch_divides_n": (dict(structure_levels=2), dict(batch_size=50), "mlp"),
}


@pytest.mark.parametrize("case", sorted(GRAM_CASES))
def test_the_training_gram_gives_the_reference_numbers(case, monkeypatch):
    loss_options, train_options, head = GRAM_CASES[case]
    calls, inner = [], FrozenGram.similarity
    monkeypatch.setattr(FrozenGram, "similarity", lambda self, *a, **k: calls.append(1) or inner(self, *a, **k))
    _assert_same_run(loss_options, train_options, frozen_gram="on", head=head)
    batch_size = train_options.get("batch_size", 64)
    steps = 20 * math.ceil(150 / batch_size)
    # every training batch but the first (λ = 0), both modalities; a batch of all 150 rows is the
    # same sorted rows every epoch: read once
    assert len(calls) == (2 if batch_size >= 150 else 2 * (steps - 1))


def _gram_wanted(choice="auto", loss_options=None, extras=False, impl="auto", **train_options):
    loss_fn = AlignmentLoss(**(loss_options or {}))
    config = TrainConfig(**{"epochs": 20, "batch_size": 64, **train_options})
    return fast_loop.wants_gram(choice, fast_loop.fused_twin(loss_fn, impl), loss_fn, config, 150,
                                impl=impl, extras=extras)


def test_auto_builds_the_gram_where_it_pays_and_fits(monkeypatch):
    # pays: more than GRAM_PAYBACK·N/batch = 2·150/64 = 4.7 epochs
    assert _gram_wanted(epochs=5) and not _gram_wanted(epochs=4)
    assert _gram_wanted(epochs=3, batch_size=150) and not _gram_wanted(epochs=2, batch_size=150)  # one batch
    needed = (2 * 150 * 150 + 64 * 150) * 4  # two float32 150×150 Grams and the 64×150 gather scratch
    monkeypatch.setattr(fast_loop, "GRAM_CACHE_BYTES", needed)
    assert _gram_wanted()
    monkeypatch.setattr(fast_loop, "GRAM_CACHE_BYTES", needed - 1)
    assert not _gram_wanted()
    assert _gram_wanted("on", epochs=1)  # "on" skips both cost rules
    assert not _gram_wanted("off")
    assert not _gram_wanted(loss_options=dict(structure_centering="standard"))  # "auto": skipped, no error
    assert not _gram_wanted(impl="reference")


def test_train_alignment_builds_the_gram_as_auto_decides(monkeypatch):
    built = []
    inner = fast_loop.FusedAlignmentLoss.cache_gram
    monkeypatch.setattr(fast_loop.FusedAlignmentLoss, "cache_gram", lambda self, *a: built.append(1) or inner(self, *a))
    for epochs, expected in ((4, []), (5, [1])):
        built.clear()
        _run("auto", {}, dict(epochs=epochs))
        assert built == expected, epochs


@pytest.mark.parametrize("loss_options, train_options, kwargs, named", [
    (dict(structure_centering="standard"), {}, {}, "structure_centering='standard'"),
    (dict(structure_center_first=True), {}, {}, "structure_center_first"),
    (dict(structure_lambda=0.0), {}, {}, "structure_lambda"),
    ({}, dict(mixup_alpha=0.4), {}, "mixup_alpha"),
    ({}, dict(fixed_structure=True), {}, "fixed_structure"),
    ({}, {}, dict(extras=True), "extra_image"),
    ({}, {}, dict(impl="reference"), "impl='reference'"),
    (dict(structure_distance="rbf"), {}, {}, "structure_distance='rbf'"),
])
def test_gram_on_refuses_options_it_does_not_cover(loss_options, train_options, kwargs, named):
    impl = kwargs.pop("impl", "auto")
    with pytest.raises(ValueError, match="frozen_gram='on' does not cover .*" + re.escape(named)):
        _run(impl, loss_options, {"epochs": 1, **train_options}, frozen_gram="on", **kwargs)


def test_unknown_frozen_gram_is_rejected():
    with pytest.raises(ValueError, match="frozen_gram"):
        _run("fast", {}, dict(epochs=1), frozen_gram="sometimes")


def test_auto_picks_the_fast_path_where_it_applies(monkeypatch):
    calls = []
    inner = fast_loop.FusedAlignmentLoss.clip_term
    monkeypatch.setattr(fast_loop.FusedAlignmentLoss, "clip_term",
                        lambda self, *args: calls.append(1) or inner(self, *args))
    config = TrainConfig(epochs=1, batch_size=64, lr=1e-2)
    heads = (build_head("linear", 24, 8, seed=0), build_head("linear", 16, 8, seed=1))
    train_alignment(*heads, AlignmentLoss(), *_pairs(100, 1), *_pairs(30, 2), config)
    assert calls  # default impl="auto": fused
    calls.clear()
    train_alignment(*heads, AlignmentLoss(structure_distance="rbf"), *_pairs(100, 1), *_pairs(30, 2), config)
    assert not calls  # not covered: the reference path


@pytest.mark.parametrize("options", [dict(structure_distance="rbf"), dict(structure_distance="spearman"),
                                     dict(structure_divergence="js")])
def test_uncovered_options_fall_back_or_refuse(options):
    loss_fn = AlignmentLoss(**options)
    assert fast_loop.fused_twin(loss_fn, "auto") is None
    with pytest.raises(ValueError, match="impl='reference'"):
        fast_loop.fused_twin(loss_fn, "fast")
    result, _, _ = _run("auto", options, dict(epochs=2))
    assert all(math.isfinite(row["val_loss"]) for row in result.history)


def test_a_loss_that_is_not_a_plain_alignment_loss_runs_as_given():
    class Custom(AlignmentLoss):
        pass

    assert fast_loop.fused_twin(Custom(), "auto") is None


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl"):
        _run("turbo", {}, dict(epochs=1))


def test_validation_cache_respects_its_budget(monkeypatch):
    monkeypatch.setattr(fast_loop, "VALIDATION_CACHE_BYTES", 0)
    _assert_same_run({}, dict(epochs=3))  # nothing cached: recomputed each epoch, same numbers


def test_a_trial_reports_the_same_metrics_on_both_paths():
    from test_trial import CONFIG, make_data  # the trial tests' toy data

    from trials.config import TrialConfig
    from trials.trial import run_trial

    data, config = make_data(), TrialConfig(**{**CONFIG, "structure_lambda": 10.0}, n_train=200)
    ref, fast = run_trial(data, config, impl="reference"), run_trial(data, config, impl="auto")
    assert ref["best_epoch"] == fast["best_epoch"] and ref["epochs_run"] == fast["epochs_run"]
    for key, value in ref.items():
        if isinstance(value, float) and key != "train_seconds":
            assert fast[key] == pytest.approx(value, rel=RTOL, abs=1e-6), key
