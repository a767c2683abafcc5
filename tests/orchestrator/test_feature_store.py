"""The disk feature cache: atomic entries, checksums, no recompute on a hit."""

import json

import numpy as np
import pytest

from orchestrator.actors import EncoderWorker
from orchestrator.feature_store import FeatureStore, feature_key

SPLIT = {"dataset": "synthetic", "split": "train", "name": "s", "options": {"size": 64}}
ENCODER = {"name": "synthetic:image", "pool": None, "dtype": "float32", "device": "cpu",
           "batch_size": 16, "num_gpus": 0, "num_cpus": 1, "options": {"layers": 4, "planted_layer": 1}}


def put(store, key, layers):
    """Store features [N, L, D] in one write (the extractor streams them batch by batch)."""
    with store.writer(key, layers.shape) as writer:
        writer.write(layers)


def test_put_then_read_each_layer(tmp_path):
    store = FeatureStore(tmp_path)
    features = np.random.default_rng(0).standard_normal((10, 3, 5)).astype(np.float32)
    put(store, "k", features)
    assert store.has("k", verify=True) and store.manifest("k")["num_layers"] == 3
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


def test_truncation_is_caught_by_the_cheap_check(tmp_path):
    store = FeatureStore(tmp_path)
    put(store, "k", np.ones((8, 2, 4), np.float32))
    layer_file = tmp_path / "k" / "layer_001.npy"
    layer_file.write_bytes(layer_file.read_bytes()[:-4])
    assert not store.has("k")  # sizes are checked on every has(), no hashing needed


def test_same_size_corruption_needs_the_checksum(tmp_path):
    store = FeatureStore(tmp_path)
    put(store, "k", np.ones((8, 2, 4), np.float32))
    layer_file = tmp_path / "k" / "layer_000.npy"
    data = bytearray(layer_file.read_bytes())
    data[-1] ^= 0xFF
    layer_file.write_bytes(bytes(data))
    assert store.has("k") and not store.has("k", verify=True)
    assert not FeatureStore(tmp_path).has("k", verify=True)


def test_checksums_are_verified_once_per_process(tmp_path, monkeypatch):
    import orchestrator.feature_store as fs

    store = FeatureStore(tmp_path)
    put(store, "k", np.ones((8, 3, 4), np.float32))
    calls = []
    monkeypatch.setattr(fs, "_sha256", lambda path, real=fs._sha256: calls.append(path) or real(path))
    assert store.has("k", verify=True) and store.has("k", verify=True)
    assert len(calls) == 3  # one per layer file, the second call hashed nothing


def test_failed_write_leaves_nothing(tmp_path):
    store = FeatureStore(tmp_path)
    with pytest.raises(RuntimeError):
        with store.writer("k", (4, 2, 3)) as writer:
            writer.write(np.zeros((2, 2, 3), np.float32))
            raise RuntimeError("encoder crashed")
    assert not store.has("k") and not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(ValueError, match="2 of 4 rows"):
        with store.writer("k", (4, 2, 3)) as writer:
            writer.write(np.zeros((2, 2, 3), np.float32))


def _race(cache_root, barrier, results):
    """One extractor process: wait for the other, then ask for the same key."""
    import time

    worker = EncoderWorker(ENCODER, cache_root)
    encode = worker.encoder.encode
    worker.encoder.encode = lambda batch: (time.sleep(0.3), encode(batch))[1]  # a slow model
    barrier.wait()
    out = worker.ensure(SPLIT, ["images"])
    results.put((out["computed"]["images"], worker.forward_batches, out["keys"]["images"]))


def test_concurrent_requests_compute_once(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter per extractor
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_race, args=(str(tmp_path), barrier, results)) for _ in range(2)]
    for process in processes:
        process.start()
    outcomes = sorted(results.get(timeout=120) for _ in processes)
    for process in processes:
        process.join(timeout=60)
    (lost, lost_batches, key_a), (won, won_batches, key_b) = outcomes
    assert (lost, won) == (False, True) and key_a == key_b
    assert lost_batches == 0 and won_batches == 4  # the second waited, then read the entry
    assert FeatureStore(tmp_path).has(key_a, verify=True)
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == [key_a]


def test_a_trial_fetches_only_its_two_layers(tmp_path):
    """trial_data asks the store (or the object store) for layer i of the image
    features and layer j of the text features, and for nothing else."""
    from orchestrator.features import FeatureSet, SplitFeatures, trial_data

    store = FeatureStore(tmp_path)
    rng = np.random.default_rng(0)
    for key, n in (("img", 20), ("txt", 20), ("prompts", 6)):
        put(store, key, rng.standard_normal((n, 5, 4)).astype(np.float32))
    pairs = SplitFeatures(image="img", text="txt", text_to_image=np.arange(20))
    zero_shot = SplitFeatures(image="img", text="prompts", text_to_image=np.arange(0),
                              labels=np.zeros(20, dtype=int), n_prompts=[2, 2, 2])
    features = FeatureSet(train=pairs, val=pairs, zero_shot={"zs": zero_shot},
                          retrieval={"ret": pairs}, num_layers=(5, 5))
    fetched = []

    def fetch(key, layer):
        fetched.append((key, layer))
        return store.layer(key, layer)

    data = trial_data(features, fetch, 3, 1)
    assert set(fetched) == {("img", 3), ("txt", 1), ("prompts", 1)}
    np.testing.assert_array_equal(data.train_image, store.layer("img", 3))
    assert data.zero_shot["zs"].prompts.shape == (3, 2, 4)


def test_atomic_save_npy_replaces_whole_file_and_leaves_no_temp(tmp_path):
    from orchestrator.durable import atomic_save_npy, atomic_write_bytes

    path = tmp_path / "sub" / "m.npy"
    atomic_save_npy(path, np.arange(6.0).reshape(2, 3))
    atomic_save_npy(path, np.ones((3, 2)))
    np.testing.assert_array_equal(np.load(path), np.ones((3, 2)))
    atomic_write_bytes(tmp_path / "b.bin", b"abc")
    assert (tmp_path / "b.bin").read_bytes() == b"abc"
    assert not list(tmp_path.rglob(".tmp-*"))


def _similarity_inputs(tmp_path, n=50):
    from orchestrator.features import FeatureSet, SplitFeatures

    store = FeatureStore(tmp_path / "features")
    rng = np.random.default_rng(0)
    put(store, "img", rng.standard_normal((n // 2, 2, 4)).astype(np.float32))
    put(store, "txt", rng.standard_normal((n, 3, 4)).astype(np.float32))
    train = SplitFeatures(image="img", text="txt", text_to_image=np.arange(n) // 2)
    return store, FeatureSet(train=train, val=train, zero_shot={}, retrieval={}, num_layers=(2, 3))


def test_similarity_scores_the_official_row_sample(tmp_path, monkeypatch):
    import torch

    import orchestrator.similarity_stage as stage
    from orchestrator.spec import SimilaritySpec
    from trials.selection import sample_rows

    store, features = _similarity_inputs(tmp_path)
    seen = {}

    def fake(x, y, **_):
        seen["x"], seen["y"] = x, y
        return torch.zeros(x.shape[0], y.shape[0])

    monkeypatch.setattr(stage, "layer_similarity", fake)
    settings = SimilaritySpec(n_samples=20, seed=3, k=3)
    assert stage.compute_similarity(store, features, settings).shape == (2, 3)
    rows = sample_rows(50, 20, 3)
    np.testing.assert_array_equal(seen["y"][1].numpy(), store.layer("txt", 1)[rows])
    np.testing.assert_array_equal(seen["x"][0].numpy(), store.layer("img", 0)[rows // 2])


def test_concurrent_similarity_stages_compute_once(tmp_path, monkeypatch):
    import threading

    import pandas as pd

    import orchestrator.similarity_stage as stage
    from orchestrator.spec import SimilaritySpec

    store, features = _similarity_inputs(tmp_path)
    calls, real = [], stage.compute_similarity

    def counting(*args):
        calls.append(1)
        return real(*args)

    class Results:  # the run's results store, reduced to what the stage uses
        def query(self, table):
            return pd.DataFrame()

        def write(self, table, rows):
            pass

    monkeypatch.setattr(stage, "compute_similarity", counting)
    settings = SimilaritySpec(n_samples=30, k=3)
    out = []
    threads = [threading.Thread(target=lambda: out.append(
        stage.similarity_stage(store, Results(), features, settings, log=lambda *_: None)))
        for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(out) == 3
    for matrix in out:
        np.testing.assert_array_equal(matrix, out[0])
    assert not list((tmp_path / "similarity").glob(".tmp-*"))
