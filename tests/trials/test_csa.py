"""trials.csa against the official CSA/MMDA outputs (METHOD.md §4.4, §11, §15.7)."""

import pytest
import torch
import torch.nn.functional as F

from trials.csa import fit_csa


def _f64(values):
    return torch.tensor(values, dtype=torch.float64)


def _similarity(zx, zy, weights=None):
    """Cosine of canonical coordinates (what STRUCTURE evaluates with); with ``weights``,
    MMDA's CSA score ``sum_k c_k x_k y_k`` of L2-normalised coordinates (§11)."""
    zx, zy = F.normalize(zx, dim=1), F.normalize(zy, dim=1)
    return (zx if weights is None else zx * weights.to(zx)) @ zy.T


def _mmda_corr_coeff(fit):
    """MMDA's ``corr_coeff = diag(Z1'Z2)/n``, which equals ``rho * n/(n-1)`` (§11)."""
    return fit.rho * fit.n_train / (fit.n_train - 1)


def _views(case, split):
    return _f64(case[f"{split}_view1"]), _f64(case[f"{split}_view2"])


def _fit(case):
    params = case.get("params")
    if params is None:
        return fit_csa(*_views(case, "train"), case["sim_dim"])
    assert params.get("batch_size") is None, "stored refined cases are full-batch"
    return fit_csa(*_views(case, "train"), case["sim_dim"], refine=True,
                   lambda_rs=params["lambda_rs"], lambda_cca=params["lambda_cca_coeff"],
                   levels=params["L"], tau=params["tau"], refine_epochs=params["refine_epochs"],
                   lr=params["lr"], batch_size=None)


def test_csa_matches_official(csa_ref_case):
    case = csa_ref_case
    fit = _fit(case)
    test_x, test_y = _views(case, "test")
    zx, zy = fit.transform_x(test_x), fit.transform_y(test_y)
    refined = "params" in case
    structure = case if refined else case["structure_NormalizedCCA"]
    tol = 1e-4 if refined else 1e-5  # the refinement is float32 Adam (§15.7)
    cos = _similarity(zx, zy)
    assert torch.allclose(cos, _f64(structure["test_cosine_similarity_matrix"]), rtol=0, atol=tol)
    assert torch.allclose(fit.structure_corr_coeff, _f64(structure["corr_coeff"]), rtol=0, atol=tol)
    if "test_paired_cosine" in structure:
        assert torch.allclose(cos.diag(), _f64(structure["test_paired_cosine"]), rtol=0, atol=tol)
    if refined:
        plain = fit_csa(*_views(case, "train"), case["sim_dim"])
        unrefined = _similarity(plain.transform_x(test_x), plain.transform_y(test_y))
        assert torch.allclose(unrefined, _f64(case["test_cosine_similarity_matrix_without_refinement"]),
                              rtol=0, atol=1e-5)
    mmda = case.get("mmda_original_CSA")
    if mmda is not None:
        assert torch.allclose(_mmda_corr_coeff(fit), _f64(mmda["corr_coeff"]), rtol=0, atol=1e-6)
        weighted = _similarity(zx, zy, _mmda_corr_coeff(fit))
        assert torch.allclose(weighted, _f64(mmda["test_weighted_corr_similarity_matrix"]), rtol=0, atol=1e-5)
        assert torch.allclose(weighted.diag(), _f64(mmda["test_paired_weighted_corr_sim"]), rtol=0, atol=1e-5)
        assert torch.allclose(cos, _f64(mmda["test_plain_cosine_similarity_matrix"]), rtol=0, atol=1e-5)


def _paired_views(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    x = z @ torch.randn(3, 9, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 9, generator=g, dtype=torch.float64)
    y = z @ torch.randn(3, 7, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, 7, generator=g, dtype=torch.float64) + 3
    return x, y


def test_csa_rho_is_the_textbook_correlation_of_the_canonical_variates():
    x, y = _paired_views()
    fit = fit_csa(x, y, 5)
    zx, zy = fit.transform_x(x), fit.transform_y(y)
    corr = torch.corrcoef(torch.cat([zx, zy], dim=1).T)[:5, 5:]
    assert torch.allclose(corr.diag().abs(), fit.rho, atol=1e-10)
    assert torch.allclose(corr - torch.diag(corr.diag()), torch.zeros(5, 5, dtype=torch.float64), atol=1e-10)
    assert torch.all(fit.rho[:-1] >= fit.rho[1:])


def test_csa_transforms_centre_project_and_keep_input_dtype():
    x, y = _paired_views()
    fit = fit_csa(x, y, 4)
    assert torch.allclose(fit.transform_x(x), (x - x.mean(0)) @ fit.weight_x)
    assert torch.allclose(fit.transform_y(y), (y - y.mean(0)) @ fit.weight_y)
    assert fit.transform_x(x.float()).dtype == torch.float32


def test_csa_dim_beyond_rank_is_rejected():
    x, y = _paired_views(n=5)
    with pytest.raises(ValueError, match="rank"):
        fit_csa(x, y, 6)


def test_csa_whiten_option_whitens_refined_projections():
    x, y = _paired_views(n=120)
    fit = fit_csa(x, y, 3, refine=True, refine_epochs=2, batch_size=None, whiten=True)
    z = fit.transform_x(x)
    cov = z.T @ z / len(z)
    assert torch.allclose(cov, torch.eye(3, dtype=torch.float64), atol=1e-4)
