"""Encoder-pair selection (freeze-align §3.1): which frozen encoders to align, before any trial.

Every candidate encoder embeds the probe set (``encoder_selection.probe``,
paired samples) once, one encoder after the other, into the feature cache;
then every (image, text) candidate pair is scored with ``metric`` on the raw
features (``normalize: false``, as freeze-align). Text rows are the mean of
each image's caption features (freeze-align averages the captions of an
image), so a row is an image. ``n_samples`` images are drawn with ``seed``.

Protocol ``per_layer``: every layer pair at once (``trials.similarity.
layer_similarity``, each layer's Gram matrix once); a pair is ranked by its
best layer pair, and the last layers' score is kept too. ``cka`` is scored
with ``eps=0``: freeze-align's ``linear_CKA``, i.e. ``trials.similarity.cka``
with ``eps=0``.

Protocol ``freeze_align`` (the paper's embeddings, one score per pair): each
candidate embeds the probe through a probe copy of itself
(:func:`probe_encoder`): a ``timm`` image encoder with ``pool: mean_all``
(the mean over ALL tokens, CLS included, of the last layer after the final
norm), an ``hf`` text encoder with ``pool: mean`` (masked mean: the
sentence-transformers pooling), whatever pool the candidate trains with;
a ``synthetic`` candidate as it is. Only the LAST layers are scored: the
image rows as they are, each caption L2-normalised (sentence-transformers'
``Normalize`` step) and then averaged over its image's captions WITHOUT
re-normalising, then ``metric`` (``cka``: without eps) on those raw rows. Matrices are cached under content keys beside the layer
similarity (a re-run computes nothing), and the ranking is written to the
run's ``encoder_pairs`` table (schema: ``orchestrator.schema.ENCODER_PAIRS_COLUMNS``).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from orchestrator.config import SpecError
from orchestrator.feature_store import FeatureStore
from orchestrator.features import run_encoder
from orchestrator.keys import content_key
from orchestrator.pair_rules import ROLES, EncoderPair, all_pairs
from orchestrator.results import ResultsStore
from orchestrator.similarity_stage import cached_array

# Part of the cache keys: change it whenever which probe rows are scored, or how, changes.
SAMPLING = "orchestrator.encoder_pairs.caption_means+sample_rows-v1"
_FIELDS = {"image": "images", "text": "texts"}
# freeze_align: the pool each encoder kind embeds the probe with (module docstring)
FREEZE_ALIGN_POOLS = {("image", "timm"): "mean_all", ("text", "hf"): "mean",
                      ("image", "synthetic"): None, ("text", "synthetic"): None}


@dataclass(frozen=True)
class ProbeFeatures:
    """Store keys of every candidate's probe features, and the probe's pairing."""

    keys: dict  # (role, candidate index) -> store key
    text_to_image: np.ndarray
    fingerprint: str  # the probe split's content key
    computed: int = 0  # entries computed now (the rest were cache hits)
    cached: int = 0


@dataclass(frozen=True)
class PairScore:
    """One encoder pair's score: ``score`` at layers ``best``, ``last_score`` at the last layers."""

    pair: EncoderPair
    key: str
    matrix: np.ndarray  # [Li, Lj], metric of every layer pair
    best: tuple[int, int]
    score: float
    last_score: float
    n_samples: int


@dataclass
class Selection:
    """The ranked pairs (best first) and what the probe extraction cost."""

    ranked: list[PairScore]
    probe: ProbeFeatures

    @property
    def ranking(self) -> list[EncoderPair]:
        return [s.pair for s in self.ranked]


def select_encoder_pairs(spec, store: FeatureStore, results: Optional[ResultsStore],
                         log=print, run=run_encoder) -> Selection:
    """Probe features of every candidate, every pair scored and ranked, the table written.
    ``run``: how one encoder fills the store (:func:`~orchestrator.features.run_encoder`:
    a Ray actor; tests pass a local one)."""
    settings = spec.encoder_selection
    probe = extract_probe(spec, str(store.root), log, run)
    scores = [score_pair(store, probe, pair, settings) for pair in all_pairs(spec.encoders)]
    # stable: a tie keeps the spec's order; a pair without a finite score ranks last
    ranked = sorted(scores, key=lambda s: -s.score if np.isfinite(s.score) else np.inf)
    if results is not None:
        write_selection(results, spec, probe, ranked)
    for rank, s in enumerate(ranked, 1):
        log(f"  #{rank} {s.pair.label}: {settings.metric} = {s.score:.4f} at image layer {s.best[0]}, "
            f"text layer {s.best[1]} (last layers {s.last_score:.4f}; {s.n_samples} probe rows)")
    return Selection(ranked, probe)


def extract_probe(spec, cache_root: str, log=print, run=run_encoder) -> ProbeFeatures:
    """Every candidate's features of the probe set, one encoder at a time (each once)."""
    ref, encoders = spec.encoder_selection.probe, spec.encoders
    keys, outputs = {}, {}
    for role in ROLES:
        for i, encoder in enumerate(encoders.candidates(role)):
            encoder = probe_encoder(encoder, role, spec.encoder_selection.protocol)
            (out,), _ = run(encoders.path(role, i), encoder, cache_root,
                            [(asdict(ref), [_FIELDS[role]])], log)
            keys[(role, i)], outputs[(role, i)] = out["keys"][_FIELDS[role]], out
            fresh = out["computed"][_FIELDS[role]]
            log(f"  probe {ref.name}/{ref.split}/{_FIELDS[role]} [{encoder.title}]: "
                + (f"computed in {out['seconds'][_FIELDS[role]]:.1f}s" if fresh else "cached"))
    computed = sum(o["computed"][_FIELDS[r]] for (r, _), o in outputs.items())
    text = outputs[("text", 0)]
    return ProbeFeatures(keys, np.asarray(text["text_to_image"]), text["fingerprint"],
                         computed, len(outputs) - computed)


def probe_encoder(encoder, role: str, protocol: str):
    """The encoder that embeds the probe: the candidate itself, or under ``freeze_align``
    a copy with the protocol's pool (module docstring)."""
    if protocol != "freeze_align":
        return encoder
    pool = FREEZE_ALIGN_POOLS[(role, encoder.name.partition(":")[0])]
    return encoder if pool is None else dataclasses.replace(encoder, pool=pool)


def check_probe_encoders(spec) -> None:
    """Before any Ray work: every probe copy can be built (the ``freeze_align`` image pool
    ``mean_all`` must be one this build's timm encoder knows)."""
    from orchestrator.encoders import EncoderOptionError, describe_encoder

    settings = spec.encoder_selection
    if settings is None or settings.protocol != "freeze_align":
        return
    for role in ROLES:
        for i, encoder in enumerate(spec.encoders.candidates(role)):
            probe = probe_encoder(encoder, role, settings.protocol)
            try:
                describe_encoder(probe.name, pool=probe.pool, options=probe.options)
            except EncoderOptionError as err:
                raise SpecError(f"protocol freeze_align embeds the probe with pool {probe.pool!r} "
                                f"({err}); this build cannot, so use protocol: per_layer",
                                path=f"encoders.{spec.encoders.path(role, i)}") from None


# --- scoring ---------------------------------------------------------------------------------

def probe_rows(text_to_image: np.ndarray, n_samples: int, seed: int) -> np.ndarray:
    """The images scored: ``min(n_samples, images with a caption)``, drawn with ``seed``."""
    from trials.selection import sample_rows

    images = np.unique(np.asarray(text_to_image))
    return images[sample_rows(len(images), n_samples, seed)]


def pair_key(probe: ProbeFeatures, pair: EncoderPair, settings) -> str:
    """What determines a pair's scores: both encoders' probe features, the rows, the metric."""
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("probe", "top")}
    return content_key([probe.keys[("image", pair.image)], probe.keys[("text", pair.text)],
                        fields, SAMPLING], 24)


def score_pair(store: FeatureStore, probe: ProbeFeatures, pair: EncoderPair, settings) -> PairScore:
    """The pair's all-layer-pairs matrix and its best and last scores (cached, see module doc)."""
    rows = probe_rows(probe.text_to_image, settings.n_samples, settings.seed)
    key = pair_key(probe, pair, settings)
    image, text = probe.keys[("image", pair.image)], probe.keys[("text", pair.text)]
    last_only = settings.protocol == "freeze_align"

    def compute() -> np.ndarray:  # features are read only when the matrix is not cached
        if last_only:
            x = _layers(store, image, rows, layers=[_last(store, image)])
            y = _layers(store, text, rows, probe.text_to_image, [_last(store, text)], normalise=True)
        else:
            x, y = _layers(store, image, rows), _layers(store, text, rows, probe.text_to_image)
        return _matrix(x, y, settings)

    matrix, _ = cached_array(store, key, compute)
    best = (_last(store, image), _last(store, text)) if last_only else best_layers(matrix)
    score = float(matrix[-1, -1] if last_only else matrix[best])
    return PairScore(pair, key, matrix, best, score, float(matrix[-1, -1]), len(rows))


def _last(store: FeatureStore, key: str) -> int:
    return store.manifest(key)["num_layers"] - 1


def best_layers(matrix: np.ndarray) -> tuple[int, int]:
    """The best-scoring layer pair. A layer whose features are constant on the probe (e.g. the
    CLS position of a text model's embedding output) scores NaN with CKA's eps = 0: skipped."""
    finite = np.where(np.isfinite(matrix), matrix, -np.inf)
    return tuple(int(v) for v in np.unravel_index(np.argmax(finite), matrix.shape))


def _layers(store: FeatureStore, key: str, rows: np.ndarray, text_to_image=None, layers=None,
            normalise: bool = False):
    """[L, len(rows), D] float32 features of ``rows`` at ``layers`` (default: all); texts: the
    mean of each image's captions, each caption first L2-normalised if ``normalise``."""
    import torch

    out = []
    for layer in range(store.manifest(key)["num_layers"]) if layers is None else layers:
        x = torch.from_numpy(np.array(store.layer(key, layer), dtype=np.float32))
        if text_to_image is not None:
            x = text_rows(x, text_to_image, normalise)
        out.append(x[torch.from_numpy(np.asarray(rows, dtype=np.int64))])
    return torch.stack(out)


def text_rows(texts, text_to_image: np.ndarray, normalise: bool = False):
    """[n_images, D] one text row per image: the mean of its captions, each caption first
    L2-normalised when ``normalise`` (sentence-transformers' ``Normalize``: ``F.normalize(p=2,
    dim=1)``); the mean itself is NOT re-normalised (freeze-align)."""
    import torch

    return caption_means(torch.nn.functional.normalize(texts, p=2, dim=1) if normalise else texts,
                         text_to_image)


def caption_means(texts, text_to_image: np.ndarray):
    """[n_images, D] mean caption feature per image (zeros for an image without captions)."""
    import torch

    index = torch.from_numpy(np.array(text_to_image, dtype=np.int64))  # a copy: Ray hands read-only arrays
    n_images = int(index.max()) + 1 if len(index) else 0
    sums = torch.zeros(n_images, texts.shape[1], dtype=texts.dtype).index_add_(0, index, texts)
    counts = torch.bincount(index, minlength=n_images).clamp(min=1).to(texts.dtype)
    return sums / counts[:, None]


def _matrix(x, y, settings) -> np.ndarray:
    """Every layer pair's score; CKA without eps (freeze-align's ``linear_CKA``)."""
    from trials.similarity import CKA_EPS, layer_similarity, selection_k

    k = selection_k(settings.metric, settings.k, x.shape[1])
    return layer_similarity(x, y, metric=settings.metric, k=k if k is not None else settings.k,
                            normalize=settings.normalize,
                            eps=0.0 if settings.metric == "cka" else CKA_EPS).double().numpy()


# --- the table ------------------------------------------------------------------------------

def selection_rows(spec, probe: ProbeFeatures, ranked: list[PairScore]) -> list[dict]:
    """The ``encoder_pairs`` rows of one ranking (columns: ENCODER_PAIRS_COLUMNS)."""
    settings, ref = spec.encoder_selection, spec.encoder_selection.probe
    selection_key = content_key([settings.protocol, [s.key for s in ranked]], 24)
    now = time.time()
    return [{"row_key": f"{selection_key}/{s.key}", "selection_key": selection_key, "pair_key": s.key,
             "image_encoder": s.pair.image_label, "text_encoder": s.pair.text_label,
             "image_name": spec.encoders.candidates("image")[s.pair.image].name,
             "text_name": spec.encoders.candidates("text")[s.pair.text].name,
             "protocol": settings.protocol, "metric": settings.metric,
             "image_layer": s.best[0], "text_layer": s.best[1], "score": s.score,
             "last_score": s.last_score, "rank": rank, "probe": f"{ref.dataset}/{ref.split} ({ref.name})",
             "probe_fingerprint": probe.fingerprint, "n_samples": s.n_samples,
             "normalize": settings.normalize, "written_at": now}
            for rank, s in enumerate(ranked, 1)]


def write_selection(results: ResultsStore, spec, probe: ProbeFeatures, ranked: list[PairScore]) -> None:
    """Store the ranking once: a re-run with the same scores adds no rows."""
    rows = selection_rows(spec, probe, ranked)
    stored = results.query("encoder_pairs", columns=["row_key"])
    have = set(stored["row_key"]) if "row_key" in stored else set()
    results.write("encoder_pairs", [r for r in rows if r["row_key"] not in have])
