"""Conformance of every registry entry (as timm tests every registered model).

A head, preset or similarity metric added to its registry is tested here with
no edit to this file: trainable heads build, forward and backprop; closed-form
heads fit and transform; presets make a valid trial config; metrics are
rotation-invariant similarities and agree with their all-pairs form.
"""

import dataclasses
import inspect

import pytest
import torch

from trials.config import TrialConfig
from trials.head_options import HEAD_OPTIONS, check_head_options, is_closed_form, needs_tokens
from trials.heads import HEADS, build_head, list_heads
from trials.losses import AlignmentLoss
from trials.presets import get_preset, list_presets
from trials.selection import parse_rule
from trials.similarity import METRICS, layer_similarity
from trials.token_trial import build_token_projector

TOKEN = HEAD_OPTIONS.names(tokens=True)  # their conformance: tests/trials/test_token_projector.py
TRAINABLE = [name for name in HEAD_OPTIONS.names(closed_form=False) if name not in TOKEN]
CLOSED_FORM = HEAD_OPTIONS.names(closed_form=True)

# ------------------------------------------------------------------ heads


def test_every_head_has_options_and_code_under_one_name():
    assert HEADS.names() == HEAD_OPTIONS.names() == list_heads()
    assert list_heads(trainable_only=True) == sorted(TRAINABLE + TOKEN) and CLOSED_FORM
    assert sorted(TRAINABLE + CLOSED_FORM + TOKEN) == list_heads()


@pytest.mark.parametrize("name", HEAD_OPTIONS.names())
def test_head_options_have_defaults_for_everything(name):
    defaults = HEAD_OPTIONS.get(name)()  # no option is required
    check_head_options(name, dataclasses.asdict(defaults))


@pytest.mark.parametrize("name", TRAINABLE)
def test_trainable_head_takes_exactly_its_options(name):
    """The module's arguments after (in_dim, out_dim) are its options' fields, without defaults of its own."""
    params = list(inspect.signature(HEADS.get(name)).parameters.values())[2:]
    assert [p.name for p in params] == [f.name for f in dataclasses.fields(HEAD_OPTIONS.get(name))]
    assert all(p.default is inspect.Parameter.empty for p in params)


@pytest.mark.parametrize("name", TRAINABLE)
def test_trainable_head_builds_forwards_and_backprops(name):
    head = build_head(name, 12, 6, seed=0).train()
    out = head(torch.randn(10, 12))
    assert out.shape == (10, 6) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", TRAINABLE)
def test_seeded_build_is_deterministic_and_leaves_global_rng_alone(name):
    state = torch.random.get_rng_state()
    a, b = build_head(name, 7, 5, seed=3), build_head(name, 7, 5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def _paired(n=60, dx=9, dy=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    x = z @ torch.randn(3, dx, generator=g) + 0.5 * torch.randn(n, dx, generator=g)
    y = z @ torch.randn(3, dy, generator=g) + 0.5 * torch.randn(n, dy, generator=g)
    return x, y


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_closed_form_head_fits_and_transforms(name):
    x, y = _paired()
    fit = HEADS.get(name)(x, y, 4, seed=0)
    zx, zy = fit.transform_x(x[:11]), fit.transform_y(y[:13])
    assert zx.shape == (11, 4) and zy.shape == (13, 4)
    assert torch.isfinite(zx).all() and torch.isfinite(zy).all()
    assert fit.class_vectors(torch.randn(5, 3, 7)).shape == (5, 4)  # [classes, templates, dy]


@pytest.mark.parametrize("name", CLOSED_FORM)
def test_closed_form_head_is_not_built(name):
    with pytest.raises(ValueError, match="closed form"):
        build_head(name, 4, 4)


# ------------------------------------------------------------------ presets


@pytest.mark.parametrize("name", list_presets())
def test_preset_makes_a_valid_trial(name):
    preset = get_preset(name)
    assert set(preset) == {"head", "head_options", "out_dim", "layer_rule", "loss", "train"}
    assert preset["head"] in list_heads()
    parse_rule(preset["layer_rule"])
    config = TrialConfig(head=preset["head"], head_options=preset["head_options"],
                         out_dim=preset["out_dim"], **preset["loss"], **preset["train"])
    if is_closed_form(preset["head"]):  # fitted: no loss to set
        assert preset["loss"] == {}
    elif needs_tokens(preset["head"]):
        build_token_projector(config.head, 8, 6, config.out_dim, **config.head_options)
        AlignmentLoss(config.loss_options())
    else:
        build_head(config.head, 8, config.out_dim, **config.head_options)
        AlignmentLoss(config.loss_options())


# ------------------------------------------------------------------ similarity metrics


def _layers(seed, n=40, dims=(5, 7)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for d in dims]


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_is_a_rotation_invariant_similarity(name):
    """A 0-d score <= 1, unchanged by rotating a layer's features, higher for a layer
    with itself than with unrelated noise. (Not by scaling: CKA's +1e-6 sees the scale.)"""
    metric = METRICS.get(name)
    x, y = _layers(0)
    rotation = torch.linalg.qr(_layers(1, n=5, dims=(5,))[0])[0]
    args = (4,) if metric.uses_k else ()
    score = metric.pair(x, y, *args)
    assert score.ndim == 0 and torch.isfinite(score) and score.item() <= 1 + 1e-9
    assert metric.pair(x @ rotation, y, *args).item() == pytest.approx(score.item(), abs=1e-9)
    assert metric.pair(x, x, *args).item() > score.item()


@pytest.mark.parametrize("name", METRICS.names())
def test_metric_all_pairs_is_its_pair_function_on_every_pair(name):
    metric = METRICS.get(name)
    xs, ys = _layers(1), _layers(2, dims=(4, 6, 3))
    args = (4,) if metric.uses_k else ()
    got = layer_similarity(xs, ys, metric=name, k=4, normalize=False)
    want = torch.tensor([[metric.pair(x, y, *args).item() for y in ys] for x in xs], dtype=torch.float64)
    assert got.dtype == torch.float64 and got.shape == (2, 3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
