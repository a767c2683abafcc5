"""trials.token_projector: freeze-align's token heads and the learnable-temperature loss."""

import numpy as np
import pytest
import torch

from trials.head_options import needs_tokens
from trials.heads import build_head
from trials.losses import AlignmentLoss, clip_loss
from trials.token_projector import LearnableTemperatureLoss, Tokens, pooled_original
from trials.token_trial import build_token_projector
from trials.tokens import RaggedTokens


def random_tokens(b=5, length=7, dim=6, prefix=2, seed=0, min_length=1) -> Tokens:
    """Random tokens with ragged lengths; the padding holds garbage (it must never be read)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, length + 1, (b,), generator=g)
    mask = torch.arange(length)[None] < lengths[:, None]
    local = torch.where(mask[..., None], torch.randn(b, length, dim, generator=g), 1e3)
    return Tokens(local, mask, torch.randn(b, prefix, dim, generator=g))


def model(image_dim=6, text_dim=6, out_dim=4, seed=0, **options):
    return build_token_projector("token_projector", image_dim, text_dim, out_dim, seed=seed, **options).eval()


def test_outputs_are_unit_rows_of_the_right_shape():
    m = model(image_dim=6, text_dim=5, out_dim=4)
    image, text = random_tokens(b=5, dim=6), random_tokens(b=3, dim=5, prefix=0)
    for out, rows in ((m.image(image), 5), (m.text(text), 3)):
        assert out.shape == (rows, 4)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(rows), rtol=0, atol=1e-6)


def test_image_mean_excludes_prefix_and_padding_but_the_cls_has_its_projector():
    m, tokens = model(), random_tokens()
    out = m.image(tokens)
    register = tokens.prefix.clone()
    register[:, 1] += 5.0  # a register token: neither in the mean nor the CLS
    padding = torch.where(tokens.mask[..., None], tokens.local, -7.0)
    torch.testing.assert_close(m.image(tokens._replace(prefix=register)), out, rtol=0, atol=0)
    torch.testing.assert_close(m.image(tokens._replace(local=padding)), out, rtol=0, atol=1e-6)
    cls = tokens.prefix.clone()
    cls[:, 0] += torch.linspace(-1, 1, 6)  # not a constant: LayerNorm removes those
    assert (m.image(tokens._replace(prefix=cls)) - out).abs().max() > 1e-3


def _zero_mlp_paths(m):
    with torch.no_grad():
        for projector in (m.image.local, m.image.cls):
            last = projector[2].mlp[2]
            last.weight.zero_(), last.bias.zero_()


def _layer_norm(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)


def test_with_mlp_paths_zeroed_the_image_head_is_two_linear_maps_of_mean_patches_and_cls():
    """normalize(Lin_l(mean LN(patches)) + Lin_c(LN(cls))), computed in float64 numpy
    (the LayerNorms are at their initial identity affine; dropout is off in eval mode)."""
    m, tokens = model(), random_tokens(length=9, min_length=3)
    _zero_mlp_paths(m)
    lin_l, lin_c = m.image.local[2].linear, m.image.cls[2].linear
    w_l, b_l = lin_l.weight.detach().double().numpy(), lin_l.bias.detach().double().numpy()
    w_c, b_c = lin_c.weight.detach().double().numpy(), lin_c.bias.detach().double().numpy()
    local, mask = tokens.local.double().numpy(), tokens.mask.numpy()
    means = np.stack([_layer_norm(local[i][mask[i]]).mean(0) for i in range(len(mask))])
    want = means @ w_l.T + b_l + _layer_norm(tokens.prefix[:, 0].double().numpy()) @ w_c.T + b_c
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(m.image(tokens).detach().numpy(), want, rtol=0, atol=1e-5)


def test_text_masked_mean_is_invariant_to_padding_length():
    m = model(text_dim=6)
    tokens = random_tokens(prefix=0, length=4)
    wider = Tokens(torch.cat([tokens.local, torch.randn(5, 6, 6)], 1),
                   torch.cat([tokens.mask, torch.zeros(5, 6, dtype=torch.bool)], 1), tokens.prefix)
    torch.testing.assert_close(m.text(wider), m.text(tokens), rtol=0, atol=1e-6)


def test_ragged_source_batches_feed_the_heads():
    padded = random_tokens(prefix=1)
    source = RaggedTokens.from_padded(padded.local.numpy(), padded.mask.numpy(), padded.prefix.numpy())
    batch = Tokens.from_numpy(source.gather(np.array([3, 0])))
    torch.testing.assert_close(model().image(batch), model().image(Tokens(*(t[[3, 0]] for t in padded))),
                               rtol=0, atol=1e-6)


def test_pooled_original_is_cls_for_images_and_the_masked_mean_for_text():
    tokens = random_tokens()
    torch.testing.assert_close(pooled_original(tokens, True), tokens.prefix[:, 0])
    want = torch.stack([tokens.local[i][tokens.mask[i]].mean(0) for i in range(5)])
    torch.testing.assert_close(pooled_original(tokens, False), want)
    torch.testing.assert_close(pooled_original(tokens._replace(prefix=tokens.prefix[:, :0]), True), want)


def test_temperature_is_clamped_and_is_the_clip_temperature():
    loss = LearnableTemperatureLoss(structure_lambda=0.0, temperature=0.07)
    assert loss.temp.requires_grad and loss.temp.item() == pytest.approx(0.07)
    for value, clamped in ((5.0, 0.5), (1e-6, 0.001), (0.2, 0.2)):
        with torch.no_grad():
            loss.temp.fill_(value)
        loss.clamp_temperature()
        assert loss.temp.item() == pytest.approx(clamped)
    a = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    b = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    torch.testing.assert_close(loss(a, b, a, b)["clip_loss"], clip_loss(a, b, 0.2))
    assert not LearnableTemperatureLoss(learnable=False).temp.requires_grad


def test_rs_on_pooled_features_adds_to_the_loss():
    m, image, text = model(), random_tokens(b=8, seed=1), random_tokens(b=8, prefix=0, seed=2)
    originals = pooled_original(image, True), pooled_original(text, False)
    plain = LearnableTemperatureLoss(structure_lambda=0.0)(m.image(image), m.text(text), *originals)
    with_rs = LearnableTemperatureLoss(structure_lambda=1.0, warmup_steps=0)(m.image(image), m.text(text), *originals)
    torch.testing.assert_close(with_rs["clip_loss"], plain["clip_loss"])
    want = AlignmentLoss(structure_lambda=1.0, warmup_steps=0)(m.image(image), m.text(text), *originals)
    torch.testing.assert_close(with_rs["structure_loss"], want["structure_loss"])
    assert with_rs["overall_loss"] > plain["overall_loss"] + 1e-4


def test_token_head_conformance_every_parameter_trains_and_the_build_is_seeded():
    assert needs_tokens("token_projector") and not needs_tokens("linear")
    m = model().train()
    (m.image(random_tokens()).sum() + m.text(random_tokens(prefix=0)).square().sum()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
    for (ka, va), (kb, vb) in zip(model(seed=3).state_dict().items(), model(seed=3).state_dict().items()):
        assert ka == kb and torch.equal(va, vb)
    with pytest.raises(ValueError, match="token features"):
        build_head("token_projector", 6, 4)
    with pytest.raises(ValueError, match="schedule"):
        model(schedule="cosine")
