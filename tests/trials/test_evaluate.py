"""trials.evaluate against the official code's stored outputs (METHOD.md §15.8-9) and by hand."""

import itertools

import pytest
import torch

from trials.evaluate import retrieval_metrics, zero_shot_logits, zero_shot_metrics, zero_shot_weights


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def _f32(values):
    return _f64(values).to(torch.float32)


# ------------------------------------------------------------------ zero-shot


def test_zero_shot_classifier_matches_official(zero_shot_classifier_ref_case):
    case = zero_shot_classifier_ref_case
    feats = _f32(case["text_features_all_layers"])[:, case["layer_index"], :]
    weight, bias = _f32(case["align_weight"]), _f32(case["align_bias"])
    n_classes, n_templates = len(case["classes"]), len(case["templates"])
    # texts are class-major: for each class, all its templates
    aligned = (feats @ weight.T + bias).reshape(n_classes, n_templates, -1)
    weights = zero_shot_weights(aligned)
    assert torch.allclose(weights.double(), _f64(case["classifier_weights"]), rtol=0, atol=2e-6)
    logits = zero_shot_logits(_f32(case["image_aligned"]), weights)
    assert torch.allclose(logits.double(), _f64(case["logits"]), rtol=0, atol=5e-4)
    assert logits.argmax(1).tolist() == case["argmax"]


def test_zero_shot_weights_are_unit_and_template_balanced():
    emb = torch.randn(4, 3, 8, dtype=torch.float64)
    scaled = emb * torch.tensor([1.0, 10.0, 0.1], dtype=torch.float64)[None, :, None]
    weights = zero_shot_weights(scaled)  # rescaling a template must not change its vote
    assert torch.allclose(weights, zero_shot_weights(emb))
    assert torch.allclose(weights.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_zero_shot_metrics_by_hand():
    # 6 samples, 5 classes; predictions 0,0,1,2,2,4 for labels 0,1,1,2,3,3
    labels = torch.tensor([0, 1, 1, 2, 3, 3])
    pred = [0, 0, 1, 2, 2, 4]
    logits = torch.full((6, 5), -1.0)
    logits[torch.arange(6), torch.tensor(pred)] = 5.0
    logits[:, 3] += torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])  # label 3 ranks 2nd for the misses
    m = zero_shot_metrics(logits, labels)
    assert m["top1"] == pytest.approx(3 / 6)
    # per-class recall: c0 1/1, c1 1/2, c2 1/1, c3 0/2, c4 predicted but absent -> counts as 0
    assert m["top1_macro"] == pytest.approx((1 + 0.5 + 1 + 0 + 0) / 5)
    # per-class F1 = 2TP / (2TP + FP + FN): c0 2/3 (FP: sample 1), c1 2/3 (FN: sample 1),
    # c2 2/3 (FP: sample 4), c3 0, c4 0 (predicted, absent: counts, as in torchmetrics/sklearn)
    assert m["f1_macro"] == pytest.approx((2 / 3 + 2 / 3 + 2 / 3 + 0 + 0) / 5)
    assert m["top5"] == pytest.approx(1.0)
    assert m["top5_macro"] == pytest.approx(1.0)  # 5 classes: every top-5 list holds them all
    assert all(isinstance(v, float) for v in m.values())


def test_zero_shot_top5_macro_by_hand():
    # 7 classes; the label's rank (0 = top) per sample; class 6 never occurs in the labels
    labels = torch.tensor([0, 0, 0, 1, 2, 2, 3, 4, 5, 5])
    ranks = torch.tensor([0, 4, 6, 5, 1, 6, 3, 2, 0, 5])
    logits = torch.zeros(len(labels), 7)
    for row, (label, rank) in enumerate(zip(labels.tolist(), ranks.tolist())):
        others = [c for c in range(7) if c != label]
        order = others[:rank] + [label] + others[rank:]  # the label at position `rank`
        logits[row, torch.tensor(order)] = torch.arange(7, 0, -1, dtype=torch.float32)
    m = zero_shot_metrics(logits, labels)
    # in the top 5 iff rank < 5: c0 2/3, c1 0/1, c2 1/2, c3 1/1, c4 1/1, c5 1/2; c6 absent: left out
    assert m["top5_macro"] == pytest.approx((2 / 3 + 0 + 1 / 2 + 1 + 1 + 1 / 2) / 6)
    assert m["top5"] == pytest.approx(6 / 10)


def _confusion_reference(logits, labels):
    """Macro F1 and top-5 macro recall from a numpy confusion matrix (independent of the code)."""
    import numpy as np

    scores, y = logits.double().numpy(), labels.numpy()
    classes = scores.shape[1]
    confusion = np.zeros((classes, classes))
    np.add.at(confusion, (y, scores.argmax(1)), 1)
    tp, support, predicted = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    used = (support + predicted) > 0
    f1 = np.divide(2 * tp, support + predicted, out=np.zeros(classes), where=used)
    top5 = np.argsort(-scores, axis=1, kind="stable")[:, :5]
    hit5 = (top5 == y[:, None]).any(1)
    recall5 = [hit5[y == c].mean() for c in range(classes) if (y == c).any()]
    return f1[used].mean(), float(np.mean(recall5))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_zero_shot_macro_metrics_match_a_confusion_matrix(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 9, (200,), generator=g)
    labels[labels == 8] = 7  # class 8 never a label (it may still be predicted)
    logits = torch.randn(200, 9, generator=g, dtype=torch.float64)
    logits[torch.arange(200), labels] += 1.0
    m = zero_shot_metrics(logits, labels)
    f1, top5_macro = _confusion_reference(logits, labels)
    assert m["f1_macro"] == pytest.approx(f1, abs=1e-12)
    assert m["top5_macro"] == pytest.approx(top5_macro, abs=1e-12)


def test_zero_shot_f1_macro_matches_sklearn():
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(5)
    labels = torch.randint(0, 6, (150,), generator=g)
    logits = torch.randn(150, 7, generator=g) + 2.0 * torch.nn.functional.one_hot(labels, 7)
    expected = metrics.f1_score(labels.numpy(), logits.argmax(1).numpy(), average="macro",
                                zero_division=0)
    assert zero_shot_metrics(logits, labels)["f1_macro"] == pytest.approx(expected, abs=1e-12)


def test_zero_shot_metrics_omit_top5_below_five_classes():
    m = zero_shot_metrics(torch.eye(3), torch.tensor([0, 1, 2]))
    assert set(m) == {"top1", "top1_macro", "f1_macro"} and m["top1"] == 1.0
    assert m["f1_macro"] == 1.0


# ------------------------------------------------------------------ retrieval


def test_retrieval_official_matches_reference(retrieval_ref_case):
    case = retrieval_ref_case
    images, texts = _f32(case["image_embeddings_unique"]), _f32(case["text_embeddings_rows"])
    owner = torch.arange(case["n_img"]).repeat_interleave(case["captions_per_image"])
    got = retrieval_metrics(images, texts, owner, protocol="official", chunk_size=7)
    for direction in ("I2T", "T2I"):
        for key, value in case[direction].items():
            assert got[direction][key] == pytest.approx(value, abs=1e-12), (direction, key)


def test_retrieval_official_t2i_is_deflated_vs_standard(retrieval_ref_case):
    case = retrieval_ref_case
    images, texts = _f32(case["image_embeddings_unique"]), _f32(case["text_embeddings_rows"])
    owner = torch.arange(case["n_img"]).repeat_interleave(case["captions_per_image"])
    official = retrieval_metrics(images, texts, owner, protocol="official")["T2I"]
    standard = retrieval_metrics(images, texts, owner, protocol="standard")["T2I"]
    assert official["R@1"] == pytest.approx(standard["R@1"])
    assert standard["R@5"] > official["R@5"]


def _brute_force(queries, gallery, relevant, ks):
    """Plain-Python R@k, P@k, MAP@k over unique queries (the standard protocol)."""
    sums = {f"{m}@{k}": 0.0 for m, k in itertools.product(("R", "P", "MAP"), ks)}
    for q, rel in zip(queries, relevant):
        sims = [float(q @ g) for g in gallery]
        order = sorted(range(len(gallery)), key=lambda j: -sims[j])
        for k in ks:
            flags = [j in rel for j in order[:k]]
            hits, ap = 0, 0.0
            for r, flag in enumerate(flags, start=1):
                if flag:
                    hits += 1
                    ap += hits / r
            sums[f"R@{k}"] += float(any(flags))
            sums[f"P@{k}"] += sum(flags) / k
            sums[f"MAP@{k}"] += ap / min(len(rel), k)
    return {key: value / len(queries) for key, value in sums.items()}


def test_retrieval_standard_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    n_img, dim = 9, 6
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 5, 5, 6, 7, 7, 8, 8, 8, 8])  # unequal caption counts
    images = torch.randn(n_img, dim, generator=g, dtype=torch.float64)
    texts = images[owner] + 1.5 * torch.randn(len(owner), dim, generator=g, dtype=torch.float64)
    ks = (1, 3, 5)
    got = retrieval_metrics(images, texts, owner, ks=ks, protocol="standard", chunk_size=4)
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    i2t = _brute_force(unit(images), unit(texts), [set((owner == i).nonzero().flatten().tolist())
                                                   for i in range(n_img)], ks)
    t2i = _brute_force(unit(texts), unit(images), [{int(i)} for i in owner], ks)
    for key in i2t:
        assert got["I2T"][key] == pytest.approx(i2t[key], abs=1e-12), key
        assert got["T2I"][key] == pytest.approx(t2i[key], abs=1e-12), key


def test_retrieval_official_i2t_weights_images_by_caption_count():
    g = torch.Generator().manual_seed(4)
    owner = torch.tensor([0, 1, 1, 1, 2])
    images = torch.randn(3, 5, generator=g)
    texts = images[owner] + 2.0 * torch.randn(5, 5, generator=g)
    standard = retrieval_metrics(images, texts, owner, ks=(1,), protocol="standard")["I2T"]
    official = retrieval_metrics(images, texts, owner, ks=(1,), protocol="official")["I2T"]
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    hits = [float(owner[(unit(images[i:i + 1]) @ unit(texts).T).argmax()] == i) for i in range(3)]
    assert standard["R@1"] == pytest.approx(sum(hits) / 3)
    assert official["R@1"] == pytest.approx((hits[0] + 3 * hits[1] + hits[2]) / 5)


def test_retrieval_rejects_unknown_protocol():
    with pytest.raises(ValueError, match="protocol"):
        retrieval_metrics(torch.eye(2), torch.eye(2), [0, 1], protocol="karpathy")
