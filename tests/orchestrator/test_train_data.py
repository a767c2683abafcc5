"""``train_data``: the training split's dataset options as a grid dimension (spec side)."""

import copy

import pytest
import yaml

from orchestrator.config import SpecError
from orchestrator.pair_rules import grid_pairs, trained_pairs
from orchestrator.spec import load_spec
from orchestrator.train_data import DEFAULT, TrainVariant, parse_train_data, train_refs
from orchestrator.trial_counts import count_pairs
from orchestrator.validate_report import report_lines
from orchestrator.validation import check_world


def spec_of(tmp_path, tiny, search):
    data = copy.deepcopy(tiny)
    data["search"] = search
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_spec(path)


def test_every_combination_in_order_sorted_by_option():
    variants = parse_train_data({"per_concept": [500, 2000], "method": ["concept_balanced", "random"]}, "x")
    assert [v.label for v in variants] == [
        "method=concept_balanced, per_concept=500", "method=random, per_concept=500",
        "method=concept_balanced, per_concept=2000", "method=random, per_concept=2000"]
    assert parse_train_data({"size": 300}, "x") == [TrainVariant((("size", 300),))]


@pytest.mark.parametrize("value, path, words", [
    ({}, "g.train_data", "mapping"), ([1], "g.train_data", "mapping"),
    ({"size": []}, "g.train_data.size", "empty list"), ({"size": [{"a": 1}]}, "g.train_data.size[0]", "scalar"),
    ({"size": [300, 300]}, "g.train_data.size", "twice")])
def test_bad_values_are_named(value, path, words):
    with pytest.raises(SpecError) as err:
        parse_train_data(value, "g.train_data")
    assert err.value.path == path and words in err.value.reason


def test_variants_apply_to_the_training_split_only(tmp_path, tiny):
    spec = spec_of(tmp_path, tiny, [{"name": "sizes", "layers": "last", "n_train": 100,
                                     "train_data": {"size": [300, 600]}},
                                    {"name": "plain", "layers": "last", "n_train": 100}])
    refs = dict(train_refs(spec))
    # size 600 is what data.train already says: the spec's own split, one feature set, one fingerprint
    assert list(refs) == [TrainVariant((("size", 300),)), DEFAULT]
    assert refs[DEFAULT] is spec.data.train
    small = refs[TrainVariant((("size", 300),))]
    assert (small.name, small.options["size"], small.split) == ("synthetic[size=300]", 300, "train")
    assert spec.data.train.options["size"] == 600 and spec.data.val.options["size"] == 200  # untouched
    pairs = trained_pairs(spec, None)
    assert [p.train.label for p in pairs] == ["size=300", ""]
    assert [p.label for p in grid_pairs(spec, spec.search[1], None)] == ["synthetic:image + synthetic:text"]
    assert pairs[0].label == "synthetic:image + synthetic:text on size=300"
    assert pairs[0].key != pairs[1].key and pairs[0].labels == pairs[1].labels
    assert spec.resolved()["search"][0]["train_data"] == {"size": [300, 600]}  # as written


def test_validate_counts_each_training_split_and_says_its_size(tmp_path, tiny):
    spec = spec_of(tmp_path, tiny, [{"name": "sizes", "layers": ["last", [0, 0]], "n_train": 100,
                                     "seed": [0, 1], "train_data": {"size": [300, 400]}}])
    world = check_world(spec)
    counts = count_pairs(spec, world)
    assert {k: c.unique for k, c in counts.items()} == {
        "synthetic:image + synthetic:text on size=300": 4, "synthetic:image + synthetic:text on size=400": 4}
    lines = report_lines(spec, world, None)
    assert "OK, 8 trials in 1 grid(s) on 1 encoder pair (3 image x 3 text layers)" in lines[0]
    assert "    size=300: 300 pairs (options.size)" in lines
    assert "  per encoder pair and training split (1 image x 1 text candidates):" in lines


def test_the_specs_own_split_is_named_when_grids_vary_it(tmp_path, tiny):
    spec = spec_of(tmp_path, tiny, [{"name": "sizes", "layers": "last", "n_train": 100,
                                     "train_data": {"size": [300, 600]}}])  # 600: data.train's own
    counts = count_pairs(spec, check_world(spec))
    assert list(counts) == ["synthetic:image + synthetic:text on size=300",
                            "synthetic:image + synthetic:text on data.train"]
