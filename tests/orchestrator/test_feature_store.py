"""The disk feature cache: atomic entries, checksums, no recompute on a hit."""

import json

import numpy as np
import pytest

from orchestrator.actors import EncoderWorker
from orchestrator.feature_store import FeatureStore, feature_key

SPLIT = {"dataset": "synthetic", "split": "train", "name": "s", "options": {"size": 64}}
ENCODER = {"name": "synthetic:image", "pool": None, "dtype": "float32", "device": "cpu",
           "batch_size": 16, "num_gpus": 0, "num_cpus": 1, "options": {"layers": 4, "planted_layer": 1}}


def test_put_then_read_each_layer(tmp_path):
    store = FeatureStore(tmp_path)
    features = np.random.default_rng(0).standard_normal((10, 3, 5)).astype(np.float32)
    store.put("k", features)
    assert store.has("k", verify=True) and store.num_layers("k") == 3
    for layer in range(3):
        np.testing.assert_array_equal(store.layer("k", layer), features[:, layer])
    np.testing.assert_array_equal(store.layer("k", -1), features[:, 2])
    assert not list(tmp_path.glob(".tmp-*"))  # no temporary left behind


def test_key_depends_on_every_part():
    base = feature_key({"encoder": "a", "pool": "cls"}, "split1", "images")
    assert base == feature_key({"pool": "cls", "encoder": "a"}, "split1", "images")
    assert base != feature_key({"encoder": "a", "pool": "mean"}, "split1", "images")
    assert base != feature_key({"encoder": "a", "pool": "cls"}, "split2", "images")
    assert base != feature_key({"encoder": "a", "pool": "cls"}, "split1", "texts")


def test_second_request_runs_no_forward_pass(tmp_path):
    first = EncoderWorker(ENCODER, str(tmp_path))
    out = first.ensure(SPLIT, ["images"])
    assert out["computed"] == {"images": True} and first.forward_batches == 4
    second = EncoderWorker(ENCODER, str(tmp_path))
    again = second.ensure(SPLIT, ["images"])
    assert again["computed"] == {"images": False} and second.forward_batches == 0
    assert again["keys"] == out["keys"]


def test_corrupt_file_is_detected_and_rebuilt(tmp_path):
    worker = EncoderWorker(ENCODER, str(tmp_path))
    key = worker.ensure(SPLIT, ["images"])["keys"]["images"]
    good = np.array(worker.store.layer(key, 2))
    layer_file = tmp_path / key / "layer_002.npy"
    layer_file.write_bytes(layer_file.read_bytes()[:-40])  # truncated
    assert not worker.store.has(key, verify=True)
    again = EncoderWorker(ENCODER, str(tmp_path)).ensure(SPLIT, ["images"])
    assert again["computed"] == {"images": True}
    np.testing.assert_array_equal(worker.store.layer(key, 2), good)


def test_manifest_records_provenance(tmp_path):
    worker = EncoderWorker(ENCODER, str(tmp_path))
    key = worker.ensure(SPLIT, ["images"])["keys"]["images"]
    manifest = json.loads((tmp_path / key / "manifest.json").read_text())
    assert manifest["shape"] == [64, 4, 64]
    assert manifest["meta"]["encoder"]["encoder"] == "synthetic:image"
    assert len(manifest["files"]) == 4


def test_unknown_field_fails_clearly(tmp_path):
    with pytest.raises(AttributeError):
        EncoderWorker(ENCODER, str(tmp_path)).ensure(SPLIT, ["pixels"])
