"""Spec validation: typed, strict, with file/key/allowed values in the error."""

from pathlib import Path

import pytest
import yaml

from orchestrator.config import SpecError
from orchestrator.planning import count_trials
from orchestrator.grids import Grid
from orchestrator.pair_rules import parse_search
from orchestrator.spec import load_spec
from orchestrator.tune_settings import TuneSpec
from trials.selection import parse_rule

DEMO = Path(__file__).parents[2] / "search_spaces" / "demo.yaml"


def write_spec(tmp_path, mutate) -> Path:
    data = yaml.safe_load(DEMO.read_text())
    mutate(data)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_demo_spec_loads_with_defaults():
    spec = load_spec(DEMO)
    assert spec.encoders.image.name == "synthetic:image"
    assert spec.similarity.metric == "mutual_knn" and spec.similarity.k == 10
    assert spec.tune.run_config.max_failures == 1  # a default the spec left out
    assert spec.run_dir == (Path("runs") / "demo").resolve()
    assert count_trials(spec, (6, 6)) == (36 + 2 * 2 * 3 * 3 + 2 * 2 * 3, True)


@pytest.mark.parametrize("mutate, path, words", [
    (lambda d: d["training"].update(batch_sise=5), "training.batch_sise", ["did you mean 'batch_size'"]),
    (lambda d: d["training"].update(epochs="forty"), "training.epochs", ["expected an integer"]),
    (lambda d: d["encoders"]["image"].update(name="nosuch:model"), "encoders.image.name", ["timm", "hf"]),
    (lambda d: d["encoders"]["text"].update(dtype="fp8"), "encoders.text.dtype", ["'bfloat16'"]),
    (lambda d: d["search"][1].update(structure_lamda=[1]), "search[1].structure_lamda", ["structure_lambda"]),
    (lambda d: d["search"][0].update(layers="everything"), "search[0].layers", ["top3", "similar"]),
    (lambda d: d["search"][1].update(structure_centering=["meen"]), "search[1]", ["'standard'"]),
    (lambda d: d["data"]["train"].update(dataset="cocoo"), "data.train.dataset", ["registered"]),
    (lambda d: d["search"][1].update(head=["linear", "mpl"]), "search[1].head", ["'mlp'", "csa"]),
    (lambda d: d["training"].update(head="lineer"), "training.head", ["did you mean 'linear'"]),
    (lambda d: d["similarity"].update(metric="knn"), "similarity.metric", ["'mutual_knn'"]),
    (lambda d: d.update(tune=3), "tune", ["mapping"]),
    (lambda d: d.pop("encoders"), "encoders", ["missing required key"]),
    (lambda d: d.update(unknown_top=1), "unknown_top", ["allowed keys"]),
])
def test_bad_spec_names_file_key_and_allowed_values(tmp_path, mutate, path, words):
    spec_file = write_spec(tmp_path, mutate)
    with pytest.raises(SpecError) as info:
        load_spec(spec_file)
    message = str(info.value)
    assert message.startswith(f"{spec_file}:{path}")
    for word in words:
        assert word in message


def test_yaml_is_parsed_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(path)


def test_missing_spec_file(tmp_path):
    with pytest.raises(SpecError, match="spec file not found"):
        load_spec(tmp_path / "nope.yaml")


def test_single_grid_mapping_and_scalars_become_lists(tmp_path):
    spec = load_spec(write_spec(tmp_path, lambda d: d.update(search={"layers": [[0, 1]], "seed": 3})))
    assert spec.search == [Grid(name="grid[0]", layers=[parse_rule((0, 1))], dims={"seed": [3]})]
    assert spec.search[0].draw_count(5) == 1  # no sampled dimension: one draw


def test_combinations_follow_the_spec_order_of_dimensions():
    # the combination index seeds the sampled draws: the order is part of trial identity
    g = Grid.parse({"seed": [0, 1], "layers": ["similar", "last"], "lr": {"uniform": [0.001, 0.01]}},
                   "search[0]")
    assert [(c.values["seed"], str(c.layers)) for c in g.combinations()] == [
        (0, "similar"), (0, "last"), (1, "similar"), (1, "last")]
    assert g.order == ("seed", "layers") and g.draw_count(3) == 3 and g.sample_count(3) == 3


def test_presets_unfold_into_trial_values_and_layer_rules(tmp_path):
    grid = {"preset": ["linear+last", "linear+similar+rs"], "seed": [0, 1]}
    spec = load_spec(write_spec(tmp_path, lambda d: d.update(search=grid)))
    combos = spec.search[0].combinations()
    assert len(combos) == 4
    last = next(c for c in combos if c.preset == "linear+last")
    rs = next(c for c in combos if c.preset == "linear+similar+rs")
    assert str(last.layers) == "last" and last.values["structure_lambda"] == 0
    assert str(rs.layers) == "similar" and rs.values["structure_lambda"] == 10 and rs.values["out_dim"] == 512
    assert [str(r) for r in spec.search[0].layer_rules()] == ["last", "similar"]


def test_grid_dimensions_override_the_preset(tmp_path):
    grid = {"preset": "linear+similar+rs", "structure_lambda": [1.0], "layers": "last"}
    spec = load_spec(write_spec(tmp_path, lambda d: d.update(search=grid)))
    (combo,) = spec.search[0].combinations()
    assert combo.values["structure_lambda"] == 1.0 and str(combo.layers) == "last"


def test_unknown_preset_is_named(tmp_path):
    spec_file = write_spec(tmp_path, lambda d: d.update(search={"preset": "linear+similr"}))
    with pytest.raises(SpecError, match=r"search\[0\].preset: unknown preset 'linear\+similr' "
                                        r"\(did you mean 'linear\+similar'\?\)"):
        load_spec(spec_file)


def test_sampled_dimensions_and_num_samples_plan_seeded_draws(tmp_path):
    import numpy as np

    from orchestrator.planning import _draws

    grid = {"layers": "best", "lr": {"loguniform": [1e-4, 1e-2]}, "structure_lambda": {"choice": [0, 10]},
            "seed": [0, 1], "num_samples": 3}
    spec = load_spec(write_spec(tmp_path, lambda d: d.update(search=grid)))
    g = spec.search[0]
    assert set(g.sample) == {"lr", "structure_lambda"} and g.num_samples == 3
    assert count_trials(spec, (6, 6)) == (2 * 3, True)
    draws = _draws(spec, g, 0)
    assert len(draws) == 3 and all(1e-4 <= d["lr"] <= 1e-2 for d in draws)
    assert draws == _draws(spec, g, 0)  # a re-run draws the same values
    assert all(d["structure_lambda"] in (0, 10) for d in draws)
    assert np.std([d["lr"] for d in draws]) > 0


@pytest.mark.parametrize("dim, words", [
    ({"loguniform": [0, 1]}, "low > 0"),
    ({"randint": [1.5, 3]}, "integer bounds"),
    ({"uniform": [2, 1]}, "low < high"),
    ({"choice": []}, "non-empty"),
])
def test_bad_sampled_dimension(tmp_path, dim, words):
    with pytest.raises(SpecError, match=words):
        load_spec(write_spec(tmp_path, lambda d: d.update(search={"lr": dim})))


def test_env_variables_are_substituted_and_unset_ones_fail_at_run_time(tmp_path, monkeypatch):
    from orchestrator.spec import check_runnable

    def mutate(d):
        d["data"]["train"]["options"]["root"] = "${SS_TEST_ROOT}"
        d["data"]["val"]["options"]["root"] = "${SS_TEST_VAL:-/data/val}"
    path = write_spec(tmp_path, mutate)
    monkeypatch.delenv("SS_TEST_ROOT", raising=False)
    spec = load_spec(path)  # structure validates with the variable unset
    assert spec.data.val.options["root"] == "/data/val"
    with pytest.raises(SpecError, match=r"data.train.options.root uses \$\{SS_TEST_ROOT\}"):
        check_runnable(spec)
    monkeypatch.setenv("SS_TEST_ROOT", "/data/train")
    spec = load_spec(path)
    assert spec.data.train.options["root"] == "/data/train"
    # set, the variable reaches the world checks: the synthetic set takes no root
    with pytest.raises(SpecError, match=r"data.train.options.root: dataset 'synthetic' has no option 'root'"):
        check_runnable(spec)


def test_run_spec_roundtrip_for_resume(tmp_path):
    from orchestrator.spec import load_run_spec, save_spec

    grid = {"layers": ["best", [0, 1]], "lr": {"uniform": [0.001, 0.01]}, "num_samples": 2}
    spec = load_spec(write_spec(tmp_path, lambda d: d.update(search=grid, output_dir=str(tmp_path / "r"))))
    (tmp_path / "r").mkdir()
    save_spec(spec, tmp_path / "r")
    again = load_run_spec(tmp_path / "r")
    assert again.search == spec.search and again.run_dir == spec.run_dir and again.tune == spec.tune
    (tmp_path / "r" / "spec.json").write_text('{"name": "old"}')
    with pytest.raises(SpecError, match="spec.json: no 'raw' spec to resume from"):
        load_run_spec(tmp_path / "r")
    with pytest.raises(SpecError, match=r":raw: unknown key 'raw'"):  # set by the loader, not a key
        load_spec(write_spec(tmp_path, lambda d: d.update(raw={})))


@pytest.mark.parametrize("name", sorted(p.name for p in DEMO.parent.glob("*.yaml")) + ["sampled"])
def test_resolved_grids_are_written_in_the_spec_spelling(tmp_path, name):
    if name == "sampled":
        grid = {"n_train": [10, 20], "layers": [[0, 1], "top2"], "lr": {"loguniform": [1e-4, 1e-2]},
                "head_options": {"bias": False}, "name": "s", "num_samples": 2}
        spec = load_spec(write_spec(tmp_path, lambda d: d.update(search=grid)))
    else:
        spec = load_spec(DEMO.parent / name)
    written = spec.resolved()["search"]
    assert parse_search(written, "search") == spec.search  # grids, and the encoder pairs they name


def test_tune_options_are_checked(tmp_path):
    with pytest.raises(SpecError, match="tune.metric"):
        load_spec(write_spec(tmp_path, lambda d: d.update(tune={"search": "optuna", "metric": "zs/nope/top1"})))
    spec = load_spec(write_spec(tmp_path, lambda d: d.update(tune={"search": "optuna", "scheduler": "asha"})))
    assert spec.tune.search_config.metric == "zs/synthetic-classes/top1"
    assert spec.tune.search_config.mode == "max"
    gpu = load_spec(write_spec(tmp_path, lambda d: d.update(tune={"gpus_per_trial": 0.25})))
    assert gpu.tune.run_config.trial_device == "cuda"


def test_the_flat_tune_block_splits_into_search_and_run_settings(tmp_path):
    block = {"search": "optuna", "scheduler": "asha", "num_samples": 3, "seed": 2,
             "asha": {"grace_period": 2}, "cpus_per_trial": 0.5, "max_failures": 0,
             "flush_seconds": 2.0, "feature_memory_gb": 1.5}
    tune = load_spec(write_spec(tmp_path, lambda d: d.update(tune=block))).tune
    assert (tune.search_config.search, tune.search_config.asha.grace_period) == ("optuna", 2)
    assert (tune.run_config.cpus_per_trial, tune.run_config.feature_memory_gb) == (0.5, 1.5)
    assert tune.to_dict()["num_samples"] == 3 and "search_config" not in tune.to_dict()
    assert TuneSpec.parse(tune.to_dict(), "tune") == tune  # spec.json writes it flat, as a spec does
    with pytest.raises(SpecError, match=r"tune.max_concurent_trials: unknown key .*did you mean "
                                        r"'max_concurrent_trials'.*allowed keys: search, "):
        TuneSpec.parse({"max_concurent_trials": 2}, "tune")
    with pytest.raises(SpecError, match=r"^tune.trials_per_task: ASHA stops single trials"):
        TuneSpec.parse({"scheduler": "asha", "trials_per_task": 2}, "tune")


@pytest.mark.parametrize("name", sorted(p.name for p in DEMO.parent.glob("*.yaml")))
def test_shipped_specs_validate_without_their_variables(name):
    spec = load_spec(DEMO.parent / name)
    assert spec.search


def test_two_ints_are_one_explicit_layer_pair(tmp_path):
    spec = load_spec(write_spec(tmp_path, lambda d: d.update(search={"layers": [3, 4]})))
    assert spec.search[0].layers == [parse_rule((3, 4))]
    assert count_trials(spec, (6, 6)) == (1, True)
    nested = load_spec(write_spec(tmp_path, lambda d: d.update(search={"layers": [[3, 4]]})))
    assert nested.search[0].layers == [parse_rule((3, 4))]
    rules = load_spec(write_spec(tmp_path, lambda d: d.update(search={"layers": ["best", "last"]})))
    assert [str(r) for r in rules.search[0].layers] == ["similar", "last"]  # old spelling reads


def test_tune_mode_defaults_by_metric_and_metric_names_are_checked(tmp_path):
    def tune(**t):
        return load_spec(write_spec(tmp_path, lambda d: d.update(tune={"search": "optuna", **t}))).tune.search_config

    assert tune(metric="best_val_loss").mode == "min"
    assert tune(metric="zs/synthetic-classes/top5").mode == "max"
    assert tune(metric="ret/synthetic-captions/official/T2I/MAP@10").mode == "max"
    assert tune(metric="best_val_loss", mode="max").mode == "max"
    for bad in ("zs/synthetic-classes/top3", "ret/synthetic-captions/official/I2T/R@2",
                "ret/synthetic-captions/strict/I2T/R@1", "val_loss", "zs/synthetic-classes"):
        with pytest.raises(SpecError, match="tune.metric") as info:
            tune(metric=bad)
        assert "zs/synthetic-classes/top1" in str(info.value)  # lists the valid names


def test_default_objective_is_the_headline_metric(tmp_path):
    from orchestrator.schema import choose_headline, headline_metric
    import pandas as pd

    def two_sets(d):
        d["data"]["zero_shot"] = [{"dataset": "synthetic", "split": "test", "name": n} for n in ("zz", "aa")]
    assert load_spec(write_spec(tmp_path, two_sets)).tune.search_config.metric == "zs/aa/top1"  # not spec order

    def retrieval_only(d):
        d["data"]["zero_shot"] = []
    metric = load_spec(write_spec(tmp_path, retrieval_only)).tune.search_config.metric
    columns = ["ret/synthetic-captions/standard/I2T/R@1", "ret/synthetic-captions/official/I2T/R@1"]
    assert metric == headline_metric(pd.DataFrame({c: [0.5] for c in columns}))
    assert metric == choose_headline(columns) == "ret/synthetic-captions/official/I2T/R@1"


@pytest.mark.parametrize("kind", ["zero_shot", "retrieval"])
def test_duplicate_evaluation_set_names_are_rejected(tmp_path, kind):
    def dup(d):
        d["data"][kind] = [{"dataset": "synthetic", "split": "test"}, {"dataset": "synthetic", "split": "val"}]
    with pytest.raises(SpecError, match=rf"data.{kind}\[1\].name: .*'synthetic'.*`name:`"):
        load_spec(write_spec(tmp_path, dup))


def test_num_samples_without_sampled_dimensions_is_rejected(tmp_path):
    with pytest.raises(SpecError, match=r"search\[0\].num_samples: .*sampled dimensions"):
        load_spec(write_spec(tmp_path, lambda d: d.update(search={"lr": [0.1], "num_samples": 3})))
    with pytest.raises(SpecError, match=r"tune.num_samples: .*sampled"):
        load_spec(write_spec(tmp_path, lambda d: d.update(tune={"num_samples": 2})))
    optuna = load_spec(write_spec(tmp_path, lambda d: d.update(tune={"search": "optuna", "num_samples": 4})))
    assert optuna.tune.search_config.num_samples == 4


@pytest.mark.parametrize("key, value", [("n_train", 0), ("temperature", 0.0),
                                        ("structure_lambda", -1.0), ("batch_size", 0)])
def test_out_of_range_trial_values_are_spec_errors(tmp_path, key, value):
    spec_file = write_spec(tmp_path, lambda d: d["training"].update({key: value}))
    with pytest.raises(SpecError) as info:
        load_spec(spec_file)
    assert str(info.value).startswith(f"{spec_file}:training.{key}: {key}=")


def test_unknown_head_option_is_a_spec_error(tmp_path):
    spec_file = write_spec(tmp_path, lambda d: d["search"][1].update(head_options={"rnk": 4}))
    with pytest.raises(SpecError, match=r"search\[1\].*rnk"):
        load_spec(spec_file)


def test_unpaired_data_is_a_pair_of_optional_dataset_refs(tmp_path):
    def add(unpaired):
        return lambda d: d["data"].update(unpaired=unpaired)

    ref = {"dataset": "synthetic", "split": "test", "options": {"size": 50}}
    spec = load_spec(write_spec(tmp_path, add({"image": ref, "text": {**ref, "split": "val"}})))
    assert spec.data.unpaired.image.dataset == "synthetic" and spec.data.unpaired.text.split == "val"
    assert spec.data.unpaired.image.name == "synthetic"  # a dataset ref like the others
    only_text = load_spec(write_spec(tmp_path, add({"text": ref}))).data.unpaired
    assert only_text.image is None and only_text.text.options == {"size": 50}
    assert load_spec(write_spec(tmp_path, lambda d: None)).data.unpaired is None

    for unpaired, path, words in [
            ({"image": {**ref, "dataset": "synthetc"}}, "data.unpaired.image.dataset", "did you mean"),
            ({"images": ref}, "data.unpaired.images", "allowed keys: image, text"),
            ({}, "data.unpaired", "neither `image` nor `text`"),
            ({"text": "synthetic"}, "data.unpaired.text", "expected"),
            ([ref], "data.unpaired", "expected")]:
        with pytest.raises(SpecError) as err:
            load_spec(write_spec(tmp_path, add(unpaired)))
        assert err.value.path == path and words in str(err.value), (unpaired, str(err.value))
