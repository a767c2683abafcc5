"""Tiny models built here, never downloaded: shared by the encoder tests and
the registry conformance test.

A 3-block ViT (timm, from its config) and 2-layer BERT/RoBERTa models with
word-level tokenizers trained on :data:`TEXTS` (transformers, saved with
``save_pretrained``).
"""

from __future__ import annotations

import contextlib
import pathlib

import pytest
import torch

TINY_VIT = dict(img_size=32, patch_size=8, depth=3, embed_dim=32, num_heads=2)
TINY_VIT_ARCH = "vit_tiny_patch16_224"
TEXTS = ["a cat sits on the mat", "the dog runs", "hello", "a bird flies over the house"]


@contextlib.contextmanager
def offline_hub(cache: pathlib.Path):
    """No network and an empty Hugging Face cache, so a download attempt fails fast.

    huggingface_hub reads HF_HUB_OFFLINE and the cache path when it is
    imported, so its constants are patched as well as the environment.
    """
    import huggingface_hub.constants as constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HOME", str(cache))
        mp.setattr(constants, "HF_HUB_OFFLINE", True)
        mp.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))
        yield


def save_tiny_vit(path: pathlib.Path) -> pathlib.Path:
    """The tiny ViT with seeded random weights in timm's Hub layout
    (``config.json`` + ``model.safetensors``) at ``path``."""
    from timm.models._hub import save_for_hf

    from orchestrator.encoders import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder(f"timm:{TINY_VIT_ARCH}", pretrained=False, **TINY_VIT)
    save_for_hf(encoder.model, str(path), safe_serialization=True)
    return path


def save_tiny_text_model(path: pathlib.Path, kind: str, pad: bool = True) -> pathlib.Path:
    """A 2-layer BERT or RoBERTa with a word-level tokenizer trained on TEXTS, saved to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast, RobertaConfig, RobertaModel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] if kind == "bert" else ["<s>", "<pad>", "</s>", "<unk>"]
    first, last = (specials[2], specials[3]) if kind == "bert" else (specials[0], specials[2])
    unk = specials[1] if kind == "bert" else specials[3]
    tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=specials))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{first} $A {last}", special_tokens=[(t, tokenizer.token_to_id(t)) for t in (first, last)])
    special = dict(unk_token=unk, bos_token=first, eos_token=last)
    if pad:
        special["pad_token"] = specials[0] if kind == "bert" else specials[1]
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(path)
    sizes = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=16, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=32, max_position_embeddings=40)
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(BertConfig(pad_token_id=0, **sizes))
    else:
        model = RobertaModel(RobertaConfig(pad_token_id=1, bos_token_id=0, eos_token_id=2, **sizes))
    model.save_pretrained(path)
    return path
