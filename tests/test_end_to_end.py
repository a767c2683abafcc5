"""A tiny sweep on a real local Ray cluster, end to end, twice."""

import pytest
import yaml

from orchestrator.results import ResultsStore
from orchestrator.spec import load_spec
from orchestrator.status import run_status
from orchestrator.driver import run_sweep


@pytest.fixture
def tiny_spec(tmp_path_factory, tiny):
    root = tmp_path_factory.mktemp("sweep")
    spec_file = root / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({**tiny, "output_dir": str(root / "run"),
                                         "cache_dir": str(root / "cache")}))
    return load_spec(spec_file)


def test_sweep_runs_every_trial_once_then_skips_everything(ray_cluster, tiny_spec):
    first = run_sweep(tiny_spec, log=lambda *_: None)
    # 9 layer pairs + 2 rules x 2 λ x 2 sizes, minus duplicates of the grid
    # (the best and last pair at n=300 are not repeated: sizes differ)
    assert first.planned == 9 + 8 and first.failed == 0 and first.finished == first.planned
    assert first.features_computed == 8 and first.features_cached == 0
    trials = ResultsStore(tiny_spec.run_dir).query("trials")
    assert len(trials) == first.planned and trials["fingerprint"].is_unique
    assert (trials["status"] == "done").all()
    assert trials["zs/classes/top1"].between(0, 1).all()
    assert trials["ret/captions/standard/I2T/R@1"].between(0, 1).all()
    # every finished trial recorded its epochs (the spec asks for nothing: on by default)
    epochs = ResultsStore(tiny_spec.run_dir).query("epochs")
    assert set(epochs["fingerprint"]) == set(trials["fingerprint"])
    assert epochs["nbr_image"].between(0, 1).all() and epochs["nbr_text"].between(0, 1).all()
    assert epochs["row_key"].is_unique
    # layers chosen per trial: one matrix per training subsample (n_train 300, 150, 600; seed 0)
    similarity = ResultsStore(tiny_spec.run_dir).query("layer_similarity")
    assert len(similarity) == 3 * 9 and set(similarity["selection"]) == {"per_trial"}
    for (n, seed), matrix in similarity.groupby(["n_train", "seed"]):
        best = matrix.loc[matrix["score"].idxmax()]
        assert (best["image_layer"], best["text_layer"]) == (1, 2), n  # the planted pair
        assert set(matrix["similarity_n"]) == {min(n, 400)}  # similarity.n_samples: 400
    similar = trials[trials["layer_rule"] == "similar"]
    assert len(similar) == 4 and (similar["similarity_n"] == similar["n_train_used"].clip(upper=400)).all()
    assert set(trials.loc[trials["grid"] == "grid", "layer_rule"]) == {"all"}
    assert set(trials.loc[trials["layer_rule"] != "similar", "similarity_n"]) == {0}

    lines = []
    second = run_sweep(tiny_spec, log=lines.append)
    assert "3 per_trial similarity matrices: 0 computed, 3 cached" in "\n".join(lines)
    assert second.finished == 0 and second.skipped == first.planned
    assert second.features_computed == 0 and second.features_cached == 8
    assert len(ResultsStore(tiny_spec.run_dir).query("trials")) == first.planned

    status = run_status(tiny_spec.run_dir)
    assert f"{first.planned} done, 0 stopped early, 0 failed, 0 pending" in status
    assert "best zs/classes/top1" in status


def test_a_grid_larger_than_the_feature_budget_runs_in_waves(ray_cluster, tmp_path, tiny):
    spec_file = tmp_path / "waves.yaml"
    tiny["search"] = [{"name": "grid", "layers": "all", "structure_lambda": 0, "n_train": 150}]
    tiny["tune"] = {"max_concurrent_trials": 2, "feature_memory_gb": 1e-9}  # one layer per wave
    spec_file.write_text(yaml.safe_dump({**tiny, "output_dir": str(tmp_path / "run"),
                                         "cache_dir": str(tmp_path / "cache")}))
    lines = []
    outcome = run_sweep(load_spec(spec_file), log=lines.append)
    assert outcome.finished == 9 and outcome.failed == 0
    assert [line.split(":")[0].strip() for line in lines if "wave" in line] == \
        ["wave 1/3", "wave 2/3", "wave 3/3"]
    trials = ResultsStore(tmp_path / "run").query("trials")
    assert len(trials) == 9 and trials["fingerprint"].is_unique


def test_candidate_encoders_are_selected_then_the_best_pairs_trained(ray_cluster, tmp_path, tiny):
    """freeze-align §3.1 end to end: 2 x 2 planted candidates scored on the probe (the val split),
    the top-2 pairs trained; every encoder runs once per split, a re-run computes nothing."""
    from dashboards.data import load_run
    from dashboards.report import encoders_section
    from orchestrator.feature_store import FeatureStore

    image, text = tiny["encoders"]["image"], tiny["encoders"]["text"]
    tiny["encoders"] = {  # planted shares peak_image x peak_text: .72 > .48 > .36 > .24
        "image": [{**image, "label": f"img-{p}", "options": {**image["options"], "peak": p}} for p in (0.9, 0.6)],
        "text": [{**text, "label": f"txt-{p}", "options": {**text["options"], "peak": p}} for p in (0.8, 0.4)]}
    tiny["encoder_selection"] = {"probe": tiny["data"]["val"], "metric": "cka", "top": 2}
    tiny["search"] = [{"name": "top", "encoder_pairs": "top", "layers": "last", "n_train": 150}]
    spec_file = tmp_path / "pairs.yaml"
    spec_file.write_text(yaml.safe_dump({**tiny, "output_dir": str(tmp_path / "run"),
                                         "cache_dir": str(tmp_path / "cache")}))
    spec = load_spec(spec_file)
    first = run_sweep(spec, log=lambda *_: None)
    assert first.planned == 2 and first.finished == 2 and first.failed == 0
    # probe: 4 candidates x val; then 3 encoders x 4 splits, whose val is the probe's (cached)
    assert (first.features_computed, first.features_cached) == (4 + 9, 3)
    assert len(list(FeatureStore(tmp_path / "cache" / "features").root.glob("*/manifest.json"))) == 13

    store = ResultsStore(spec.run_dir)
    ranked = store.query("encoder_pairs").sort_values("rank")
    order = [("img-0.9", "txt-0.8"), ("img-0.6", "txt-0.8"), ("img-0.9", "txt-0.4"), ("img-0.6", "txt-0.4")]
    assert list(zip(ranked["image_encoder"], ranked["text_encoder"])) == order
    trials = store.query("trials")
    assert set(zip(trials["image_encoder"], trials["text_encoder"])) == set(order[:2])
    similarity = store.query("layer_similarity")
    assert set(zip(similarity["image_encoder"], similarity["text_encoder"])) == set(order[:2])
    assert encoders_section(load_run(spec.run_dir)).figures == 1

    second = run_sweep(spec, log=lambda *_: None)
    assert second.finished == 0 and second.skipped == 2
    assert (second.features_computed, second.features_cached) == (0, 16)
    assert len(store.query("encoder_pairs")) == 4
