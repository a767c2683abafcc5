"""trials.heads and trials.head_options: names, options, the stuck ResLowRank gate (METHOD.md §4, §15.11).

Every registered head's conformance (build, forward, gradients; fit, transform)
is in test_registries.py.
"""

import math

import pytest
import torch

from trials.head_options import check_head_options
from trials.heads import build_head, list_heads
from trials.losses import AlignmentLoss


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
    with pytest.raises(ValueError, match="unknown head 'transformer'"):
        check_head_options("transformer", {})
    with pytest.raises(ValueError, match="closed form.*trials.csa.fit_csa"):
        build_head("csa", 4, 4)


@pytest.mark.parametrize("options, message", [({"num_layers": 0}, "num_layers=0"),
                                              ({"activation": "tanh"}, "activation='tanh'")])
def test_mlp_option_values_are_checked_without_building(options, message):
    with pytest.raises(ValueError, match=message):
        check_head_options("mlp", options)


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
