"""trials.fused_loss against the reference formulas of trials.losses: values, gradients, gradcheck."""

import itertools

import pytest
import torch

from trials import packed_loss
from trials.fast_loop import FusedAlignmentLoss
from trials.frozen_gram import FrozenGram, frozen_side_from_gram
from trials.fused_loss import Workspace, frozen_side, fused_clip_loss, fused_structure_regularizer
from trials.losses import AlignmentLoss, clip_loss, structure_regularizer

F64 = torch.float64


def _data(n, d_x=9, d_a=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_x, generator=g, dtype=dtype)
    a = torch.randn(n, d_a, generator=g, dtype=dtype).requires_grad_(True)
    return x, a


def _options(levels=1, weighting="none", centering="mean", center_first=False, margin=0.0, temperature=0.05):
    return dict(levels=levels, weighting=weighting, centering=centering, center_first=center_first,
                margin=margin, temperature=temperature)


GRID = [_options(*combo) for combo in itertools.product(
    (1, 2, 3), ("none", "inverse"), ("none", "mean", "standard"), (False, True), (0.0, 0.05), (0.05, 0.3))]


def _relative(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


@pytest.mark.parametrize("options", GRID, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_structure_value_and_gradient_equal_the_reference(options):
    x, a = _data(37, seed=len(str(options)))
    ref = structure_regularizer(x, a, **options)
    fused = fused_structure_regularizer(x, a, **options)
    (ref_grad,) = torch.autograd.grad(ref, a)
    (fused_grad,) = torch.autograd.grad(fused, a)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-12, abs=1e-15)
    assert _relative(fused_grad, ref_grad) < 1e-10 or ref_grad.norm() == 0


@pytest.mark.parametrize("options", [_options(), _options(2, "inverse"), _options(3, "none", "standard", True, 0.01, 0.2),
                                     _options(2, "none", "none", margin=0.02)])
def test_structure_gradcheck(options):
    x, a = _data(11, d_a=4, seed=3)
    assert torch.autograd.gradcheck(lambda z: fused_structure_regularizer(x, z, **options), (a,),
                                    eps=1e-6, atol=1e-8, rtol=1e-6)


def test_margin_above_the_divergence_gives_zero_value_and_gradient():
    x, a = _data(20)
    value = fused_structure_regularizer(x, a, **_options(margin=1e3))
    (grad,) = torch.autograd.grad(value, a)
    assert value.item() == 0.0 and torch.count_nonzero(grad) == 0


def test_identical_inputs_give_zero():
    x, _ = _data(16)
    assert fused_structure_regularizer(x, x.clone(), **_options()).item() == pytest.approx(0.0, abs=1e-15)


def test_clip_value_and_gradients_equal_the_reference():
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(50, 8, generator=g, dtype=F64).requires_grad_(True) for _ in range(2))
    ref, fused = clip_loss(a, b, 0.1), fused_clip_loss(a, b, 0.1)
    assert fused.item() == pytest.approx(ref.item(), rel=1e-13)
    for r, f in zip(torch.autograd.grad(ref, (a, b)), torch.autograd.grad(fused, (a, b))):
        assert _relative(f, r) < 1e-12
    assert torch.autograd.gradcheck(lambda u, v: fused_clip_loss(u, v, 0.3), (a[:9, :4], b[:9, :4]))


def test_float32_matches_the_reference_to_rounding():
    x, a = _data(300, d_x=40, d_a=16, dtype=torch.float32)
    for options in (_options(), _options(2, "inverse")):
        ref, fused = structure_regularizer(x, a, **options), fused_structure_regularizer(x, a, **options)
        assert fused.item() == pytest.approx(ref.item(), rel=2e-6)
        assert _relative(torch.autograd.grad(fused, a)[0], torch.autograd.grad(ref, a)[0]) < 2e-5


def test_one_workspace_serves_any_size_and_dtype():
    workspace = Workspace()
    for n, dtype in ((30, F64), (50, F64), (20, torch.float32), (40, F64)):
        x, a = _data(n, dtype=dtype)
        fused = fused_structure_regularizer(x, a, workspace=workspace, **_options(levels=2))
        assert fused.item() == pytest.approx(structure_regularizer(x, a, **_options(levels=2)).item(), rel=1e-5)
    assert workspace.nbytes() > 0


def test_a_precomputed_frozen_side_gives_the_same_numbers():
    x, a = _data(25)
    options = _options(levels=2, weighting="inverse")
    frozen = frozen_side(x, levels=2, temperature=0.05, centering="mean", center_first=False)
    assert frozen.nbytes() == 4 * 25 * 25 * 8
    with_cache = fused_structure_regularizer(x * float("nan"), a, frozen=frozen, **options)  # x is not read
    assert with_cache.item() == pytest.approx(structure_regularizer(x, a, **options).item(), rel=1e-12)


def test_the_fused_terms_refuse_other_distances():
    x, a = _data(8)
    with pytest.raises(ValueError, match="cosine"):
        fused_structure_regularizer(x, a, distance="rbf", **_options())


@pytest.mark.parametrize("n", [5, 300, 2500])
def test_symmetrize_is_exact(n):
    m = torch.randn(n, n, generator=torch.Generator().manual_seed(n))
    expected = m + m.T
    assert torch.equal(packed_loss._symmetrize_(m, torch.empty(n, n)), expected)


# ------------------------------------------------------------------ the frozen side from a Gram of the training rows


def _relative_error(side, truth) -> float:
    """The largest relative error of ½P^l + ε over the levels, against a float64 truth."""
    return max(_relative(mine.double(), true) for mine, true in zip(side.half_p, truth.half_p))


@pytest.mark.parametrize("centering, levels", [("mean", 1), ("mean", 2), ("none", 2)])
def test_the_frozen_side_from_the_gram_equals_the_batch_product(centering, levels):
    """float32 features with a large common component (5 in every column), a batch of sorted rows:
    the Gram's side is as close to the float64 truth as the batch product's own float32 side."""
    g = torch.Generator().manual_seed(7)
    features = 5.0 + torch.randn(400, 48, generator=g)
    rows = torch.randperm(400, generator=g)[:150].sort().values
    options = dict(levels=levels, temperature=0.05)
    truth = frozen_side(features[rows].double(), centering=centering, center_first=False, **options)
    batch = frozen_side(features[rows], centering=centering, center_first=False, **options)
    from_gram = frozen_side_from_gram(FrozenGram(features, centering), rows, workspace=Workspace(), **options)
    for mine, theirs in zip(from_gram.half_p + from_gram.log_p, batch.half_p + batch.log_p):
        assert _relative(mine, theirs) < 1e-6
    # float32 rounding alone is ~1e-7 here; a cancellation would show as 1e-6 or more
    assert _relative_error(from_gram, truth) <= 2 * _relative_error(batch, truth) + 1e-8
    if centering == "mean":  # why G is built from globally centred rows: without, it cancels
        uncentred = FrozenGram(features, "none")
        uncentred.centering = "mean"  # the same double-centring of the gathered block
        naive = frozen_side_from_gram(uncentred, rows, **options)
        assert _relative_error(naive, truth) > 5 * _relative_error(from_gram, truth)


def test_the_gram_refuses_other_centrings():
    with pytest.raises(ValueError, match="standard"):
        FrozenGram(torch.randn(5, 3), "standard")


@pytest.mark.parametrize("overrides", [dict(), dict(structure_levels=2, structure_centering="none")])
def test_the_twin_reads_an_announced_training_batch_from_the_gram(overrides, monkeypatch):
    """Rows in batch (unsorted) order: the twin sorts them and permutes the aligned rows alike;
    value and gradient are the reference's."""
    g = torch.Generator().manual_seed(3)
    train_img, train_txt = torch.randn(40, 10, generator=g, dtype=F64), torch.randn(40, 12, generator=g, dtype=F64)
    rows = torch.randperm(40, generator=g)[:17]
    img_a, txt_a = (torch.randn(17, 6, generator=g, dtype=F64).requires_grad_(True) for _ in range(2))
    twin = FusedAlignmentLoss(**overrides)
    twin.cache_gram(train_img, train_txt)
    img_o, txt_o = train_img[rows], train_txt[rows]
    twin.training_batch(img_o, txt_o, rows)
    calls, inner = [], FrozenGram.similarity
    monkeypatch.setattr(FrozenGram, "similarity", lambda self, *a, **k: calls.append(1) or inner(self, *a, **k))
    fused = twin(img_a, txt_a, img_o, txt_o)["overall_loss"]
    ref = AlignmentLoss(**overrides)(img_a, txt_a, img_o, txt_o)["overall_loss"]
    assert len(calls) == 2  # both modalities from their Gram
    assert fused.item() == pytest.approx(ref.item(), rel=1e-12)
    for mine, theirs in zip(torch.autograd.grad(fused, (img_a, txt_a)), torch.autograd.grad(ref, (img_a, txt_a))):
        assert _relative(mine, theirs) < 1e-10


# ------------------------------------------------------------------ the fused twin of AlignmentLoss


def _batch(n=24, seed=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=F64) for d in (6, 6, 10, 12)]


@pytest.mark.parametrize("overrides", [dict(), dict(structure_lambda=0.0), dict(paper_sum=True),
                                       dict(normalize_latents=False, structure_levels=2),
                                       dict(structure_use_only_unimodal=True)])
def test_the_twin_returns_the_reference_outputs(overrides):
    reference = AlignmentLoss(**overrides)
    twin = FusedAlignmentLoss.twin_of(reference)
    img_a, txt_a, img_o, txt_o = _batch()
    extra = _batch(n=7, seed=5)
    kwargs = dict(extra_image=(extra[2], extra[0]), extra_text=(extra[3], extra[1]))
    ref_out, twin_out = reference(img_a, txt_a, img_o, txt_o, **kwargs), twin(img_a, txt_a, img_o, txt_o, **kwargs)
    assert set(ref_out) == set(twin_out)
    for key in ref_out:
        assert twin_out[key].item() == pytest.approx(ref_out[key].item(), rel=1e-12), key


def test_frozen_cache_is_keyed_by_the_view_and_its_version():
    loss = FusedAlignmentLoss(structure_levels=2)
    img_a, txt_a, img_o, txt_o = _batch()
    expected = AlignmentLoss(structure_levels=2)(img_a, txt_a, img_o, txt_o)["overall_loss"].item()
    assert loss.cache_frozen(img_o) and loss.cache_frozen(txt_o)
    assert loss(img_a, txt_a, img_o, txt_o)["overall_loss"].item() == pytest.approx(expected, rel=1e-12)
    img_o.mul_(3.0).add_(1.0)  # in place: the version changes, the cached entry no longer applies
    changed = AlignmentLoss(structure_levels=2)(img_a, txt_a, img_o, txt_o)["overall_loss"].item()
    assert loss(img_a, txt_a, img_o, txt_o)["overall_loss"].item() == pytest.approx(changed, rel=1e-12)
    assert not loss.cache_frozen(img_o[:5], budget=0)
