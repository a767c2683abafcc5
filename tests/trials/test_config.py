"""trials.config: TrialConfig's range checks, its composition from each concern's options and its fingerprint fields."""

import dataclasses
import subprocess
import sys

import pytest

from trials.config import CLOSED_FORM_IGNORED, TrialConfig
from trials.loss_options import LOSS_DEFAULTS, LossOptions
from trials.train_options import TRAIN_DEFAULTS, TrainConfig


@pytest.mark.parametrize("field, value", [
    ("n_train", 0), ("seed", -1), ("out_dim", 0), ("temperature", 0.0), ("warmup_steps", -1),
    ("structure_lambda", -1.0), ("structure_levels", 0), ("structure_margin", -0.1),
    ("epochs", 0), ("batch_size", 0), ("lr", 0.0), ("weight_decay", -1e-4), ("grad_clip", -1.0),
    ("patience", 0), ("mixup_alpha", -0.5), ("image_layer", 1.5), ("text_layer", "last"),
    ("epochs", True), ("temperature", float("nan")), ("structure_distance", "euclid"),
    ("structure_weighting", "softmax"), ("structure_centering", "median"),
    ("structure_divergence", "kl"), ("head_options", ["rank"]),
])
def test_out_of_range_values_name_the_field_and_the_allowed_values(field, value):
    with pytest.raises(ValueError, match=rf"^{field}=.*allowed values: "):
        TrialConfig(**{field: value})


def test_boundary_values_are_accepted():
    TrialConfig(n_train=1, seed=0, out_dim=1, warmup_steps=0, structure_lambda=0, structure_levels=1,
                structure_margin=0, epochs=1, batch_size=1, lr=1e-9, weight_decay=0, patience=1,
                mixup_alpha=0, image_layer=-3, text_layer=7)
    TrialConfig(n_train=None, lr=None)


def test_head_options_are_checked_against_the_head():
    TrialConfig(head="res_low_rank", head_options={"rank": 4})
    TrialConfig(head="csa", head_options={"refine": True, "levels": 2})
    with pytest.raises(ValueError, match="rnak"):
        TrialConfig(head="res_low_rank", head_options={"rnak": 4})
    with pytest.raises(ValueError, match="seed"):
        TrialConfig(head="csa", head_options={"seed": 3})


def test_the_parts_carry_the_trial_fields_and_the_owners_defaults():
    config = TrialConfig(temperature=0.1, structure_levels=3, epochs=7, lr=1e-3, seed=5)
    assert config.loss_options() == dataclasses.replace(LOSS_DEFAULTS, temperature=0.1, structure_levels=3)
    assert config.train_config("cpu") == dataclasses.replace(TRAIN_DEFAULTS, epochs=7, lr=1e-3, seed=5)
    assert TrialConfig().loss_options() == LOSS_DEFAULTS and TrialConfig().train_config("cpu") == TRAIN_DEFAULTS


def test_closed_form_heads_ignore_every_loss_and_optimiser_field_but_not_the_seed():
    owned = {f.name for f in dataclasses.fields(LossOptions)} | {f.name for f in dataclasses.fields(TrainConfig)}
    trial_fields = [f.name for f in dataclasses.fields(TrialConfig)]
    assert list(CLOSED_FORM_IGNORED) == [n for n in trial_fields if n in owned and n != "seed"]


def test_fingerprint_fields_drop_what_csa_ignores():
    linear = TrialConfig(head="linear")
    assert linear.fingerprint_fields() == dataclasses.asdict(linear)
    a = TrialConfig(head="csa", structure_lambda=1.0, epochs=3, lr=1e-2)
    b = TrialConfig(head="csa", structure_lambda=30.0, epochs=7, mixup_alpha=0.2)
    assert a.fingerprint_fields() == b.fingerprint_fields()
    assert set(a.fingerprint_fields()) == {f.name for f in dataclasses.fields(a)} - set(CLOSED_FORM_IGNORED)
    assert TrialConfig(head="csa", seed=1).fingerprint_fields() != a.fingerprint_fields()
    assert set(CLOSED_FORM_IGNORED) <= {f.name for f in dataclasses.fields(TrialConfig)}


def test_importing_and_building_a_config_does_not_load_torch():
    code = ("import sys, trials.config as c, trials.presets as p\n"
            "c.TrialConfig(head='csa', head_options={'refine': True}).fingerprint_fields()\n"
            "c.TrialConfig(head='mlp', head_options={'num_layers': 3}), p.get_preset('default')\n"
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
