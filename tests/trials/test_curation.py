"""Concept-balanced curation (freeze-align §3.2): the algorithm on hand-made scores."""

import numpy as np
import pytest

from trials.curation import (
    CurationConfig,
    TopLists,
    curate,
    greedy_assign,
    load_prototypes,
    prototypes_from_embeddings,
    quantise_faithful,
    random_control,
    rechunk,
    top_lists,
)


def lists_from(scores, max):
    lists = TopLists(scores.shape[1], max)
    lists.update(np.arange(len(scores)), np.asarray(scores, dtype=np.float32))
    return lists


# Captions x concepts (A, B, C). Caption 0 is the top caption of both A and B.
HAND = np.array([[0.9, 0.8, 0.1],
                 [0.5, 0.1, 0.2],
                 [0.4, 0.7, 0.3],
                 [0.0, 0.0, 0.6]])


def test_hand_made_greedy_assignment_weakest_tail_picks_first():
    # max 2: tails (2nd best) A 0.5, B 0.7, C 0.3, so the order is C, A, B and
    # caption 0 goes to A, whose tail is weaker than B's.
    selection = greedy_assign(lists_from(HAND, max=2), per_concept=1)
    assert selection.order.tolist() == [2, 0, 1]
    assert selection.ids.tolist() == [3, 0, 2]
    assert selection.concepts.tolist() == [2, 0, 1]
    np.testing.assert_allclose(selection.scores, [0.6, 0.9, 0.7])
    assert selection.counts.tolist() == [1, 1, 1]


def test_hand_made_caption_follows_the_weaker_tail():
    scores = HAND.copy()
    scores[1, 0] = 0.75  # now A's tail (0.75) is stronger than B's (0.7): B picks before A
    selection = greedy_assign(lists_from(scores, max=2), per_concept=1)
    assert selection.order.tolist() == [2, 1, 0]
    assert dict(zip(selection.concepts.tolist(), selection.ids.tolist())) == {2: 3, 1: 0, 0: 1}


def test_concepts_take_up_to_per_concept_and_skip_taken_captions():
    selection = greedy_assign(lists_from(HAND, max=4), per_concept=2)
    # tails (4th best): A 0.0, B 0.0 (tie: by index), C 0.1
    assert selection.order.tolist() == [0, 1, 2]
    assert selection.ids.tolist() == [0, 1, 2, 3]  # B skips 0 and 1 (A's); C finds all taken
    assert selection.concepts.tolist() == [0, 0, 1, 1]
    assert selection.counts.tolist() == [2, 2, 0]


def pool(n=200, d=8, c=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)), rng.standard_normal((c, d))


def brute_force_lists(embeddings, prototypes, max):
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    p = prototypes / np.linalg.norm(prototypes, axis=1, keepdims=True)
    scores = (e @ p.T).astype(np.float32)
    ids = np.arange(len(e))
    return np.stack([ids[np.lexsort((ids, -scores[:, c]))][:max] for c in range(len(p))], axis=1)


def split_parts(emb, k):
    return list(zip(np.array_split(np.arange(len(emb)), k), np.array_split(emb, k)))


@pytest.mark.parametrize("faithful", [False, True])
def test_streaming_in_1_2_or_5_parts_gives_identical_lists(faithful):
    emb, protos = pool(d=64)  # cosines ~ N(0, 1/8^2): some faithful blocks clip, some do not
    config = CurationConfig(per_concept=10, max=30, faithful=faithful, batch=16)
    uneven = [(np.arange(0, 1), emb[:1]), (np.arange(1, 200), emb[1:])]
    streams = [split_parts(emb, 1), split_parts(emb, 2), split_parts(emb, 5), uneven]
    lists = [top_lists(parts, protos, config) for parts in streams]
    selections = [curate(parts, protos, config) for parts in streams]
    for other, selection in zip(lists[1:], selections[1:]):
        np.testing.assert_array_equal(other.ids, lists[0].ids)
        np.testing.assert_array_equal(other.scores, lists[0].scores)
        np.testing.assert_array_equal(selection.ids, selections[0].ids)
        np.testing.assert_array_equal(selection.concepts, selections[0].concepts)
    if faithful:
        blocks = set(np.unique(lists[0].ids) // 16)
        assert 0 < len(blocks) < 13  # some of the 13 blocks clipped: gone from every list
    else:
        np.testing.assert_array_equal(lists[0].ids, brute_force_lists(emb, protos, 30))


def test_rechunk_cuts_blocks_at_fixed_positions():
    parts = [(np.arange(0, 3), np.zeros((3, 1))), (np.arange(3, 4), np.zeros((1, 1))),
             (np.arange(4, 11), np.zeros((7, 1)))]
    assert [ids.tolist() for ids, _ in rechunk(parts, 4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]


# --- the faithful quirks ---------------------------------------------------------


def test_faithful_scale_and_int8_wrap_at_0_4():
    q = quantise_faithful(np.array([[-0.3, 0.0, 0.35, 0.4]]))
    # trunc((2 (s + 0.3) / 0.7 - 1) * 128): -128, -18, 109, and 128 wraps to -128
    assert q.dtype == np.int8 and q.tolist() == [[-128, -18, 109, -128]]


@pytest.mark.parametrize("outlier", [0.41, -0.31])
def test_faithful_batch_wide_clipping_poisons_the_whole_block(outlier):
    block = np.array([[0.1, 0.2], [0.3, outlier]])
    assert (quantise_faithful(block) == -128).all()  # not just the outlier: every score
    assert (quantise_faithful(block[:1]) != -128).all()  # without the outlier, all fine


def three_d(a, b):
    """A unit vector whose cosines with e1, e2 are a, b."""
    return [a, b, np.sqrt(1 - a * a - b * b)]


def test_faithful_outlier_drops_its_batch_file_from_every_list():
    protos = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    emb = np.array([three_d(0.3, 0.1), [1.0, 0, 0], three_d(0.2, 0.35), three_d(0.1, 0.2)])
    parts = [(np.arange(4), emb)]
    exact = top_lists(parts, protos, CurationConfig(max=4, batch=2))
    assert exact.ids[:, 0].tolist() == [1, 0, 2, 3]
    faithful = top_lists(parts, protos, CurationConfig(max=4, batch=2, faithful=True))
    # block {0, 1} holds the outlier (cosine 1 > 0.4): both captions score -1 for
    # EVERY concept, below all of block {2, 3}; equal scores go by id
    assert faithful.ids[:, 0].tolist() == [2, 3, 0, 1]
    assert faithful.ids[:, 1].tolist() == [2, 3, 0, 1]
    assert (faithful.scores[2:] == -1).all()


def test_faithful_candidates_are_max_minus_one():
    emb, protos = pool(c=3)
    selection = curate([(np.arange(len(emb)), emb)], protos,
                       CurationConfig(per_concept=5, max=3, faithful=True))
    assert selection.counts.max() <= 2  # the official [:max_amount - 1]
    exact = curate([(np.arange(len(emb)), emb)], protos, CurationConfig(per_concept=5, max=3))
    assert exact.counts.max() == 3


# --- invariants --------------------------------------------------------------------


def test_every_sample_at_most_once():
    rng = np.random.default_rng(1)
    centre = rng.standard_normal(8)  # concepts close together: their lists overlap
    protos = centre + 0.3 * rng.standard_normal((20, 8))
    emb = centre + rng.standard_normal((300, 8))
    selection = curate([(np.arange(300) * 7 + 5, emb)], protos, CurationConfig(per_concept=10, max=40))
    assert len(np.unique(selection.ids)) == len(selection.ids) == selection.counts.sum()
    assert selection.counts.max() <= 10 and set(selection.ids) <= set(np.arange(300) * 7 + 5)


def test_repeated_sample_ids_are_refused():
    emb, protos = pool(n=10, c=1)
    with pytest.raises(ValueError, match="unique"):
        curate([(np.zeros(10, dtype=int), emb)], protos, CurationConfig(per_concept=5, max=10))


def test_random_control_has_the_requested_size_and_is_seeded():
    ids = np.arange(100) + 1000
    a = random_control(ids, 30, seed=3)
    assert len(a) == len(np.unique(a)) == 30 and set(a) <= set(ids)
    np.testing.assert_array_equal(a, random_control(ids, 30, seed=3))
    assert not np.array_equal(a, random_control(ids, 30, seed=4))
    with pytest.raises(ValueError):
        random_control(ids, 101)


def test_config_rejects_bad_values():
    for bad in ({"per_concept": 0}, {"max": 1.5}, {"batch": True}, {"max": 1, "faithful": True},
                {"faithful": "false"}):
        with pytest.raises(ValueError):
            CurationConfig(**bad)


# --- prototypes --------------------------------------------------------------------


def test_prototypes_from_embeddings_average_normalised_rows():
    protos = prototypes_from_embeddings([np.array([[2.0, 0], [0, 5.0]]), np.array([[0, 3.0]])])
    np.testing.assert_allclose(protos, [[0.5, 0.5], [0, 1.0]])
    with pytest.raises(ValueError):
        prototypes_from_embeddings([np.zeros((0, 2))])


def test_load_prototypes_npz_and_npy_with_names(tmp_path):
    array = np.eye(3, 4, dtype=np.float32)
    np.savez(tmp_path / "p.npz", prototypes=array, names=np.array(["cat", "dog", "owl"]))
    loaded, names = load_prototypes(tmp_path / "p.npz")
    np.testing.assert_array_equal(loaded, array)
    assert names == ["cat", "dog", "owl"]
    np.save(tmp_path / "q.npy", array)
    assert load_prototypes(tmp_path / "q.npy")[1] == ["concept 0", "concept 1", "concept 2"]
    (tmp_path / "q.txt").write_text("a\nb\nc\n")
    assert load_prototypes(tmp_path / "q.npy")[1] == ["a", "b", "c"]
    with pytest.raises(ValueError, match="3 prototypes"):
        load_prototypes(tmp_path / "q.npy", names=["x"])
