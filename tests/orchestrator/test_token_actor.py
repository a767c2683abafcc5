"""EncoderWorker.ensure with token fields: stored like pooled features, computed once."""

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.actors import EncoderWorker
from orchestrator.datasets import load_split
from orchestrator.datasets.files import open_image
from orchestrator.feature_store import feature_key
from orchestrator.token_store import open_tokens
from tiny_models import TEXTS, offline_hub, save_tiny_text_model

FP16_RTOL, FP16_ATOL = 2.0 ** -11, 1e-6  # the store keeps float16 (11 significant bits)
VIT = {"name": "timm:vit_tiny_patch16_224", "pool": None, "dtype": "float32", "device": "cpu",
       "batch_size": 4, "num_gpus": 0, "num_cpus": 1,
       "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32,
                   "num_heads": 2, "reg_tokens": 1}}


@pytest.fixture(scope="module", autouse=True)
def no_network(tmp_path_factory):
    with offline_hub(tmp_path_factory.mktemp("hf_home")):
        yield


@pytest.fixture
def pairs(tmp_path):
    """Ten images and a caption each (the tiny tokenizer's texts, so lengths vary)."""
    rng = np.random.default_rng(0)
    lines = ["image,caption"]
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        lines.append(f"{i}.png,{TEXTS[i % len(TEXTS)]}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return {"dataset": "pairs", "split": "all", "name": "p", "options": {"path": str(tmp_path / "pairs.csv")}}


def vit_worker(cache):
    torch.manual_seed(0)  # random-init weights are part of the key: same seed, same key
    return EncoderWorker(VIT, str(cache), token_shard_bytes=50 * 32 * 2)  # 50 rows: shards split images


def test_image_tokens_are_stored_once_and_match_a_direct_forward(tmp_path, pairs):
    worker = vit_worker(tmp_path / "cache")
    out = worker.ensure(pairs, ["images", "images@tokens:-1", "images@tokens:1"])
    assert out["computed"] == {"images": True, "images@tokens:-1": True, "images@tokens:1": False}
    assert out["keys"]["images@tokens:-1"] == out["keys"]["images@tokens:1"]  # -1 is layer 1 of 2
    split = load_split("pairs", "all", pairs["options"])
    assert out["keys"]["images"] == feature_key(worker.identity(), split.field_fingerprint("images"), "images")
    assert worker.forward_batches == 6  # 3 batches of the pooled field, 3 of the tokens
    reader = open_tokens(worker.store, out["keys"]["images@tokens:-1"])
    assert len(worker.store.manifest(out["keys"]["images@tokens:-1"])["shards"]) == 4  # 160 rows / 50
    prefix, local = worker.encoder.encode_tokens([open_image(p) for p in split.images.paths], -1)
    batch = reader.gather(np.arange(10))
    assert reader.num_prefix == 2 and batch.prefix.shape == (10, 2, 32) and batch.mask.all()
    np.testing.assert_allclose(batch.prefix, prefix, rtol=FP16_RTOL, atol=FP16_ATOL)
    np.testing.assert_allclose(batch.local, np.stack(local), rtol=FP16_RTOL, atol=FP16_ATOL)

    again = vit_worker(tmp_path / "cache")
    second = again.ensure(pairs, ["images@tokens:1", "images"])
    assert second["computed"] == {"images@tokens:1": False, "images": False} and again.forward_batches == 0
    assert second["keys"] == {k: out["keys"][k] for k in ("images@tokens:1", "images")}


def test_text_tokens_are_ragged_and_keyed_apart_from_pooling(tmp_path, pairs):
    model = save_tiny_text_model(tmp_path / "bert", "bert")
    spec = {"name": f"hf:{model}", "pool": "mean", "dtype": "float32", "device": "cpu", "batch_size": 3,
            "options": {}}
    worker = EncoderWorker(spec, str(tmp_path / "cache"))
    out = worker.ensure(pairs, ["texts@tokens:0", "texts@tokens:-1"])
    assert out["computed"] == {"texts@tokens:0": True, "texts@tokens:-1": True}
    assert out["keys"]["texts@tokens:0"] != out["keys"]["texts@tokens:-1"]
    split = load_split("pairs", "all", pairs["options"])
    reader = open_tokens(worker.store, out["keys"]["texts@tokens:-1"], stream=True)
    _, local = worker.encoder.encode_tokens(list(split.texts), -1)
    np.testing.assert_array_equal(reader.lengths(), [len(x) for x in local])
    batch = reader.gather(np.arange(len(local)))
    assert batch.prefix.shape == (len(local), 0, 16)
    for i, tokens in enumerate(local):
        assert batch.mask[i].sum() == len(tokens) and not batch.local[i, len(tokens):].any()
        np.testing.assert_allclose(batch.local[i, : len(tokens)], tokens, rtol=FP16_RTOL, atol=FP16_ATOL)
    cls = EncoderWorker({**spec, "pool": "cls"}, str(tmp_path / "cache"))  # tokens do not depend on pooling
    assert cls.ensure(pairs, ["texts@tokens:-1"])["computed"] == {"texts@tokens:-1": False}


def test_bad_token_fields_fail_clearly(tmp_path, pairs):
    worker = vit_worker(tmp_path / "cache")
    with pytest.raises(ValueError, match="out of range"):
        worker.ensure(pairs, ["images@tokens:2"])
    with pytest.raises(AttributeError):
        worker.ensure(pairs, ["pixels@tokens:0"])
    assert worker.forward_batches == 0
