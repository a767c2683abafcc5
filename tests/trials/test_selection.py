"""trials.selection against the official trainer's pandas logic (METHOD.md §6.3) and the stored cases."""

import numpy as np
import pytest
import torch

from trials.selection import LayerRule, parse_rule, quantile_bins, sample_rows, select_layers
from trials.similarity import layer_similarity

pd = pytest.importorskip("pandas")


def _official(scores: np.ndarray, rule: str, n_bins=5, seed=0, k=None):
    """The official ``compute_layer_alignment`` after the −1 rows are dropped, in pandas.

    Independent oracle: follows the trainer code step by step (§6.3) and maps its
    (−1, −1) "last layer" entry to non-negative indices, dropping that duplicate.
    """
    li, lj = scores.shape
    df = pd.DataFrame({"indices": [(i, j) for i in range(li) for j in range(lj)],
                       "alignment_score": scores.ravel()})
    df["indices_x"], df["indices_y"] = df["indices"].str[0], df["indices"].str[1]
    df["quantile_bin"] = pd.qcut(df["alignment_score"], q=n_bins, labels=False, duplicates="drop")
    sampled = pd.concat([g.sample(n=1, random_state=seed) for _, g in df.groupby("quantile_bin")])
    sampled = sampled.reset_index(drop=True).sort_values(by="alignment_score", ascending=False)
    by_score = df.sort_values(by="alignment_score", ascending=False)
    sampled.iloc[0], sampled.iloc[-1] = by_score.iloc[0], by_score.iloc[-1]
    by_index = df.sort_values(by=["indices_x", "indices_y"], ascending=False)
    last = by_index.iloc[0].copy()
    last["indices"], last["indices_x"], last["indices_y"] = (-1, -1), -1, -1
    sampled.loc[len(sampled)] = last
    sampled = sampled.drop_duplicates(subset="indices")
    if rule == "similar":
        sampled = sampled.sort_values(by="alignment_score", ascending=False).iloc[:1]
    elif rule == "last":
        sampled = sampled[sampled["indices"] == (-1, -1)]
    elif rule == "last2":
        keep_x, keep_y = range(li - k, li), range(lj - k, lj)
        sampled = by_index[by_index["indices_x"].isin(keep_x) & by_index["indices_y"].isin(keep_y)]
    pairs = [(li - 1, lj - 1) if p == (-1, -1) else tuple(int(v) for v in p) for p in sampled["indices"]]
    return list(dict.fromkeys(pairs))


def _tie_free_scores(seed, shape):
    return np.random.default_rng(seed).permutation(shape[0] * shape[1]).reshape(shape) / 997.0 + 0.1


@pytest.mark.parametrize("rule", ["similar", "last", "bins", "last2"])
@pytest.mark.parametrize("shape", [(24, 25), (3, 4), (1, 6), (2, 2)])
def test_matches_official_pandas_logic(rule, shape):
    for seed in range(4):
        scores = _tie_free_scores(seed, shape)
        for n_bins in (1, 3, 5):
            spelled = f"bins{n_bins}" if rule == "bins" else rule
            got = select_layers(scores, spelled, n_bins=n_bins, seed=seed)
            assert got == _official(scores, rule, n_bins=n_bins, seed=seed, k=2), (seed, n_bins)


def test_bins_with_tied_scores_match_official():
    # kNN scores are multiples of 1/(n k): many ties inside bins and on bin edges,
    # but a unique maximum and minimum so that pandas' unstable sort cannot matter
    rng = np.random.default_rng(7)
    for seed in range(6):
        scores = rng.integers(3, 9, size=(6, 7)) / 10.0
        scores.flat[rng.integers(42)] = 1.0
        scores.flat[(np.argmax(scores) + 5) % 42] = 0.0
        assert select_layers(scores, "bins", seed=seed) == _official(scores, "bins", seed=seed)


def test_quantile_bins_equal_pandas_qcut():
    rng = np.random.default_rng(0)
    for size in (1, 2, 5, 6, 11, 20, 600):
        for values in (rng.normal(size=size), rng.integers(0, 4, size=size) / 8.0, np.arange(size) / 7.0):
            for q in (1, 2, 3, 5, 7):
                want = pd.qcut(values, q=q, labels=False, duplicates="drop")
                want = np.where(np.isnan(want), -1, want).astype(int)
                np.testing.assert_array_equal(quantile_bins(values, q), want)


def test_best_excludes_concat_like_the_trainer(compute_score_layers_ref_case):
    case = compute_score_layers_ref_case
    x = torch.tensor(case["x_feats"], dtype=torch.float64).to(getattr(torch, case["dtype"])).permute(1, 0, 2)
    y = torch.tensor(case["y_feats"], dtype=torch.float64).to(getattr(torch, case["dtype"])).permute(1, 0, 2)
    for run in case["runs"]:
        scores = layer_similarity(x, y, metric=run["metric"], k=run.get("topk_param", 10))
        assert select_layers(scores, "similar") == [tuple(run["trainer_best_excluding_concat"]["indices"])]
        if "platonic_best" in run:  # platonic-rep's compute_score never sees the concatenation
            assert select_layers(scores, "similar") == [tuple(run["platonic_best"]["indices"])]


def test_rules_on_a_small_matrix():
    scores = torch.tensor([[0.1, 0.5, 0.5], [0.2, 0.1, 0.3]])
    assert select_layers(scores) == [(0, 1)]  # ties: first in row-major order
    assert select_layers(scores, "last") == [(1, 2)]
    assert select_layers(scores, "last2") == [(1, 2), (1, 1), (0, 2), (0, 1)]
    assert select_layers(scores, "last9") == [(i, j) for i in (1, 0) for j in (2, 1, 0)]
    bins = select_layers(scores, "bins2", seed=3)
    assert bins[0] == (0, 1) and (1, 2) in bins and (1, 1) in bins  # max first, last pair, last min
    # all equal: one bin (pandas gives none and the code fails); its pick becomes the max, then the min
    assert select_layers(np.full((2, 3), 0.4), "bins") == [(1, 2)]
    # one bin: the code's "best" list is only {global min, last pair}
    assert select_layers(scores, "similar", n_bins=1) == [(1, 2)]


def test_selection_leaves_global_rngs_alone():
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    select_layers(_tie_free_scores(1, (5, 6)), "bins", seed=11)
    sample_rows(100, 10, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state()[1:2], np_state[1:2]))
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_sample_rows_matches_seeded_global_choice():
    saved = np.random.get_state()
    try:
        np.random.seed(42)
        want = np.random.choice(8000, 5000, replace=False)
    finally:
        np.random.set_state(saved)
    np.testing.assert_array_equal(sample_rows(8000, seed=42), want)
    assert sorted(sample_rows(30, seed=1)) == list(range(30))


@pytest.mark.parametrize(
    "scores, kwargs, message",
    [
        (np.ones((2, 2)), dict(rule="random"), "not a layer rule; expected all | last | similar"),
        (np.ones((2, 2)), dict(rule="last0"), "not a layer rule"),
        (np.ones((2, 2)), dict(rule=[1, 2, 3]), "not a layer rule"),
        (np.ones((2, 2)), dict(rule="similar", n_bins=0), "n_bins"),
        (np.ones((2, 2)), dict(rule=(2, 0)), "out of range"),
        (np.ones(4), dict(), r"\[Li, Lj\]"),
        (np.array([[0.1, np.nan]]), dict(), "finite"),
    ],
)
def test_rejects_bad_input(scores, kwargs, message):
    with pytest.raises(ValueError, match=message):
        select_layers(scores, **kwargs)


@pytest.mark.parametrize("spelling, kind, k, canonical", [
    ("similar", "similar", 0, "similar"), ("best", "similar", 0, "similar"),
    ("last", "last", 0, "last"), ("all", "all", 0, "all"), ("top3", "top", 3, "top3"),
    ("last2", "last_k", 2, "last2"), ("bins", "bins", 5, "bins"), ("bins3", "bins", 3, "bins3"),
])
def test_rule_spellings_parse_and_print_back(spelling, kind, k, canonical):
    rule = parse_rule(spelling)
    assert (rule.kind, rule.k, str(rule)) == (kind, k, canonical)
    assert parse_rule(str(rule)) == rule


def test_explicit_pairs_and_counts():
    assert parse_rule([3, 4]) == LayerRule("pair", pair=(3, 4)) == parse_rule((3, 4))
    assert str(parse_rule([3, -1])) == "[3, -1]"
    counts = {r: parse_rule(r).count((6, 7)) for r in ("all", "last", "similar", "top4",
                                                         "last2", "last9", "bins3")}
    assert counts == {"all": (42, True), "last": (1, True), "similar": (1, True),
                      "top4": (4, True), "last2": (4, True), "last9": (42, True),
                      "bins3": (4, False)}
    with pytest.raises(ValueError, match="layer counts"):
        parse_rule("all").count(None)


def test_resolve_every_rule_on_a_matrix():
    scores = np.array([[0.1, 0.5, 0.2], [0.9, 0.3, 0.4]])
    assert parse_rule("similar").resolve(scores) == [(1, 0)]
    assert parse_rule("last").resolve(scores) == [(1, 2)]
    assert parse_rule("top2").resolve(scores) == [(1, 0), (0, 1)]
    assert len(parse_rule("all").resolve(scores)) == 6
    assert parse_rule((-1, 0)).resolve(scores) == [(1, 0)]
    grid = np.arange(12, dtype=float).reshape(3, 4)
    assert parse_rule("last2").resolve(grid) == [(2, 3), (2, 2), (1, 3), (1, 2)]
    pairs = parse_rule("bins3").resolve(grid)
    assert pairs[0] == (2, 3) and (0, 0) in pairs and len(set(pairs)) == len(pairs)


def test_layer_rules_load_without_torch():
    import subprocess
    import sys

    code = "import sys, trials.selection; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
