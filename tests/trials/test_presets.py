"""trials.presets: the official config table (METHOD.md §2); every preset's conformance is in test_registries.py."""

import pytest

from trials.presets import get_preset, list_presets

REQUIRED = [
    "linear+last", "linear+similar", "linear+similar+rs", "linear+similar+rs-l2",
    "linear+similar+rs-l3", "linear+similar+rs-l5", "res_low_rank+last", "res_low_rank+similar",
    "res_low_rank+similar+rs", "csa+last", "csa+similar", "csa+similar+rs",
    "ablation-centering-none", "ablation-centering-standard", "ablation-center-first",
    "ablation-distance-rbf", "ablation-distance-spearman",
]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(list_presets())


def test_get_preset_returns_a_copy_and_rejects_unknown_names():
    get_preset("linear+similar+rs")["loss"]["structure_lambda"] = 0.0
    assert get_preset("linear+similar+rs")["loss"]["structure_lambda"] == 10.0
    with pytest.raises(ValueError) as err:
        get_preset("linear+similar+rs-l4")
    assert "unknown preset" in str(err.value) and "linear+similar+rs-l5" in str(err.value)


def test_official_table_values():
    base, rs = get_preset("linear+last"), get_preset("linear+similar+rs")
    assert base["loss"]["structure_lambda"] == 0 and base["layer_rule"] == "last"
    assert rs["loss"] == dict(temperature=0.05, normalize_latents=True, warmup_steps=1000,
                              structure_lambda=10.0, structure_levels=1, structure_weighting="none")
    assert get_preset("linear+similar+rs-l3")["loss"]["structure_weighting"] == "inverse"
    assert get_preset("default")["out_dim"] == 256 and rs["out_dim"] == 512
    mlp = get_preset("res_low_rank+similar+rs")
    assert mlp["head_options"] == dict(rank=64, dropout_p=0.1, gate_init=0.0)
    csa = get_preset("csa+similar+rs-l5")["head_options"]
    assert csa == dict(refine=True, lambda_rs=10.0, lambda_cca=1e-2, levels=5, tau=0.2, refine_epochs=10,
                       lr=5e-4, batch_size=4096)  # no `whiten`: the configs do not name it
    assert get_preset("csa+similar")["head_options"] == {}
    assert get_preset("ablation-distance-rbf")["loss"]["structure_distance"] == "rbf"
    assert get_preset("ablation-center-first")["loss"]["structure_center_first"] is True

