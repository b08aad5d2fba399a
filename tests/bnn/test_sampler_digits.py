"""SGHMC at real size (issue 19, "Real-size behaviour"): the digits MLP 64-64-10 with the
spectral prior ``gaussian`` (registry: ``GaussianSpectrum(0.5)``, penalty measure, on both
weight matrices; biases without prior), 1438 training points, mini-batches of 256.

One MAP fit (20 epochs of Adam, lr 3e-3, batches of 64) and one SGHMC run from it:
``CHAINS = 4`` chains started at the MAP weights (chains 1-3 jittered 10 %), constant step
(no cycles) ``lr = 0.2`` (``eta = lr / N``), friction 0.05 (near critical damping of the
prior's directions: ``2 sqrt(eta) / 0.5 = 0.047``), ``EPOCHS = 500`` epochs of 6 steps per
chain, the first ``BURN_IN = 100`` discarded, every 8th step kept (300 draws per chain).
Targets (stated in the issue):

* R-hat < 1.05 for ``lambda_max`` and ``stable_rank`` of both layers (ArviZ rank-normalised
  split R-hat over the 4 chains) after these 500 epochs (3000 steps) per chain;
* PSIS-LOO Pareto k <= 0.7 on >= 95 % of the training points;
* held-out accuracy at least MAP's, within ``ACC_TOL = 0.01`` (3.6 of the 359 test digits:
  the two accuracies are single runs on one test set, and a CPU with other vector
  instructions changes 3000 sampler steps enough to move a digit or two).

Measured (2026-11-30, one core, 90-360 s on a loaded machine), after sampler results
record each draw's own biases (``res.free_draws``): R-hat 1.034 / 1.013 (``lambda_max``
fc1 / fc2), 1.016 / 1.027 (``stable_rank``); accuracy 0.9777 against MAP's 0.9638; Pareto
k <= 0.7 on 52.9 % of the training points (largest k 1.38). Before that fix (every chain's
draws evaluated with the last chain's biases) the same draws gave accuracy 0.9666 and a k
share of 0.9 %; with sampler seeds 1, 2, 10 the largest R-hat was 1.045, 1.041, 1.042. The
chains sit at ``lambda_max`` 63-65 (fc1) and 33-34 (fc2), close to the prior's own values
(``0.25 (8 + 8)^2 = 64``, ``0.25 (8 + 3.2)^2 = 31``): the data leave the spectra
prior-dominated.

The Pareto-k target is NOT reached and stays ``xfail(strict=True)``. The model has 4810
parameters for 1438 points (LOO's "flexible model" case, where high k is expected).
Earlier settings that reached 73 % (4 cycles of 40 epochs, 43 draws per chain, the
exploration halves without noise) did so because their draws had not left the MAP's
neighbourhood: their R-hat was 1.57-1.73 and ``lambda_max`` still climbing (fc1 42 -> 55
over the run). The ``spike_and_slab`` prior (slab 1) is wider still: fc1's ``lambda_max``
sits near its prior value 256. Only a cold posterior reached the share (``temperature=
0.1``: 99.2 %, accuracy 0.9582 < MAP, measured before the fix), and it is not the posterior
PSIS-LOO's weights ``1 / p(y_i | theta)`` assume. The sampler itself is checked
against NUTS in ``test_sampler_vs_nuts.py``.
"""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest
from torch import nn

import bayes_spectral as bs
from bayes_spectral.apps.nets import make_mlp
from bayes_spectral.diagnostics.arviz_adapter import posterior_of
from bayes_spectral.diagnostics.loo import mcmc_loo
from bayes_spectral.distributions import PRIORS

pytestmark = pytest.mark.slow

PRIOR = "gaussian"
CHAINS, EPOCHS, BURN_IN, THIN, LR, FRICTION, BATCH = 4, 500, 100, 8, 0.2, 0.05, 256
DRAWS = (EPOCHS - BURN_IN) * 6 // THIN  # 6 = ceil(1438 / 256) steps per epoch
RHAT_MAX, K_GOOD, K_SHARE = 1.05, 0.7, 0.95
ACC_TOL = 0.01


@pytest.fixture(scope="module")
def fitted():
    d = bs.data.load_digits()
    n = len(d.x_train)
    prior = {nn.Linear: PRIORS.get(PRIOR)}
    res_map = bs.fit(bs.bayesian(make_mlp(64, (64,), 10, 0), prior, num_data=n), d, "map",
                     epochs=20, batch_size=64, lr=3e-3, seed=0, progress=False)
    start = bs.bayesian(res_map.to_module(), prior, num_data=n)
    res = bs.fit(start, d, "sghmc", lr=LR, epochs=EPOCHS, batch_size=BATCH,
                 num_chains=CHAINS, friction=FRICTION, burn_in=BURN_IN, thin=THIN, seed=0,
                 progress=False)
    idata = bs.to_inference_data(res, (d.x_train, d.y_train))
    return {"d": d, "map": res_map, "res": res, "idata": idata}


def test_draws_have_the_stated_shape(fitted):
    w = fitted["res"].samples["net.fc1.weight"]
    assert w.shape[:2] == (CHAINS, DRAWS), w.shape
    post = posterior_of(fitted["idata"])
    assert post.sizes["chain"] == CHAINS and post.sizes["draw"] == DRAWS


def test_heldout_accuracy_at_least_map(fitted):
    d = fitted["d"]
    acc_map = fitted["map"].evaluate(d.x_test, d.y_test).accuracy
    acc = fitted["res"].evaluate(d.x_test, d.y_test).accuracy
    assert acc >= acc_map - ACC_TOL, (acc, acc_map)


def test_rhat_of_spectral_statistics(fitted):
    post = posterior_of(fitted["idata"])
    rhat = {(v, str(layer)): float(az.rhat(post[v].sel(layer=layer).values))
            for v in ("lambda_max", "stable_rank") for layer in post.layer.values}
    assert max(rhat.values()) < RHAT_MAX, rhat


@pytest.mark.xfail(strict=True, reason="not reached: Pareto k <= 0.7 on 52.9 % of the "
                   "training points, largest k 1.38 (see module docstring)")
def test_psis_loo_pareto_k(fitted):
    loo = mcmc_loo(fitted["idata"])
    assert loo.frac_good >= K_SHARE, (loo.frac_good, loo.khat_max)
    assert np.isfinite(loo.elpd)
