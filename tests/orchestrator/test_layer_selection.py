"""Layer selection per trial (on the trial's own subsample) and the oracle option."""

from pathlib import Path

import numpy as np
import pytest
import yaml

from orchestrator.feature_store import FeatureStore
from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.planning import materialize, optuna_space, plan_trials
from orchestrator.results import ResultsStore
from orchestrator.schema import LAYER_SIMILARITY_COLUMNS
from orchestrator.similarity_stage import LayerSimilarity, similarity_stage
from orchestrator.spec import SimilaritySpec, load_spec
from trials.selection import selection_rows
from trials.trial import subsample

N_TOTAL, DIM = 400, 8
SMALL = (40, 0)  # the subsample whose own best pair differs from the whole split's


def _planted(rng, rows_a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[N, 2, D] image and text features: image/text layer 0 share their structure on
    ``rows_a`` only, layer 1 on every other row."""
    image = rng.standard_normal((N_TOTAL, 2, DIM)).astype(np.float32)
    text = rng.standard_normal((N_TOTAL, 2, DIM)).astype(np.float32)
    in_a = np.zeros(N_TOTAL, dtype=bool)
    in_a[rows_a] = True
    noise = 0.05 * rng.standard_normal((N_TOTAL, DIM)).astype(np.float32)
    text[in_a, 0] = image[in_a, 0] + noise[in_a]
    text[~in_a, 1] = image[~in_a, 1] + noise[~in_a]
    return image, text


def _features(tmp_path) -> tuple[FeatureStore, FeatureSet]:
    store = FeatureStore(tmp_path / "cache" / "features")
    image, text = _planted(np.random.default_rng(0), subsample(N_TOTAL, *SMALL).numpy())
    for key, values in (("img", image), ("txt", text)):
        with store.writer(key, values.shape) as writer:
            writer.write(values)
    split = SplitFeatures(image="img", text="txt", text_to_image=np.arange(N_TOTAL))
    return store, FeatureSet(train=split, val=split, zero_shot={}, retrieval={}, num_layers=(2, 2))


def _spec(tmp_path, search, similarity=None, tune=None):
    data = yaml.safe_load((Path(__file__).parents[2] / "search_spaces" / "demo.yaml").read_text())
    data["similarity"] = {"metric": "mutual_knn", "k": "rice", "n_samples": 200, **(similarity or {})}
    data["search"], data["tune"] = search, tune or {}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
    return load_spec(tmp_path / "spec.yaml")


SCALING = [{"name": "scaling", "layers": ["similar", "last"], "n_train": [40, 400], "seed": [0, 1]}]


def _similar_pairs(trials) -> dict:
    return {(t.config.n_train, t.config.seed): (t.config.image_layer, t.config.text_layer)
            for t in trials if t.layer_rule == "similar"}


def test_per_trial_selection_follows_each_subsample(tmp_path):
    store, features = _features(tmp_path)
    spec = _spec(tmp_path, SCALING)
    assert spec.similarity.selection == "per_trial"  # the default
    source = LayerSimilarity(store, None, features, spec.similarity, log=lambda *_: None)
    trials = plan_trials(spec, features, source)
    # the small subsample of seed 0 holds exactly the rows whose structure lives in layer 0
    assert _similar_pairs(trials) == {(40, 0): (0, 0), (40, 1): (1, 1), (400, 0): (1, 1),
                                      (400, 1): (1, 1)}
    for t in trials:
        expected = min(t.config.n_train, 200) if t.layer_rule == "similar" else 0
        assert t.similarity_n == expected and t.layer_rule in ("similar", "last")
    # a (config, layers) keeps its fingerprint: the oracle plan (similar = last = (1, 1)
    # everywhere) is the same trials, less the one pair only the small subsample picks
    spec.similarity.selection = "oracle"
    oracle = plan_trials(spec, features, LayerSimilarity(store, None, features, spec.similarity))
    extra = {t.fingerprint for t in trials} - {t.fingerprint for t in oracle}
    assert {t.fingerprint for t in oracle} < {t.fingerprint for t in trials}
    assert extra == {t.fingerprint for t in trials if (t.config.image_layer, t.config.n_train) == (0, 40)}


def test_the_oracle_reproduces_the_whole_split_plan(tmp_path):
    store, features = _features(tmp_path)
    spec = _spec(tmp_path, SCALING, similarity={"selection": "oracle"})
    source = LayerSimilarity(store, None, features, spec.similarity, log=lambda *_: None)
    trials = plan_trials(spec, features, source)
    assert set(_similar_pairs(trials).values()) == {(1, 1)}  # the whole split's best, everywhere
    assert {t.similarity_n for t in trials if t.layer_rule == "similar"} == {200}
    # the same plan as before per-trial selection: the whole-split matrix for every trial
    matrix = similarity_stage(store, _NoResults(), features, spec.similarity, log=lambda *_: None)
    before = plan_trials(spec, features, matrix)
    assert [(t.fingerprint, t.layer_rule) for t in before] == [(t.fingerprint, t.layer_rule) for t in trials]
    assert source.computed + source.cached == 1


class _NoResults:
    def query(self, table):
        import pandas as pd

        return pd.DataFrame()

    def write(self, table, rows):
        pass


def test_a_subsample_scores_its_own_rows_with_k_at_its_size(tmp_path, monkeypatch):
    import orchestrator.similarity_stage as stage

    store, features = _features(tmp_path)
    seen = []
    real = stage.compute_similarity
    monkeypatch.setattr(stage, "compute_similarity",
                        lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    source = LayerSimilarity(store, None, features, SimilaritySpec(n_samples=30), log=lambda *_: None)
    scored = source.for_trial(100, 3)
    expected = selection_rows(subsample(N_TOTAL, 100, 3).numpy(), 30, 3)
    np.testing.assert_array_equal(seen[0]["rows"], expected)
    assert set(expected) <= set(subsample(N_TOTAL, 100, 3).tolist())  # drawn from the subsample
    assert seen[0]["k"] == scored.k_value == 7  # rice at 30 rows: ceil(2 * 30^(1/3))
    assert (scored.n_train, scored.seed, scored.similarity_n) == (100, 3, 30)
    assert source.for_trial(10_000, 0).n_train == N_TOTAL  # n_train beyond the split: all of it
    assert source.for_trial(None, 0).key == source.for_trial(N_TOTAL, 0).key


def test_a_second_run_finds_every_matrix_cached(tmp_path, monkeypatch):
    import orchestrator.similarity_stage as stage

    store, features = _features(tmp_path)
    spec = _spec(tmp_path, SCALING)
    results = ResultsStore(tmp_path / "run")
    first = LayerSimilarity(store, results, features, spec.similarity, log=lambda *_: None)
    plan = plan_trials(spec, features, first)
    first.flush()
    assert (first.computed, first.cached) == (4, 0)  # (40|400) x (seed 0|1)

    def fail(*args, **kwargs):
        raise AssertionError("recomputed a cached similarity matrix")

    monkeypatch.setattr(stage, "compute_similarity", fail)
    second = LayerSimilarity(store, results, features, spec.similarity, log=lambda *_: None)
    assert [t.fingerprint for t in plan_trials(spec, features, second)] == [t.fingerprint for t in plan]
    second.flush()
    assert (second.computed, second.cached) == (0, 4)
    assert second.summary() == "4 per_trial similarity matrices: 0 computed, 4 cached"
    table = results.query("layer_similarity")
    assert len(table) == 4 * 4  # written once, 2 x 2 layers per matrix
    stored = table.groupby(["n_train", "seed"])[["similarity_n", "k_value"]].first()
    assert stored.loc[(40, 0)].tolist() == [40, 7] and stored.loc[(400, 1)].tolist() == [200, 12]
    assert set(table["selection"]) == {"per_trial"}
    assert set(table.columns) == set(LAYER_SIMILARITY_COLUMNS)  # as documented


def test_k_is_clipped_and_too_small_subsamples_fail_only_where_a_rule_needs_them(tmp_path):
    store, features = _features(tmp_path)
    lines = []
    source = LayerSimilarity(store, None, features, SimilaritySpec(k=10), log=lines.append)
    assert source.for_trial(6, 0).k_value == 5 and any("clipped to 5" in line for line in lines)
    spec = _spec(tmp_path, [{"name": "g", "layers": ["last"], "n_train": 1}])
    trials = plan_trials(spec, features, LayerSimilarity(store, None, features, spec.similarity,
                                                         log=lines.append))
    assert [(t.config.image_layer, t.config.text_layer, t.similarity_n) for t in trials] == [(1, 1, 0)]
    assert any("no similarity matrix for n_train=1" in line for line in lines)
    spec = _spec(tmp_path, [{"name": "g", "layers": ["similar"], "n_train": 1}])
    with pytest.raises(ValueError, match="1 training pairs of seed 0.*selection: oracle"):
        plan_trials(spec, features, LayerSimilarity(store, None, features, spec.similarity,
                                                    log=lines.append))


def test_optuna_slots_follow_the_trials_subsample(tmp_path):
    store, features = _features(tmp_path)
    grid = {"name": "tpe", "layers": ["similar"], "n_train": [40, 400],
            "lr": {"loguniform": [1e-4, 1e-2]}}
    spec = _spec(tmp_path, [grid], tune={"search": "optuna", "num_samples": 4})
    source = LayerSimilarity(store, None, features, spec.similarity, log=lambda *_: None)
    space = optuna_space(spec, spec.search[0], source)
    assert space.slots == {"40/0": [[0, 0, "similar", 40]], "400/0": [[1, 1, "similar", 200]]}
    index = space.choices["n_train"].index(40)
    trial = materialize(spec.training, "tpe", space, {"c__n_train": index, "s__lr": 1e-3}, features)
    assert (trial.config.image_layer, trial.config.text_layer, trial.layer_rule,
            trial.similarity_n) == (0, 0, "similar", 40)
    ranged = _spec(tmp_path, [{**grid, "n_train": {"randint": [40, 400]}}],
                   tune={"search": "optuna", "num_samples": 4})
    with pytest.raises(ValueError, match="n_train must be listed"):
        optuna_space(ranged, ranged.search[0], source)
