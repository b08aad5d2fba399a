"""Hutchinson x Chebyshev spectral sums ``tr f(W^T W)`` against eigvalsh, scipy-free."""

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import chebyshev as C

from bayes_spectral.spectra.stochastic import (
    chebyshev_coefficients,
    rademacher,
    spectral_sum,
)


def _mat(m, n, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=g, dtype=dtype) / math.sqrt(max(m, n))


def _evals(W):
    G = W.mT @ W if W.shape[-2] >= W.shape[-1] else W @ W.mT
    return torch.linalg.eigh(G)


def _kink(lam):  # the power-law prior's tail function: alpha = 3, xmin = tau = 0.5
    return torch.where(lam >= 0.5, (lam - 0.5) / 0.5 - 3 * torch.log((lam / 0.5).clamp_min(1)),
                       0.0)


def _interp_sum(f, evals, b, d):
    """``sum_i p(lambda_i)``, ``p`` numpy's Chebyshev interpolant of ``f`` on ``[0, b]``."""
    coef = C.chebinterpolate(lambda x: f(torch.as_tensor((x + 1) * b / 2)).numpy(), d)
    return float(C.chebval(2 * evals.numpy() / b - 1, coef).sum())


@pytest.mark.parametrize("shape", [(30, 20), (20, 30), (25, 25)])
def test_exact_probes_give_the_interpolant_trace(shape):
    W = _mat(*shape)
    ev = _evals(W).eigenvalues
    b = float(ev.max()) * 1.1
    for f in (torch.exp, _kink):
        for d in (1, 6, 17):
            got = float(spectral_sum(W, f, b, d, "exact"))
            assert got == pytest.approx(_interp_sum(f, ev, b, d), rel=1e-10, abs=1e-10)


def test_smooth_function_converges_to_the_exact_sum():
    W = _mat(40, 30, seed=1)
    ev = _evals(W).eigenvalues
    want = float(torch.exp(-3 * ev).sum())
    got = float(spectral_sum(W, lambda x: torch.exp(-3 * x), float(ev.max()) * 1.05, 24, "exact"))
    assert abs(got - want) < 1e-10 * abs(want)


def test_kink_bias_shrinks_with_degree():
    """The documented interpolation bias near a kink falls with the degree: measured relative
    7e-2, 3e-3, 8e-5 at d = 8, 32, 128."""
    W = _mat(60, 40, seed=2) * 1.4
    ev = _evals(W).eigenvalues
    want = float(_kink(ev).sum())
    b = float(ev.max()) * 1.1
    errs = [abs(float(spectral_sum(W, _kink, b, d, "exact")) - want) for d in (8, 32, 128)]
    assert errs[2] < errs[0] / 5 and errs[2] < 1e-2 * abs(want), errs


def test_batched_stack_equals_per_matrix():
    Ws = torch.stack([_mat(12, 9, seed=s) for s in range(3)])
    b = torch.stack([_evals(W).eigenvalues.max() * 1.1 for W in Ws])
    got = spectral_sum(Ws, torch.exp, b, 9, "exact")
    want = torch.stack([spectral_sum(W, torch.exp, bb, 9, "exact")
                        for W, bb in zip(Ws, b, strict=True)])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.slow
def test_hutchinson_is_unbiased_with_the_stated_sd():
    """400 draws of 4 probes: mean within 3 standard errors of ``tr p(G)``; the sample sd
    within 15% of ``sqrt(2 (||B||_F^2 - sum B_ii^2) / p)``, ``B = p(G)``."""
    W = _mat(30, 24, seed=3) * 1.3
    ev, V = _evals(W)
    b, d, p = float(ev.max()) * 1.1, 12, 4
    exact = float(spectral_sum(W, _kink, b, d, "exact"))
    coef = C.chebinterpolate(lambda x: _kink(torch.as_tensor((x + 1) * b / 2)).numpy(), d)
    B = V @ torch.diag(torch.as_tensor(C.chebval(2 * ev.numpy() / b - 1, coef))) @ V.T
    sd = math.sqrt(2 * (float(B.square().sum()) - float(B.diagonal().square().sum())) / p)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([spectral_sum(W, _kink, b, d, p, generator=gen) for _ in range(400)])
    assert abs(float(draws.mean()) - exact) < 3 * sd / math.sqrt(400)
    assert float(draws.std()) == pytest.approx(sd, rel=0.15)


def _grad(fn, W):
    w = W.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(w), w)
    return g


def test_exact_probe_gradient_matches_finite_differences():
    W = _mat(14, 10, seed=4) * 1.5
    b = float(_evals(W).eigenvalues.max()) * 1.2
    fn = lambda w: spectral_sum(w, _kink, b, 20, "exact")  # noqa: E731
    g = _grad(fn, W)
    D = _mat(14, 10, seed=5)
    h = 1e-6
    fd = (float(fn(W + h * D)) - float(fn(W - h * D))) / (2 * h)
    assert float((g * D).sum()) == pytest.approx(fd, rel=1e-6)


def test_exact_probe_gradient_is_2_W_p_prime():
    """``d tr p(W^T W)/dW = 2 W p'(W^T W)`` with numpy's derivative of the interpolant."""
    W = _mat(16, 11, seed=6) * 1.5
    ev, V = _evals(W)
    b, d = float(ev.max()) * 1.1, 15
    coef = C.chebinterpolate(lambda x: _kink(torch.as_tensor((x + 1) * b / 2)).numpy(), d)
    dp = torch.as_tensor(C.chebval(2 * ev.numpy() / b - 1, C.chebder(coef)) * 2 / b)
    want = 2 * W @ (V @ torch.diag(dp) @ V.T)
    got = _grad(lambda w: spectral_sum(w, _kink, b, d, "exact"), W)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.slow
def test_stochastic_gradient_is_unbiased():
    """The mean of 300 four-probe gradients has cosine > 0.99 with the exact one (a single
    draw: ~0.5)."""
    W = _mat(20, 16, seed=7) * 1.5
    b = float(_evals(W).eigenvalues.max()) * 1.1
    exact = _grad(lambda w: spectral_sum(w, _kink, b, 12, "exact"), W).flatten()
    gen = torch.Generator().manual_seed(1)
    gs = torch.stack([_grad(lambda w: spectral_sum(w, _kink, b, 12, 4, generator=gen), W)
                      .flatten() for _ in range(300)])
    cos = torch.nn.functional.cosine_similarity
    assert float(cos(gs.mean(0), exact, dim=0)) > 0.99
    assert float(cos(gs[0], exact, dim=0)) < 0.9  # one draw is noisy (stated in the docs)


def test_float32_and_generator_device():
    W = _mat(20, 12, dtype=torch.float32)
    gen = torch.Generator(device=W.device).manual_seed(0)
    out = spectral_sum(W, torch.exp, 2.0, 8, 3, generator=gen)
    assert out.dtype == torch.float32 and out.shape == ()
    z = rademacher(5, 3, W, (2,), generator=gen)
    assert z.shape == (2, 5, 3) and set(z.unique().tolist()) <= {-1.0, 1.0}


def test_coefficients_with_tensor_bound_need_no_float():
    c = chebyshev_coefficients(torch.exp, 6, torch.tensor([1.0, 2.0], dtype=torch.float64),
                               jackson=True)
    assert c.shape == (2, 7)
    assert np.isfinite(c.numpy()).all()


@pytest.mark.parametrize("kw", [{"degree": 0}, {"probes": 0}, {"probes": "all"}])
def test_bad_settings_raise(kw):
    args = {"degree": 4, "probes": 2, **kw}
    with pytest.raises(ValueError, match="spectral_sum"):
        spectral_sum(_mat(5, 4), torch.exp, 2.0, **args)


def test_non_matrix_raises():
    with pytest.raises(TypeError, match="spectral_sum"):
        spectral_sum(torch.ones(4), torch.exp, 2.0)
