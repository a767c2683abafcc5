"""Evaluation of aligned embeddings: zero-shot classification and retrieval (METHOD.md §8).

Everything runs vectorised on the embeddings' device, in chunks of queries,
and returns plain Python floats (fractions in [0, 1]).
"""

from __future__ import annotations

import torch

from trials.losses import safe_normalize

KS = (1, 5, 10)


# ------------------------------------------------------------------ zero-shot (§8.1)


def zero_shot_weights(class_template_emb: torch.Tensor) -> torch.Tensor:
    """Class weights [C, D] from aligned prompt embeddings [C, T, D]: normalise, mean, normalise.

    For CSA, STRUCTURE applies this to the RAW prompt features and then the
    view-2 transform, without re-normalising (§4.4):
    ``zero_shot_logits(fit.transform_x(img), fit.transform_y(zero_shot_weights(raw)))``.
    """
    per_template = safe_normalize(class_template_emb)
    return safe_normalize(per_template.mean(dim=1))


def zero_shot_logits(image_emb: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``100 · safe_norm(image) · weightsᵀ`` [N, C]; the weights are used as given (§8.1, §4.4)."""
    return 100.0 * safe_normalize(image_emb) @ weights.to(image_emb.dtype).T


def zero_shot_metrics(logits: torch.Tensor, labels) -> dict[str, float]:
    """Zero-shot classification metrics, as the official torchmetrics objects compute them.

    * ``top1`` (micro accuracy) and ``top1_macro`` (``Accuracy(top_k=1, average="macro")``):
      the mean per-class recall over the classes that occur in the labels or the
      predictions (a class only predicted counts with recall 0);
    * ``f1_macro`` (the fork's ``top1_f1_macro``, ``F1Score(top_k=1, average="macro")``):
      the mean over the same classes of 2·TP / (2·TP + FP + FN), as sklearn's
      ``f1_score(average="macro")`` (labels = those present, zero_division=0);
    * if C >= 5, ``top5`` (micro) and ``top5_macro`` (``Accuracy(top_k=5,
      average="macro")``): the mean over the classes present in the LABELS of the
      fraction of their samples whose label is among the 5 highest logits.
      torchmetrics >= 1.4 leaves a class absent from the labels out of a top-k
      macro mean (older versions counted it as 0 when some top-5 list named it;
      the official version is UNDETERMINED, and it matters only for such classes).
    """
    labels = torch.as_tensor(labels, device=logits.device).long()
    num_classes = logits.shape[1]
    pred = logits.argmax(dim=1)
    hit = (pred == labels).double()
    support = torch.bincount(labels, minlength=num_classes).double()
    predicted = torch.bincount(pred, minlength=num_classes).double()
    tp = torch.bincount(labels, weights=hit, minlength=num_classes)
    seen = ((support + predicted) > 0).double()
    recall = tp / support.clamp(min=1)
    f1 = 2 * tp / (support + predicted).clamp(min=1)  # 2TP + FP + FN = support + predicted
    # masked means, not recall[seen]: boolean indexing would sync with the host
    out = {"top1": hit.mean(), "top1_macro": (recall * seen).sum() / seen.sum(),
           "f1_macro": (f1 * seen).sum() / seen.sum()}
    if num_classes >= 5:
        in_top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).double()
        present = (support > 0).double()
        recall5 = torch.bincount(labels, weights=in_top5, minlength=num_classes) / support.clamp(min=1)
        out["top5"] = in_top5.mean()
        out["top5_macro"] = (recall5 * present).sum() / present.sum()
    return {key: float(value) for key, value in zip(out, torch.stack(list(out.values())).tolist())}


# ------------------------------------------------------------------ retrieval (§8.2)


def retrieval_metrics(image_emb: torch.Tensor, text_emb: torch.Tensor, text_to_image,
                      ks=KS, protocol: str = "official",
                      chunk_size: int = 1024) -> dict[str, dict[str, float]]:
    """R@k, P@k and MAP@k for image→text (I2T) and text→image (T2I).

    ``image_emb`` [M, D] holds UNIQUE images, ``text_emb`` [K, D] one row per
    caption, ``text_to_image`` [K] the image index of each caption.

    ``protocol="official"`` reproduces §8.2's per-caption-row evaluation:
    every image is queried once per caption (I2T is a caption-count-weighted
    mean), and the T2I gallery holds each image once per caption, which
    deflates T2I R@5/R@10. ``protocol="standard"`` is the usual unique-image
    protocol (each image queried once; T2I gallery of unique images); it is a
    different number and must be labelled so.
    """
    if protocol not in ("official", "standard"):
        raise ValueError(f"protocol must be 'official' or 'standard', got {protocol!r}")
    image_emb, text_emb = safe_normalize(image_emb), safe_normalize(text_emb.to(image_emb))
    owner = torch.as_tensor(text_to_image, device=image_emb.device).long()
    images = torch.arange(image_emb.shape[0], device=image_emb.device)
    counts = torch.bincount(owner, minlength=image_emb.shape[0])
    # images without captions are not rows of the official dataframe: never queried
    i2t_weight = counts.to(image_emb.dtype) if protocol == "official" else (counts > 0).to(image_emb.dtype)
    i2t = _ranked_metrics(image_emb, images, i2t_weight, text_emb, owner, ks, chunk_size)
    if protocol == "official":
        t2i = _ranked_metrics(text_emb, owner, None, image_emb[owner], owner, ks, chunk_size)
    else:
        t2i = _ranked_metrics(text_emb, owner, None, image_emb, images, ks, chunk_size)
    return {"I2T": i2t, "T2I": t2i}


def _ranked_metrics(queries, query_ids, query_weights, gallery, gallery_ids, ks,
                    chunk_size) -> dict[str, float]:
    """Weighted mean over queries of R@k, P@k, MAP@k, as the official ``retrieval_metrics_df``.

    The relevant items of a query are the gallery rows sharing its id; AP@k
    divides by min(#relevant, k). Only the top max(ks) ranks are needed.
    """
    n_relevant = torch.bincount(gallery_ids, minlength=int(query_ids.max()) + 1)
    if query_weights is None:
        query_weights = torch.ones(len(queries), dtype=queries.dtype, device=queries.device)
    depth = min(max(ks), gallery.shape[0])
    sums = torch.zeros(len(ks), 3, dtype=torch.float64, device=queries.device)
    for start in range(0, len(queries), chunk_size):
        stop = start + chunk_size
        top = (queries[start:stop] @ gallery.T).topk(depth, dim=1).indices
        relevant = gallery_ids[top] == query_ids[start:stop, None]
        scores = _scores_at_k(relevant, n_relevant[query_ids[start:stop]], ks)
        sums += (scores * query_weights[start:stop, None, None]).sum(0).to(torch.float64)
    values = (sums / query_weights.sum()).tolist()
    out = {}
    for k, (recall, precision, ap) in zip(ks, values):
        out.update({f"R@{k}": recall, f"P@{k}": precision, f"MAP@{k}": ap})
    return out


def _scores_at_k(relevant: torch.Tensor, n_relevant: torch.Tensor, ks) -> torch.Tensor:
    """[B, len(ks), 3] recall hit, precision and AP for each query of a chunk."""
    rel = relevant.to(torch.float64)
    hits = rel.cumsum(dim=1)
    ranks = torch.arange(1, rel.shape[1] + 1, device=rel.device, dtype=rel.dtype)
    precision_at_hit = rel * hits / ranks
    per_k = []
    for k in ks:
        kk = min(k, rel.shape[1])  # a gallery smaller than k: the missing ranks are misses
        hits_k = hits[:, kk - 1]
        ap = precision_at_hit[:, :kk].sum(1) / n_relevant.clamp(min=1, max=k).to(rel.dtype)
        per_k.append(torch.stack([(hits_k > 0).to(rel.dtype), hits_k / k, ap], dim=1))
    return torch.stack(per_k, dim=1)
