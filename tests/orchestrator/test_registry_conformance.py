"""Every registry entry, checked the same way (as timm tests every registered model).

The tests are parametrised over the registries' own names, so an entry added
without a case here fails ``test_*_case_exists``. Every dataset is built for
real from a tiny on-disk fixture in its expected layout (torchvision's
checksum checks are switched off, the files are fakes); every encoder prefix
is built from a tiny model made here (nothing is downloaded).
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny_models import TEXTS, offline_hub, save_tiny_text_model, save_tiny_vit

from orchestrator.datasets import (
    DATASETS,
    KIND_FIELDS,
    DatasetError,
    Split,
    dataset_names,
    load_split,
    register_dataset,
)
from orchestrator.encoders import Encoder, build_encoder, encoder_prefixes, register_encoder

# --- datasets ----------------------------------------------------------------------


def image(path, value=0, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, 7)).save(path)


def coco(root, _):
    for name in ("a.png", "b.png"):
        image(root / "train2014" / name)
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps({
        "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
        "annotations": [{"image_id": 1, "caption": "an a"}, {"image_id": 2, "caption": "a b"}]}))
    return "train", {"root": str(root)}


def flickr30k(root, _):
    image(root / "flickr30k-images" / "0.jpg")
    (root / "results.csv").write_text("image_name| comment_number| comment\n0.jpg| 0| a photo\n")
    return "all", {"root": str(root)}


def pairs(root, _):
    image(root / "img" / "x.png")
    (root / "pairs.csv").write_text("image,caption\nimg/x.png,an x\nimg/x.png,another x\n")
    return "train", {"path": str(root / "pairs.csv")}


def image_folder(root, _):
    for cls in ("cat", "dog"):
        image(root / "train" / cls / "0.png")
    return "train", {"root": str(root)}


def cifar(folder, files, label_key, names_file, names_key):
    def build(root, monkeypatch):
        import torchvision.datasets.cifar as module

        monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)
        (root / folder).mkdir()
        for name in files:
            batch = {"data": np.zeros((2, 3072), np.uint8), label_key: [0, 1]}
            (root / folder / name).write_bytes(pickle.dumps(batch))
        (root / folder / names_file).write_bytes(pickle.dumps({names_key: ["c0", "c1"]}))
        return "test", {"root": str(root)}
    return build


def stl10(root, monkeypatch):
    import torchvision.datasets.stl10 as module

    monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)
    folder = root / "stl10_binary"
    folder.mkdir()
    (folder / "test_X.bin").write_bytes(np.zeros(2 * 3 * 96 * 96, np.uint8).tobytes())
    (folder / "test_y.bin").write_bytes(np.array([1, 2], np.uint8).tobytes())  # 1-based
    (folder / "class_names.txt").write_text("airplane\nbird\n")
    return "test", {"root": str(root)}


def food101(root, _):
    base = root / "food-101"
    for cls in ("pie", "soup"):
        image(base / "images" / cls / "1.jpg")
    (base / "meta").mkdir()
    (base / "meta" / "test.json").write_text(json.dumps({"pie": ["pie/1"], "soup": ["soup/1"]}))
    return "test", {"root": str(root)}


def pets(root, _):
    base = root / "oxford-iiit-pet"
    for name in ("Abyssinian_1", "beagle_1"):
        image(base / "images" / f"{name}.jpg")
    (base / "annotations").mkdir()
    (base / "annotations" / "test.txt").write_text("Abyssinian_1 1 1 1\nbeagle_1 2 2 1\n")
    return "test", {"root": str(root)}


def flowers(root, monkeypatch):
    import torchvision.datasets.flowers102 as module
    from scipy.io import savemat

    monkeypatch.setattr(module, "check_integrity", lambda *a, **k: True)
    base = root / "flowers-102"
    for i in (1, 2):
        image(base / "jpg" / f"image_{i:05d}.jpg")
    savemat(base / "imagelabels.mat", {"labels": np.array([[1, 2]])})
    savemat(base / "setid.mat", {"trnid": np.array([[1]]), "valid": np.array([[2]]),
                                 "tstid": np.array([[1, 2]])})
    return "test", {"root": str(root)}


def dtd(root, _):
    data = root / "dtd" / "dtd"
    for cls in ("banded", "zigzagged"):
        image(data / "images" / cls / f"{cls}_1.jpg")
    (data / "labels").mkdir()
    (data / "labels" / "test1.txt").write_text("zigzagged/zigzagged_1.jpg\nbanded/banded_1.jpg\n")
    return "test", {"root": str(root)}


def mnist(root, _):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):  # IDX files: magic (type 8 = uint8, n dims), sizes, data
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x0803, 2, 28, 28)
                                                          + bytes(2 * 28 * 28))
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x0801, 2) + bytes([3, 7]))
    return "test", {"root": str(root)}


def synthetic(_, __):
    return "train", {"size": 6, "n_classes": 3, "templates": 2}


def curated(root, monkeypatch):
    monkeypatch.setenv("STRUCTURE_SWEEP_CACHE", str(root / "cache"))  # the selection's cache
    np.save(root / "prototypes.npy", np.eye(3, 16, dtype=np.float32))  # 3 concepts, synthetic latent width
    return "train", {"pool": {"dataset": "synthetic", "options": {"size": 12, "n_classes": 3}},
                     "prototypes": str(root / "prototypes.npy"), "per_concept": 2, "max": 4}


def mixture(root, monkeypatch):
    # a file-backed source (its path can go missing) and an in-memory one, cut to a size
    _, table = pairs(root, monkeypatch)
    return "train", {"seed": 1, "sources": [{"dataset": "pairs", "options": table},
                                            {"dataset": "synthetic", "options": {"size": 5}, "size": 3}]}


# name -> builder(root, monkeypatch) -> (split, options) of a tiny instance.
DATASET_CASES = {
    "coco": coco, "flickr30k": flickr30k, "pairs": pairs, "image_folder": image_folder,
    "cifar10": cifar("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
                     "labels", "batches.meta", "label_names"),
    "cifar100": cifar("cifar-100-python", ["train", "test"], "fine_labels", "meta", "fine_label_names"),
    "stl10": stl10, "food101": food101, "pets": pets, "flowers": flowers, "dtd": dtd, "mnist": mnist,
    "synthetic": synthetic, "curated": curated, "mixture": mixture,
}


def test_every_dataset_has_a_case():
    assert set(dataset_names()) == set(DATASET_CASES), "add a tiny fixture for each new dataset here"


def check_split(split: Split, kind: str) -> None:
    """What every split promises, plus the fields of its kind."""
    n_images, n_texts = len(split.images), len(split.texts)
    assert n_images > 0 and n_texts > 0 and isinstance(split.fingerprint, str) and split.fingerprint
    pairing = np.asarray(split.text_to_image)
    assert pairing.shape == (n_texts,) and pairing.dtype.kind == "i"
    assert 0 <= pairing.min() and pairing.max() < n_images
    assert len(split.images[0:1]) == 1 and len(split.inputs("texts")[0:1]) == 1  # sliceable inputs
    for field in KIND_FIELDS[kind]:
        assert getattr(split, field) is not None, f"a {kind} split must fill {field}"
    if kind == "classification":
        assert len(split.labels) == n_images and 0 <= min(split.labels) <= max(split.labels)
        assert max(split.labels) < len(split.class_names) == len(split.prompts)
        assert all(len(p) > 0 for p in split.prompts)
        assert isinstance(split.field_fingerprint("prompts"), str)
    assert isinstance(split.field_fingerprint("images"), str)


@pytest.mark.parametrize("name", dataset_names())
def test_dataset_conforms(name, tmp_path, monkeypatch):
    split_name, options = DATASET_CASES[name](tmp_path, monkeypatch)
    split = load_split(name, split_name, options)
    check_split(split, DATASETS.meta(name)["kind"])
    assert load_split(name, split_name, options).fingerprint == split.fingerprint  # deterministic


@pytest.mark.parametrize("name", dataset_names())
def test_dataset_missing_location_names_dataset_and_layout(name, tmp_path, monkeypatch):
    split_name, options = DATASET_CASES[name](tmp_path, monkeypatch)
    missing = relocated(options, str(tmp_path))
    if name == "synthetic":
        assert missing == options  # made in memory: nothing to be missing
        return
    assert missing != options
    # a composite dataset (mixture) reports its source's error: that source is named
    owner = "pairs" if name == "mixture" else name
    with pytest.raises(DatasetError, match=f"(?s)dataset '{owner}'.*expected"):
        load_split(name, split_name, missing)


def relocated(value, root: str):
    """``value`` with every path under ``root`` (nested in sources too) moved to nowhere."""
    if isinstance(value, str) and value.startswith(root):
        return str(Path(root) / "nowhere")
    if isinstance(value, dict):
        return {k: relocated(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relocated(v, root) for v in value]
    return value


# --- encoders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny saved models, with the Hub offline (a download attempt fails fast)."""
    root = tmp_path_factory.mktemp("models")
    with offline_hub(tmp_path_factory.mktemp("hf_home")):
        yield {"vit": save_tiny_vit(root / "vit"), "bert": save_tiny_text_model(root / "bert", "bert")}


def planted(width: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((n, width)).astype(np.float32)


# prefix -> cases(models) -> [(name, options, batch)]
ENCODER_CASES = {
    "synthetic": lambda m: [("synthetic:image", {"layers": 3, "dim": 8, "planted_layer": 1},
                             planted(16 + 32)),
                            ("synthetic:text", {"layers": 2, "dim": 8, "planted_layer": 0}, planted(16 + 32))],
    "timm": lambda m: [(f"timm:{m['vit']}", {}, np.random.default_rng(0).random((3, 3, 32, 32), np.float32))],
    "hf": lambda m: [(f"hf:{m['bert']}", {}, TEXTS[:3])],
}


def test_every_encoder_prefix_has_a_case():
    assert set(encoder_prefixes()) == set(ENCODER_CASES), "add a tiny model for each new prefix here"


@pytest.mark.parametrize("prefix", encoder_prefixes())
def test_encoder_conforms(prefix, models):
    for name, options, batch in ENCODER_CASES[prefix](models):
        encoder = build_encoder(name, **options)
        assert isinstance(encoder, Encoder) and encoder.modality in ("image", "text")
        assert encoder.num_layers >= 1 and encoder.dim >= 1
        identity = encoder.identity()
        assert identity and json.loads(json.dumps(identity)) == identity  # a cache key part
        assert build_encoder(name, **options).identity() == identity  # stable
        features = encoder.encode(batch)
        assert features.shape == (len(batch), encoder.num_layers, encoder.dim), name
        assert features.dtype == np.float32 and np.isfinite(features).all()
        # every layer of a sample is the same alone as in a batch
        alone = np.concatenate([encoder.encode(batch[i:i + 1]) for i in range(len(batch))])
        np.testing.assert_allclose(alone, features, atol=1e-5, err_msg=name)


def test_a_name_is_registered_once(monkeypatch):
    import orchestrator.encoders as encoders

    with pytest.raises(ValueError, match="'coco' is already registered"):
        register_dataset("coco")(lambda split: None)
    build_encoder("synthetic:image")  # its module is imported now
    with pytest.raises(ValueError, match="'synthetic' is already registered"):
        register_encoder("synthetic")(lambda rest, **_: None)
    # a built-in prefix is refused even before its module is (lazily) imported
    monkeypatch.setitem(encoders._BUILTIN_MODULES, "lazy", "orchestrator.encoders.lazy")
    with pytest.raises(ValueError, match="'lazy' is built in"):
        register_encoder("lazy")(lambda rest, **_: None)
