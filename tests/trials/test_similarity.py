"""trials.similarity against the official outputs (METHOD.md §15.3-6) and its own per-pair metrics."""

import pytest
import torch
import torch.nn.functional as F

from trials import similarity
from trials.similarity import (
    METRICS,
    cka,
    cknna,
    cycle_knn,
    layer_similarity,
    mutual_knn,
    topk_from_rule,
    unbiased_cka,
)

_DTYPES = {"float64": torch.float64, "float32": torch.float32}
KNN_TOL = 1e-6  # values are multiples of 1/(n k) computed in float32 by the official code


def _tensor(values, dtype_name):
    return torch.tensor(values, dtype=torch.float64).to(_DTYPES[dtype_name])


def _cka_tol(dtype_name):
    return 1e-9 if dtype_name == "float64" else 2e-5


# --- mutual / cycle kNN (§15.3) ---------------------------------------------------------------


def test_knn_metrics(mutual_knn_ref_case):
    case = mutual_knn_ref_case
    raw_x, raw_y = _tensor(case["X"], case["dtype"]), _tensor(case["Y"], case["dtype"])
    x, y = F.normalize(raw_x, dim=-1), F.normalize(raw_y, dim=-1)
    for topk, expected in case["results_by_topk"].items():
        k = int(topk)
        assert mutual_knn(x, y, k).item() == pytest.approx(expected["mutual_knn_platonic_normalized"], abs=KNN_TOL)
        assert mutual_knn(x, y, k).item() == pytest.approx(expected["mutual_knn_structure_normalized"], abs=KNN_TOL)
        assert cycle_knn(x, y, k).item() == pytest.approx(expected["cycle_knn_platonic_normalized"], abs=KNN_TOL)
        raw = expected["mutual_knn_platonic_raw_unnormalized"]
        assert mutual_knn(raw_x, raw_y, k).item() == pytest.approx(raw, abs=KNN_TOL)


# --- k rules (§15.4) --------------------------------------------------------------------------


def test_topk_rules(reference_vectors):
    table = reference_vectors["topk_rules"]["values"]
    assert table, "no stored topk rule values"
    for n, rules in table.items():
        for rule, expected in rules.items():
            assert topk_from_rule(int(n), rule) == expected, (n, rule)


def test_topk_spec_table_and_integers():
    assert [topk_from_rule(5000, r) for r in ("rice", "sqrt", "sturges")] == [35, 71, 14]
    assert topk_from_rule(64, "rice") == 8  # 64 ** (1/3) = 3.9999999999999996
    assert topk_from_rule(5000, 10) == 10 and topk_from_rule(5000, "50") == 50


@pytest.mark.parametrize("rule", ["scott", 0, -3, True, 2.5, None])
def test_topk_rejects_unknown_rules(rule):
    with pytest.raises(ValueError, match="allowed values"):
        topk_from_rule(100, rule)


# --- compute_score over layers, −1 = concatenation (§15.5) ------------------------------------


def _layer_major(values, dtype_name):
    """Stored features are (n, L, d) like the official code; ours are [L, n, d]."""
    return _tensor(values, dtype_name).permute(1, 0, 2)


def test_all_pairs_with_concatenation_match_compute_score(compute_score_layers_ref_case):
    """Every (i, j) score of the official ``compute_score``, i or j = −1 the concatenation,
    which ``include_concat`` puts last so that Python index −1 reads it."""
    case = compute_score_layers_ref_case
    x, y = _layer_major(case["x_feats"], case["dtype"]), _layer_major(case["y_feats"], case["dtype"])
    for run in case["runs"]:
        metric = run["metric"]
        tol = KNN_TOL if METRICS.get(metric).uses_k else _cka_tol(case["dtype"])
        if METRICS.get(metric).uses_k and run.get("topk_used_for_knn") is not None:
            assert topk_from_rule(case["n"], run["topk_param"]) == run["topk_used_for_knn"]
        scores = layer_similarity(x, y, metric, k=run.get("topk_param", 10), include_concat=True).tolist()
        expected = run["structure_alignment_list"]
        assert len(expected) == len(scores) * len(scores[0])
        for want in expected:
            i, j = want["indices"]
            assert scores[i][j] == pytest.approx(want["alignment_score"], abs=tol), (metric, want)


# --- CKA family (§15.6) -----------------------------------------------------------------------

_CKA_FUNCTIONS = {
    "cka_platonic": cka,
    "cka_structure": cka,
    "unbiased_cka_platonic": unbiased_cka,
    "unbiased_cka_structure": unbiased_cka,
    "cka_rbf_sigma1_platonic": lambda x, y: cka(x, y, kernel="rbf", sigma=1.0),
    "cknna_topk10_platonic": lambda x, y: cknna(x, y, 10),
    "linear_CKA_freeze_align": lambda x, y: cka(x, y, eps=0.0),
}


def test_cka_family(cka_ref_case):
    case = cka_ref_case
    x, y = _tensor(case["X"], case["dtype"]), _tensor(case["Y"], case["dtype"])
    if case["rows_l2_normalized_before_metric"]:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    checked = 0
    for key, expected in case["results"].items():
        if key in _CKA_FUNCTIONS:
            assert _CKA_FUNCTIONS[key](x, y).item() == pytest.approx(expected, abs=_cka_tol(case["dtype"])), key
            checked += 1
    assert checked >= 5


def test_cka_properties():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 5, generator=g, dtype=torch.float64)
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))[0]
    assert cka(x, 3 * x @ rotation, eps=0).item() == pytest.approx(1.0, abs=1e-12)
    assert unbiased_cka(x, x @ rotation).item() == pytest.approx(1.0, abs=1e-6)


# --- all pairs at once == the per-pair metrics --------------------------------------------------


def _random_layers(seed, n, dims):
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 4, generator=g, dtype=torch.float64)
    return [shared @ torch.randn(4, d, generator=g, dtype=torch.float64)
            + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64) for d in dims]


def _per_pair(xs, ys, metric, k, normalize, include_concat):
    """Independent reference: the per-pair function in a plain double loop."""
    if include_concat:
        xs, ys = xs + [torch.cat(xs, 1)], ys + [torch.cat(ys, 1)]
    if normalize:
        xs, ys = [F.normalize(t, dim=-1) for t in xs], [F.normalize(t, dim=-1) for t in ys]
    pair = METRICS.get(metric).pair
    args = (k,) if METRICS.get(metric).uses_k else ()
    return torch.tensor([[pair(x, y, *args).item() for y in ys] for x in xs], dtype=torch.float64)


@pytest.mark.parametrize("metric", METRICS.names())
@pytest.mark.parametrize("normalize, include_concat", [(True, False), (False, True)])
def test_all_pairs_equal_per_pair_loop(metric, normalize, include_concat):
    xs, ys = _random_layers(1, 40, [6, 9, 5]), _random_layers(2, 40, [7, 4, 8, 6])
    got = layer_similarity(xs, ys, metric=metric, k=5, normalize=normalize, include_concat=include_concat)
    want = _per_pair(xs, ys, metric, 5, normalize, include_concat)
    assert got.shape == want.shape == (3 + include_concat, 4 + include_concat)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_stacked_tensor_and_list_inputs_agree():
    xs, ys = _random_layers(3, 32, [6] * 3), _random_layers(4, 32, [5] * 2)
    stacked = layer_similarity(torch.stack(xs).float(), torch.stack(ys).float(), k="sqrt")
    listed = layer_similarity([t.float() for t in xs], [t.float() for t in ys], k=topk_from_rule(32, "sqrt"))
    assert stacked.dtype == torch.float64 and torch.equal(stacked, listed)


@pytest.mark.parametrize("metric, counted, calls", [("mutual_knn", "knn_indices", 7), ("cycle_knn", "knn_indices", 7),
                                                    ("cka", "_linear_kernel", 7), ("unbiased_cka", "_linear_kernel", 7),
                                                    ("cknna", "_cknna_mask", 7)])
def test_each_layer_is_processed_once(monkeypatch, metric, counted, calls):
    original, seen = getattr(similarity, counted), []
    monkeypatch.setattr(similarity, counted, lambda *a, **kw: seen.append(1) or original(*a, **kw))
    layer_similarity(_random_layers(5, 24, [4] * 3), _random_layers(6, 24, [3] * 4), metric=metric, k=3)
    assert len(seen) == calls  # 3 + 4 layers, not 3 × 4 pairs


# --- input validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(metric="svcca"), "unknown metric 'svcca'.*registered: cka, cknna, cycle_knn"),
        (dict(k=30), r"allowed values: an integer in \[1, 19\]"),
        (dict(metric="cknna", k=1), r"\[2, 19\]"),
        (dict(k="scott"), "allowed values"),
    ],
)
def test_layer_similarity_rejects_bad_options(kwargs, message):
    xs, ys = _random_layers(7, 20, [4, 4]), _random_layers(8, 20, [3, 3])
    with pytest.raises(ValueError, match=message):
        layer_similarity(xs, ys, **kwargs)


def test_layer_similarity_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same number of rows"):
        layer_similarity(torch.randn(2, 10, 4), torch.randn(2, 12, 4))
    with pytest.raises(ValueError, match=r"\[L, N, D\]"):
        layer_similarity(torch.randn(10, 4), torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="same number of rows N"):
        layer_similarity([torch.randn(10, 4), torch.randn(11, 4)], torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="same number of rows"):
        mutual_knn(torch.randn(10, 4), torch.randn(9, 4), 3)
    with pytest.raises(ValueError, match="at least 4 rows"):
        unbiased_cka(torch.randn(3, 4), torch.randn(3, 4))
