"""``prototypes: {from: images, per_concept: K}``: the paper's image prototypes of the curated stage."""

import numpy as np
import pytest

from orchestrator.datasets import DatasetError, load_split
from orchestrator.datasets.curated import build_stage, curated_selection, load_stage_prototypes, prototype_identity
from trials.curation import CurationConfig

POOL = {"dataset": "synthetic", "options": {"size": 400, "n_classes": 4, "templates": 3}}
IMAGES = {"from": "images", "per_concept": 5}


def expected_prototypes(images, labels, k, width=16):
    """Independent: per class, the first k images (pool order), rows scaled to unit length, averaged."""
    out = []
    for c in range(labels.max() + 1):
        rows = [i for i in range(len(labels)) if labels[i] == c][:k]
        z = images[rows, :width].astype(np.float64)
        out.append((z / np.sqrt((z ** 2).sum(axis=1, keepdims=True))).mean(axis=0))
    return np.stack(out)


def test_synthetic_pool_uses_the_images_semantic_latent():
    stage = build_stage("train", POOL, IMAGES, "auto", None)
    prototypes, names = load_stage_prototypes(stage)
    pool = load_split("synthetic", "train", POOL["options"])
    np.testing.assert_allclose(prototypes, expected_prototypes(pool.images, pool.labels, 5), atol=1e-6)
    assert names == pool.class_names


def test_image_features_file_and_labels_choose_the_images(tmp_path):
    pool = load_split("synthetic", "train", POOL["options"])
    features = np.random.default_rng(0).standard_normal((len(pool.images), 16)).astype(np.float32)
    np.save(tmp_path / "images.npy", features)
    stage = build_stage("train", POOL, {"from": "images", "per_concept": 3}, "auto", None,
                        str(tmp_path / "images.npy"))
    prototypes, _ = load_stage_prototypes(stage)
    np.testing.assert_allclose(prototypes, expected_prototypes(features, pool.labels, 3), atol=1e-6)
    np.save(tmp_path / "short.npy", features[:10])
    with pytest.raises(DatasetError, match="image_features has 10 rows"):
        load_stage_prototypes(build_stage("train", POOL, IMAGES, "auto", None, str(tmp_path / "short.npy")))


def test_image_prototypes_select_their_concepts_and_are_keyed_by_k(tmp_path):
    options = {"pool": POOL, "prototypes": IMAGES, "per_concept": 20, "max": 60, "batch": 64,
               "cache_dir": str(tmp_path)}
    split = load_split("curated", "train", options)
    assert len(split.texts) == 80
    selection = curated_selection(build_stage("train", POOL, IMAGES, "auto", None), method="concept_balanced",
                                  config=CurationConfig(20, 60, batch=64), cache_dir=str(tmp_path))
    pool = load_split("synthetic", "train", POOL["options"])
    # five images per class already point at the class: most picks are captions of their concept
    assert (pool.labels[pool.text_to_image[selection.ids]] == selection.concepts).mean() > 0.8
    identity = prototype_identity(build_stage("train", POOL, IMAGES, "auto", None))
    assert identity[:2] == ["images", 5]
    other = load_split("curated", "train", {**options, "prototypes": {"from": "images", "per_concept": 6}})
    assert other.fingerprint != split.fingerprint


@pytest.mark.parametrize("bad", [{"from": "images"}, {"from": "images", "per_concept": 0},
                                 {"from": "images", "per_concept": 2, "extra": 1}, {"from": "photos"}])
def test_bad_recipes_are_refused(bad):
    with pytest.raises(DatasetError, match="per_concept: K"):
        prototype_identity(build_stage("train", POOL, bad, "auto", None))


def test_a_real_pool_needs_image_features(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    (tmp_path / "pairs.csv").write_text("image,caption\nx.png,an x\n")
    np.save(tmp_path / "captions.npy", np.ones((1, 4), dtype=np.float32))
    pool = {"dataset": "pairs", "options": {"path": str(tmp_path / "pairs.csv")}}
    stage = build_stage("train", pool, IMAGES, "auto", str(tmp_path / "captions.npy"))
    with pytest.raises(DatasetError, match="need image_features"):
        prototype_identity(stage)
