"""SG-MCMC samplers in ``fit`` (issue 19): ``method="sgld"`` / ``"sghmc"``.

The statistical checks use Bayesian linear regression with a Gaussian prior and a Gaussian
likelihood of known noise, whose posterior is exact:
``Sigma = (I / s0^2 + X^T X / sigma^2)^-1``, ``mu = Sigma X^T y / sigma^2``. Full-batch
SGLD/SGHMC on this quadratic potential is a linear recursion ``z' = A z + b + noise``, so the
stationary covariance of the algorithm as specified is computed exactly (discrete Lyapunov
equation): its distance to the exact posterior is the step-size bias that the tolerance
states, on top of 4 Monte Carlo standard errors (from ArviZ's ESS).
"""

from __future__ import annotations

import importlib.util
import math
import os
import pathlib
import sys
import warnings

import arviz as az
import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import scipy.linalg
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn import samplers

SITE = "net.0.weight"


# ----------------------------------------------------------------------------- the model


def _blr_data(n=100, d=2, sigma=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.linspace(-1.0, 2.0, d)
    y = x @ w + sigma * torch.randn(n, generator=g)
    return x, y


def _blr(x, noise=0.5, s0=1.0):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(x.shape[1], 1, bias=False))
    prior = {nn.Linear: lambda s: dist.Normal(torch.zeros(s), s0).to_event(len(s))}
    return bs.bayesian(net, prior, likelihood="gaussian", noise=noise, num_data=x.shape[0],
                       output_fn=lambda o: o.squeeze(-1))


def _exact_posterior(x, y, sigma=0.5, s0=1.0):
    x, y = x.double().numpy(), y.double().numpy()
    prec = np.eye(x.shape[1]) / s0**2 + x.T @ x / sigma**2
    cov = np.linalg.inv(prec)
    return cov @ x.T @ y / sigma**2, cov, prec


def _stationary_cov(method, prec, eta, friction, temperature):
    """The exact stationary covariance of theta of full-batch SGLD / SGHMC (as specified in
    bayes_spectral.bnn.samplers) on U = (theta - mu)^T P (theta - mu) / 2."""
    d = prec.shape[0]
    eye = np.eye(d)
    if method == "sgld":
        a, q = eye - eta * prec, 2 * eta * temperature * eye
        return scipy.linalg.solve_discrete_lyapunov(a, q)
    return sghmc_stationary_cov(prec, eta, friction, 2 * friction * eta * temperature * eye)


def sghmc_stationary_cov(prec, eta, friction, noise_cov):
    """The stationary covariance of theta for SGHMC on the quadratic potential with
    precision ``prec``: ``v' = (1 - f) v - eta P theta + n``, ``theta' = theta + v'``,
    ``n ~ N(0, noise_cov)`` (also used by test_sampler_minibatch_noise.py)."""
    d = prec.shape[0]
    eye = np.eye(d)
    a = np.block([[eye - eta * prec, (1 - friction) * eye], [-eta * prec, (1 - friction) * eye]])
    q = np.kron(np.ones((2, 2)), noise_cov)
    return scipy.linalg.solve_discrete_lyapunov(a, q)[:d, :d]


def _draws(res):
    w = res.samples[SITE]  # (chains, draws, 1, d)
    return w.reshape(w.shape[0], w.shape[1], -1).double().numpy()


def _mcse(draws):
    """The MCSE of each coordinate's mean and of each covariance entry (the mean of
    ``c_i c_j``, ``c`` centred), from ArviZ's bulk ESS."""
    c = draws - draws.mean((0, 1))
    d = c.shape[-1]
    m = np.array([c[..., i].std() / math.sqrt(az.ess(c[..., i])) for i in range(d)])
    v = np.empty((d, d))
    for i in range(d):
        for j in range(d):
            z = c[..., i] * c[..., j]
            v[i, j] = z.std() / math.sqrt(az.ess(z))
    return m, v


def _check_against_exact(res, method, x, y, lr, friction):
    """Mean within 3 MCSE of the exact posterior mean; each covariance entry within 3 MCSE
    of the exact posterior's shifted by the step-size bias (the algorithm's exact stationary
    covariance). Returns the relative bias of the variances."""
    mu, cov, prec = _exact_posterior(x, y)
    draws = _draws(res)
    flat = draws.reshape(-1, draws.shape[-1])
    mean_hat, cov_hat = flat.mean(0), np.cov(flat.T)
    stat = _stationary_cov(method, prec, lr / x.shape[0], friction, 1.0)
    mcse_mean, mcse_cov = _mcse(draws)
    assert np.all(np.abs(mean_hat - mu) <= 3 * mcse_mean), (mean_hat, mu, mcse_mean)
    assert np.all(np.abs(cov_hat - stat) <= 3 * mcse_cov), (cov_hat, stat, cov, mcse_cov)
    return np.abs(np.diag(stat) - np.diag(cov)) / np.diag(cov)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.slow
@pytest.mark.parametrize("method,lr,friction", [("sgld", 0.03, 0.1), ("sghmc", 0.004, 0.1)])
def test_mean_and_covariance_match_exact_posterior(method, lr, friction):
    """The step-size bias of the variance is below 10% here (stated and accounted for);
    a noise scale off by sqrt(2) moves the variance by a factor 2: far outside."""
    x, y = _blr_data(d=4)
    bn = _blr(x)
    res = bs.fit(bn, (x, y), method, lr=lr, epochs=1100, burn_in=100, batch_size=100,
                 num_chains=2, friction=friction, seed=1, progress=False)
    assert res.method == method
    rel_bias = _check_against_exact(res, method, x, y, lr, friction)
    assert np.all(rel_bias < 0.1), rel_bias


@pytest.mark.parametrize("method", ["sgld", "map", "svi"])
def test_a_model_with_every_weight_latent_follows_the_fit_dtype(method):
    """Bayesian linear regression has no parameter left once its weight is latent (no bias,
    fixed noise): the chains' and guides' starting values must still follow ``fit``'s
    device/dtype (they stayed float32 on the CPU, and a ``device="cuda"`` sampler fit
    failed with "mat2 is on cpu" on the GPU)."""
    x, y = _blr_data(d=3)
    bn = _blr(x)
    assert not list(bn.parameters())
    res = bs.fit(bn, (x, y), method, lr=1e-3, epochs=2, batch_size=50, seed=0,
                 progress=False, dtype=torch.float64)
    assert bn.initial_values()[SITE].dtype == torch.float64
    draws = res.samples[SITE] if res.samples else pyro.param(
        next(k for k in pyro.get_param_store() if SITE in k))
    assert draws.dtype == torch.float64, draws.dtype


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,lr,friction", [("sgld", 0.03, 0.1), ("sghmc", 0.004, 0.1)])
def test_sampler_on_cuda_matches_exact_posterior(method, lr, friction):
    """The same check on the GPU (``device="cuda"``: the model, the data, the prior's
    tensors and the sampler's noise there; the draws come back to the host): a sampler
    that drew its noise on the wrong device or with the wrong scale fails it as on the CPU."""
    x, y = _blr_data(d=4)
    bn = _blr(x)
    res = bs.fit(bn, (x, y), method, lr=lr, epochs=1100, burn_in=100, batch_size=100,
                 num_chains=2, friction=friction, seed=1, progress=False, device="cuda")
    assert next(bn.parameters()).device.type == "cuda"
    rel_bias = _check_against_exact(res, method, x, y, lr, friction)
    assert np.all(rel_bias < 0.1), rel_bias


@pytest.mark.slow
def test_variance_scales_with_temperature():
    """At temperature T the stationary law is exp(-U/T): for a Gaussian posterior the
    covariance is T * Sigma (the step-size bias scales the same way: the ratio is exact).
    The trace over 8 directions: relative MCSE about 4%, tolerance 15%."""
    x, y = _blr_data(d=8)
    tr = {}
    for t in (0.5, 1.0, 2.0):
        bn = _blr(x)
        res = bs.fit(bn, (x, y), "sgld", lr=0.03, epochs=900, burn_in=100, batch_size=100,
                     num_chains=1, temperature=t, seed=2, progress=False)
        draws = _draws(res)
        tr[t] = draws.reshape(-1, draws.shape[-1]).var(0).sum()
    np.testing.assert_allclose(tr[0.5] / tr[1.0], 0.5, rtol=0.15)
    np.testing.assert_allclose(tr[2.0] / tr[1.0], 2.0, rtol=0.15)


@pytest.mark.slow
def test_learned_gaussian_noise_is_sampled():
    """Learned noise (LogNormal prior): the sampler's mean and sd of sigma and of w agree
    with the exact posterior computed on a (w, sigma) grid (N = 30, d = 1), within 3 Monte
    Carlo standard errors (plus 1 % of the mean / 5 % of the sd for the step-size bias)."""
    x, y = _blr_data(n=30, d=1, sigma=0.5, seed=3)
    prior = dist.LogNormal(torch.tensor(math.log(0.5)), torch.tensor(1.0))
    bn = _blr(x, noise=prior)
    res = bs.fit(bn, (x, y), "sgld", lr=0.05, epochs=1700, burn_in=100, batch_size=30,
                 num_chains=1, seed=4, progress=False)
    s = res.samples["noise"].double().numpy()
    w = res.samples[SITE].reshape(1, -1).double().numpy()
    assert s.shape == w.shape == (1, 1600)
    xx, yy = x[:, 0].double().numpy(), y.double().numpy()
    ols = (xx @ yy) / (xx @ xx)
    ws, ss = np.linspace(ols - 1.0, ols + 1.0, 801), np.linspace(0.15, 1.5, 1001)
    resid = yy[None, :, None] - ws[:, None, None] * xx[None, :, None]
    logp = (-0.5 * ws**2)[:, None] + (-len(yy) * np.log(ss))[None] \
        - 0.5 * (resid**2).sum(1) / ss[None] ** 2 \
        - np.log(ss)[None] - 0.5 * ((np.log(ss) - math.log(0.5)) ** 2)[None]
    p = np.exp(logp - logp.max())
    p /= p.sum()
    ms, mw = (p.sum(0) * ss).sum(), (p.sum(1) * ws).sum()
    sds = math.sqrt((p.sum(0) * (ss - ms) ** 2).sum())
    mcse_s = s.std() / math.sqrt(az.ess(s))
    mcse_w = w.std() / math.sqrt(az.ess(w))
    assert s.std() > 0.5 * sds  # the noise is sampled, not a point
    assert abs(s.mean() - ms) <= 3 * mcse_s + 0.01 * ms, (s.mean(), ms, mcse_s)
    assert abs(w.mean() - mw) <= 3 * mcse_w, (w.mean(), mw)
    # the sd's own Monte Carlo error (ESS about 50-110 here: a fixed 15 % bound failed at
    # other seeds, e.g. seed 3's ratio is 1.25 with MCSE 0.12 sd) plus 5 % step-size bias
    mcse_sd = float(az.mcse(s, method="sd"))
    assert abs(s.std() - sds) <= 3 * mcse_sd + 0.05 * sds, (s.std(), sds, mcse_sd)


def test_potential_includes_the_jacobian():
    """U(u) = -log p(w) - sum log N(y | x w, sigma) - log p_LogNormal(sigma) - log sigma
    with sigma = exp(u) (the log|det J| of exp): the sampler's per-step loss equals it
    (divided by N). Without the Jacobian term it is off by log(0.5) / 20 = -0.035."""
    x, y = _blr_data(n=20, d=2, seed=5)
    prior = dist.LogNormal(torch.tensor(math.log(0.5)), torch.tensor(1.0))
    bn = _blr(x, noise=prior)  # starts at the prior's median 0.5: log|det J| = log 0.5
    seen = []
    res = bs.fit(bn, (x, y), "sgld", lr=1e-12, epochs=1, burn_in=0, batch_size=20,
                 num_chains=1, seed=0, progress=False, init_jitter=0.0,
                 callbacks=[lambda info: seen.append(info["history"]["loss"][-1])])
    w = res.samples[SITE][0, 0].double()
    s = res.samples["noise"][0, 0].double()
    xd, yd = x.double(), y.double()
    u = (-dist.Normal(0.0, 1.0).log_prob(w).sum()
         - dist.Normal(xd @ w[0], s).log_prob(yd).sum()
         - dist.LogNormal(math.log(0.5), 1.0).log_prob(s) - torch.log(s))
    # the loss is of the step's starting point, the draw after it: lr 1e-12 moves nothing
    # but the noise sqrt(2 lr / N): below 1e-6
    assert seen[0] == pytest.approx(float(u) / 20, rel=1e-4, abs=1e-5)


# ----------------------------------------------------------------------------- counts, shapes


def _small(n=40, d=2):
    x, y = _blr_data(n=n, d=d)
    return _blr(x), (x, y)


def test_burn_in_thin_and_chain_counts():
    bn, data = _small()
    res = bs.fit(bn, data, "sghmc", lr=1e-3, epochs=12, batch_size=10, burn_in=5, thin=3,
                 num_chains=3, seed=0, progress=False)
    # 4 steps per epoch; draws from the 7 epochs after burn-in, every 3rd: floor(28 / 3)
    assert res.samples[SITE].shape == (3, 9, 1, 2)
    assert res.draw_steps == [20 + 3 * k for k in range(1, 10)]
    assert res.num_draws == 27
    assert len(res.history["loss"]) == 36 and res.history["chain"] == [0] * 12 + [1] * 12 + \
        [2] * 12
    chains = res.samples[SITE]
    assert not torch.equal(chains[0], chains[1])  # seeds seed + c, jittered starts


def test_cyclical_schedule_draws_only_in_sampling_phases():
    bn, data = _small()
    res = bs.fit(bn, data, "sgld", lr=1e-3, epochs=10, batch_size=10, cycles=4, explore=0.5,
                 num_chains=2, seed=0, progress=False)
    # K = 40 steps, 4 cycles of L = 10: step k (1-based) is in cycle position (k-1) % 10,
    # sampling when (k-1) % 10 >= 5: 5 per cycle
    want = [k for k in range(1, 41) if (k - 1) % 10 >= 5]
    assert res.draw_steps == want
    assert res.samples[SITE].shape == (2, 20, 1, 2)
    sched = [samplers.cyclical_lr(1.0, k, 40, 4) for k in range(40)]
    assert sched[0] == 1.0 and sched[10] == 1.0
    assert sched[5] == pytest.approx(0.5) and sched[9] == pytest.approx(
        0.5 * (math.cos(math.pi * 0.9) + 1))


def test_exploration_steps_have_no_noise(monkeypatch):
    calls = []
    orig = samplers.SGLD.noise_std

    def spy(self, eta, group):
        calls.append(eta)
        return orig(self, eta, group)

    monkeypatch.setattr(samplers.SGLD, "noise_std", spy)
    bn, data = _small()
    bs.fit(bn, data, "sgld", lr=1e-3, epochs=10, batch_size=10, cycles=4, explore=0.5,
           num_chains=1, seed=0, progress=False)
    # one latent parameter, 20 sampling steps: the noise is drawn only there
    assert len(calls) == 20


def test_inference_data_has_chain_and_draw_and_rhat():
    _, data = _small(d=3)
    bn2 = bs.bayesian(nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(),
                                    nn.Linear(4, 1, bias=False)),
                      {nn.Linear: lambda s: dist.Normal(torch.zeros(s), 1.0).to_event(2)},
                      likelihood="gaussian", noise=0.5, num_data=40,
                      output_fn=lambda o: o.squeeze(-1))
    res = bs.fit(bn2, data, "sghmc", lr=1e-3, epochs=30, batch_size=20, burn_in=10,
                 num_chains=2, seed=0, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = bs.to_inference_data(res, data)
    from bayes_spectral.diagnostics.arviz_adapter import group, posterior_of

    post = posterior_of(idata)
    # 2 batches per epoch, 20 epochs after burn-in: 40 draws per chain
    assert dict(post.sizes)["chain"] == 2 and dict(post.sizes)["draw"] == 40
    ll = group(idata, "log_likelihood")
    assert dict(ll.sizes)["chain"] == 2 and dict(ll.sizes)["draw"] == 40
    summ = az.summary(idata, var_names=["lambda_max"])
    assert np.isfinite(summ["r_hat"].to_numpy()).all()
    probs = res.predict(data[0][:5])
    assert tuple(probs.loc.shape[:2]) == (80, 5)  # every draw of both chains


@pytest.mark.parametrize("free", ["drift", "fixed"])
def test_parameters_without_prior_drift_or_stay_fixed(free):
    """A bias has no prior: not in the draws; it moves by the drift (no noise), or stays at
    its start with free_params="fixed" (as NUTS keeps it)."""
    x, y = _blr_data(n=40, d=2)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 1))
    start = net[0].bias.detach().clone()
    bn = bs.bayesian(net, {nn.Linear: lambda s: dist.Normal(torch.zeros(s), 1.0).to_event(2)},
                     likelihood="gaussian", noise=0.5, num_data=40,
                     output_fn=lambda o: o.squeeze(-1))
    res = bs.fit(bn, (x, y), "sghmc", lr=1e-2, epochs=4, batch_size=10, burn_in=1,
                 num_chains=1, free_params=free, progress=False)
    assert list(res.samples) == [SITE]
    bias = res.to_module()[0].bias.detach()
    assert torch.equal(bias, start) == (free == "fixed"), (bias, start)
    with pytest.raises(ValueError, match="free_params"):
        bs.fit(bn, (x, y), "sghmc", epochs=4, free_params="sampled", progress=False)


# ----------------------------------------------------------------------------- files


def _interrupting(after: int):
    count = {"n": 0}

    class Interrupt(Exception):
        pass

    def cb(info):
        count["n"] += 1
        if count["n"] == after:
            raise Interrupt

    return cb, Interrupt


@pytest.mark.parametrize("after", [2, 5])  # inside chain 0; inside chain 1
def test_resume_equals_uninterrupted_run(tmp_path, after):
    kw = dict(lr=1e-3, epochs=4, batch_size=10, burn_in=1, num_chains=2, seed=3,
              progress=False, precondition=True)
    bn, data = _small()
    full = bs.fit(bn, data, "sghmc", checkpoint_dir=tmp_path / "a", **kw)
    cb, Interrupt = _interrupting(after)
    bn, data = _small()
    with pytest.raises(Interrupt):
        bs.fit(bn, data, "sghmc", checkpoint_dir=tmp_path / "b", callbacks=[cb], **kw)
    bn, data = _small()
    resumed = bs.fit(bn, data, "sghmc", checkpoint_dir=tmp_path / "b", **kw)
    assert resumed.history == full.history
    assert resumed.draw_steps == full.draw_steps
    for k in full.samples:
        assert torch.equal(resumed.samples[k], full.samples[k]), k
    for k, v in full.params().items():
        assert torch.equal(resumed.params()[k], v), k


def test_resume_with_other_temperature_is_refused(tmp_path):
    kw = dict(lr=1e-3, epochs=2, batch_size=10, burn_in=0, num_chains=1, seed=0,
              progress=False, checkpoint_dir=tmp_path)
    bn, data = _small()
    bs.fit(bn, data, "sgld", **kw)
    bn, data = _small()
    with pytest.raises(ValueError, match="temperature"):
        bs.fit(bn, data, "sgld", temperature=0.5, **kw)
    with pytest.raises(ValueError, match="thin"):
        bs.fit(bn, data, "sgld", thin=2, **kw)


def test_draws_dir_streams_chunks_and_equals_in_memory(tmp_path):
    kw = dict(lr=1e-3, epochs=6, batch_size=10, burn_in=1, num_chains=2, seed=0,
              progress=False, draw_chunk=7)
    bn, data = _small()
    mem = bs.fit(bn, data, "sghmc", **kw)
    bn, data = _small()
    disk = bs.fit(bn, data, "sghmc", draws_dir=tmp_path / "draws", **kw)
    files = sorted(os.listdir(tmp_path / "draws"))
    # 20 draws per chain in chunks of 7: 3 files per chain
    assert len([f for f in files if f.endswith(".safetensors")]) == 6, files
    assert not [f for f in files if f.endswith(".tmp")]
    for k in mem.samples:
        assert torch.equal(mem.samples[k], disk.samples[k]), k


@pytest.mark.parametrize("kw,match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"friction": 0.0}, "friction"), ({"friction": 1.5}, "friction"),
    ({"thin": 0}, "thin"), ({"burn_in": 4}, "burn_in"), ({"cycles": 17}, "cycles"),
    ({"cycles": 2, "explore": 1.0}, "explore"), ({"cycles": 2, "explore": -0.1}, "explore"),
    ({"lr": -1.0}, "lr"), ({"guide": "normal"}, "guide"), ({"patience": 2}, "patience"),
])
def test_bad_settings(kw, match):
    bn, data = _small()
    base = dict(lr=1e-3, epochs=4, batch_size=10, burn_in=1, progress=False)
    base.update(kw)
    if "patience" in kw:
        base["val_data"] = data
    with pytest.raises(ValueError, match=match):
        bs.fit(bn, data, "sghmc", **base)


# ----------------------------------------------------------------------------- own models


def _own_models():
    path = pathlib.Path(__file__).resolve().parents[1] / "test_own_models.py"
    spec = importlib.util.spec_from_file_location("_own_models_for_samplers", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


OWN = _own_models()


@pytest.mark.parametrize("case", OWN.CASES, ids=OWN.IDS)
def test_short_sghmc_on_own_models(case):
    train, _ = case.data()
    train = (train[0][:128], train[1][:128])
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn = bs.bayesian(OWN._model(case), case.priors, likelihood=case.likelihood,
                         noise=case.noise)
        res = bs.fit(bn, OWN._loader(train), "sghmc", lr=1e-3, epochs=2, burn_in=1,
                     num_chains=2, progress=False)
    for site in bn.latent_sites:
        v = res.samples[site]
        assert v.shape[:2] == (2, 2), (site, v.shape)  # 2 batches of 64 per epoch
        assert torch.isfinite(v).all(), site
    if case.noise != 1.0:
        assert (res.samples["noise"] > 0).all()


@pytest.mark.parametrize("kind", ["spectral", "tracked", "lazy"])
def test_short_sghmc_on_spectral_priors(kind):
    """The spectral parameterisation (positive singular values: sampled through the exp
    transform's Jacobian, U and V point-estimated), a tracked Frechet prior and lazy priors
    (prior_every=2) run through the sampler with finite draws of the right shape."""
    from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum

    split = bs.data.load_digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    if kind == "spectral":
        bn = bs.bayesian(net, {"0": lambda s: PowerLawSpectrum(2.0, 0.5, s)}, num_data=256,
                         spectral=True)
    elif kind == "tracked":
        bn = bs.bayesian(net, {nn.Linear: lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)},
                         num_data=256, tracked=True)
    else:
        bn = bs.bayesian(net, {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)},
                         num_data=256)
    res = bs.fit(bn, (split.x_train[:256], split.y_train[:256]), "sghmc", lr=1e-2, epochs=3,
                 batch_size=64, num_chains=2, progress=False,
                 prior_every=2 if kind == "lazy" else 1)
    assert sorted(res.samples) == sorted(bn.latent_sites)
    for site, v in res.samples.items():
        assert v.shape[:2] == (2, 8) and torch.isfinite(v).all(), site
        assert v.std(1).min() > 0, site  # the draws move
        if site.endswith("spectral_s"):
            assert (v > 0).all()


# ----------------------------------------------------------------------------- command line


def test_cli_fit_sghmc_with_temperature(tmp_path, capsys):
    import json

    from bayes_spectral import cli

    common = ["fit", "--prior", "gaussian", "--method", "sghmc", "--hidden", "8",
              "--batch-size", "256", "--lr", "0.01", "--chains", "2", "--epochs", "2"]
    assert cli.main([*common, "--temperature", "0.5", "--out", str(tmp_path / "a")]) == 0
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["method"] == "sghmc" and config["temperature"] == 0.5
    assert "test accuracy" in capsys.readouterr().out
    code = cli.main([*common, "--temperature", "0", "--out", str(tmp_path / "b")])
    assert code == cli.EXIT_USAGE
    assert "temperature must be a positive number" in capsys.readouterr().err
