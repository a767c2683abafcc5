"""Layer similarity of every (image layer, text layer) pair, per training subsample.

:class:`LayerSimilarity` is what layer rules resolve against (``plan_trials``,
``optuna_space``). ``similarity.selection`` says on which data:

* ``per_trial`` (default; the official order, METHOD.md §5.1, §6.1): every
  training subsample (n_train, seed) of a sweep gets its own matrix. Its rows
  are the trial's (``trials.trial.subsample``); the selection scores
  ``min(n_samples, N)`` of them, drawn from the subsample with the trial's seed
  (``trials.selection.selection_rows``), with k by its rule at that size
  (:func:`trials.similarity.selection_k`: rice gives 35 at 5,000 rows and 20
  at 1,000; an integer k is clipped to the sample). One call of
  ``layer_similarity`` scores every layer pair of one subsample.
* ``oracle`` (what earlier versions did, kept as a labelled comparison): one
  matrix on ``n_samples`` pairs of the FULL training split, drawn with
  ``similarity.seed``, shared by every trial.

Each matrix is cached under a content key (the feature keys, the metric
settings and, per trial, the scored rows themselves) beside the feature cache,
so sweeps share it and a re-run recomputes nothing; it is written once to the
run's ``layer_similarity`` table with its (selection, n_train, seed,
similarity_n, k_value): the report correlates each trial with its matching matrix.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from orchestrator.durable import atomic_save_npy
from orchestrator.feature_store import FeatureStore
from orchestrator.features import FeatureSet
from orchestrator.keys import content_key
from orchestrator.results import ResultsStore
from orchestrator.schema import ENCODER_COLUMNS, SELECTIONS, TRAIN_DATA
from trials.selection import sample_rows, selection_rows
from trials.similarity import METRICS, layer_similarity, selection_k, topk_from_rule
from trials.trial import subsample

# Part of the cache keys: change them whenever which rows are scored changes.
SAMPLING = "trials.selection.sample_rows-v1"  # the oracle's draw
PER_TRIAL_SAMPLING = "trials.trial.subsample+trials.selection.selection_rows-v1"


@dataclass(frozen=True)
class ScoredMatrix:
    """A [Li, Lj] similarity matrix and the data it was scored on.

    ``n_train``: training pairs its rows were drawn from (the subsample's N;
    oracle: the whole split). ``seed``: the seed of the subsample and of the
    draw (oracle: ``similarity.seed``), also the ``bins`` rule's random_state.
    ``similarity_n``: pairs scored. ``k_value``: the k of a kNN metric at that
    size, 0 for a metric without k.
    """

    matrix: np.ndarray
    key: str
    selection: str
    n_train: int
    seed: int
    similarity_n: int
    k_value: int = 0


def similarity_key(features: FeatureSet, settings) -> str:
    """The oracle matrix's cache key (unchanged since 0.1: ``selection`` is not part of it)."""
    fields = {k: v for k, v in dataclasses.asdict(settings).items() if k != "selection"}
    return content_key([features.train.image, features.train.text, fields, SAMPLING], 24)


def per_trial_key(features: FeatureSet, settings, rows: np.ndarray, k_value: int) -> str:
    """A per-trial matrix's cache key: exactly what determines it (rows, metric, k at that size)."""
    return content_key([features.train.image, features.train.text, PER_TRIAL_SAMPLING,
                        {"metric": settings.metric, "k": k_value, "normalize": settings.normalize},
                        np.asarray(rows).tolist()], 24)


def compute_similarity(store: FeatureStore, features: FeatureSet, settings,
                       rows: Optional[np.ndarray] = None, k=None) -> np.ndarray:
    """The [Li, Lj] similarity matrix of every layer pair on training pairs ``rows``.

    Default ``rows``: the oracle's official draw of ``settings.n_samples`` pairs of
    the whole split (METHOD §6.1, ``trials.selection.sample_rows``), in draw order:
    the kNN-based metrics are invariant to a common permutation. ``k``: default
    ``settings.k``.
    """
    pairs = features.train.text_to_image
    if rows is None:
        rows = sample_rows(len(pairs), settings.n_samples, settings.seed)
    rows = np.asarray(rows, dtype=np.int64)
    li, lj = features.num_layers

    def stack(key: str, n_layers: int, index: np.ndarray) -> torch.Tensor:
        return torch.stack([torch.from_numpy(np.asarray(store.layer(key, layer)[index]))
                            for layer in range(n_layers)])

    x = stack(features.train.image, li, pairs[rows])
    y = stack(features.train.text, lj, rows)
    return layer_similarity(x, y, metric=settings.metric, k=settings.k if k is None else k,
                            normalize=settings.normalize).double().numpy()


def cached_array(store: FeatureStore, key: str, compute) -> tuple[np.ndarray, bool]:
    """(matrix, whether it came from the cache); a concurrent sweep waits, then finds it."""
    cache = Path(store.root).parent / "similarity" / f"{key}.npy"
    with store.lock(f"similarity-{key}"):
        if cache.is_file():
            return np.load(cache, allow_pickle=False), True
        matrix = compute()
        atomic_save_npy(cache, matrix)
        return matrix, False


class FixedSimilarity:
    """One given [Li, Lj] matrix for every trial: an oracle of ``settings`` (tests, tools)."""

    selection = "oracle"

    def __init__(self, matrix, settings, n_total: Optional[int] = None):
        matrix = np.asarray(matrix, dtype=float)
        n = settings.n_samples if n_total is None else min(settings.n_samples, n_total)
        self.num_layers = matrix.shape
        self.scored = ScoredMatrix(matrix, "", "oracle", n_total or n, settings.seed, n)

    def for_trial(self, n_train, seed) -> ScoredMatrix:
        return self.scored

    def matching(self, n_train, seed) -> ScoredMatrix:
        return self.scored


class LayerSimilarity:
    """Similarity matrices by training subsample, computed or loaded once each.

    :meth:`for_trial` gives the matrix a trial's layer rule resolves against;
    :meth:`flush` writes the new ones to the run's ``layer_similarity`` table;
    ``computed``/``cached`` count matrices by where they came from. ``pair``:
    the :class:`~orchestrator.pair_rules.EncoderPair` whose features these are
    (its labels go into every row, so a multi-encoder run keeps them apart).
    """

    def __init__(self, store: FeatureStore, results: Optional[ResultsStore], features: FeatureSet,
                 settings, log=print, pair=None):
        if settings.selection not in SELECTIONS:
            raise ValueError(f"similarity.selection={settings.selection!r}; allowed: {SELECTIONS}")
        self.store, self.results, self.features, self.settings = store, results, features, settings
        self.log, self.selection, self.pair = log, settings.selection, pair
        self.n_total, self.num_layers = len(features.train.text_to_image), features.num_layers
        self.computed = self.cached = 0
        self._too_small: dict[tuple, str] = {}
        self._matrices: dict = {}  # (N, seed) or "oracle" -> ScoredMatrix
        self._unwritten: list[ScoredMatrix] = []

    def for_trial(self, n_train: Optional[int], seed: int) -> ScoredMatrix:
        """The matrix that chooses the layers of a trial on ``n_train`` pairs with ``seed``."""
        if self.selection == "oracle":
            return self.oracle()
        n = self.n_total if n_train is None else min(n_train, self.n_total)
        if (n, seed) not in self._matrices:
            try:
                self._matrices[(n, seed)] = self._score_subsample(n, seed)
            except ValueError as error:  # too few pairs: remembered, raised for every trial
                self._matrices[(n, seed)] = error
        found = self._matrices[(n, seed)]
        if isinstance(found, ValueError):
            raise ValueError(str(found))
        return found

    def matching(self, n_train: Optional[int], seed: int) -> Optional[ScoredMatrix]:
        """:meth:`for_trial`, or None (said once) where the subsample is too small to score:
        for a rule that needs no similarity, the matrix is only the report's."""
        try:
            return self.for_trial(n_train, seed)
        except ValueError as error:
            if (n_train, seed) not in self._too_small:
                self._too_small[(n_train, seed)] = str(error)
                self.log(f"  no similarity matrix for n_train={n_train}, seed={seed}: {error}")
            return None

    def oracle(self) -> ScoredMatrix:
        """The one matrix on ``n_samples`` pairs of the whole split (``similarity.seed``)."""
        if "oracle" not in self._matrices:
            key = similarity_key(self.features, self.settings)
            n = min(self.settings.n_samples, self.n_total)
            uses_k = METRICS.get(self.settings.metric).uses_k
            k_value = topk_from_rule(n, self.settings.k) if uses_k else 0  # as given, unclipped
            compute = lambda: compute_similarity(self.store, self.features, self.settings)  # noqa: E731
            self._matrices["oracle"] = self._record(key, compute, "oracle", self.n_total,
                                                    self.settings.seed, n, k_value)
        return self._matrices["oracle"]

    def _score_subsample(self, n: int, seed: int) -> ScoredMatrix:
        train_rows = subsample(self.n_total, n, seed).numpy()
        rows = selection_rows(train_rows, self.settings.n_samples, seed)
        try:
            k_value = selection_k(self.settings.metric, self.settings.k, len(rows))
        except ValueError as error:
            raise ValueError(f"layer selection on the {n} training pairs of seed {seed}: {error}; "
                             "train on more pairs, or set similarity.selection: oracle") from None
        if k_value is not None and k_value < topk_from_rule(len(rows), self.settings.k):
            self.log(f"  similarity k={self.settings.k} clipped to {k_value} on {len(rows)} pairs")
        key = per_trial_key(self.features, self.settings, rows, k_value or 0)
        compute = lambda: compute_similarity(self.store, self.features, self.settings,  # noqa: E731
                                             rows=rows, k=k_value)
        return self._record(key, compute, "per_trial", n, seed, len(rows), k_value or 0)

    def _record(self, key: str, compute, selection: str, n: int, seed: int, similarity_n: int,
                k_value: int) -> ScoredMatrix:
        matrix, hit = cached_array(self.store, key, compute)
        self.cached, self.computed = self.cached + hit, self.computed + (not hit)
        scored = ScoredMatrix(matrix, key, selection, n, seed, similarity_n, k_value)
        self._unwritten.append(scored)
        return scored

    def flush(self) -> None:
        """Write the matrices the run's ``layer_similarity`` table lacks, as one part file."""
        if self.results is None or not self._unwritten:
            return
        stored = self.results.query("layer_similarity")
        have = set(stored["similarity_key"]) if "similarity_key" in stored else set()
        rows = [row for m in self._unwritten if m.key not in have for row in self._rows(m)]
        self.results.write("layer_similarity", rows)
        self._unwritten = []

    def _rows(self, m: ScoredMatrix) -> list[dict]:
        s = self.settings
        encoders = {**dict(zip(ENCODER_COLUMNS, self.pair.labels)), TRAIN_DATA: self.pair.train.label} \
            if self.pair else {}
        return [{"row_key": f"{m.key}/{i}/{j}", **encoders, "similarity_key": m.key, "metric": s.metric,
                 "k": str(s.k), "k_value": m.k_value, "n_samples": s.n_samples,
                 "selection": m.selection, "n_train": m.n_train, "seed": m.seed,
                 "similarity_n": m.similarity_n, "image_layer": i, "text_layer": j,
                 "score": float(m.matrix[i, j])}
                for i in range(m.matrix.shape[0]) for j in range(m.matrix.shape[1])]

    def scored(self) -> list[ScoredMatrix]:
        """Every matrix prepared so far (oracle or per subsample), in order."""
        return [m for m in self._matrices.values() if isinstance(m, ScoredMatrix)]

    def summary(self) -> str:
        return (f"{self.computed + self.cached} {self.selection} similarity matrices: "
                f"{self.computed} computed, {self.cached} cached")


def similarity_stage(store: FeatureStore, results: ResultsStore, features: FeatureSet,
                     settings, log=print) -> np.ndarray:
    """The oracle matrix (whole split), cached and recorded in the run's results store."""
    settings = dataclasses.replace(settings, selection="oracle")
    stage = LayerSimilarity(store, results, features, settings, log)
    matrix = stage.oracle().matrix
    log(f"  layer similarity ({settings.metric}): {'cached' if stage.cached else 'computed'}")
    stage.flush()
    return matrix
