"""The ``curated`` data stage: a concept-balanced subset of a synthetic caption
pool, loaded like any dataset and cached under a content key."""

import numpy as np
import pytest

from orchestrator.datasets import DatasetError, load_split
from orchestrator.datasets.curated import build_stage, curated_selection
from trials.curation import CurationConfig

POOL = {"dataset": "synthetic", "options": {"size": 400, "n_classes": 4, "templates": 3}}


def options(tmp_path, **extra):
    return {"pool": POOL, "per_concept": 20, "max": 60, "batch": 64,
            "cache_dir": str(tmp_path / "cache"), **extra}


class CountingEmbed:
    """The synthetic semantic embedding, counting its calls (a Python-side seam)."""

    identity = "counting-semantic-16"

    def __init__(self):
        self.calls = 0

    def __call__(self, inputs):
        self.calls += 1
        return np.asarray(inputs)[:, :16]


def test_loads_like_any_dataset(tmp_path):
    split = load_split("curated", "train", options(tmp_path))
    pool = load_split("synthetic", "train", POOL["options"])
    assert len(split.texts) == 4 * 20  # every concept filled: 20 each
    rows = [int(np.flatnonzero((pool.texts == t).all(axis=1))[0]) for t in split.texts]
    assert len(set(rows)) == len(rows) and rows == sorted(rows)  # each once, in pool order
    np.testing.assert_array_equal(split.images[split.text_to_image], pool.images[pool.text_to_image[rows]])
    assert split.class_names == pool.class_names and len(split.labels) == len(split.images)


def test_second_load_reuses_the_cached_selection(tmp_path):
    embed = CountingEmbed()
    first = load_split("curated", "train", options(tmp_path, embed=embed))
    assert embed.calls > 0
    embed.calls = 0
    second = load_split("curated", "train", options(tmp_path, embed=embed))
    assert embed.calls == 0  # no scoring, no prototype building
    assert second.fingerprint == first.fingerprint
    np.testing.assert_array_equal(second.texts, first.texts)
    files = sorted(p.name for p in (tmp_path / "cache" / "curated").iterdir())
    assert len(files) == 1 and files[0].endswith(".npz")  # no temp file left behind
    load_split("curated", "train", options(tmp_path, embed=embed, per_concept=10))
    assert embed.calls > 0  # another parameter: another key, computed


def test_an_unreadable_cache_file_is_rebuilt(tmp_path):
    first = load_split("curated", "train", options(tmp_path))
    (cached,) = (tmp_path / "cache" / "curated").iterdir()
    cached.write_bytes(b"not an npz")
    again = load_split("curated", "train", options(tmp_path))
    np.testing.assert_array_equal(again.texts, first.texts)
    assert np.load(cached)["ids"].size == len(first.texts)  # rewritten whole


def test_random_control_has_the_same_size(tmp_path):
    balanced = load_split("curated", "train", options(tmp_path))
    control = load_split("curated", "train", options(tmp_path, method="random"))
    other = load_split("curated", "train", options(tmp_path, method="random", seed=1))
    assert len(control.texts) == len(balanced.texts) == len(other.texts)
    assert len({balanced.fingerprint, control.fingerprint, other.fingerprint}) == 3
    assert not np.array_equal(control.texts, other.texts)


def test_selection_rows_and_counts_for_the_report(tmp_path):
    stage = build_stage("train", POOL, None, "auto", None)
    selection = curated_selection(stage, method="concept_balanced", config=CurationConfig(20, 60, batch=64),
                                  cache_dir=str(tmp_path))
    assert selection.counts.tolist() == [20] * 4 and selection.names == [f"class {c}" for c in range(4)]
    assert len(np.unique(selection.ids)) == len(selection.ids) == len(selection.concepts) == 80
    assert np.isfinite(selection.scores).all()
    # prompt prototypes in the semantic space pick mostly each class's own captions
    pool = load_split("synthetic", "train", POOL["options"])
    assert (pool.labels[pool.text_to_image[selection.ids]] == selection.concepts).mean() > 0.9


def write_prototypes(tmp_path, pool):
    """Per-class means of the semantic latents (labelled: an oracle from the labels)."""
    z = pool.texts[:, :16]
    labels = pool.labels[pool.text_to_image]
    path = tmp_path / "protos.npz"
    np.savez(path, prototypes=np.stack([z[labels == c].mean(0) for c in range(4)]),
             names=np.array(["a", "b", "c", "d"]))
    return path


def test_prototypes_from_file_and_caption_features(tmp_path):
    pool = load_split("synthetic", "train", POOL["options"])
    path = write_prototypes(tmp_path, pool)
    semantic = load_split("curated", "train", options(tmp_path, prototypes=str(path)))
    np.save(tmp_path / "features.npy", pool.texts[:, :16])
    features = load_split("curated", "train", options(tmp_path, prototypes=str(path),
                                                      caption_features=str(tmp_path / "features.npy")))
    np.testing.assert_array_equal(features.texts, semantic.texts)  # same vectors, same subset
    assert features.fingerprint != semantic.fingerprint  # a different embedding identity


def test_faithful_flag_is_part_of_the_key(tmp_path):
    exact = load_split("curated", "train", options(tmp_path))
    faithful = load_split("curated", "train", options(tmp_path, faithful=True))
    assert faithful.fingerprint != exact.fingerprint and len(faithful.texts) > 0


@pytest.mark.parametrize("bad, message", [
    ({"method": "best"}, "method must be one of"),
    ({"per_concept": 0}, "per_concept must be a positive integer"),
    ({"prototypes": {"from": "images"}}, "prototypes must be a file"),
    ({"pool": {"dataset": "synthetic", "splits": "x"}}, "unknown pool keys"),
])
def test_bad_options_name_the_dataset(tmp_path, bad, message):
    with pytest.raises(DatasetError, match=message):
        load_split("curated", "train", options(tmp_path, **bad))


def test_a_real_pool_needs_caption_features(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "pairs.csv").write_text("image,caption\nx.png,an x\n")
    pool = {"dataset": "pairs", "options": {"path": str(tmp_path / "pairs.csv")}}
    with pytest.raises(DatasetError, match="caption_features"):
        load_split("curated", "train", options(tmp_path, pool=pool))
    with pytest.raises(DatasetError, match="for a synthetic pool"):
        load_split("curated", "train", options(tmp_path, pool=pool, embed="semantic"))
