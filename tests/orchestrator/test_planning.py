"""Trial fingerprints: what changes a result changes the fingerprint, nothing else."""

import numpy as np

from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.planning import fingerprint
from trials.config import TrialConfig


def features(suffix="") -> FeatureSet:
    split = SplitFeatures(image=f"img{suffix}", text="txt", text_to_image=np.arange(3))
    return FeatureSet(train=split, val=split, zero_shot={}, retrieval={}, num_layers=(2, 2))


def test_fingerprint_follows_config_features_and_layers():
    base = fingerprint(TrialConfig(image_layer=0, text_layer=1), features())
    assert base == fingerprint(TrialConfig(image_layer=0, text_layer=1), features())
    assert base != fingerprint(TrialConfig(image_layer=1, text_layer=1), features())
    assert base != fingerprint(TrialConfig(image_layer=0, text_layer=1, seed=1), features())
    assert base != fingerprint(TrialConfig(image_layer=0, text_layer=1), features("-other"))


def test_closed_form_csa_ignores_loss_and_optimiser_settings():
    a = TrialConfig(head="csa", structure_lambda=0.0, lr=1e-3)
    b = TrialConfig(head="csa", structure_lambda=10.0, lr=None, epochs=5)
    assert fingerprint(a, features()) == fingerprint(b, features())
    assert fingerprint(a, features()) != fingerprint(TrialConfig(head="csa", seed=2), features())
    assert (fingerprint(TrialConfig(structure_lambda=0.0), features())
            != fingerprint(TrialConfig(structure_lambda=10.0), features()))
