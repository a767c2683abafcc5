"""trials.losses against the official code's stored outputs (METHOD.md §15.1-2) and the spec."""

import math

import pytest
import torch

from trials.losses import (
    AlignmentLoss,
    clip_loss,
    js_divergence,
    official_divergence,
    safe_normalize,
    structure_regularizer,
)

# official structure_reg / CLIPLoss Python defaults (§2, §3), for cases that leave a key out
_STRUCTURE_REG_DEFAULTS = dict(levels=3, temperature=0.1, gamma=1.0, margin=0.0, eps=1e-12,
                               weighting="inverse", distance_type="cosine", centering_type="mean",
                               center_first=False)
_CLIPLOSS_DEFAULTS = dict(temperature=0.07, normalize_latents=False, warmup_steps=500, structure_lambda=10.0,
                          structure_levels=1, structure_weighting="none", structure_margin=0.0,
                          structure_centering="mean", structure_distance="cosine",
                          structure_centering_first=False, structure_use_only_unimodal=False)
_DTYPES = {"float64": torch.float64, "float32": torch.float32}


def _tensor(values, dtype_name, requires_grad=False):
    return torch.tensor(values, dtype=torch.float64).to(_DTYPES[dtype_name]).requires_grad_(requires_grad)


def _structure_kwargs(params):
    p = {**_STRUCTURE_REG_DEFAULTS, **params}
    assert p["eps"] == 1e-12, "only the official eps is implemented"
    return dict(levels=p["levels"], temperature=p["temperature"], gamma=p["gamma"], margin=p["margin"],
                weighting=p["weighting"], distance=p["distance_type"], centering=p["centering_type"],
                center_first=p["center_first"])


def _structure_tolerance(case):
    """§15.1: 1e-10 abs (1e-9 rel) for float64 cosine/rbf; 2e-6 abs for float32 and spearman."""
    loose = case["dtype"] == "float32" or case["params"].get("distance_type") == "spearman"
    return dict(abs=2e-6, rel=1e-5) if loose else dict(abs=1e-10, rel=1e-9)


# --- structure_reg (§15.1) ------------------------------------------------------------------


def test_structure_reg_output(structure_reg_ref_case):
    case = structure_reg_ref_case
    x = _tensor(case["X_original"], case["dtype"])
    z = _tensor(case["Z_aligned"], case["dtype"], requires_grad=True)
    out = structure_regularizer(x, z, **_structure_kwargs(case["params"]))
    assert out.shape == ()
    if case["name"] == "identical_inputs_zero":
        assert out.item() == 0.0
    assert out.item() == pytest.approx(case["output"], **_structure_tolerance(case))
    assert (out.grad_fn is not None) == case["output_has_grad_fn"]


def test_structure_reg_gradient(structure_reg_ref_case):
    case = structure_reg_ref_case
    if case.get("grad_wrt_Z_aligned_fro_norm") is None:
        pytest.skip("no stored gradient (spearman has none)")
    x = _tensor(case["X_original"], case["dtype"])
    z = _tensor(case["Z_aligned"], case["dtype"], requires_grad=True)
    (grad,) = torch.autograd.grad(structure_regularizer(x, z, **_structure_kwargs(case["params"])), z)
    expected_norm = case["grad_wrt_Z_aligned_fro_norm"]
    assert grad.double().norm().item() == pytest.approx(expected_norm, rel=1e-6, abs=1e-12)
    if "grad_wrt_Z_aligned" in case:
        expected = torch.tensor(case["grad_wrt_Z_aligned"], dtype=torch.float64)
        torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=1e-6 * max(expected_norm, 1e-12))


def test_spearman_has_no_gradient():
    x, z = torch.randn(12, 6, dtype=torch.float64), torch.randn(12, 4, dtype=torch.float64, requires_grad=True)
    out = structure_regularizer(x, z, distance="spearman")
    assert out.grad_fn is None and out.dtype == torch.float32  # float32 ranks, like the code


def test_scale_invariance_and_identity():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(20, 8, generator=g, dtype=torch.float64), torch.randn(20, 5, generator=g, dtype=torch.float64)
    base = structure_regularizer(x, z, levels=2, weighting="inverse")
    scaled = structure_regularizer(x * torch.rand(20, 1, generator=g, dtype=torch.float64) * 7, z, levels=2,
                                   weighting="inverse")
    assert scaled.item() == pytest.approx(base.item(), abs=1e-12)
    # kl_div's xlogy and log round differently at the last ulp, so ~1e-21, not always exactly 0
    assert structure_regularizer(x, x.clone()).item() == pytest.approx(0.0, abs=1e-18)


def test_margin_clips_and_weighting():
    g = torch.Generator().manual_seed(1)
    x, z = torch.randn(16, 8, generator=g, dtype=torch.float64), torch.randn(16, 4, generator=g, dtype=torch.float64)
    d1 = structure_regularizer(x, z, levels=1).item()
    assert structure_regularizer(x, z, margin=d1 + 1.0).item() == 0.0
    assert structure_regularizer(x, z, margin=d1 / 2).item() == pytest.approx(d1 / 2, rel=1e-12)
    none2 = structure_regularizer(x, z, levels=2).item()
    inv2 = structure_regularizer(x, z, levels=2, weighting="inverse").item()
    # (D1 + D2)/2 vs (D1 + D2/2)/2 share D1 = d1
    assert 2 * inv2 - d1 == pytest.approx((2 * none2 - d1) / 2, rel=1e-10)


def test_js_is_bounded_and_differs_from_official():
    g = torch.Generator().manual_seed(2)
    p = torch.softmax(torch.randn(10, 10, generator=g, dtype=torch.float64) * 20, -1)
    q = torch.softmax(torch.randn(10, 10, generator=g, dtype=torch.float64) * 20, -1)
    js = js_divergence(p, q).item()
    assert 0 < js <= math.log(2) + 1e-9
    assert official_divergence(p, q).item() > js
    assert js_divergence(p, p).item() == pytest.approx(0.0, abs=1e-12)
    # textbook form, written out
    m = (p + q) / 2
    expected = 0.5 * ((p * (p / m).log()).sum() + (q * (q / m).log()).sum()) / 10
    assert js == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize(
    "option, value",
    [("weighting", "linear"), ("centering", "zscore"), ("distance", "l2"), ("divergence", "kl"),
     ("levels", 0), ("levels", 1.5), ("temperature", 0.0)],
)
def test_invalid_options_name_the_allowed_values(option, value):
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match=option):
        structure_regularizer(x, x, **{option: value})
    with pytest.raises(ValueError, match="allowed values"):
        structure_regularizer(x, x, **{option: value})


def test_mismatched_rows_are_rejected():
    with pytest.raises(ValueError, match="same n"):
        structure_regularizer(torch.randn(6, 3), torch.randn(5, 3))


def test_invalid_loss_options():
    with pytest.raises(ValueError, match="'official', 'js'"):
        AlignmentLoss(structure_divergence="textbook")
    with pytest.raises(ValueError, match="structure_lambda"):
        AlignmentLoss(structure_lambda=-1.0)


def test_regularizer_ignores_autocast():
    x, z = torch.randn(8, 6), torch.randn(8, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = structure_regularizer(x, z)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(structure_regularizer(x, z).item(), rel=1e-6)


def test_safe_normalize():
    x = torch.randn(5, 3, dtype=torch.float64)
    unit = x / x.norm(dim=-1, keepdim=True)
    nearly = unit * (1 + 1e-8)  # within tolerance: returned unchanged
    assert torch.equal(safe_normalize(nearly), nearly)
    torch.testing.assert_close(safe_normalize(3 * x), unit, rtol=0, atol=1e-15)
    assert torch.equal(safe_normalize(torch.zeros(2, 3)), torch.zeros(2, 3))


# --- CLIP loss and AlignmentLoss (§15.2) ----------------------------------------------------


def _alignment_loss(params):
    p = {**_CLIPLOSS_DEFAULTS, **params}
    p["structure_center_first"] = p.pop("structure_centering_first")
    return AlignmentLoss(**p)


def test_clip_loss_case(clip_loss_ref_case):
    case = clip_loss_ref_case
    loss = _alignment_loss(case["params"])
    for _ in range(case["n_step_calls"]):
        loss.step()
    assert loss.structure_lambda == pytest.approx(case["structure_lambda_in_effect"], abs=1e-15)
    t = {k: _tensor(case[k], case["dtype"]) for k in
         ("image_aligned", "text_aligned", "image_original", "text_original")}
    extras = {}
    if "add_image_original" in case:
        extras["extra_image"] = (_tensor(case["add_image_original"], case["dtype"]),
                                 _tensor(case["add_image_aligned"], case["dtype"]))
    if "add_text_original" in case:
        extras["extra_text"] = (_tensor(case["add_text_original"], case["dtype"]),
                                _tensor(case["add_text_aligned"], case["dtype"]))
    out = loss(**t, **extras)
    assert set(out) == set(case["outputs"])  # λ=0: no structure keys
    tol = 1e-10 if case["dtype"] == "float64" else 5e-6
    for key, expected in case["outputs"].items():
        assert isinstance(out[key], torch.Tensor) and out[key].shape == ()
        assert out[key].item() == pytest.approx(expected, abs=tol), key


def test_clip_loss_formula():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(7, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64)
    z = a @ b.T / 0.1
    ce = lambda m: (m.logsumexp(1) - m.diag()).mean()  # noqa: E731
    assert clip_loss(a, b, 0.1).item() == pytest.approx(0.5 * (ce(z) + ce(z.T)).item(), rel=1e-12)


def test_warmup_schedule():
    loss = AlignmentLoss(structure_lambda=8.0, warmup_steps=4)
    seen = [loss.structure_lambda]
    for _ in range(7):
        loss.step()
        seen.append(loss.structure_lambda)
    assert seen == [8.0, 0.0, 2.0, 4.0, 6.0, 8.0, 8.0, 8.0]


def test_lambda_zero_skips_structure_and_first_batch_does_too():
    x = torch.randn(6, 5)
    out = AlignmentLoss(structure_lambda=0.0)(x[:, :3], x[:, 1:4], x, x)
    assert set(out) == {"clip_loss", "overall_loss"}
    loss = AlignmentLoss()
    loss.step()
    assert set(loss(x[:, :3], x[:, 1:4], x, x)) == {"clip_loss", "overall_loss"}


def test_steps_round_trip_through_state_dict():
    loss = AlignmentLoss(warmup_steps=10)
    for _ in range(6):
        loss.step()
    fresh = AlignmentLoss(warmup_steps=10)
    fresh.load_state_dict(loss.state_dict())
    assert fresh.steps == 6 and fresh.structure_lambda == loss.structure_lambda == 5.0


def _random_batch(seed=4, n=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=torch.float64) for d in (6, 6, 10, 12)]


def test_paper_sum_doubles_the_structure_term():
    batch = _random_batch()
    avg, summed = AlignmentLoss()(*batch), AlignmentLoss(paper_sum=True)(*batch)
    assert summed["structure_loss_wo_lambda"].item() == pytest.approx(2 * avg["structure_loss_wo_lambda"].item())
    assert summed["clip_loss"].item() == avg["clip_loss"].item()


def test_extras_only_unimodal_replace_the_batch():
    img_a, txt_a, img_o, txt_o = _random_batch()
    extra_img, extra_txt = _random_batch(seed=5, n=9)[0::2], _random_batch(seed=6, n=7)[1::2]
    out = AlignmentLoss(structure_use_only_unimodal=True)(img_a, txt_a, img_o, txt_o,
                                                         extra_image=(extra_img[1], extra_img[0]),
                                                         extra_text=(extra_txt[1], extra_txt[0]))
    r_img = structure_regularizer(extra_img[1], safe_normalize(extra_img[0]))
    r_txt = structure_regularizer(extra_txt[1], safe_normalize(extra_txt[0]))
    assert out["structure_loss_wo_lambda"].item() == pytest.approx(((r_img + r_txt) / 2).item(), rel=1e-12)


def test_gradients_flow_to_heads():
    img_a, txt_a, img_o, txt_o = _random_batch()
    img_a.requires_grad_(True)
    AlignmentLoss(structure_distance="spearman")(img_a, txt_a, img_o, txt_o)["overall_loss"].backward()
    assert img_a.grad is not None and torch.isfinite(img_a.grad).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_no_host_sync_in_forward_backward():
    batch = [t.float().cuda() for t in _random_batch(n=64)]
    batch[0].requires_grad_(True)
    loss = AlignmentLoss(structure_levels=2, structure_centering="standard")
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss(*batch)["overall_loss"].backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
