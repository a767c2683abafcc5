"""Streaming = resident: a token trial computes the same numbers from every reader of one store.

A tiny token store (images with a CLS token, ragged captions, shards small
enough that samples straddle them) feeds run_token_trial through
StreamedTokens, MappedTokens, the store read into memory (to_resident) and
the original arrays rounded to fp16 independently. Every reader hands the
trial the same float32 batches (fp16 -> float32 is exact, padding and order
are the same) and the loop draws its batch order and dropout masks from the
trial's seed only, so the metrics must be EXACTLY equal, not merely close:
any difference means a reader returned other values or another order.
"""

import numpy as np
import pytest

from orchestrator.feature_store import FeatureStore
from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.token_features import TokenEntries, token_trial_data
from orchestrator.token_store import (
    MappedTokens,
    StoredTokens,
    StreamedTokens,
    TokenWriter,
)
from trials.config import TrialConfig
from trials.token_trial import TokenTrialData, TokenZeroShotSet, run_token_trial
from trials.tokens import RaggedTokens, TokenPairs
from trials.trial import EPOCH_ROWS

IMAGE_DIM, TEXT_DIM, PATCHES, CLASSES, TEMPLATES = 8, 6, 5, 3, 2
SIZES = {"train": 60, "val": 20, "zs": 15, "ret": 10}  # images per split
# Dropout on, R_S on (it reads the pooled frozen features), the official schedule,
# a subsample of the training pairs and several batches per epoch.
CONFIG = TrialConfig(head="token_projector", head_options={"schedule": "freeze_align"}, out_dim=8, n_train=45,
                     batch_size=16, epochs=3, lr=1e-3, temperature=0.07, structure_lambda=2.0,
                     warmup_steps=2, seed=3)


def _originals(seed: int = 0) -> dict:
    """name -> (prefix [N, K, D], local tokens per sample) in float32: images and captions
    (2 per retrieval image), class-major zero-shot prompts."""
    rng = np.random.default_rng(seed)
    image = lambda n: (rng.standard_normal((n, 1, IMAGE_DIM), np.float32),
                       list(rng.standard_normal((n, PATCHES, IMAGE_DIM), np.float32)))
    text = lambda n: (np.zeros((n, 0, TEXT_DIM), np.float32),
                      [rng.standard_normal((int(k), TEXT_DIM), np.float32) for k in rng.integers(1, 8, n)])
    data = {f"image-{s}": image(n) for s, n in SIZES.items()}
    data.update({"text-train": text(SIZES["train"]), "text-val": text(SIZES["val"]),
                 "text-ret": text(2 * SIZES["ret"]), "text-zs": text(CLASSES * TEMPLATES)})
    return data


def _text_to_image(split: str) -> np.ndarray:
    return np.repeat(np.arange(SIZES[split]), 2) if split == "ret" else np.arange(SIZES[split])


LABELS = np.arange(SIZES["zs"]) % CLASSES


def _trial_data(source) -> TokenTrialData:
    """The trial's sets, each entry read by ``source(name)``."""
    pairs = lambda split: TokenPairs(source(f"image-{split}"), source(f"text-{split}"), _text_to_image(split))
    return TokenTrialData(pairs("train"), pairs("val"),
                          zero_shot={"zs": TokenZeroShotSet(source("image-zs"), LABELS, source("text-zs"), TEMPLATES)},
                          retrieval={"ret": pairs("ret")})


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """(FeatureStore, the float32 originals) with every entry written in batches of 7,
    in shards of 9 rows: image samples (5 rows each) and captions straddle shard ends."""
    store, originals = FeatureStore(tmp_path_factory.mktemp("tokens")), _originals()
    for name, (prefix, local) in originals.items():
        dim = prefix.shape[2]
        with TokenWriter(store, name, dim=dim, num_prefix=prefix.shape[1], shard_bytes=9 * dim * 2) as writer:
            for first in range(0, len(local), 7):
                writer.write(prefix[first:first + 7], local[first:first + 7])
        assert len(store.manifest(name)["shards"]) > 1
    return store, originals


def _metrics(data: TokenTrialData) -> dict:
    metrics = run_token_trial(data, CONFIG)
    del metrics["train_seconds"]  # wall time, the one value that may differ
    return metrics


def _resident(originals: dict, name: str, dtype=np.float16) -> RaggedTokens:
    """An entry's originals in memory as ``dtype`` (fp16: rounded here, not read from the store)."""
    prefix, local = originals[name]
    offsets = np.concatenate([[0], np.cumsum([len(x) for x in local])])
    return RaggedTokens(np.concatenate(local).astype(dtype), offsets, prefix.astype(dtype))


def test_streamed_mapped_and_resident_readers_give_identical_metrics(store):
    store, originals = store
    streamed = _metrics(_trial_data(lambda name: StreamedTokens(store.path(name))))
    assert {"zs/zs/top1", "ret/ret/standard/I2T/R@1", "best_val_loss"} <= set(streamed)
    assert len(streamed[EPOCH_ROWS]) == 3
    for source in (lambda name: MappedTokens(store.path(name)),
                   lambda name: StreamedTokens(store.path(name)).to_resident(),
                   lambda name: _resident(originals, name)):
        assert _metrics(_trial_data(source)) == streamed
    # Not vacuous: the unrounded float32 tokens (other bits) give other numbers.
    unrounded = _metrics(_trial_data(lambda name: _resident(originals, name, np.float32)))
    assert unrounded["best_val_loss"] != streamed["best_val_loss"]


def _feature_set(store: FeatureStore) -> FeatureSet:
    """A FeatureSet holding only what token_trial_data reads: pairings, labels and token entries."""
    split = lambda name, **kw: SplitFeatures(f"pooled-image-{name}", f"pooled-text-{name}",
                                             _text_to_image(name), **kw)
    path = lambda name: str(store.path(name))
    features = FeatureSet(split("train"), split("val"),
                          zero_shot={"zs": split("zs", labels=LABELS, n_prompts=[TEMPLATES] * CLASSES)},
                          retrieval={"ret": split("ret")}, num_layers=(2, 2))
    for role in ("image", "text"):
        features.tokens[(role, 1)] = TokenEntries(path(f"{role}-train"), path(f"{role}-val"),
                                                  {"zs": path(f"{role}-zs")}, {"ret": path(f"{role}-ret")})
    return features


def _readers(data: TokenTrialData) -> set[type]:
    zs, ret = data.zero_shot["zs"], data.retrieval["ret"]
    sources = [data.train.image, data.train.text, data.val.image, data.val.text, zs.image, zs.prompts,
               ret.image, ret.text]
    assert all(isinstance(s, StoredTokens) for s in sources)
    return {type(s) for s in sources}


def test_the_worker_streams_beyond_the_memory_budget_with_the_same_metrics(store):
    store, _ = store
    features = _feature_set(store)
    size = sum(f.stat().st_size for f in store.root.glob("*/*.npy"))
    mapped = token_trial_data(features, 1, 1, memory_budget_gb=size / 2**30)  # fits exactly: mapped
    streamed = token_trial_data(features, 1, 1, memory_budget_gb=(size - 1) / 2**30)  # one byte over
    assert _readers(mapped) == {MappedTokens} and _readers(streamed) == {StreamedTokens}
    assert _metrics(streamed) == _metrics(mapped)
