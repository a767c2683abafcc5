"""Token cache sizes known before any weights load, checked against real extractions."""

import shutil
from collections import namedtuple

import numpy as np
import pytest
import torch

from orchestrator.encoders import build_encoder
from orchestrator.token_size import estimate_tokens, human_bytes, token_bytes, token_space_error
from tiny_models import TEXTS, TINY_VIT, TINY_VIT_ARCH, offline_hub, save_tiny_text_model, save_tiny_vit


@pytest.fixture(scope="module", autouse=True)
def no_network(tmp_path_factory):
    with offline_hub(tmp_path_factory.mktemp("hf_home")):
        yield


def stored_tokens(encoder, batch) -> int:
    """Tokens an extraction produces (prefix + local), counted from its output."""
    prefix, local = encoder.encode_tokens(batch, -1)
    return prefix.shape[0] * prefix.shape[1] + sum(map(len, local))


@pytest.mark.parametrize("extra", [{}, {"reg_tokens": 2}, {"img_size": 40}, {"class_token": False,
                                                                             "global_pool": "avg"}])
def test_timm_estimate_equals_what_extraction_stores(extra):
    options = {"pretrained": False, **TINY_VIT, **extra}
    estimate = estimate_tokens(f"timm:{TINY_VIT_ARCH}", options, num_samples=5)
    encoder = build_encoder(f"timm:{TINY_VIT_ARCH}", **options)
    size = encoder.data_config["input_size"][1]
    assert estimate.tokens == stored_tokens(encoder, torch.zeros(5, 3, size, size))
    assert estimate.bytes == estimate.tokens * 32 * 2 == token_bytes(f"timm:{TINY_VIT_ARCH}", options, num_samples=5)
    assert estimate_tokens(f"timm:{TINY_VIT_ARCH}", options, num_samples=5, dtype="float32").bytes == 2 * estimate.bytes


def test_timm_local_folder_is_read_from_its_config(tmp_path):
    folder = save_tiny_vit(tmp_path / "vit")
    estimate = estimate_tokens(f"timm:{folder}", {}, num_samples=3, label="tiny")
    assert estimate.count.num_prefix == 1 and estimate.count.local == 16 and estimate.count.dim == 32
    assert estimate.message("image") == ("tiny at 32 px: 17 tokens (1 prefix + 16 local) x 32 x 2 B = "
                                         "1.09 kB per image, 3.26 kB for 3 images")


def test_the_issue_example_dinov2_large_at_256_px():
    """Architecture only (meta device): no weights are needed, none are downloaded."""
    estimate = estimate_tokens("timm:vit_large_patch14_dinov2.lvd142m", {"img_size": 256}, num_samples=82783,
                               label="DINOv2-L/14")
    assert estimate.tokens == 82783 * 325 and estimate.bytes == 82783 * 325 * 1024 * 2
    assert estimate.message("image") == ("DINOv2-L/14 at 256 px: 325 tokens (1 prefix + 324 local) x 1024 x 2 B "
                                         "= 0.666 MB per image, 55.1 GB for 82,783 images")


def test_hf_estimate_counts_the_local_tokenizer_or_bounds(tmp_path):
    model = save_tiny_text_model(tmp_path / "bert", "bert")
    texts = TEXTS * 3
    exact = estimate_tokens(f"hf:{model}", {}, num_samples=len(texts), texts=texts)
    assert not exact.count.bound and exact.tokens == stored_tokens(build_encoder(f"hf:{model}"), texts)
    assert exact.bytes == exact.tokens * 16 * 2 and "on average" in exact.message("text")
    short = estimate_tokens(f"hf:{model}", {"max_length": 4}, num_samples=len(texts), texts=texts)
    assert short.tokens == stored_tokens(build_encoder(f"hf:{model}", max_length=4), texts) < exact.tokens
    bound = estimate_tokens(f"hf:{model}", {}, num_samples=10)  # no texts: max_position_embeddings
    assert bound.count.bound and bound.tokens == 10 * 40 and "upper bound" in bound.message("text")
    assert estimate_tokens(f"hf:{model}", {"max_length": 8}, num_samples=10).tokens == 80


def test_unknown_sizes_say_why():
    assert "not in the local Hugging Face cache" in estimate_tokens("hf:nobody/no-model", num_samples=3)
    assert "no token features" in estimate_tokens("synthetic:image", num_samples=3)
    assert token_bytes("synthetic:text", num_samples=3) is None


def test_space_check_names_the_numbers(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**12, 0, 12 * 10**9))
    assert token_space_error(11 * 10**9, tmp_path / "not" / "made" / "yet") is None
    message = token_space_error(55_100_000_000, tmp_path / "cache")
    assert "55.1 GB" in message and "12 GB free" in message and str(tmp_path / "cache") in message
    assert "55,100,000,000 > 12,000,000,000 bytes" in message


def test_human_bytes():
    assert [human_bytes(b) for b in (12, 665600, 55.1e9, 2.32e11, 4e15)] == \
        ["12 B", "0.666 MB", "55.1 GB", "232 GB", "4,000 TB"]
    assert np.isclose(float(human_bytes(1.5e6).split()[0]), 1.5)
