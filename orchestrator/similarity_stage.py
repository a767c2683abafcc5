"""Layer similarity of every (image layer, text layer) pair of a sweep.

Scored once on a seeded sample of the training pairs, cached under a content
key (feature keys + settings) in the feature cache, and written to the run's
``layer_similarity`` table.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from orchestrator.durable import atomic_save_npy
from orchestrator.feature_store import FeatureStore
from orchestrator.features import FeatureSet
from orchestrator.keys import content_key
from orchestrator.results import ResultsStore
from trials.selection import sample_rows
from trials.similarity import layer_similarity

# Part of the cache key: change it whenever which rows are scored changes.
SAMPLING = "trials.selection.sample_rows-v1"


def similarity_key(features: FeatureSet, settings) -> str:
    return content_key([features.train.image, features.train.text, dataclasses.asdict(settings),
                        SAMPLING], 24)


def compute_similarity(store: FeatureStore, features: FeatureSet, settings) -> np.ndarray:
    """The [Li, Lj] similarity matrix on ``settings.n_samples`` training pairs.

    The pairs are the official draw (METHOD §6.1, ``trials.selection.sample_rows``),
    in draw order: the kNN-based metrics are invariant to a common permutation.
    """
    pairs = features.train.text_to_image
    rows = np.asarray(sample_rows(len(pairs), settings.n_samples, settings.seed), dtype=np.int64)
    li, lj = features.num_layers

    def stack(key: str, n_layers: int, index: np.ndarray) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(store.layer(key, layer)[index]))
                            for layer in range(n_layers)])

    x = stack(features.train.image, li, pairs[rows])
    y = stack(features.train.text, lj, rows)
    return layer_similarity(x, y, metric=settings.metric, k=settings.k,
                            normalize=settings.normalize).double().numpy()


def similarity_stage(store: FeatureStore, results: ResultsStore, features: FeatureSet,
                     settings, log=print) -> np.ndarray:
    """Cached similarity matrix; recorded in the run's results store."""
    key = similarity_key(features, settings)
    cache = Path(store.root).parent / "similarity" / f"{key}.npy"
    with store.lock(f"similarity-{key}"):  # a concurrent sweep waits, then finds it cached
        if cache.is_file():
            matrix = np.load(cache, allow_pickle=False)
            log(f"  layer similarity ({settings.metric}): cached")
        else:
            matrix = compute_similarity(store, features, settings)
            atomic_save_npy(cache, matrix)
            log(f"  layer similarity ({settings.metric}): computed {matrix.shape[0]}x{matrix.shape[1]}")
    stored = results.query("layer_similarity")
    if stored.empty or key not in set(stored["similarity_key"]):
        results.write("layer_similarity", _rows(matrix, key, settings))
    return matrix


def _rows(matrix: np.ndarray, key: str, settings) -> list[dict]:
    return [{"row_key": f"{key}/{i}/{j}", "similarity_key": key, "metric": settings.metric,
             "k": str(settings.k), "n_samples": settings.n_samples, "image_layer": i,
             "text_layer": j, "score": float(matrix[i, j])}
            for i in range(matrix.shape[0]) for j in range(matrix.shape[1])]
