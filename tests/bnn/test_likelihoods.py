"""Likelihoods as objects: categorical, Bernoulli, Gaussian (fixed or latent noise),
heteroskedastic Gaussian; their metrics against hand computations; ``evaluate`` and the
validation NLL per likelihood; the learned noise as a latent site under SVI and NUTS."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn import predict as P
from bayes_spectral.bnn.likelihoods import LIKELIHOODS


def normal_prior(scale=1.0):
    return lambda s: dist.Normal(torch.zeros(s), scale).to_event(len(s))


def linear_data(n=200, noise=0.3, seed=0, dtype=torch.float32):
    """``y = x w + noise * eps``, ``x`` of 3 features, ``w = (1, -2, 0.5)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = y + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def norm_logpdf(y, mu, sigma):
    return -0.5 * math.log(2 * math.pi) - math.log(sigma) - 0.5 * ((y - mu) / sigma) ** 2


def mean_nll(y, out, sigma):
    """``-mean_n log N(y_n | out_n, sigma)`` by hand."""
    pairs = list(zip(y.tolist(), out.tolist(), strict=True))
    return -sum(norm_logpdf(a, b, sigma) for a, b in pairs) / len(pairs)


def norm_cdf(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


# --- the registry -------------------------------------------------------------------------


def test_registry_has_the_four_likelihoods():
    assert LIKELIHOODS.names()[:4] == ["categorical", "gaussian", "bernoulli", "heteroskedastic"]


# --- Gaussian: metrics by hand ------------------------------------------------------------


def test_gaussian_predictive_metrics_equal_hand_computation():
    """Two draws, three points, float64: mixture NLL, RMSE and interval coverage."""
    loc = torch.tensor([[0.0, 1.0, 2.0], [0.5, 1.5, 1.0]], dtype=torch.float64)
    scale = torch.tensor([[1.0, 0.5, 2.0], [0.8, 0.5, 1.0]], dtype=torch.float64)
    y = torch.tensor([0.3, 2.4, -0.2], dtype=torch.float64)
    pred = P.GaussianPredictive(loc, scale)
    m = bs.evaluate(pred, y, likelihood="gaussian")
    nll = -sum(math.log(0.5 * sum(math.exp(norm_logpdf(y[i].item(), loc[s, i].item(),
                                                        scale[s, i].item())) for s in range(2)))
               for i in range(3)) / 3
    assert m.nll == pytest.approx(nll, rel=1e-12)
    mean = loc.mean(0)
    rmse = math.sqrt(sum((mean[i].item() - y[i].item()) ** 2 for i in range(3)) / 3)
    assert m.rmse == pytest.approx(rmse, rel=1e-12)
    cdf = [0.5 * sum(norm_cdf((y[i].item() - loc[s, i].item()) / scale[s, i].item())
                     for s in range(2)) for i in range(3)]
    # F(y) = 0.5096, 0.9808, 0.1254: point 0 inside both intervals, point 1 inside neither,
    # point 2 inside the 90% one only
    assert [round(c, 4) for c in cdf] == [0.5096, 0.9808, 0.1254]
    assert m.coverage_50 == pytest.approx(1 / 3)
    assert m.coverage_90 == pytest.approx(2 / 3)


def test_gaussian_one_draw_nll_is_the_normal_nll():
    loc = torch.tensor([[[1.0], [2.0]]], dtype=torch.float64)  # (S=1, n=2, 1)
    y = torch.tensor([1.5, 1.0], dtype=torch.float64)
    m = bs.evaluate(P.GaussianPredictive(loc, torch.full_like(loc, 0.7)), y, likelihood="gaussian")
    expect = -(norm_logpdf(1.5, 1.0, 0.7) + norm_logpdf(1.0, 2.0, 0.7)) / 2
    assert m.nll == pytest.approx(expect, rel=1e-12)


# --- Gaussian: fit, evaluate and validation -----------------------------------------------


def _fitted_output(res, x):
    values = res.guide.median()
    with torch.no_grad():
        return res.model.deterministic_forward(x, values).squeeze(-1).to(torch.float64), values


def test_evaluate_and_val_nll_of_a_fixed_noise_gaussian_fit():
    """``evaluate`` works (today: IndexError) and ``val_nll`` is the Gaussian NLL at the
    fitted weights (today: the MSE)."""
    x, y = linear_data()
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Linear(3, 1), {nn.Linear: normal_prior()}, likelihood="gaussian",
                     noise=0.5, num_data=150)
    res = bs.fit(bn, (x[:150], y[:150]), "map", epochs=5, batch_size=50, lr=5e-2,
                 progress=False, val_data=(x[150:], y[150:]))
    out, _ = _fitted_output(res, x[150:])
    yv = y[150:].to(torch.float64)
    nll = mean_nll(yv, out, 0.5)
    assert res.history["val_nll"][-1] == pytest.approx(nll, rel=1e-6)
    mse = float((out - yv).square().mean())
    assert abs(res.history["val_nll"][-1] - mse) > 0.1
    m = res.evaluate(x[150:], y[150:])
    assert m.nll == pytest.approx(nll, rel=1e-6)
    assert m.rmse == pytest.approx(math.sqrt(mse), rel=1e-5)
    inside50 = ((yv - out).abs() <= 0.5 * 0.6744897501960817).to(torch.float64).mean()
    assert m.coverage_50 == pytest.approx(float(inside50))


def test_learned_noise_map_is_near_the_true_noise_and_val_nll_uses_it():
    """Data with noise 0.3: the MAP noise is within 0.03 of 0.3; ``val_nll`` is the
    Gaussian NLL at the fitted weights and noise."""
    x, y = linear_data(n=400)
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Linear(3, 1, bias=False), {nn.Linear: normal_prior()},
                     likelihood="gaussian", noise="learned", num_data=300)
    assert "noise" in bn.latent_sites
    res = bs.fit(bn, (x[:300], y[:300]), "map", epochs=60, batch_size=100, lr=5e-2,
                 progress=False, val_data=(x[300:], y[300:]))
    out, values = _fitted_output(res, x[300:])
    sigma = float(values["noise"])
    assert abs(sigma - 0.3) < 0.03
    yv = y[300:].to(torch.float64)
    nll = mean_nll(yv, out, sigma)
    assert res.history["val_nll"][-1] == pytest.approx(nll, rel=1e-5)
    assert res.evaluate(x[300:], y[300:]).nll == pytest.approx(nll, rel=1e-5)


def test_learned_noise_has_a_guide_under_svi():
    x, y = linear_data(n=100)
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Linear(3, 1, bias=False), {nn.Linear: normal_prior()},
                     likelihood="gaussian", noise="learned", num_data=100)
    res = bs.fit(bn, (x, y), "svi", epochs=30, batch_size=100, lr=5e-2, progress=False)
    draws = torch.stack([poutine.trace(res.guide).get_trace(x, y).nodes["noise"]["value"]
                         for _ in range(50)])
    assert draws.std() > 1e-3  # a distribution over the noise, not a point
    assert bool((draws > 0).all())
    m = res.evaluate(x, y, num_samples=16)
    assert math.isfinite(m.nll) and 0.0 <= m.coverage_50 <= m.coverage_90 <= 1.0


def test_nuts_samples_the_noise_near_its_true_value():
    """Under NUTS the noise is sampled (today: fixed at 1.0): it moves from its start
    (1.0) and its posterior mean is within 0.05 of the true 0.3 (posterior sd ~0.015)."""
    x, y = linear_data(n=200)
    bn = bs.bayesian(nn.Linear(3, 1, bias=False), {nn.Linear: normal_prior()},
                     likelihood="gaussian", noise="learned", num_data=200)
    res = bs.fit(bn, (x, y), "nuts", num_samples=60, warmup_steps=60, num_chains=1,
                 max_tree_depth=5, progress=False)
    noise = res.samples["noise"]
    assert noise.shape == (1, 60)
    assert float(noise.std()) > 1e-3
    assert abs(float(noise.mean()) - 0.3) < 0.05
    m = res.evaluate(x, y)
    assert 0.3 < m.coverage_50 < 0.7 and 0.8 < m.coverage_90 <= 1.0


def test_noise_learned_is_refused_for_a_likelihood_without_a_noise_scale():
    with pytest.raises(ValueError, match="noise='learned'"):
        bs.bayesian(nn.Linear(3, 2), {}, likelihood="categorical", noise="learned", num_data=9)


def test_noise_prior_by_default_and_given():
    """Default ``LogNormal(0, 1)`` (start: its median 1); ``set_noise(prior)`` uses that
    prior (start: its median) and follows the model's dtype."""
    x, y = linear_data(n=6)
    bn = bs.bayesian(nn.Linear(3, 1), {}, likelihood="gaussian", noise="learned", num_data=6)
    assert float(bn.initial_values()["noise"]) == pytest.approx(1.0)
    site = poutine.trace(bn).get_trace(x, y).nodes["noise"]
    assert site["fn"].log_prob(torch.tensor(0.3)).item() == pytest.approx(
        -math.log(0.3) - 0.5 * math.log(2 * math.pi) - 0.5 * math.log(0.3) ** 2)
    bn.set_noise(dist.HalfNormal(0.5))
    assert float(bn.initial_values()["noise"]) == pytest.approx(0.5 * 0.6744897501960817)
    bn.to(torch.float64)
    site = poutine.trace(bn).get_trace(x.double(), y.double()).nodes["noise"]
    assert isinstance(site["fn"], dist.HalfNormal) and site["value"].dtype == torch.float64
    bn.set_noise(0.2)
    assert bn.latent_sites == [] and bn.noise_value == 0.2
    with pytest.raises(ValueError, match="positive float"):
        bn.set_noise(-1.0)


@pytest.mark.filterwarnings("ignore:a MAP result holds one draw",
                            "ignore:layer .* has a single singular value")
def test_pointwise_log_likelihood_of_learned_noise_in_inference_data():
    x, y = linear_data(n=60)
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Linear(3, 1, bias=False), {nn.Linear: normal_prior()},
                     likelihood="gaussian", noise="learned", num_data=60)
    res = bs.fit(bn, (x, y), "map", epochs=20, batch_size=60, lr=5e-2, progress=False)
    out, values = _fitted_output(res, x)
    sigma = float(values["noise"])
    idata = bs.to_inference_data(res, (x, y))
    ll = idata["log_likelihood"]["y"].values.reshape(-1)
    expect = [norm_logpdf(a, b, sigma) for a, b in zip(y.tolist(), out.tolist(), strict=True)]
    assert ll.tolist() == pytest.approx(expect, rel=1e-5)


# --- Bernoulli ----------------------------------------------------------------------------


def test_bernoulli_metrics_equal_hand_computations():
    """Two draws of four logits -> p = sigmoid; metrics of the two-class predictive."""
    p = torch.tensor([[0.9, 0.4, 0.2, 0.5], [0.7, 0.5, 0.01, 0.2]], dtype=torch.float64)
    logits = torch.log(p / (1 - p)).unsqueeze(-1)  # (S, n, 1), as the network returns
    pred = LIKELIHOODS.get("bernoulli").predictive(None, logits, {})
    assert pred.shape == (2, 4, 2)
    y = torch.tensor([1, 0, 0, 1])
    m = bs.evaluate(pred, y, likelihood="bernoulli")
    pm = [0.8, 0.45, 0.105, 0.35]  # P(y = 1), mean over draws
    assert m.accuracy == pytest.approx(3 / 4)  # the last: 0.35 -> class 0 (wrong)
    lik = [0.8, 0.55, 0.895, 0.35]
    assert m.nll == pytest.approx(-sum(math.log(v) for v in lik) / 4, rel=1e-12)
    # two-class Brier: sum over both classes = 2 (p - y)^2
    assert m.brier == pytest.approx(2 * (0.2 ** 2 + 0.45 ** 2 + 0.105 ** 2 + 0.65 ** 2) / 4)
    # confidences 0.8, 0.55, 0.895, 0.65 each alone in its bin; correct 1, 1, 1, 0
    assert m.ece == pytest.approx((0.2 + 0.45 + 0.105 + 0.65) / 4)

    def h(q):
        return -sum(v * math.log(v) for v in (q, 1 - q) if v > 0)

    ent = [h(q) for q in pm]
    assert m.entropy == pytest.approx(sum(ent) / 4, rel=1e-12)
    mi = [ent[i] - (h(p[0, i].item()) + h(p[1, i].item())) / 2 for i in range(4)]
    assert m.mutual_information == pytest.approx(sum(mi) / 4, rel=1e-12)


def test_bernoulli_observation_and_fit():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    y = (x[:, 0] - x[:, 1] > 0).long()
    torch.manual_seed(0)
    net = nn.Linear(2, 1)
    bn = bs.bayesian(net, {nn.Linear: normal_prior(3.0)}, likelihood="bernoulli", num_data=200)
    tr = poutine.trace(poutine.condition(bn, data=bn.initial_values())).get_trace(x[:5], y[:5])
    logit = net(x[:5]).squeeze(-1).detach().to(torch.float64)
    yf = y[:5].to(torch.float64)
    logsig = torch.nn.functional.logsigmoid
    expect = yf * logsig(logit) + (1 - yf) * logsig(-logit)
    assert torch.allclose(tr.nodes["obs"]["fn"].log_prob(tr.nodes["obs"]["value"]).double(),
                          expect, atol=1e-6)
    with pytest.raises(ValueError, match="0 or 1"):
        bn.check_data(x[:4], torch.tensor([0, 1, 2, 1]))
    res = bs.fit(bn, (x, y), "map", epochs=30, batch_size=50, lr=5e-2, progress=False,
                 val_data=(x, y))
    m = res.evaluate(x, y)
    assert m.accuracy > 0.95 and len(res.history["val_accuracy"]) == 30
    p = res.predict(x)[0, :, 1].to(torch.float64)  # (S, n, 2): P(y = 0), P(y = 1)
    assert res.history["val_nll"][-1] == pytest.approx(
        float(-(torch.where(y == 1, p, 1 - p)).log().mean()), rel=1e-5)


# --- categorical: Brier -------------------------------------------------------------------


def test_categorical_brier_score_by_hand():
    probs = torch.tensor([[[0.9, 0.1], [0.4, 0.6]], [[0.7, 0.3], [0.6, 0.4]]])
    y = torch.tensor([0, 1])
    m = bs.evaluate(probs, y)  # mean [[0.8, 0.2], [0.5, 0.5]]
    assert m.brier == pytest.approx(((0.2 ** 2 + 0.2 ** 2) + (0.5 ** 2 + 0.5 ** 2)) / 2)


# --- heteroskedastic Gaussian -------------------------------------------------------------


def test_heteroskedastic_fit_learns_a_larger_scale_where_the_noise_is_larger():
    """Noise 0.1 for x < 0 and 0.5 for x > 0: the fitted scales, averaged over each half,
    are within a factor 1.5 of the truth."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(400, 1, generator=g) * 2 - 1
    sd = torch.where(x[:, 0] < 0, 0.1, 0.5)
    y = 2 * x[:, 0] + sd * torch.randn(400, generator=g)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 2))
    bn = bs.bayesian(net, {"2": normal_prior()}, likelihood="heteroskedastic", num_data=400)
    tr = poutine.trace(poutine.condition(bn, data=bn.initial_values())).get_trace(x, y)
    out = net(x).detach()
    expect = dist.Normal(out[:, 0], out[:, 1].exp()).log_prob(y)
    assert torch.allclose(tr.nodes["obs"]["fn"].log_prob(y), expect, atol=1e-5)
    res = bs.fit(bn, (x, y), "map", epochs=300, batch_size=400, lr=2e-2, progress=False)
    scale = res.predict(x).scale[0]
    lo, hi = float(scale[x[:, 0] < 0].mean()), float(scale[x[:, 0] > 0].mean())
    assert 0.1 / 1.5 < lo < 0.1 * 1.5 and 0.5 / 1.5 < hi < 0.5 * 1.5
    m = res.evaluate(x, y)
    assert 0.4 < m.coverage_50 < 0.6 and 0.85 < m.coverage_90 < 0.95
    with pytest.raises(ValueError, match="2 columns"):
        bs.bayesian(nn.Linear(1, 3), {}, likelihood="heteroskedastic",
                    num_data=400).check_data(x, y)
    pyro.clear_param_store()


# --- pointwise log-likelihood -------------------------------------------------------------


@pytest.mark.parametrize("name, width, target", [
    ("categorical", 3, lambda g: torch.randint(0, 3, (8,), generator=g)),
    ("bernoulli", 1, lambda g: torch.randint(0, 2, (8,), generator=g)),
    ("gaussian", 1, lambda g: torch.randn(8, generator=g)),
    ("heteroskedastic", 2, lambda g: torch.randn(8, generator=g)),
])
def test_log_likelihood_method_equals_the_observed_site(name, width, target):
    """``Likelihood.log_likelihood`` (pointwise, unscaled) is the ``obs`` site's log-density
    that the diagnostics read from a trace."""
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 4, generator=g), target(g)
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Linear(4, width), {nn.Linear: normal_prior()}, likelihood=name,
                     noise=0.7, num_data=16)
    values = bn.initial_values()
    tr = poutine.trace(poutine.condition(bn, data=values)).get_trace(x, y)
    obs = tr.nodes["obs"]
    out = bn.deterministic_forward(x, values)
    law = LIKELIHOODS.get(name)
    ll = law.log_likelihood(out, y, law.parameters(bn) if name == "gaussian" else None)
    assert ll.shape == (8,)
    assert torch.allclose(ll, obs["fn"].log_prob(obs["value"]), atol=1e-6)


def test_svi_inference_data_and_loo_with_learned_noise():
    """Per guide draw ``d``: ``log_likelihood = log N(y | x w_d, noise_d)`` (hand), the noise
    draws in the posterior; importance-weighted LOO is finite."""
    x, y = linear_data(n=80)
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Linear(3, 1, bias=False), {nn.Linear: normal_prior()},
                     likelihood="gaussian", noise="learned", num_data=80)
    res = bs.fit(bn, (x, y), "svi", epochs=40, batch_size=80, lr=5e-2, progress=False)
    with pytest.warns(UserWarning, match="single singular value"):
        idata = bs.to_inference_data(res, (x, y), num_samples=4, include_latent=True)
    post = idata["posterior"]
    w = torch.as_tensor(post["net.weight"].values)[0]  # (4, 1, 3)
    noise = torch.as_tensor(post["noise"].values)[0]  # (4,)
    assert float(noise.std()) > 0
    mu = torch.einsum("dj,nj->dn", w[:, 0], x.double())
    expect = torch.distributions.Normal(mu, noise[:, None]).log_prob(y.double()[None])
    got = torch.as_tensor(idata["log_likelihood"]["y"].values)[0]
    assert torch.allclose(got, expect, rtol=1e-5, atol=1e-5)
    loo = bs.importance_elpd(res, (x, y), num_samples=30)
    assert math.isfinite(loo.elpd) and loo.elpd_i.shape == (80,)


def test_svi_predictive_does_not_depend_on_the_batch():
    """The guide's draws are taken once and shared by every batch (today each batch drew
    its own): the noise and the means of a point are the same in any batching."""
    x, y = linear_data(n=30)
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Linear(3, 1), {nn.Linear: normal_prior()}, likelihood="gaussian",
                     noise="learned", num_data=30)
    res = bs.fit(bn, (x, y), "svi", epochs=5, batch_size=30, lr=5e-2, progress=False)
    torch.manual_seed(3)
    whole = bs.predictive_probs(bn, x, guide=res.guide, num_samples=6)
    torch.manual_seed(3)
    parts = bs.predictive_probs(bn, x, guide=res.guide, num_samples=6, batch_size=7)
    # the same draws: equal to float32 round-off (a product over 7 rows and over 30 rounds
    # differently on some BLAS kernels: not bit-equal on the H200 machine's CPU); a batch
    # drawing its own weights or noise would differ by the posterior spread (> 1e-3 here)
    torch.testing.assert_close(parts.loc, whole.loc, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(parts.scale, whole.scale, rtol=1e-6, atol=1e-6)
    assert float(whole.scale[:, 0].std()) > 1e-3  # six different noise draws
    assert float(whole.loc[:, 0].std()) > 1e-2  # six different weight draws
