"""Tests of bayes_spectral.distributions (scalar Frechet + spectral priors on weights).

Tolerances: closed-form comparisons in float64 to 1e-6 (against scipy) or 1e-8 (identities);
statistical checks use fixed seeds and require p > 0.01.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import pytest
import scipy.stats as st
import torch
from pyro.distributions import TorchDistribution
from pyro.infer import MCMC, NUTS, TraceEnum_ELBO
from pyro.nn import PyroModule, PyroSample

import bayes_spectral as bs
from bayes_spectral.distributions import (
    Frechet,
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
    SpikeAndSlabSpectrum,
)
from bayes_spectral.spectra.laws import spliced_powerlaw_log_norm, spliced_powerlaw_log_pdf

F64 = torch.float64


def t(x):
    return torch.as_tensor(x, dtype=F64)


# --------------------------------------------------------------------------------------
# Scalar Frechet: one fixture table drives every comparison with scipy.stats.invweibull
# --------------------------------------------------------------------------------------

FRECHET_CASES = [
    # (concentration, scale, loc)
    (0.7, 1.0, 0.0),
    (1.5, 2.0, 0.0),
    (2.5, 0.5, 1.0),
    (4.0, 3.0, -2.0),
    (9.0, 1.3, 0.2),
]


@pytest.fixture(params=FRECHET_CASES, ids=lambda c: "a={}-s={}-m={}".format(*c))
def frechet_case(request):
    a, s, m = request.param
    return Frechet(t(a), t(s), t(m)), st.invweibull(c=a, loc=m, scale=s)


def test_frechet_log_prob_cdf_match_scipy(frechet_case):
    d, ref = frechet_case
    x = ref.ppf(np.linspace(0.001, 0.999, 41))
    np.testing.assert_allclose(d.log_prob(t(x)).numpy(), ref.logpdf(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(d.cdf(t(x)).numpy(), ref.cdf(x), rtol=1e-6, atol=1e-6)


def test_frechet_icdf_matches_scipy(frechet_case):
    d, ref = frechet_case
    u = np.linspace(0.001, 0.999, 41)
    np.testing.assert_allclose(d.icdf(t(u)).numpy(), ref.ppf(u), rtol=1e-6, atol=1e-6)


def test_frechet_moments_entropy_match_scipy(frechet_case):
    d, ref = frechet_case
    a = float(d.concentration)
    if a > 1:
        np.testing.assert_allclose(float(d.mean), ref.mean(), rtol=1e-6)
    else:
        assert math.isinf(float(d.mean))
    if a > 2:
        np.testing.assert_allclose(float(d.variance), ref.var(), rtol=1e-6)
    else:
        assert math.isinf(float(d.variance))
    np.testing.assert_allclose(float(d.entropy()), ref.entropy(), rtol=1e-6, atol=1e-6)


def test_frechet_samples_ks(frechet_case):
    d, ref = frechet_case
    torch.manual_seed(0)
    x = d.sample((20_000,)).numpy()
    assert st.kstest(x, ref.cdf).pvalue > 0.01


def test_frechet_rsample_gradient_and_support():
    a, s = t(3.0).requires_grad_(), t(2.0).requires_grad_()
    torch.manual_seed(1)
    x = Frechet(a, s).rsample((100,))
    x.mean().backward()
    assert torch.isfinite(a.grad) and torch.isfinite(s.grad) and float(s.grad) > 0
    d = Frechet(t(3.0), t(2.0), t(1.0), validate_args=False)
    assert float(d.log_prob(t(0.5)).exp()) == 0.0  # below loc: -inf without validation
    with pytest.raises(ValueError):
        Frechet(t(3.0), t(2.0), t(1.0), validate_args=True).log_prob(t(0.5))


# --------------------------------------------------------------------------------------
# Spectral priors: one named fixture table drives the generic tests below
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpectralPriorFixture:
    """One row of the spectral-prior table: a name (the test id), a factory
    ``(shape, measure) -> prior`` and the properties the generic tests rely on.

    :param kink_at_equal_top: the penalty is a ``max`` over eigenvalues (not differentiable
        where ``lambda_max`` is repeated), so there only finiteness of the gradient holds.
    :param closed_form_generative_gradient: the generative gradient has a closed form checked
        by its own test, instead of finite differences.
    """

    name: str
    make: Callable[[tuple[int, ...], str], TorchDistribution]
    kink_at_equal_top: bool = False
    closed_form_generative_gradient: bool = False

    def __call__(self, shape: tuple[int, ...], measure: str) -> TorchDistribution:
        return self.make(shape, measure)


SPECTRAL_PRIORS = [
    SpectralPriorFixture(
        "gaussian", lambda shape, m: GaussianSpectrum(t(1.3), shape, measure=m),
        closed_form_generative_gradient=True),
    SpectralPriorFixture(
        "powerlaw", lambda shape, m: PowerLawSpectrum(t(2.5), t(0.5), shape, xmin=t(1.5),
                                                      measure=m)),
    SpectralPriorFixture(
        "frechet_top", lambda shape, m: FrechetTopEigenvalue(t(3.0), t(2.0), t(0.7), shape,
                                                             measure=m),
        kink_at_equal_top=True),
    SpectralPriorFixture(
        "spike_and_slab", lambda shape, m: SpikeAndSlabSpectrum(t(0.3), t(0.1), t(1.0), shape,
                                                                measure=m)),
]


@pytest.fixture(params=SPECTRAL_PRIORS, ids=lambda f: f.name)
def spectral_prior(request) -> SpectralPriorFixture:
    return request.param


@pytest.fixture(params=[f for f in SPECTRAL_PRIORS if not f.closed_form_generative_gradient],
                ids=lambda f: f.name)
def spectral_prior_without_closed_form_gradient(request) -> SpectralPriorFixture:
    return request.param


# --------------------------------------------------------------------------------------
# The spliced power law: its tail is a Pareto law
# --------------------------------------------------------------------------------------


def test_spliced_tail_is_pareto():
    alpha, tau, xmin = 2.7, 0.8, 1.5
    lam = t(np.linspace(1.5, 40.0, 50))
    log_z = spliced_powerlaw_log_norm(t(alpha), t(xmin), t(tau))
    p_tail = math.exp(-xmin / tau) * xmin / (alpha - 1) / math.exp(float(log_z))
    cond = spliced_powerlaw_log_pdf(lam, alpha, xmin, tau) - math.log(p_tail)
    ref = st.pareto(b=alpha - 1, scale=xmin).logpdf(lam.numpy())
    np.testing.assert_allclose(cond.numpy(), ref, rtol=1e-10, atol=1e-10)

    torch.manual_seed(2)
    d = PowerLawSpectrum(t(alpha), t(tau), (50, 50), xmin=t(xmin))
    ev = d.sample_eigenvalues((400,)).reshape(-1).numpy()
    tail = ev[ev >= xmin]
    assert abs(len(tail) / len(ev) - p_tail) < 4 * math.sqrt(p_tail * (1 - p_tail) / len(ev))
    assert st.kstest(tail[:20_000], st.pareto(b=alpha - 1, scale=xmin).cdf).pvalue > 0.01
    bulk = ev[ev < xmin]
    trunc = st.truncexpon(b=xmin / tau, scale=tau)
    assert st.kstest(bulk[:20_000], trunc.cdf).pvalue > 0.01


# --------------------------------------------------------------------------------------
# GaussianSpectrum: the anchor of the framework (Jacobian + Haar volume)
# --------------------------------------------------------------------------------------

SHAPES = [(3, 5), (5, 3), (4, 4), (1, 6), (6, 1), (2, 3, 3)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_gaussian_spectrum_matches_normal(shape):
    torch.manual_seed(3)
    s = 0.7
    d = GaussianSpectrum(t(s), shape)
    normal = torch.distributions.Normal(t(0.0), t(s))
    w1, w2 = torch.randn(shape, dtype=F64), 2 * torch.randn(shape, dtype=F64)
    diff = d.log_prob(w1) - d.log_prob(w2)
    ref = normal.log_prob(w1).sum() - normal.log_prob(w2).sum()
    assert abs(float(diff - ref)) < 1e-8
    # absolute value through the framework: Wishart law of sigma - log J - log vol
    assert abs(float(d.framework_log_prob(w1) - normal.log_prob(w1).sum())) < 1e-8


def test_gaussian_spectrum_sample_is_gaussian():
    torch.manual_seed(4)
    w = GaussianSpectrum(t(1.5), (4, 6)).sample((3000,))
    assert w.shape == (3000, 4, 6)
    assert st.kstest(w[:, 1, 2].numpy(), st.norm(scale=1.5).cdf).pvalue > 0.01
    assert st.kstest(w[:, 3, 0].numpy(), st.norm(scale=1.5).cdf).pvalue > 0.01
    corr = torch.corrcoef(w.reshape(3000, -1).T)
    assert float((corr - torch.eye(24, dtype=F64)).abs().max()) < 0.1


def test_gaussian_penalty_is_weight_decay():
    torch.manual_seed(5)
    d = GaussianSpectrum(t(2.0), (3, 4), measure="penalty")
    w1, w2 = torch.randn(3, 4, dtype=F64), torch.randn(3, 4, dtype=F64)
    diff = d.log_prob(w1) - d.log_prob(w2)
    ref = -(w1.square().sum() - w2.square().sum()) / (2 * 4.0)
    assert abs(float(diff - ref)) < 1e-10


@pytest.mark.parametrize("shape", [(2, 2), (2, 3), (3, 3)], ids=str)
def test_generative_density_is_normalised(shape):
    """E_{W ~ p}[q(W)/p(W)] = 1 for a Gaussian q: sample() and log_prob agree, and the
    generative log_prob of a non-Gaussian law integrates to one (4 standard errors)."""
    torch.manual_seed(6)
    d = SpikeAndSlabSpectrum(t(0.5), t(0.4), t(1.2), shape, measure="generative")
    w = d.sample((200_000,))
    q = torch.distributions.Normal(t(0.0), t(1.0)).log_prob(w).sum((-1, -2))
    ratio = torch.exp(q - d.log_prob(w))
    se = float(ratio.std()) / math.sqrt(len(ratio))
    assert abs(float(ratio.mean()) - 1.0) < 4 * se + 1e-3


# --------------------------------------------------------------------------------------
# sample() of the non-Gaussian laws
# --------------------------------------------------------------------------------------


def test_frechet_top_eigenvalue_sample_ks():
    torch.manual_seed(7)
    a, s, m = 3.0, 4.0, 0.5
    d = FrechetTopEigenvalue(t(a), t(s), t(1.0), (6, 10), loc=t(m), measure="generative")
    w = d.sample((3000,))
    lam = torch.linalg.svdvals(w).square()
    assert bool((lam[:, 0] > lam[:, 1]).all())
    assert st.kstest(lam[:, 0].numpy(), st.invweibull(c=a, loc=m, scale=s).cdf).pvalue > 0.01
    # the others: exponential(mean 1) truncated below lambda_max; far below it, ~ Exp(1)
    rest = lam[:, 1:].reshape(-1).numpy()
    assert abs(rest.mean() - 1.0) < 0.05


def test_powerlaw_spectrum_sample_tail_exponent():
    """Tail exponent fitted to the ESD of sampled weights: |alpha_hat - alpha| < 0.2 at a
    fixed xmin (~840 tail eigenvalues, sd ~0.05) and < 0.35 with the KS-chosen xmin."""
    torch.manual_seed(8)
    alpha = 2.5
    d = PowerLawSpectrum(t(alpha), t(1.0), (100, 150), xmin=t(1.0), measure="generative")
    w = d.sample((30,))
    lam = torch.cat([bs.esd(wi) for wi in w])
    assert abs(float(bs.fit_powerlaw(lam, xmin=1.0).alpha) - alpha) < 0.2
    fit = bs.fit_powerlaw(lam[:1500])
    assert abs(float(fit.alpha) - alpha) < 0.35


# --------------------------------------------------------------------------------------
# NUTS on W targeting the generative log_prob reproduces sample(): the Jacobian is right
# --------------------------------------------------------------------------------------


def _nuts_vs_sample(d, num_samples, warmup, seed, depth):
    pyro.set_rng_seed(seed)
    kernel = NUTS(potential_fn=lambda p: -d.log_prob(p["W"]), max_tree_depth=depth)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup,
                initial_params={"W": d.sample()}, disable_progbar=True)
    mcmc.run()
    sv = torch.linalg.svdvals(mcmc.get_samples()["W"])
    ref = torch.linalg.svdvals(d.sample((4000,)))
    return [st.ks_2samp(sv[:, i].numpy(), ref[:, i].numpy()).pvalue for i in (0, -1)]


@pytest.mark.slow
def test_nuts_gaussian_spectrum():
    d = GaussianSpectrum(t(1.0), (3, 5))
    p_top, p_min = _nuts_vs_sample(d, 800, 300, seed=0, depth=6)
    assert p_top > 0.01 and p_min > 0.01


@pytest.mark.slow
def test_nuts_frechet_top_eigenvalue():
    d = FrechetTopEigenvalue(t(4.0), t(3.0), t(1.0), (3, 3), measure="generative")
    p_top, p_min = _nuts_vs_sample(d, 500, 200, seed=0, depth=5)
    assert p_top > 0.01 and p_min > 0.01


# --------------------------------------------------------------------------------------
# Gradients: finite at repeated singular values and equal to finite differences
# --------------------------------------------------------------------------------------


def _repeated_sv_weights():
    torch.manual_seed(9)
    q, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    orth = 1.2 * q[:3]  # 3 x 4, all singular values 1.2
    u, _ = torch.linalg.qr(torch.randn(3, 3, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(4, 3, dtype=F64))
    two_equal = u @ torch.diag(t([2.0, 0.9, 0.9])) @ v.T
    return [orth, two_equal]


def test_penalty_gradient_at_repeated_singular_values(spectral_prior):
    """Finite gradients at an orthogonal W and at W with two equal singular values, equal to
    finite differences. FrechetTopEigenvalue's penalty has a kink where lambda_max itself is
    repeated (a max), so there only finiteness is checked."""
    for k, w0 in enumerate(_repeated_sv_weights()):
        d = spectral_prior((3, 4), "penalty")
        w = w0.clone().requires_grad_()
        (g,) = torch.autograd.grad(d.log_prob(w), w)
        assert bool(torch.isfinite(g).all())
        if spectral_prior.kink_at_equal_top and k == 0:
            continue
        assert torch.autograd.gradcheck(d.log_prob, (w0.clone().requires_grad_(),), eps=1e-6,
                                        atol=1e-5)


def test_gaussian_generative_gradient_at_repeated_singular_values():
    for w0 in _repeated_sv_weights():
        d = GaussianSpectrum(t(1.3), (3, 4))
        w = w0.clone().requires_grad_()
        (g,) = torch.autograd.grad(d.log_prob(w), w)
        np.testing.assert_allclose(g.numpy(), (-w0 / 1.3**2).numpy(), atol=1e-10)


def test_generative_gradient_matches_finite_differences(
        spectral_prior_without_closed_form_gradient):
    torch.manual_seed(10)
    u, _ = torch.linalg.qr(torch.randn(3, 3, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(4, 3, dtype=F64))
    w0 = u @ torch.diag(t([2.2, 1.1, 0.4])) @ v.T
    d = spectral_prior_without_closed_form_gradient((3, 4), "generative")
    assert torch.autograd.gradcheck(d.log_prob, (w0.requires_grad_(),), eps=1e-6, atol=1e-5)


# --------------------------------------------------------------------------------------
# Penalty forms
# --------------------------------------------------------------------------------------


def test_frechet_top_penalty_uses_lambda_max_and_frobenius():
    torch.manual_seed(11)
    d = FrechetTopEigenvalue(t(3.0), t(2.0), t(0.7), (4, 5))
    w = torch.randn(4, 5, dtype=F64)
    lam = bs.esd(w)
    ref = st.invweibull(c=3.0, scale=2.0).logpdf(float(lam[-1])) + float(
        -(lam.sum() - lam[-1]) / 0.7 - 3 * math.log(0.7)
    )
    assert abs(float(d.log_prob(w)) - ref) < 1e-8


def test_powerlaw_penalty_pools_conv_slices_and_quantile_xmin():
    torch.manual_seed(12)
    w = torch.randn(6, 4, 3, 3, dtype=F64)
    lam = bs.esd(w)  # pooled over the 9 slices, ascending
    d = PowerLawSpectrum(t(2.5), t(1.0), w.shape, xmin=t(2.0))
    ref = spliced_powerlaw_log_pdf(lam, 2.5, 2.0, 1.0).sum()
    assert abs(float(d.log_prob(w) - ref)) < 1e-8
    dq = PowerLawSpectrum(t(2.5), t(1.0), w.shape, xmin_quantile=0.75)
    xmin = lam[int(0.75 * len(lam))]
    ref_q = spliced_powerlaw_log_pdf(lam, 2.5, xmin, 1.0).sum()
    assert abs(float(dq.log_prob(w) - ref_q)) < 1e-8
    # conv generative measure uses the flattened out x (in*k) view
    dg = PowerLawSpectrum(t(2.5), t(1.0), w.shape, xmin=t(2.0), measure="generative")
    sv = torch.linalg.svdvals(w.reshape(6, -1))
    assert torch.allclose(dg.flat_singular_values(w), sv)
    assert dg.sample((2,)).shape == (2, 6, 4, 3, 3)


def test_alpha_can_be_a_latent_tensor_with_gradient():
    alpha = t(2.5).requires_grad_()
    torch.manual_seed(13)
    w = torch.randn(5, 7, dtype=F64)
    PowerLawSpectrum(alpha, t(0.5), (5, 7), xmin=t(1.0)).log_prob(w).backward()
    assert torch.isfinite(alpha.grad)


# --------------------------------------------------------------------------------------
# Shapes: batch_shape / event_shape / expand follow Pyro's rules
# --------------------------------------------------------------------------------------


def test_shapes_and_expand():
    d = PowerLawSpectrum(t([2.2, 3.0]), t(1.0), (3, 4), xmin=t(1.0))
    assert d.batch_shape == (2,) and d.event_shape == (3, 4)
    w = d.sample((5,))
    assert w.shape == (5, 2, 3, 4)
    assert d.log_prob(w).shape == (5, 2)
    assert d.log_prob(w[0, 0]).shape == (2,)
    e = d.expand((7, 2))
    assert e.batch_shape == (7, 2) and e.event_shape == (3, 4)
    assert e.sample().shape == (7, 2, 3, 4)
    assert e.measure == d.measure and e.log_prob(w[0, 0]).shape == (7, 2)
    np.testing.assert_allclose(e.log_prob(w[0, 0])[3].numpy(), d.log_prob(w[0, 0]).numpy())
    with pytest.raises(RuntimeError):
        d.expand((3,))
    priors = [f((2, 3, 2), "generative") for f in SPECTRAL_PRIORS]
    priors += [f((4, 3), "penalty") for f in SPECTRAL_PRIORS]
    for prior in priors:
        ex = prior.expand((2,))
        assert ex.sample((3,)).shape == (3, 2) + tuple(prior.event_shape)
        assert ex.log_prob(prior.sample()).shape == (2,)
    ind = SpikeAndSlabSpectrum(t(0.3), t(0.1), t(1.0), (3, 4)).to_event(0)
    assert ind.event_shape == (3, 4)


def test_pyro_sample_on_linear_weight():
    class Net(PyroModule):
        def __init__(self):
            super().__init__()
            self.fc = PyroModule[torch.nn.Linear](5, 3)
            self.fc.weight = PyroSample(GaussianSpectrum(torch.tensor(1.0), (3, 5)))

    pyro.set_rng_seed(14)
    net = Net()
    tr = pyro.poutine.trace(net.fc).get_trace(torch.randn(2, 5))
    site = tr.nodes["fc.weight"]
    assert site["value"].shape == (3, 5)
    assert torch.isfinite(site["fn"].log_prob(site["value"]))
    tr.compute_log_prob()


# --------------------------------------------------------------------------------------
# Spike-and-slab: enumeration over indicators gives back the mixture; rank posterior
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("measure", ["penalty", "generative"])
def test_spike_slab_enumeration_equals_mixture(measure):
    torch.manual_seed(15)
    d = SpikeAndSlabSpectrum(t(0.3), t(0.1), t(1.0), (4, 6), measure=measure)
    u, _ = torch.linalg.qr(torch.randn(4, 4, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(6, 4, dtype=F64))
    w = u @ torch.diag(t([2.0, 1.1, 0.05, 0.02])) @ v.T

    def model():
        d.rank_model(w)

    def guide():
        pass

    pyro.clear_param_store()
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    loss = elbo.loss(model, guide)
    assert abs(-loss - float(d.log_prob(w))) < 1e-8
    marg = elbo.compute_marginals(model, guide)["W_z"]
    probs = marg.log_prob(torch.ones(4, dtype=F64)).exp()
    np.testing.assert_allclose(probs.numpy(), d.indicator_probs(w).numpy(), atol=1e-8)
    # rank posterior: Poisson-binomial of the indicators vs brute force over 2^4 configs
    p = d.indicator_probs(w)
    brute = torch.zeros(5, dtype=F64)
    for z in itertools.product([0, 1], repeat=4):
        zt = t(z)
        brute[int(zt.sum())] += torch.prod(p * zt + (1 - p) * (1 - zt))
    post = d.rank_posterior(w)
    np.testing.assert_allclose(post.numpy(), brute.numpy(), atol=1e-12)
    assert int(post.argmax()) == 2  # two big singular values, two in the spike


# --------------------------------------------------------------------------------------
# Validation: clear ValueErrors
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, word",
    [
        (lambda: Frechet(t(-1.0), t(1.0), validate_args=True), "concentration"),
        (lambda: Frechet(t(1.0), t(0.0), validate_args=True), "scale"),
        (lambda: PowerLawSpectrum(t(0.0), t(1.0), (3, 4), validate_args=True), "alpha"),
        (lambda: PowerLawSpectrum(t(2.0), t(-1.0), (3, 4), validate_args=True), "tau"),
        (lambda: PowerLawSpectrum(t(2.0), t(1.0), (3, 4), xmin=t(0.0), validate_args=True),
         "xmin"),
        (lambda: PowerLawSpectrum(t(2.0), t(1.0), (3, 4), xmin_quantile=0.5,
                                  measure="generative"), "xmin"),
        (lambda: FrechetTopEigenvalue(t(0.0), t(1.0), t(1.0), (3, 4), validate_args=True),
         "concentration"),
        (lambda: FrechetTopEigenvalue(t(2.0), t(1.0), t(0.0), (3, 4), validate_args=True),
         "tau"),
        (lambda: SpikeAndSlabSpectrum(t(1.0), t(0.1), t(1.0), (3, 4), validate_args=True), "pi"),
        (lambda: SpikeAndSlabSpectrum(t(0.0), t(0.1), t(1.0), (3, 4), validate_args=True), "pi"),
        (lambda: SpikeAndSlabSpectrum(t(0.5), t(-0.1), t(1.0), (3, 4), validate_args=True),
         "spike_scale"),
        (lambda: GaussianSpectrum(t(0.0), (3, 4), validate_args=True), "scale"),
        (lambda: GaussianSpectrum(t(1.0), (3,)), "event_shape"),
        (lambda: GaussianSpectrum(t(1.0), (3, 4), measure="map"), "measure"),
    ],
)
def test_bad_parameters_raise(make, word):
    with pytest.raises(ValueError, match=word):
        make()


def test_bad_weights_raise():
    d = PowerLawSpectrum(t(2.0), t(1.0), (3, 4), validate_args=True)
    with pytest.raises(ValueError, match="event shape"):
        d.log_prob(torch.randn(4, 3, dtype=F64))
    w = torch.randn(3, 4, dtype=F64)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        d.log_prob(w)
    with pytest.raises(TypeError):
        d.log_prob(torch.ones(3, 4, dtype=torch.long))
