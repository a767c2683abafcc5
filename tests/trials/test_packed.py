"""trials.packed: a packed member's results equal its trial run alone (trials.trial.run_trial).

Tolerance: 1e-5 relative (1e-7 absolute near 0) on every loss and metric. The
packed path computes the same formulas with batched matmuls, whose rounding
differs from the single path's in the last bits. The neighbourhood scores
(``nbr_*``) are counts of shared neighbours: a near-tie that rounding breaks
the other way moves one neighbour, 1/(k·n); at most two such moves are allowed.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from trials.config import TrialConfig
from trials.fused_loss import fused_clip_loss, fused_structure_regularizer
from trials.losses import safe_normalize
from trials.neighbourhood import NEIGHBOURS
from trials.packed import member_bytes, pack_key, run_pack, unpackable
from trials.packed_loss import PackedAlignmentLoss
from trials.trial import EPOCH_ROWS, RetrievalSet, TrialData, ZeroShotSet, run_trial

REL, ABS = 1e-5, 1e-7
N_VAL = 60


def make_data(seed: int = 0) -> TrialData:
    """Class-clustered paired features through random linear maps (alignable)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((4, 6)) * 3
    to_img, to_txt = rng.standard_normal((6, 12)), rng.standard_normal((6, 10))

    def sample(n):
        labels = rng.integers(4, size=n)
        z = centres[labels] + 0.3 * rng.standard_normal((n, 6))
        return (z @ to_img).astype(np.float32), (z @ to_txt).astype(np.float32), labels

    (train_i, train_t, _), (val_i, val_t, _) = sample(160), sample(N_VAL)
    test_i, test_t, test_y = sample(40)
    prompts = ((centres[:, None] + 0.1 * rng.standard_normal((4, 3, 6))) @ to_txt).astype(np.float32)
    return TrialData(train_i, train_t, val_i, val_t, zero_shot={"toy": ZeroShotSet(test_i, test_y, prompts)},
                     retrieval={"toy": RetrievalSet(test_i, test_t, np.arange(40))})


BASE = dict(out_dim=8, epochs=6, batch_size=48, patience=6, warmup_steps=3, n_train=120)


def close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= REL * max(abs(a), abs(b)) + ABS


def assert_same_as_alone(packed: dict, alone: dict) -> None:
    assert set(packed) == set(alone)
    for key in ("best_epoch", "epochs_run", "stopped", "n_train_used"):
        assert packed[key] == alone[key], key
    for key, value in alone.items():
        if isinstance(value, float) and key != "train_seconds":
            assert close(packed[key], value), (key, packed[key], value)
    rows, alone_rows = packed[EPOCH_ROWS], alone[EPOCH_ROWS]
    assert [r["epoch"] for r in rows] == [r["epoch"] for r in alone_rows]
    one_neighbour = 1 / (NEIGHBOURS * N_VAL)
    for row, alone_row in zip(rows, alone_rows):
        assert set(row) == set(alone_row)
        for key, value in alone_row.items():
            if key.startswith("nbr_"):
                assert abs(row[key] - value) <= 2 * one_neighbour + 1e-9, (key, row, alone_row)
            else:
                assert close(row[key], value), (key, row[key], value)


@pytest.fixture(scope="module")
def data() -> TrialData:
    return make_data()


# 48: 3 batches an epoch; 128: one batch of all 120 rows (the pack reads them in stored order
# and makes their frozen R_S half once, the trial alone permutes them every epoch)
BATCH_SIZES = pytest.mark.parametrize("batch_size", [48, 128])


@BATCH_SIZES
@pytest.mark.parametrize("head, head_options", [("linear", {}), ("linear", {"bias": False}),
                                                ("res_low_rank", {"rank": 4})])
def test_packed_members_equal_their_trials_alone(data, head, head_options, batch_size):
    """Differing seeds (subsamples), lrs, temperatures, λ (0 and > 0) and warm-ups, one pack."""
    common = dict(BASE, head=head, head_options=head_options, batch_size=batch_size)
    configs = [TrialConfig(**common, seed=0, lr=3e-3, structure_lambda=1.0),
               TrialConfig(**common, seed=1, lr=1e-3, structure_lambda=0.0, temperature=0.1),
               TrialConfig(**{**common, "warmup_steps": 0}, seed=2, lr=5e-3, structure_lambda=10.0,
                           temperature=0.07, weight_decay=1e-2, grad_clip=0.5)]
    assert len({pack_key(c) for c in configs}) == 1
    for config, packed in zip(configs, run_pack(data, configs)):
        assert_same_as_alone(packed, run_trial(data, config))


def test_packed_structure_options_match_alone(data):
    """Two levels with inverse weighting, a margin and standard centring first, λ from the first step."""
    options = dict(BASE, structure_levels=2, structure_weighting="inverse", structure_margin=0.01,
                   structure_centering="standard", structure_center_first=True, paper_sum=True)
    configs = [TrialConfig(**options, seed=s, lr=lr, structure_lambda=lam, temperature=t)
               for s, lr, lam, t in ((3, 2e-3, 5.0, 0.05), (4, 4e-3, 1.0, 0.2))]
    for config, packed in zip(configs, run_pack(data, configs)):
        assert_same_as_alone(packed, run_trial(data, config))


def test_members_without_an_lr_run_their_own_lr_finder(data):
    configs = [TrialConfig(**BASE, seed=s, lr=None, structure_lambda=2.0) for s in (0, 5)]
    results = run_pack(data, configs)
    for config, packed in zip(configs, results):
        assert_same_as_alone(packed, run_trial(data, config))
    assert results[0]["lr_used"] != results[1]["lr_used"]  # each its own


@BATCH_SIZES
def test_a_member_stopping_early_is_restored_to_its_best_epoch_while_the_others_go_on(data, batch_size):
    """At lr 1e-7 the heads stand still while λ warms up over 30 steps: the validation loss
    (CLIP + λ·R_S) grows every epoch, so patience 2 stops that member with epoch 0 its best."""
    common = dict(BASE, epochs=8, batch_size=batch_size)
    stopping = TrialConfig(**{**common, "patience": 2, "warmup_steps": 30}, seed=1, lr=1e-7,
                           structure_lambda=10.0)
    going_on = TrialConfig(**{**common, "patience": 8}, seed=2, lr=3e-3, structure_lambda=1.0)
    first, second = run_pack(data, [stopping, going_on])
    assert first["stopped"] == "early_stopping" and first["epochs_run"] == 3
    assert first["best_epoch"] == 0  # restored two epochs back
    assert second["stopped"] == "max_epochs" and second["epochs_run"] == 8
    assert_same_as_alone(first, run_trial(data, stopping))
    assert_same_as_alone(second, run_trial(data, going_on))


def test_a_member_whose_loss_is_nan_fails_alone(data):
    """A temperature that underflows float32 makes the logits infinite: NaN from the first batch."""
    good = TrialConfig(**BASE, seed=0, lr=3e-3, structure_lambda=1.0)
    nan = TrialConfig(**BASE, seed=1, lr=3e-3, structure_lambda=1.0, temperature=1e-45)
    results = run_pack(data, [good, nan, good])
    assert isinstance(results[1], FloatingPointError) and "diverged" in str(results[1])
    with pytest.raises(FloatingPointError):
        run_trial(data, nan)
    alone = run_trial(data, good)
    assert_same_as_alone(results[0], alone)
    assert_same_as_alone(results[2], alone)


def test_on_epoch_sees_each_member_and_can_stop_one(data):
    configs = [TrialConfig(**BASE, seed=s, lr=3e-3, structure_lambda=1.0) for s in (0, 1)]
    seen = []

    def on_epoch(member, epoch, row):
        seen.append((member, epoch, "val_clip_loss" in row))
        return member == 0 and epoch == 1

    first, second = run_pack(data, configs, on_epoch=on_epoch)
    assert first["stopped"] == "callback" and first["epochs_run"] == 2
    assert second["stopped"] == "max_epochs" and second["epochs_run"] == BASE["epochs"]
    assert {(m, e) for m, e, _ in seen} == {(0, 0), (0, 1)} | {(1, e) for e in range(BASE["epochs"])}
    assert all(has_clip for *_, has_clip in seen)


def test_pack_key_groups_trials_of_one_shape():
    a = TrialConfig(**BASE)
    member_only = TrialConfig(**{**BASE, "epochs": 9, "patience": 2}, seed=7, lr=None, temperature=0.2,
                              structure_lambda=0.0, weight_decay=0.1, grad_clip=0.0)
    assert pack_key(a) == pack_key(member_only)
    # the layer pair is a member's own data (run_pack checks the data's shapes)
    assert pack_key(a) == pack_key(TrialConfig(**BASE, image_layer=3, text_layer=5))
    for other in (dict(n_train=60), dict(out_dim=4), dict(batch_size=32), dict(structure_levels=2),
                  dict(head="res_low_rank")):
        assert pack_key(TrialConfig(**{**BASE, **other})) != pack_key(a), other
    for unpackable_config in (dict(head="mlp"), dict(head="csa"), dict(structure_distance="rbf"),
                              dict(head="res_low_rank", head_options={"gate_init": 0.5}),
                              dict(structure_divergence="js"), dict(mixup_alpha=0.4), dict(fixed_structure=True)):
        config = TrialConfig(**{**BASE, **unpackable_config})
        assert pack_key(config) is None and unpackable(config), unpackable_config


@pytest.fixture(scope="module")
def other_layers() -> list[TrialData]:
    """Two more layer pairs: different features of the same dimensions and row counts."""
    return [make_data(1), make_data(2)]


@pytest.mark.parametrize("head, head_options", [("linear", {}), ("res_low_rank", {"rank": 4})])
def test_members_on_different_layer_pairs_equal_their_trials_alone_on_their_data(data, other_layers, head,
                                                                                   head_options):
    """Each member's own TrialData (two members share one): its subsample, validation (and its
    frozen R_S half), probe and evaluation; λ 0 and > 0, differing seeds and temperatures."""
    common = dict(BASE, head=head, head_options=head_options)
    datas = [data, other_layers[0], data, other_layers[1]]
    configs = [TrialConfig(**common, seed=0, lr=3e-3, structure_lambda=1.0, image_layer=0, text_layer=0),
               TrialConfig(**common, seed=1, lr=1e-3, structure_lambda=0.0, image_layer=1, text_layer=1),
               TrialConfig(**common, seed=2, lr=5e-3, structure_lambda=10.0, temperature=0.1,
                           image_layer=0, text_layer=0),
               TrialConfig(**common, seed=3, lr=2e-3, structure_lambda=2.0, image_layer=2, text_layer=1)]
    assert len({pack_key(c) for c in configs}) == 1
    for config, member_data, packed in zip(configs, datas, run_pack(datas, configs)):
        assert_same_as_alone(packed, run_trial(member_data, config))


def test_a_member_on_its_own_layer_pair_stopping_early_leaves_the_others_their_data(data, other_layers):
    """The stopping member (see the test above on one data) reads a layer pair of its own: once
    it leaves, the others still read theirs (the per-member validation and probe are selected)."""
    common = dict(BASE, epochs=8)
    stopping = TrialConfig(**{**common, "patience": 2, "warmup_steps": 30}, seed=1, lr=1e-7,
                           structure_lambda=10.0)
    going_on = [TrialConfig(**{**common, "patience": 8}, seed=s, lr=3e-3, structure_lambda=1.0) for s in (2, 3)]
    first, second, third = run_pack([other_layers[0], data, other_layers[1]], [going_on[0], stopping, going_on[1]])
    assert second["stopped"] == "early_stopping" and second["epochs_run"] == 3 and second["best_epoch"] == 0
    assert first["epochs_run"] == third["epochs_run"] == 8
    assert_same_as_alone(second, run_trial(data, stopping))
    assert_same_as_alone(first, run_trial(other_layers[0], going_on[0]))
    assert_same_as_alone(third, run_trial(other_layers[1], going_on[1]))


def test_a_member_whose_data_has_extras_runs_alone_and_the_others_still_pack(data, other_layers):
    rng = np.random.default_rng(5)
    extras = dataclasses.replace(other_layers[0], extra_image=rng.standard_normal((30, 12)).astype(np.float32),
                                 extra_text=rng.standard_normal((30, 10)).astype(np.float32))
    configs = [TrialConfig(**BASE, seed=s, lr=3e-3, structure_lambda=1.0) for s in (0, 1, 2)]
    datas = [data, extras, other_layers[1]]
    for config, member_data, packed in zip(configs, datas, run_pack(datas, configs)):
        assert_same_as_alone(packed, run_trial(member_data, config))


def test_run_pack_refuses_member_data_of_different_shapes(data):
    configs = [TrialConfig(**BASE, seed=s) for s in (0, 1)]
    narrow_text = dataclasses.replace(data, train_text=data.train_text[:, :8], val_text=data.val_text[:, :8])
    with pytest.raises(ValueError, match="text dim"):
        run_pack([data, narrow_text], configs)
    with pytest.raises(ValueError, match="validation rows"):
        run_pack([data, dataclasses.replace(data, val_image=data.val_image[:50], val_text=data.val_text[:50])],
                 configs)
    with pytest.raises(ValueError, match="training rows"):
        run_pack([data, dataclasses.replace(data, train_image=data.train_image[:150],
                                            train_text=data.train_text[:150])], configs)
    with pytest.raises(ValueError, match="one per config"):
        run_pack([data], configs)


def test_run_pack_refuses_configs_of_different_shapes(data):
    with pytest.raises(ValueError, match="pack_key"):
        run_pack(data, [TrialConfig(**BASE), TrialConfig(**{**BASE, "n_train": 60})])
    with pytest.raises(ValueError, match="unpackable"):
        run_pack(data, [TrialConfig(**{**BASE, "head": "mlp"})])


def test_member_bytes_counts_the_n_by_n_scratch():
    small = member_bytes(TrialConfig(**{**BASE, "batch_size": 64, "n_train": 1000}), 12, 10, 1000)
    large = member_bytes(TrialConfig(**{**BASE, "batch_size": 128, "n_train": 1000}), 12, 10, 1000)
    assert large - small >= 8 * 4 * (128**2 - 64**2)  # 4L + 4 = 8 matrices of float32


@pytest.mark.parametrize("levels, weighting, centering", [(1, "none", "mean"), (3, "inverse", "standard")])
def test_packed_loss_and_gradients_equal_the_fused_loss_of_each_member(levels, weighting, centering):
    """Independent oracle: trials.fused_loss on each member's slice, λ 0 for one member
    (the fused loss is itself checked against the autograd reference in test_fused_loss)."""
    torch.manual_seed(0)
    p, n = 3, 20
    img, txt = torch.randn(p, n, 7), torch.randn(p, n, 5)
    a_img, a_txt = torch.randn(p, n, 4, requires_grad=True), torch.randn(p, n, 4, requires_grad=True)
    temperatures, lambdas = [0.05, 0.1, 0.3], [2.0, 0.0, 10.0]
    options = dict(levels=levels, weighting=weighting, margin=0.0, centering=centering, center_first=False)
    loss = PackedAlignmentLoss(normalize_latents=True, paper_sum=False, structure_options=options)
    overall, clip = loss(a_img, a_txt, img, txt, torch.tensor(temperatures, dtype=torch.float64), lambdas,
                         torch.tensor(lambdas))
    grads = torch.autograd.grad(overall.sum(), (a_img, a_txt))
    for m in range(p):
        x, y = a_img[m].detach().requires_grad_(), a_txt[m].detach().requires_grad_()
        nx, ny = safe_normalize(x), safe_normalize(y)
        expected_clip = fused_clip_loss(nx, ny, temperatures[m])
        expected = expected_clip
        if lambdas[m] > 0:
            r = [fused_structure_regularizer(o, a, temperature=temperatures[m], **options)
                 for o, a in ((img[m], nx), (txt[m], ny))]
            expected = expected_clip + lambdas[m] * ((r[0] + r[1]) / 2)
        expected.backward()
        assert close(float(clip[m].detach()), float(expected_clip.detach()))
        assert close(float(overall[m].detach()), float(expected.detach()))
        for got, want in ((grads[0][m], x.grad), (grads[1][m], y.grad)):
            # entries near 0 are sums of cancelling terms: relative to the gradient's scale
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
