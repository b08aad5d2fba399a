"""The pointwise log-likelihood behind PSIS-LOO is exact to float64, not float32 (issue 19).

A float32 network gives float32 logits; ``log_softmax`` in float32 rounds
``log p(y | x) = -log(1 + sum_{j != y} exp(x_j - x_y))`` to exactly 0 once the margin exceeds
~17 (``exp(-17) < eps_32 / 2``), so every draw of a confidently classified point had the same
value and the largest importance ratios ``-log p`` were all ties: ArviZ 1.3's PSIS raises
"All tail values are the same" (``az.loo`` / ``az.compare``), ArviZ 0.23 gives ``k = inf``.
Even float64 ``log_softmax`` (``-log(1 + t)`` with ``1 + t`` rounded) is exact 0 beyond a
margin of ~37; the library's ``-log1p(t)`` stays exact to ``t ~ 1e-308``.

Reference values: ``-log1p(sum_{j != y} exp(x_j - x_y))`` in float64 numpy from the same
float32 logits. A genuinely constant tail (several draws with identical likelihood, e.g. a
ReLU net whose hidden units are all off for a point) is not a precision artefact: our
``mcmc_loo`` reports ``k = inf`` there (ArviZ 0.23's ``psislw`` and R ``loo``) on both ArviZ
generations instead of raising.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.diagnostics.arviz_adapter import (
    ARVIZ_GENERATION,
    group,
    inference_data,
    psislw,
)
from bayes_spectral.diagnostics.loo import mcmc_loo, tied_tail_points
from bayes_spectral.diagnostics.traces import trace_draw
from bayes_spectral.distributions import GaussianSpectrum, PowerLawSpectrum

CHAINS, DRAWS = 2, 20  # 40 draws: PSIS tail of 8 under both ArviZ generations
#: margins of the confident point, one per draw: all round log p to 0 in float32; above ~37
#: float64 log_softmax rounds to 0 as well
MARGINS = np.linspace(18.0, 45.0, CHAINS * DRAWS).astype(np.float32)


def _linear_model(num_data: int) -> bs.BayesianNetwork:
    """``logits = W x`` (3 classes, 2 inputs, no bias), a Gaussian prior on ``W``."""
    net = nn.Sequential(nn.Linear(2, 3, bias=False))
    return bs.bayesian(net, {"0": GaussianSpectrum(1.0, (3, 2))}, num_data=num_data)


def _draws() -> torch.Tensor:
    """``W`` draws ``(chain, draw, 3, 2)``: column 0 gives point 0 (``x = e_0``, label 0) the
    logits ``(m_s, 0, 0)``; column 1 gives point 1 (``x = e_1``) random logits."""
    gen = torch.Generator().manual_seed(0)
    w = torch.zeros(CHAINS * DRAWS, 3, 2)
    w[:, 0, 0] = torch.from_numpy(MARGINS)
    w[:, :, 1] = torch.randn(CHAINS * DRAWS, 3, generator=gen)
    return w.reshape(CHAINS, DRAWS, 3, 2)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    return x, torch.tensor([0, 0, 1, 2])


def _reference(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``log p(y_i) = -log1p(sum_{j != y_i} exp(x_ij - x_iy))`` when ``y_i`` is the argmax,
    else ``x_iy - logsumexp_j x_ij``, float64 numpy."""
    x = logits.astype(np.float64)
    xy = x[np.arange(len(y)), y]
    others = np.exp(x - xy[:, None])
    others[np.arange(len(y)), y] = 0.0
    top = x.max(1)
    lse = top + np.log(np.exp(x - top[:, None]).sum(1))
    return np.where(xy >= top, -np.log1p(others.sum(1)), xy - lse)


@pytest.fixture(scope="module")
def constructed():
    """A NUTS-shaped result with the draws of :func:`_draws`, its container and data."""
    x, y = _data()
    model = _linear_model(len(y))
    site = model.prior_sites["0"]
    res = bs.FitResult(model=model, method="nuts", samples={site: _draws()})
    return res, bs.to_inference_data(res, (x, y)), (x, y)


def test_trace_draw_log_likelihood_is_float64_and_exact():
    x, y = _data()
    model = _linear_model(len(y))
    w = _draws()[0, -1]  # margin 45: float32 and float64 log_softmax both give exactly 0
    site = model.prior_sites["0"]
    loglik, _ = trace_draw(model, {site: w}, x, y)
    assert loglik.dtype == torch.float64
    ref = _reference((x @ w.T).numpy(), y.numpy())
    np.testing.assert_allclose(loglik.numpy(), ref, rtol=1e-12, atol=0)
    assert loglik[0] < 0  # -2 exp(-45) = -5.7e-20, not 0


def test_inference_data_log_likelihood_has_no_float32_ties(constructed):
    res, idata, (x, y) = constructed
    ll = group(idata, "log_likelihood")["y"].transpose("chain", "draw", "obs_id").values
    w = _draws().reshape(CHAINS * DRAWS, 3, 2)
    ref = np.stack([_reference((x @ wi.T).numpy(), y.numpy()) for wi in w])
    np.testing.assert_allclose(ll.reshape(CHAINS * DRAWS, -1), ref, rtol=1e-12, atol=0)
    # point 0: every draw distinct (today: all exactly 0.0 in float32)
    assert len(np.unique(ll[..., 0])) == CHAINS * DRAWS


def test_arviz_loo_and_mcmc_loo_give_finite_k_on_confident_points(constructed):
    """``az.loo`` (either generation) no longer raises or returns ``k = inf`` on the
    confident point; ``mcmc_loo`` agrees with it pointwise (same smoothing)."""
    _, idata, _ = constructed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ's "k > 0.7" warnings
        loo = az.loo(idata, pointwise=True)
        ours = mcmc_loo(idata)
    k = np.asarray(loo.pareto_k).ravel()
    assert np.all(np.isfinite(k)) and np.all(np.isfinite(ours.pareto_k))
    np.testing.assert_allclose(ours.pareto_k, k, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(ours.elpd_i, _elpd_i(loo), rtol=1e-8, atol=1e-12)
    # the confident point predicts almost perfectly: elpd_0 = -O(2 exp(-18))
    assert -1e-6 < ours.elpd_i[0] < 0


def test_genuinely_constant_tail_gives_k_inf_not_an_error():
    """Draws with identical likelihood for a point (not a rounding artefact): ``mcmc_loo``
    reports ``k = inf`` for it, as ArviZ 0.23's ``psislw``, and finite k elsewhere, under
    either ArviZ; its other points are unaffected."""
    rng = np.random.default_rng(1)
    ll = rng.normal(-1.0, 0.3, size=(CHAINS, DRAWS, 3))
    ll[:, :, 1] = np.where(rng.random((CHAINS, DRAWS)) < 0.5, -2.6040310859680176,
                           rng.uniform(-1.0, -0.1, (CHAINS, DRAWS)))  # the worst draws tie
    res = mcmc_loo(ll)
    assert math.isinf(res.pareto_k[1]) and res.pareto_k[1] > 0
    assert np.all(np.isfinite(res.pareto_k[[0, 2]])) and res.frac_good < 1
    assert np.isfinite(res.elpd)
    lw, k = psislw(-ll.reshape(-1, 3).T)
    np.testing.assert_array_equal(res.pareto_k, k)
    if ARVIZ_GENERATION == 0:  # the reference behaviour
        _, k_az = az.psislw(-ll.reshape(-1, 3).T)
        np.testing.assert_array_equal(k, k_az)
    idata = inference_data(
        posterior=_posterior_stub(), log_likelihood=_loglik_dataset(ll))
    if ARVIZ_GENERATION >= 1:  # arviz_stats' loo refuses it: ours is the way to read it
        with pytest.raises(ValueError, match="tail values are the same"):
            az.loo(idata)


def test_genuinely_constant_tail_through_to_inference_data():
    """Point 0's logits are ``(1, 0, 0)`` in its 10 worst draws (identical likelihood, a
    real tie) and margins 2..5 elsewhere: ``to_inference_data`` warns naming it,
    ``mcmc_loo`` gives it ``k = inf`` (the other points finite), ArviZ 0.2x's ``az.loo``
    agrees and ArviZ 1.x's raises."""
    x, y = _data()
    model = _linear_model(len(y))
    w = _draws().reshape(CHAINS * DRAWS, 3, 2).clone()
    w[:, 0, 0] = torch.linspace(2.0, 5.0, CHAINS * DRAWS)
    w[::4, 0, 0] = 1.0  # 10 draws, spread over both chains
    res = bs.FitResult(model=model, method="nuts",
                       samples={model.prior_sites["0"]: w.reshape(CHAINS, DRAWS, 3, 2)})
    with pytest.warns(UserWarning, match=r"1 points \(obs_id \[0\]\).*All tail values"):
        idata = bs.to_inference_data(res, (x, y))
    ll = group(idata, "log_likelihood")["y"].values.reshape(CHAINS * DRAWS, -1)
    assert np.sum(ll[:, 0] == ll[:, 0].min()) == 10
    np.testing.assert_array_equal(tied_tail_points(idata), [0])
    ours = mcmc_loo(idata)
    assert math.isinf(ours.pareto_k[0]) and np.all(np.isfinite(ours.pareto_k[1:]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if ARVIZ_GENERATION == 0:
            k = np.asarray(az.loo(idata, pointwise=True).pareto_k)
            np.testing.assert_allclose(ours.pareto_k, k, rtol=1e-6)
        else:
            with pytest.raises(ValueError, match="tail values are the same"):
                az.loo(idata)


def _elpd_i(loo) -> np.ndarray:
    """Pointwise ELPD of ``az.loo(..., pointwise=True)``: ``loo_i`` (0.2x), ``elpd_i`` (1.x)."""
    return np.asarray(loo.loo_i if ARVIZ_GENERATION == 0 else loo.elpd_i).ravel()


def _posterior_stub():
    import xarray as xr

    return xr.Dataset({"a": (("chain", "draw"), np.zeros((CHAINS, DRAWS)))})


def _loglik_dataset(ll: np.ndarray):
    import xarray as xr

    return xr.Dataset({"y": (("chain", "draw", "obs_id"), ll)})


@pytest.mark.slow
def test_readme_nuts_example_unseeded_init_that_failed_under_arviz_1_3():
    """The README's "Posterior spectra with ArviZ" power-law NUTS fit with the networks'
    initial weights seeded 12 instead of 0: its float32 log-likelihood was exactly 0.0 in
    every draw for 3 training points, so ``az.loo`` raised under ArviZ 1.3 (0.23: k = inf)."""
    split = bs.data.load_digits()
    torch.manual_seed(12)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    bn = bs.bayesian(net, {"0": PowerLawSpectrum(2.0, 0.5, (16, 64))},
                     num_data=len(split.x_train))
    res = bs.fit(bn, split, "nuts", progress=False, num_samples=20, warmup_steps=40,
                 num_chains=2, max_tree_depth=4)
    idata = bs.to_inference_data(res, (split.x_train, split.y_train))
    ll = group(idata, "log_likelihood")["y"].values
    assert ll.dtype == np.float64 and np.all(ll < 0)  # no point rounds to log p = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(idata, pointwise=True)
    assert np.all(np.isfinite(np.asarray(loo.pareto_k)))
    assert math.isfinite(float(_elpd_i(loo).sum()))
