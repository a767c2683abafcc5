"""Coverage counts of a subset (the report's rule): nearest prototype by cosine."""

import math

import numpy as np

from trials.curation import nearest_counts


def loop_nearest_counts(embeddings, prototypes):
    """Independent: plain-Python cosine, first maximum wins."""
    def cos(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    counts = [0] * len(prototypes)
    for e in embeddings.tolist():
        scores = [cos(e, p) for p in prototypes.tolist()]
        counts[scores.index(max(scores))] += 1
    return counts


def test_counts_match_a_plain_python_cosine():
    rng = np.random.default_rng(0)
    embeddings, prototypes = rng.standard_normal((300, 6)), rng.standard_normal((5, 6))
    got = nearest_counts(embeddings, prototypes)
    assert got.tolist() == loop_nearest_counts(embeddings, prototypes)
    assert got.sum() == 300


def test_scale_of_a_row_does_not_matter_and_empty_concepts_count_zero():
    prototypes = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    embeddings = np.array([[10.0, 1.0], [0.1, 0.01], [0.2, 3.0]])  # cosine, not dot product
    assert nearest_counts(embeddings, prototypes).tolist() == [2, 1, 0]
    assert nearest_counts(np.empty((0, 2)), prototypes).tolist() == [0, 0, 0]
