"""trials.heads: registry conformance, the stuck ResLowRank gate and CSA (METHOD.md §4, §15.7, §15.11)."""

import math

import pytest
import torch

from trials.heads import build_head, check_head_options, fit_csa, list_heads
from trials.losses import AlignmentLoss


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


# ------------------------------------------------------------------ registry


@pytest.mark.parametrize("name", list_heads(trainable_only=True))
def test_every_head_builds_forwards_and_backprops(name):
    head = build_head(name, 12, 6, seed=0).train()
    x = torch.randn(10, 12)
    out = head(x)
    assert out.shape == (10, 6) and torch.isfinite(out).all()
    out.square().sum().backward()
    grads = [p.grad for p in head.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", list_heads(trainable_only=True))
def test_seeded_build_is_deterministic_and_leaves_global_rng_alone(name):
    state = torch.random.get_rng_state()
    a, b = build_head(name, 7, 5, seed=3), build_head(name, 7, 5, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_unknown_head_lists_registered_names():
    with pytest.raises(ValueError) as err:
        build_head("transformer", 4, 4)
    for name in list_heads():
        assert name in str(err.value)


def test_unknown_option_is_rejected_with_allowed_ones():
    with pytest.raises(ValueError, match="rank"):
        build_head("res_low_rank", 4, 4, rnak=2)
    with pytest.raises(ValueError, match="rank"):
        check_head_options("res_low_rank", {"rnak": 2})


def test_check_head_options_knows_every_head_and_csa_takes_fit_csa_options():
    assert "csa" in list_heads() and "csa" not in list_heads(trainable_only=True)
    check_head_options("mlp", {"hidden_dim": 4, "num_layers": 3})
    check_head_options("csa", {"refine": True, "levels": 2, "tau": 0.2})
    for options in ({"seed": 1}, {"bias": False}):  # a trial passes its own seed
        with pytest.raises(ValueError, match="allowed"):
            check_head_options("csa", options)
    with pytest.raises(ValueError, match="registered heads"):
        check_head_options("transformer", {})
    with pytest.raises(ValueError, match="closed form"):
        build_head("csa", 4, 4)


def test_linear_head_is_affine_with_bias():
    head = build_head("linear", 5, 3)
    x = torch.randn(4, 5)
    assert torch.allclose(head(x), x @ head.weight.T + head.bias)


def test_mlp_hidden_layer_trains():
    head = build_head("mlp", 6, 4, seed=0)
    head(torch.randn(8, 6)).sum().backward()
    assert head[0].weight.grad.abs().sum() > 0  # unlike res_low_rank's W1


# ------------------------------------------------------------------ res_low_rank (§4.3)


def test_res_low_rank_gate_is_stuck_as_official(res_low_rank_head_ref_case):
    obs = res_low_rank_head_ref_case["observations"]
    torch.manual_seed(0)
    heads = [build_head("res_low_rank", 10, 6, rank=4, dropout_p=0.1, gate_init=0.0) for _ in range(2)]
    opt = torch.optim.AdamW([p for h in heads for p in h.parameters()], lr=1e-2, weight_decay=1e-4)
    loss_fn = AlignmentLoss(temperature=0.05, warmup_steps=2)
    x_img, x_txt = torch.randn(16, 10), torch.randn(16, 10)
    w1_grad_max = []
    for _ in range(len(obs["max_abs_grad_W1_per_step"])):
        loss_fn.step()
        opt.zero_grad()
        out = loss_fn(heads[0](x_img), heads[1](x_txt), x_img, x_txt)
        out["overall_loss"].backward()
        w1_grad_max.append(max(h.W1.weight.grad.abs().max().item() for h in heads))
        opt.step()
    assert w1_grad_max == obs["max_abs_grad_W1_per_step"]
    for head in heads:
        assert head.logit_alpha.item() == -math.inf and str(obs["logit_alpha_after_training"]) == "-inf"
        assert head.alpha.item() == obs["alpha_after_training"]
        assert head.W2.weight.abs().max().item() == obs["max_abs_W2_after_training"]
        assert head.P.weight.grad.abs().sum() > 0  # the skip projection does train
        for mode in (head.train, head.eval):
            mode()
            diff = (head(x_img) - head.P(x_img)).abs().max().item()
            assert diff == obs["max_abs_difference_head_output_vs_P_x"]


def test_res_low_rank_with_open_gate_trains_its_branch():
    head = build_head("res_low_rank", 10, 6, rank=4, gate_init=0.5, seed=0)
    head.W2.weight.data.normal_()
    head(torch.randn(8, 10)).sum().backward()
    assert head.alpha.item() == pytest.approx(0.5)
    assert head.W1.weight.grad.abs().sum() > 0 and head.logit_alpha.grad != 0


# ------------------------------------------------------------------ CSA (§4.4, §11)


def _views(case, split):
    return _f64(case[f"{split}_view1"]), _f64(case[f"{split}_view2"])


def _fit(case):
    params = case.get("params")
    if params is None:
        return fit_csa(*_views(case, "train"), case["sim_dim"])
    assert params.get("batch_size") is None, "stored refined cases are full-batch"
    return fit_csa(*_views(case, "train"), case["sim_dim"], refine=True,
                   lambda_rs=params["lambda_rs"], lambda_cca=params["lambda_cca_coeff"],
                   levels=params["L"], tau=params["tau"], refine_epochs=params["refine_epochs"],
                   lr=params["lr"], batch_size=None)


def test_csa_matches_official(csa_ref_case):
    case = csa_ref_case
    fit = _fit(case)
    test_x, test_y = _views(case, "test")
    zx, zy = fit.transform_x(test_x), fit.transform_y(test_y)
    refined = "params" in case
    structure = case if refined else case["structure_NormalizedCCA"]
    tol = 1e-4 if refined else 1e-5  # the refinement is float32 Adam (§15.7)
    cos = fit.similarity(zx, zy)
    assert torch.allclose(cos, _f64(structure["test_cosine_similarity_matrix"]), rtol=0, atol=tol)
    assert torch.allclose(fit.structure_corr_coeff, _f64(structure["corr_coeff"]), rtol=0, atol=tol)
    if "test_paired_cosine" in structure:
        assert torch.allclose(cos.diag(), _f64(structure["test_paired_cosine"]), rtol=0, atol=tol)
    if refined:
        plain = fit_csa(*_views(case, "train"), case["sim_dim"])
        unrefined = plain.similarity(plain.transform_x(test_x), plain.transform_y(test_y))
        assert torch.allclose(unrefined, _f64(case["test_cosine_similarity_matrix_without_refinement"]),
                              rtol=0, atol=1e-5)
    mmda = case.get("mmda_original_CSA")
    if mmda is not None:
        assert torch.allclose(fit.mmda_corr_coeff, _f64(mmda["corr_coeff"]), rtol=0, atol=1e-6)
        weighted = fit.similarity(zx, zy, weighting="mmda")
        assert torch.allclose(weighted, _f64(mmda["test_weighted_corr_similarity_matrix"]), rtol=0, atol=1e-5)
        assert torch.allclose(weighted.diag(), _f64(mmda["test_paired_weighted_corr_sim"]), rtol=0, atol=1e-5)
        assert torch.allclose(cos, _f64(mmda["test_plain_cosine_similarity_matrix"]), rtol=0, atol=1e-5)


def _paired_views(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = z @ torch.randn(3, 9, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 9, generator=g, dtype=torch.float64)
    y = z @ torch.randn(3, 7, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 7, generator=g, dtype=torch.float64) + 3
    return x, y


def test_csa_rho_is_the_textbook_correlation_of_the_canonical_variates():
    x, y = _paired_views()
    fit = fit_csa(x, y, 5)
    zx, zy = fit.transform_x(x), fit.transform_y(y)
    corr = torch.corrcoef(torch.cat([zx, zy], dim=1).T)[:5, 5:]
    assert torch.allclose(corr.diag().abs(), fit.rho, atol=1e-10)
    assert torch.allclose(corr - torch.diag(corr.diag()), torch.zeros(5, 5, dtype=torch.float64), atol=1e-10)
    assert torch.all(fit.rho[:-1] >= fit.rho[1:])


def test_csa_transforms_centre_project_and_keep_input_dtype():
    x, y = _paired_views()
    fit = fit_csa(x, y, 4)
    assert torch.allclose(fit.transform_x(x), (x - x.mean(0)) @ fit.weight_x)
    assert torch.allclose(fit.transform_y(y), (y - y.mean(0)) @ fit.weight_y)
    assert fit.transform_x(x.float()).dtype == torch.float32


def test_csa_similarity_weightings():
    x, y = _paired_views()
    fit = fit_csa(x, y, 4)
    zx, zy = fit.transform_x(x[:6]), fit.transform_y(y[:6])
    unit = lambda z: z / z.norm(dim=1, keepdim=True)  # noqa: E731
    assert torch.allclose(fit.similarity(zx, zy, "rho"), (unit(zx) * fit.rho) @ unit(zy).T)
    assert torch.allclose(fit.similarity(zx, zy, "none", dim=2), unit(zx[:, :2]) @ unit(zy[:, :2]).T)
    with pytest.raises(ValueError, match="weighting"):
        fit.similarity(zx, zy, "softmax")


def test_csa_dim_beyond_rank_is_rejected():
    x, y = _paired_views(n=5)
    with pytest.raises(ValueError, match="rank"):
        fit_csa(x, y, 6)


def test_csa_whiten_option_whitens_refined_projections():
    x, y = _paired_views(n=120)
    fit = fit_csa(x, y, 3, refine=True, refine_epochs=2, batch_size=None, whiten=True)
    z = fit.transform_x(x)
    cov = z.T @ z / len(z)
    assert torch.allclose(cov, torch.eye(3, dtype=torch.float64), atol=1e-4)
