"""The token stage on several training splits (``train_data``): each split gets the token
layers of its own trials, and each pair's entries point at its own split's tokens."""

import copy
from types import SimpleNamespace

import yaml

import orchestrator.token_features as T
from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.pair_rules import trained_pairs
from orchestrator.spec import load_spec


def _spec(tmp_path, tiny):
    data = copy.deepcopy(tiny)
    data["search"] = [{"name": "sizes", "layers": "last", "train_data": {"size": [300, 400]}}]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data))
    return load_spec(tmp_path / "spec.yaml")


def _empty_set() -> FeatureSet:
    split = SplitFeatures("i", "t", None)
    return FeatureSet(split, split, {}, {}, (3, 3))


def test_each_training_split_gets_its_own_trials_token_layers(tmp_path, tiny, monkeypatch):
    spec = _spec(tmp_path, tiny)
    small, large = trained_pairs(spec, None)
    # a token-head trial of layer 2 on the smaller split, of layer 1 on the larger one
    planned = [SimpleNamespace(config=SimpleNamespace(head="token_projector", image_layer=i, text_layer=i),
                               features_key=pair.key) for pair, i in ((small, 2), (large, 1))]
    calls = []

    def fake_run(role, encoder, cache_root, tasks, log):
        calls.append((role, [(ref["name"], fields) for ref, fields in tasks]))
        return [{"computed": dict.fromkeys(fields, True), "seconds": dict.fromkeys(fields, 0.0),
                 "keys": {f: f"{role}-{ref['name']}-{f}" for f in fields}} for ref, fields in tasks], 3

    monkeypatch.setattr(T, "run_encoder", fake_run)
    sets = {small: _empty_set(), large: _empty_set()}
    computed, cached = T.extract_tokens(spec, [small, large], sets, planned, str(tmp_path), log=lambda _: None)

    image_tasks = dict(calls)["image"]
    assert image_tasks[:2] == [("synthetic[size=300]", ["images@tokens:2"]),
                               ("synthetic[size=400]", ["images@tokens:1"])]
    assert all(fields == ["images@tokens:1", "images@tokens:2"] for _, fields in image_tasks[2:])  # evaluation
    assert computed == sum(len(f) for _, tasks in calls for _, f in tasks) and cached == 0
    assert set(sets[small].tokens) == {("image", 2), ("text", 2)}
    assert set(sets[large].tokens) == {("image", 1), ("text", 1)}
    assert sets[small].tokens[("image", 2)].train.endswith("image-synthetic[size=300]-images@tokens:2")
    assert sets[large].tokens[("text", 1)].train.endswith("text-synthetic[size=400]-texts@tokens:1")
    assert sets[large].tokens[("text", 1)].val.endswith("text-synthetic-texts@tokens:1")
