"""SGHMC's mini-batch gradient noise inflates its stationary spread as the samplers module
docstring states (issue 19: why the digits MLP's PSIS-LOO share depends on the batch size).

Bayesian linear regression (``N = 200`` points, 2 weights, Gaussian prior ``N(0, 1)``,
noise 0.5): the potential ``U(theta) = |theta|^2 / 2 + sum_i (x_i^T theta - y_i)^2 / (2
sigma^2)`` is quadratic, so :class:`~bayes_spectral.bnn.samplers.SGHMC` is a linear
recursion and its stationary covariance follows from a discrete Lyapunov equation with the
noise covariance ``2 a eta I + eta^2 E[Q(theta)]`` in the momentum, ``Q`` the covariance of
the batch gradient. Batches are drawn with replacement (``B`` i.i.d. indices per step), so the
gradient noise is white with ``Q(theta) = N^2 / B C(theta)``, ``C`` the (population)
covariance over ``i`` of ``g_i = x_i (x_i^T theta - y_i) / sigma^2``; ``E[Q]`` is taken over
the predicted stationary law (a fixed point, by Monte Carlo). With ``B = 40``, ``lr = 0.02``
(``eta = 1e-4``), friction 0.2 the gradient noise is about the injected noise (``r`` about 1):
the variances double. The check: every covariance entry of the chain within 4 MCSE (ArviZ
ESS) plus 3 % of the predicted matrix's scale; the full-batch chain (``Q = 0``) matches
its own Lyapunov prediction (the exact posterior up to the step-size bias) the same way, and
the mini-batch variances are at least 1.5 times the full-batch ones.
"""

from __future__ import annotations

import math

import arviz as az
import numpy as np
import pytest
import torch
from test_samplers import sghmc_stationary_cov  # a sibling test module (same folder)

from bayes_spectral.bnn import samplers

pytestmark = pytest.mark.slow

N, D, SIGMA, S0 = 200, 2, 0.5, 1.0
LR, FRICTION, BATCH, STEPS, BURN, CHAINS = 0.02, 0.2, 40, 10000, 500, 2


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -0.5], dtype=torch.float64) + SIGMA * torch.randn(
        N, generator=g, dtype=torch.float64)
    return x, y


X, Y = _data()
PREC = np.eye(D) / S0**2 + (X.T @ X).numpy() / SIGMA**2
MU = np.linalg.solve(PREC, (X.T @ Y).numpy() / SIGMA**2)


def _chain(batch: int, seed: int) -> np.ndarray:
    """``STEPS`` SGHMC steps from the posterior mean on the potential with a batch of
    ``batch`` i.i.d. indices (``batch = N``: the full data, no noise); the draws after
    ``BURN``."""
    torch.manual_seed(seed)
    theta = torch.nn.Parameter(torch.tensor(MU))
    opt = samplers.SGHMC([theta], lr=LR, num_data=N, friction=FRICTION)
    idx = torch.randint(0, N, (STEPS, batch)) if batch < N else None
    out = np.empty((STEPS, D))
    for k in range(STEPS):
        xb, yb = (X, Y) if idx is None else (X[idx[k]], Y[idx[k]])
        u = 0.5 * theta.pow(2).sum() / S0**2 + \
            (N / len(xb)) * 0.5 * (xb @ theta - yb).pow(2).sum() / SIGMA**2
        opt.zero_grad()
        u.backward()
        opt.step()
        out[k] = theta.detach().numpy()
    return out[BURN:]


def _lyapunov(noise_cov: np.ndarray) -> np.ndarray:
    """Stationary covariance of theta for ``v' = (1 - a) v - eta P theta + n``,
    ``theta' = theta + v'``, ``n ~ N(0, noise_cov)``."""
    return sghmc_stationary_cov(PREC, LR / N, FRICTION, noise_cov)


def _expected_q(cov: np.ndarray, batch: int, draws: int = 4000) -> np.ndarray:
    """``E[Q(theta)]`` over ``theta ~ N(MU, cov)`` (Monte Carlo, fixed seed)."""
    rng = np.random.default_rng(0)
    x, y = X.numpy(), Y.numpy()
    th = rng.multivariate_normal(MU, cov, size=draws)
    g = x[None] * ((th @ x.T) - y)[..., None] / SIGMA**2  # (draws, N, D)
    gc = g - g.mean(1, keepdims=True)
    c = np.einsum("sni,snj->ij", gc, gc) / (draws * N)
    return N**2 / batch * c


def _predicted(batch: int) -> np.ndarray:
    """The stationary covariance with the gradient noise (fixed point in ``E[Q]``)."""
    eta, base = LR / N, 2 * FRICTION * (LR / N) * np.eye(D)
    cov = _lyapunov(base)
    if batch >= N:
        return cov
    for _ in range(4):
        cov = _lyapunov(base + eta**2 * _expected_q(cov, batch))
    return cov


def _within(draws: list[np.ndarray], pred: np.ndarray) -> list[str]:
    """Entries of the chains' covariance farther than 4 MCSE + 3 % of the scale."""
    stack = np.stack(draws)  # (chains, draws, D)
    c = stack - stack.reshape(-1, D).mean(0)
    scale = math.sqrt(np.diag(pred).prod())
    bad = []
    for i in range(D):
        for j in range(D):
            z = c[..., i] * c[..., j]
            mcse = z.std() / math.sqrt(float(az.ess(z)))
            if abs(z.mean() - pred[i, j]) > 4 * mcse + 0.03 * scale:
                bad.append(f"cov[{i},{j}] {z.mean():.3e} vs predicted {pred[i, j]:.3e} "
                           f"(mcse {mcse:.1e})")
    return bad


def test_minibatch_noise_inflates_the_stationary_covariance_as_predicted():
    """Mini-batches of 40: the chain's covariance is the one with the gradient noise (about
    twice the posterior's), and full batches give the posterior's (up to the step bias)."""
    exact = np.linalg.inv(PREC)
    full, mini = _predicted(N), _predicted(BATCH)
    assert np.allclose(full, exact, rtol=0.05), (full, exact)  # small step-size bias
    ratio = np.diag(mini) / np.diag(full)
    assert np.all(ratio > 1.7), ratio  # the predicted inflation is large at these settings
    draws_mini = [_chain(BATCH, seed) for seed in range(CHAINS)]
    draws_full = [_chain(N, 10 + seed) for seed in range(CHAINS)]
    assert not _within(draws_mini, mini), _within(draws_mini, mini)
    assert not _within(draws_full, full), _within(draws_full, full)
    var_mini = np.stack(draws_mini).reshape(-1, D).var(0)
    var_full = np.stack(draws_full).reshape(-1, D).var(0)
    assert np.all(var_mini > 1.5 * var_full), (var_mini, var_full)
