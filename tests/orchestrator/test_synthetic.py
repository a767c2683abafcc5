"""The planted synthetic pair: the planted layers share the most structure."""

import numpy as np
import pytest

from orchestrator.datasets import DatasetError, load_split
from orchestrator.encoders import UnknownEncoderError, build_encoder


def mutual_knn_numpy(x, y, k):
    """Independent, loop-free reference: mean overlap of cosine kNN sets."""
    def neighbours(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        s = a @ a.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]
    nx, ny = neighbours(x), neighbours(y)
    return np.mean([len(set(a) & set(b)) / k for a, b in zip(nx, ny)])


def test_planted_pair_is_most_similar():
    split = load_split("synthetic", "train", {"size": 600})
    image = build_encoder("synthetic:image", layers=5, planted_layer=1).encode(split.images)
    text = build_encoder("synthetic:text", layers=4, planted_layer=3).encode(split.texts)
    scores = np.array([[mutual_knn_numpy(image[:, i], text[:, j], 10) for j in range(4)]
                       for i in range(5)])
    assert np.unravel_index(scores.argmax(), scores.shape) == (1, 3)
    assert scores[1, 3] > 3 * scores[4, 0]  # far pairs share much less


def test_splits_share_classes_but_not_samples():
    train = load_split("synthetic", "train", {"size": 50})
    test = load_split("synthetic", "test", {"size": 50, "captions_per_image": 2})
    assert train.fingerprint != test.fingerprint
    assert not np.allclose(train.images[:5], test.images[:5])
    assert len(test.texts) == 100 and list(test.text_to_image[:4]) == [0, 0, 1, 1]
    assert np.array(test.prompts).shape == (10, 4, 48)


def test_encoder_is_deterministic_and_shaped():
    split = load_split("synthetic", "val", {"size": 8})
    a = build_encoder("synthetic:text", layers=3, planted_layer=0, dim=16).encode(split.texts)
    b = build_encoder("synthetic:text", layers=3, planted_layer=0, dim=16).encode(split.texts)
    assert a.shape == (8, 3, 16) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)


def test_bad_names_and_shapes_fail_clearly():
    with pytest.raises(UnknownEncoderError, match="prefix one of"):
        build_encoder("clip:vit")
    with pytest.raises(ValueError, match="synthetic:image' or 'synthetic:text"):
        build_encoder("synthetic:audio")
    with pytest.raises(ValueError, match="same latent_dim and noise_dim"):
        build_encoder("synthetic:image").encode(np.zeros((2, 10)))
    with pytest.raises(DatasetError, match="splits"):
        load_split("synthetic", "holdout")
