"""Trial fingerprints and feature keys of the shipped demo specs, pinned.

A refactor must not change them: existing run directories resume without
re-running anything, and feature caches stay valid. The pinned values were
computed by v0.1 (``tests/data/pinned_identity.json``); only a deliberate
change of what a trial computes (with ``TRIAL_CODE_VERSION`` bumped) may
change this file. The specs are v0.1's, kept in ``tests/data/pinned_specs/``
(the shipped demo has moved on; run directories of the old one still resume).
"""

import json
from pathlib import Path

import numpy as np
import pytest

from orchestrator.datasets import load_split
from orchestrator.encoders import build_encoder
from orchestrator.feature_store import feature_key
from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.planning import materialize, optuna_space, plan_trials
from orchestrator.similarity_stage import FixedSimilarity
from orchestrator.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
PINNED = json.loads((ROOT / "tests/data/pinned_identity.json").read_text())


def _feature_keys(spec) -> dict[str, str]:
    refs = {"train": spec.data.train, "val": spec.data.val,
            **{"zs:" + r.name: r for r in spec.data.zero_shot},
            **{"ret:" + r.name: r for r in spec.data.retrieval}}
    keys = {}
    for role in ("image", "text"):
        e = getattr(spec.encoders, role)
        identity = build_encoder(e.name, pool=e.pool, dtype=e.dtype, device="cpu", **e.options).identity()
        for label, ref in refs.items():
            split = load_split(ref.dataset, ref.split, ref.options)
            field = "images" if role == "image" else ("prompts" if label.startswith("zs:") else "texts")
            keys[f"{role}/{label}"] = feature_key(identity, split.field_fingerprint(field), field)
    return keys


def _feature_set(spec, keys) -> FeatureSet:
    def split(label):
        return SplitFeatures(image=keys["image/" + label], text=keys["text/" + label],
                             text_to_image=np.arange(3))
    return FeatureSet(train=split("train"), val=split("val"),
                      zero_shot={r.name: split("zs:" + r.name) for r in spec.data.zero_shot},
                      retrieval={r.name: split("ret:" + r.name) for r in spec.data.retrieval},
                      num_layers=(6, 6))


def _similarity() -> np.ndarray:
    scores = np.arange(36, dtype=float).reshape(6, 6) % 7 / 7.0
    scores[3, 4] = 2.0
    return scores


@pytest.mark.parametrize("path", sorted(PINNED))
def test_feature_keys_and_trial_fingerprints_are_unchanged(path):
    spec = load_spec(ROOT / "tests/data/pinned_specs" / Path(path).name)
    keys = _feature_keys(spec)
    assert keys == PINNED[path]["feature_keys"]
    # v0.1 chose layers on one whole-split matrix: the oracle selection reproduces that
    # (per-trial selection changes which pair a rule picks, never a (config, layers)'s fingerprint)
    spec.similarity.selection = "oracle"
    features = _feature_set(spec, keys)
    similarity = FixedSimilarity(_similarity(), spec.similarity, n_total=3)
    if spec.tune.search_config.search == "grid":
        fingerprints = [t.fingerprint for t in plan_trials(spec, features, similarity)]
    else:
        space = optuna_space(spec, spec.search[0], similarity)
        fingerprints = [materialize(spec.training, "tpe", space,
                                    {"pair": pair, "s__lr": lr, "s__temperature": 0.05,
                                     "s__structure_lambda": lam}, features).fingerprint
                        for pair, lr, lam in ((0, 1e-3, 0), (3, 2e-2, 10), (5, 1e-4, 1))]
    assert fingerprints == PINNED[path]["trial_fingerprints"]
