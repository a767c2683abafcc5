"""EncoderWorker end to end: real (tiny) encoders over datasets on disk."""

import numpy as np
import pytest
from PIL import Image

from orchestrator.actors import EncoderWorker, _batch
from orchestrator.datasets import load_split
from orchestrator.datasets.files import open_image
from orchestrator.encoders import Encoder

TINY_VIT = {"name": "timm:vit_tiny_patch16_224", "pool": None, "dtype": "float32", "device": "cpu",
            "batch_size": 4, "num_gpus": 0, "num_cpus": 1,
            "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2,
                        "embed_dim": 32, "num_heads": 2}}


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    for c, cls in enumerate(["apple", "pear"]):
        for i in range(5):
            path = tmp_path / "data" / "train" / cls / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(path)
    return {"dataset": "image_folder", "split": "train", "name": "fruit",
            "options": {"root": str(tmp_path / "data")}}


def tiny_vit_worker(cache, **kwargs):
    import torch

    torch.manual_seed(0)  # random-init weights are part of the key: same seed, same key
    return EncoderWorker(TINY_VIT, str(cache), **kwargs)


def test_timm_extraction_matches_direct_forward_and_is_cached(tmp_path, folder):
    lines = []
    worker = tiny_vit_worker(tmp_path / "cache", log=lines.append, log_every_s=0)
    out = worker.ensure(folder, ["images"])
    key = out["keys"]["images"]
    assert out["computed"] == {"images": True} and worker.forward_batches == 3  # 10 images / 4
    split = load_split("image_folder", "train", folder["options"])
    direct = worker.encoder.encode([open_image(p) for p in split.images.paths])
    assert direct.shape == (10, 2, 32) and worker.store.manifest(key)["num_layers"] == 2
    for layer in range(2):
        np.testing.assert_allclose(worker.store.layer(key, layer), direct[:, layer], rtol=1e-5, atol=1e-5)
    progress = worker.progress()
    assert progress["task"] is None and progress["done"] == progress["total"] == 10
    assert progress["finished"][0]["task"] == "fruit/train/images"
    assert set(out["timings"]["images"]) == {"load_s", "encode_s", "write_s", "total_s"}
    assert any("fruit/train/images: 4/10" in line for line in lines) and "10 samples" in lines[-1]

    again = tiny_vit_worker(tmp_path / "cache")
    second = again.ensure(folder, ["images"])
    assert second["computed"] == {"images": False} and again.forward_batches == 0
    assert second["keys"] == out["keys"] and second["timings"] == {"images": None}


class CountingText(Encoder):
    """A text encoder that records what it was asked to encode."""

    modality, num_layers, dim = "text", 2, 3
    seen: list = []

    def encode(self, batch):
        CountingText.seen.extend(batch)
        lengths = np.array([[len(t), t.count(" "), 1.0] for t in batch], np.float32)
        return np.stack([lengths, 2 * lengths], axis=1)

    def identity(self):
        return {"encoder": "counting-text"}


def test_prompts_are_encoded_by_the_text_worker_and_shared(tmp_path, folder, monkeypatch):
    import orchestrator.actors as actors

    # Swapped in for this test only: the encoder registry holds shipped encoders
    # alone (tests/test_conformance.py checks every one of them).
    monkeypatch.setattr(actors, "build_encoder", lambda name, **_: CountingText())
    CountingText.seen.clear()
    spec = {"name": "counting:text", "batch_size": 3, "options": {}}
    worker = EncoderWorker(spec, str(tmp_path / "cache"))
    options = {**folder["options"], "templates": ["a {c}.", "the {c}!"]}
    out = worker.ensure({**folder, "options": options}, ["prompts"])
    assert CountingText.seen == ["a apple.", "the apple!", "a pear.", "the pear!"]  # class-major
    assert out["n_prompts"] == [2, 2] and out["computed"] == {"prompts": True}
    flat = worker.store.layer(out["keys"]["prompts"], 1)
    np.testing.assert_array_equal(flat[:, 0], 2 * np.array([8, 10, 7, 9]))
    # another split with the same classes and templates reuses the cached prompts
    test_dir = tmp_path / "data" / "test"
    for cls in ("apple", "pear"):
        (test_dir / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(test_dir / cls / "x.png")
    other = worker.ensure({**folder, "split": "test", "options": options}, ["prompts"])
    assert other["computed"] == {"prompts": False} and other["keys"] == out["keys"]


def test_batches_open_paths_for_images_only(tmp_path):
    path = tmp_path / "x.png"
    Image.new("L", (5, 4)).save(path)
    images = _batch([str(path), path], "image")
    assert all(isinstance(i, Image.Image) and i.mode == "RGB" for i in images)
    assert _batch([str(path)], "text") == [str(path)]
    assert _batch(np.ones((2, 3)), "image").shape == (2, 3)


@pytest.mark.timeout(600)  # fails fast: well below the suite's hang guard
def test_encoder_asking_for_a_gpu_on_a_cpu_cluster_fails_fast_and_clearly(ray_cluster, tmp_path, tiny):
    import yaml

    from orchestrator.actors import EncoderResourcesError
    from orchestrator.features import extract_features
    from orchestrator.spec import load_spec

    tiny["encoders"]["text"]["num_gpus"] = 1
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump({**tiny, "cache_dir": str(tmp_path / "cache")}))
    spec = load_spec(spec_file)
    with pytest.raises(EncoderResourcesError) as err:  # refused, not left waiting (timeout mark)
        extract_features(spec, str(tmp_path / "cache" / "features"), log=lambda *_: None)
    message = str(err.value)
    assert "text encoder 'synthetic:text'" in message and "num_gpus=1" in message
    assert "0 GPU" in message and "encoders.text.num_gpus" in message and "--address" in message


def test_resource_check_against_given_totals():
    from orchestrator.actors import EncoderResourcesError, check_encoder_fits
    from orchestrator.spec import EncoderSpec

    gpu = EncoderSpec(name="synthetic:image", num_gpus=1)
    check_encoder_fits(gpu, "image", {"CPU": 4.0, "GPU": 1.0})  # fits
    with pytest.raises(EncoderResourcesError, match="image encoder"):
        check_encoder_fits(gpu, "image", {"CPU": 4.0})
    with pytest.raises(EncoderResourcesError, match="num_cpus"):
        check_encoder_fits(EncoderSpec(name="synthetic:image", num_cpus=8), "image", {"CPU": 4.0})


def test_device_auto_resolves_in_the_worker_and_keeps_the_cache_key(tmp_path, folder):
    import torch

    from orchestrator.actors import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == expected and resolve_device(None) == expected
    assert resolve_device("cpu") == "cpu"
    torch.manual_seed(0)
    auto = EncoderWorker({**TINY_VIT, "device": "auto"}, str(tmp_path / "cache"))
    assert str(auto.encoder.device) == expected
    cpu = tiny_vit_worker(tmp_path / "cache")
    if expected == "cpu":
        assert auto.identity() == cpu.identity()
        first = auto.ensure(folder, ["images"])
        second = cpu.ensure(folder, ["images"])
        assert second["keys"] == first["keys"] and second["computed"] == {"images": False}
