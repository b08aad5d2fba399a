"""Frechet draws in the far tails (small concentration), float32 and float64.

``Frechet.rsample`` is ``x = m + s * exp(-log(-log u) / a)`` computed in log space; a draw
whose quantile exceeds the dtype's largest finite number is returned as ``finfo.max``
(documented in :class:`~bayes_spectral.distributions.Frechet`). The law of the draws is
checked against ``scipy.stats.invweibull``: Kolmogorov-Smirnov on 20 000 draws with a fixed
seed, required p > 0.001; where some draws are clamped (float32, a = 0.05) the KS test is on
the unclamped draws against the law truncated at ``finfo.max`` and the clamped fraction is
checked against ``P(X > finfo.max)`` by a two-sided binomial test (p > 0.001).
"""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats as st
import torch

from bayes_spectral.distributions import Frechet

N = 20_000
P_MIN = 1e-3
CASES = [(a, dt) for a in (0.05, 0.5, 5.0) for dt in (torch.float32, torch.float64)]


def _draws(a: float, dtype: torch.dtype, scale: float = 1.0, loc: float = 0.0, seed: int = 0):
    d = Frechet(torch.tensor(a, dtype=dtype), torch.tensor(scale, dtype=dtype),
                torch.tensor(loc, dtype=dtype))
    torch.manual_seed(seed)
    return d.rsample((N,))


@pytest.mark.parametrize(("a", "dtype"), CASES, ids=lambda v: str(v))
def test_draws_follow_scipy_invweibull(a, dtype):
    x = _draws(a, dtype)
    assert x.dtype == dtype
    assert bool(torch.isfinite(x).all()), "no draw may be Inf/NaN"
    big = torch.finfo(dtype).max
    law = st.invweibull(c=a)
    xs = x.double().numpy()
    clamped = xs == np.float64(big)
    tail = law.sf(np.float64(big))  # P(X > finfo.max)
    if tail * N < 1e-3:  # no clamping expected: plain KS against scipy
        assert not clamped.any()
        assert st.kstest(xs, law.cdf).pvalue > P_MIN
        return
    k = int(clamped.sum())
    assert st.binomtest(k, N, tail).pvalue > P_MIN, (k, N * tail)
    f_big = law.cdf(np.float64(big))
    p = st.kstest(xs[~clamped], lambda v: law.cdf(v) / f_big).pvalue
    assert p > P_MIN


def test_float32_small_concentration_is_finite_and_clamps_only_beyond_max():
    """a = 0.05 in float32: the true quantile exceeds float32's max for u > F(max) ~ 0.988,
    so those draws (and only those) are ``finfo(float32).max``; no Inf/NaN, also for the
    gradients of the reparameterised draws."""
    a = torch.tensor(0.05, requires_grad=True)
    s = torch.tensor(1.0, requires_grad=True)
    torch.manual_seed(1)
    x = Frechet(a, s).rsample((N,))
    big = torch.finfo(torch.float32).max
    assert bool(torch.isfinite(x).all())
    assert float(x.detach().max()) == big
    frac = float((x == big).float().mean())
    assert abs(frac - st.invweibull(c=0.05).sf(big)) < 4 * np.sqrt(0.012 / N)
    # every unclamped draw is a finite float32 below max: the quantile there is in range
    assert bool((x[x < big] < big).all())
    x.log().sum().backward()
    assert bool(torch.isfinite(a.grad)) and bool(torch.isfinite(s.grad))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_icdf_matches_scipy_ppf_in_both_tails(dtype):
    """``icdf`` against ``invweibull.ppf`` (float64) of the same (dtype-rounded) ``u``:
    relative error below ``200 eps / a`` (``x ~ (-log u)^(-1/a)`` amplifies the rounding of
    ``log`` by ``1 / a``) wherever the quantile is a normal number of the dtype;
    ``finfo.max`` above it."""
    info = torch.finfo(dtype)
    u = np.array([1e-30, 1e-6, 0.01, 0.3, 0.5, 0.9, 0.99, 0.999999])
    for a in (0.05, 0.5, 5.0):
        d = Frechet(torch.tensor(a, dtype=dtype), torch.tensor(2.0, dtype=dtype))
        ut = torch.tensor(u, dtype=dtype)  # the quantiles of u as rounded to the dtype
        got = d.icdf(ut).double().numpy()
        want = st.invweibull(c=a, scale=2.0).ppf(ut.double().numpy())
        inside = (want < info.max) & (want > info.tiny)
        np.testing.assert_allclose(got[inside], want[inside], rtol=200 * info.eps / a)
        assert (got[want >= info.max] == info.max).all()
        assert np.isfinite(got).all()
