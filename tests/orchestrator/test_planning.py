"""Trial fingerprints: what changes a result changes the fingerprint, nothing else."""

from pathlib import Path

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


def test_plan_of_a_sampled_grid_is_pinned(tmp_path):
    """Draws are seeded by (tune.seed, grid name, combination index) and
    combinations follow the spec's order of dimensions (here not alphabetical):
    the plan is the one v0.1 made."""
    import yaml

    from orchestrator.keys import content_key
    from orchestrator.planning import plan_trials
    from orchestrator.spec import load_spec

    v01_demo = Path(__file__).parents[2] / "tests" / "data" / "pinned_specs" / "demo.yaml"
    data = yaml.safe_load(v01_demo.read_text())
    data["search"] = [{"name": "s", "seed": [0, 1], "layers": ["similar", "last"],
                       "lr": {"loguniform": [1e-4, 1e-2]}, "n_train": [100, 300],
                       "structure_lambda": {"choice": [0, 10]}, "num_samples": 3}]
    data["tune"] = {"seed": 7}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    similarity = np.arange(36, dtype=float).reshape(6, 6) % 7
    trials = plan_trials(load_spec(tmp_path / "spec.yaml"), features(), similarity)
    assert len(trials) == 24
    assert content_key([(t.fingerprint, t.config.lr) for t in trials], 20) == PINNED_SAMPLED_PLAN


PINNED_SAMPLED_PLAN = "2ce6e59292a6fec9746c"  # computed by v0.1 (commit 1a056fd)
