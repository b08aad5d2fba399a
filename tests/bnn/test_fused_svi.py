"""The fused mean-field ELBO (``FusedELBO``) and its guides ``fused_normal`` /
``local_reparam``: the same ELBO as ``Trace_ELBO`` + ``AutoNormal`` (bit for bit at the same
noise draws with ``analytic=False``, in expectation otherwise), local reparameterisation's
pre-activation moments, an exact Bayesian linear regression, ``fit`` and a user's own loop."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn.fused_elbo import FusedELBO, FusedNormal
from bayes_spectral.bnn.local_reparam import local_noise_std
from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum

N = 50


def normal_prior(shape):
    return dist.Normal(torch.zeros(shape, dtype=torch.float64), 0.5).to_event(len(shape))


def frechet_prior(shape):
    return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)


def powerlaw_prior(shape):
    return PowerLawSpectrum(2.0, 0.5, shape)


def data(task="classification", n=20, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if task == "classification":
        return x, torch.randint(0, 3, (n,), generator=g)
    return x, torch.randn(n, generator=g, dtype=torch.float64)


def model_of(case):
    """(network, data): the cases of the equality tests."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    if case == "normal":
        return bs.bayesian(net, {nn.Linear: normal_prior}, num_data=N), data()
    if case == "tracked_frechet":
        return bs.bayesian(net, {nn.Linear: frechet_prior}, num_data=N, tracked=nn.Linear), data()
    if case == "spectral":  # positive site s: the guide's Jacobian term
        return bs.bayesian(net, {nn.Linear: powerlaw_prior}, num_data=N,
                           spectral=nn.Linear), data()
    if case == "learned_noise":
        torch.manual_seed(0)
        reg = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0)).double()
        return bs.bayesian(reg, {nn.Linear: normal_prior}, likelihood="gaussian",
                           noise="learned", num_data=N), data("regression")
    raise AssertionError(case)


def guide_for(bn, x, y, local=False):
    pyro.clear_param_store()
    guide = bs.make_guide(bn, "local_reparam" if local else "fused_normal", init_scale=0.1)
    guide(x, y)
    return guide


def loss_and_grad(elbo, bn, guide, x, y, seed):
    """Loss and flat gradient at ``seed``, the trackers' state (warm-started power
    iterations) reset to that of the first call so that both ELBOs see the same."""
    params = [p for _, p in sorted(pyro.get_param_store().named_parameters())]
    net = getattr(bn, "model", bn)  # a LazyPriorModel's network
    state = net.__dict__.setdefault("_test_buffers", {n: b.clone()
                                                      for n, b in net.named_buffers()})
    with torch.no_grad():
        for n, b in net.named_buffers():
            b.copy_(state[n])
    pyro.set_rng_seed(seed)
    loss = elbo.differentiable_loss(bn, guide, x, y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                      for g, p in zip(grads, params, strict=True)])
    return loss.detach(), flat


CASES = ["normal", "tracked_frechet", "spectral", "learned_noise"]


@pytest.mark.parametrize("case", CASES)
def test_same_draws_equal_trace_elbo_value_and_gradient(case):
    """analytic=False: the same estimate as Trace_ELBO + AutoNormal at the same noise
    draws (same seed), value and gradient to float64 round-off."""
    bn, (x, y) = model_of(case)
    guide = guide_for(bn, x, y)
    for seed in (0, 1, 2):
        ref, g_ref = loss_and_grad(Trace_ELBO(), bn, guide, x, y, seed)
        out, g_out = loss_and_grad(FusedELBO(analytic=False), bn, guide, x, y, seed)
        assert torch.allclose(out, ref, rtol=1e-10, atol=1e-9), (case, seed, out, ref)
        assert torch.allclose(g_out, g_ref, rtol=1e-8, atol=1e-9), case
    other, _ = loss_and_grad(FusedELBO(analytic=False), bn, guide, x, y, 7)
    assert not torch.allclose(other, ref)  # the draws matter: the test could fail


@pytest.mark.parametrize("step", [1, 2])
def test_lazy_prior_steps_equal_trace_elbo(step):
    """fit(..., prior_every=3)'s model: the prior scaled by 3 (step 1) or masked (step 2),
    read through the model's own sites: the same estimate as Trace_ELBO."""
    from bayes_spectral.bnn.lazy import LazyPriorModel
    bn, (x, y) = model_of("tracked_frechet")
    guide = guide_for(bn, x, y)
    lazy = LazyPriorModel(bn, 3)
    lazy.set_step(step)
    ref, g_ref = loss_and_grad(Trace_ELBO(), lazy, guide, x, y, 0)
    out, g_out = loss_and_grad(FusedELBO(analytic=False), lazy, guide, x, y, 0)
    plain, _ = loss_and_grad(FusedELBO(analytic=False), bn, guide, x, y, 0)
    assert torch.allclose(out, ref, rtol=1e-10) and torch.allclose(g_out, g_ref, rtol=1e-8,
                                                                    atol=1e-9)
    assert not torch.allclose(out, plain)  # the scaling / mask did something


def paired_mean_and_se(diffs):
    d = torch.stack(diffs)
    return d.mean(0), d.std(0) / math.sqrt(len(diffs))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["normal", "learned_noise"])
def test_analytic_entropy_and_kl_unbiased(case):
    """analytic=True (Gaussian entropy, and the Normal prior's expected log-density in
    closed form) minus Trace_ELBO at the same draws: mean 0 within 3 standard errors over
    200 seeds, for the value and for the gradient projected on a fixed direction."""
    bn, (x, y) = model_of(case)
    guide = guide_for(bn, x, y)
    direction = None
    dv, dg = [], []
    for seed in range(200):
        ref, g_ref = loss_and_grad(Trace_ELBO(), bn, guide, x, y, seed)
        out, g_out = loss_and_grad(FusedELBO(analytic=True), bn, guide, x, y, seed)
        if direction is None:
            direction = torch.randn(g_ref.shape, generator=torch.Generator().manual_seed(3),
                                    dtype=g_ref.dtype)
        dv.append(out - ref)
        dg.append((g_out - g_ref) @ direction)
    for diffs in (dv, dg):
        mean, se = paired_mean_and_se(diffs)
        assert float(se) > 0  # really random
        assert abs(float(mean)) < 3 * float(se), (case, float(mean), float(se))


@pytest.mark.slow
@pytest.mark.parametrize("case", ["normal", "tracked_frechet"])
def test_local_reparam_unbiased_against_trace_elbo(case):
    """Local reparameterisation: the mean loss and the mean gradient (projected) equal
    Trace_ELBO's within 3 standard errors of their difference (independent draws, 200
    each); with a Normal prior its per-draw variance is under half weight sampling's."""
    bn, (x, y) = model_of(case)
    guide = guide_for(bn, x, y, local=True)
    direction = None
    ref_v, out_v, ref_g, out_g = [], [], [], []
    for seed in range(200):
        ref, g_ref = loss_and_grad(Trace_ELBO(), bn, guide, x, y, seed)
        out, g_out = loss_and_grad(FusedELBO(local_reparam=True), bn, guide, x, y, seed)
        if direction is None:
            direction = torch.randn(g_ref.shape, generator=torch.Generator().manual_seed(3),
                                    dtype=g_ref.dtype)
        ref_v.append(ref)
        out_v.append(out)
        ref_g.append(g_ref @ direction)
        out_g.append(g_out @ direction)
    for a, b in ((ref_v, out_v), (ref_g, out_g)):
        a, b = torch.stack(a), torch.stack(b)
        se = math.sqrt(float(a.var() / len(a) + b.var() / len(b)))
        assert abs(float(a.mean() - b.mean())) < 3 * se, (case, float(a.mean()),
                                                           float(b.mean()), se)
    if case == "normal":  # analytic KL: all the variance is the likelihood's
        assert float(torch.stack(out_v).var()) < 0.5 * float(torch.stack(ref_v).var())


def test_local_noise_std_is_the_weight_sampling_moments():
    """Linear: Var[(x W^T)_j] = sum_k x_k^2 sigma_jk^2 under W = mu + sigma * eps; Conv2d:
    the same sum over each receptive field (brute force through unfold)."""
    g = torch.Generator().manual_seed(0)
    lin = nn.Linear(5, 3).double()
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    sigma = torch.rand(3, 5, generator=g, dtype=torch.float64)
    want = ((x[:, None, :] ** 2) * sigma[None] ** 2).sum(-1).sqrt()
    assert torch.allclose(local_noise_std(lin, x, sigma), want, rtol=1e-12)
    # Monte Carlo check of the formula itself: weight sampling's variance
    w = lin.weight.detach() + sigma * torch.randn(20000, 3, 5, generator=g, dtype=torch.float64)
    pre = torch.einsum("nk,sjk->snj", x, w)
    assert torch.allclose(pre.std(0), want, rtol=0.03)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1).double()
    xc = torch.randn(2, 2, 6, 6, generator=g, dtype=torch.float64)
    sc = torch.rand(3, 2, 3, 3, generator=g, dtype=torch.float64)
    cols = nn.functional.unfold(xc, 3, padding=1, stride=2)  # (B, 18, L)
    brute = torch.einsum("bkl,jk->bjl", cols ** 2, sc.reshape(3, -1) ** 2).sqrt()
    got = local_noise_std(conv, xc, sc)
    assert torch.allclose(got.reshape(2, 3, -1), brute, rtol=1e-12)


@pytest.mark.slow
def test_local_reparam_preactivation_moments_through_the_model():
    """The hooked layer's output over many draws: mean x mu^T + b, std local_noise_std."""
    bn, (x, y) = model_of("normal")
    guide = guide_for(bn, x, y, local=True)
    from bayes_spectral.bnn.fused_elbo import sample_outputs
    torch.manual_seed(0)
    outs = []
    layer = bn.layer("0")
    handle = layer.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    try:
        for _ in range(2000):
            sample_outputs(bn, guide, x[:3], local_reparam=True)
    finally:
        handle.remove()
    pre = torch.stack(outs)
    loc, scale = guide._get_loc_and_scale("net.0.weight")
    mean = nn.functional.linear(x[:3], loc, layer.bias).detach()
    std = local_noise_std(layer, x[:3], scale).detach()
    se = std / math.sqrt(len(pre))
    assert ((pre.mean(0) - mean).abs() < 4 * se).all()
    assert torch.allclose(pre.std(0), std, rtol=0.08)


@pytest.mark.slow
def test_bayesian_linear_regression_exact_mean_field_posterior():
    """y = X w + e, e ~ N(0, s^2), w ~ N(0, t^2 I): the mean-field optimum has the exact
    posterior mean m = S X^T y / s^2 (S^-1 = X^T X / s^2 + I / t^2) and the variances
    1 / diag(S^-1). Local reparameterisation, a user's own SVI loop."""
    g = torch.Generator().manual_seed(1)
    n, d, s, t = 40, 3, 0.5, 1.0
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w_true = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = x @ w_true + s * torch.randn(n, generator=g, dtype=torch.float64)
    prec = x.T @ x / s**2 + torch.eye(d, dtype=torch.float64) / t**2
    m = torch.linalg.solve(prec, x.T @ y / s**2)
    sd = prec.diagonal().rsqrt()
    net = nn.Sequential(nn.Linear(d, 1, bias=False), nn.Flatten(0)).double()
    prior = {nn.Linear: lambda shape: dist.Normal(torch.zeros(shape, dtype=torch.float64),
                                                  t).to_event(2)}
    bn = bs.bayesian(net, prior, likelihood="gaussian", noise=s, num_data=n)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = bs.make_guide(bn, "local_reparam", init_scale=0.1)
    optim = pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.998})
    svi = SVI(bn, guide, optim, loss=FusedELBO(local_reparam=True))
    for _ in range(1500):
        svi.step(x, y)
    loc, scale = guide._get_loc_and_scale("net.0.weight")
    assert torch.allclose(loc.detach().reshape(-1), m, atol=0.1 * float(sd.min())), (loc, m)
    assert torch.allclose(scale.detach().reshape(-1), sd, rtol=0.1), (scale, sd)


@pytest.mark.parametrize("kind", ["fused_normal", "local_reparam"])
def test_fit_and_inference_data(kind):
    """bs.fit(..., method="svi", guide=kind) runs the fused ELBO, learns, and its draws
    feed bs.to_inference_data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(120, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long()
    net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    bn = bs.bayesian(net, {nn.Linear: frechet_prior}, num_data=120, tracked=nn.Linear)
    res = bs.fit(bn, (x, y), "svi", guide=kind, epochs=60, lr=0.05, batch_size=40,
                 progress=False)
    assert isinstance(res.guide, FusedNormal)
    assert res.history["loss"][-1] < 0.7 * res.history["loss"][0]
    acc = (res.predict(x).argmax(-1) == y).double().mean()
    assert float(acc) > 0.85
    idata = bs.to_inference_data(res, (x, y), num_samples=8)
    ll = idata["log_likelihood"]["y"]
    assert tuple(ll.shape) == (1, 8, 120)
    assert float(ll.std()) > 0  # distinct draws


def test_fit_uses_the_fused_elbo(monkeypatch):
    calls = []
    orig = FusedELBO.differentiable_loss

    def spy(self, *a, **k):
        calls.append(self.local_reparam)
        return orig(self, *a, **k)

    monkeypatch.setattr(FusedELBO, "differentiable_loss", spy)
    bn, (x, y) = model_of("normal")
    bs.fit(bn, (x, y), "svi", guide="local_reparam", epochs=2, progress=False)
    assert calls and all(calls)


def test_errors():
    bn, (x, y) = model_of("normal")
    pyro.clear_param_store()
    delta = bs.make_guide(bn, "delta")
    with pytest.raises(TypeError, match="AutoNormal"):
        FusedELBO().loss(bn, delta, x, y)
    with pytest.raises(ValueError, match="analytic"):
        FusedELBO(analytic="yes")


@pytest.mark.slow
def test_digits_fused_guides_match_trace_elbo():
    """Digits, power-law prior, SVI started at the MAP fit: the fused ELBO (weight
    sampling, and local reparameterisation) reaches the test NLL of Trace_ELBO + AutoNormal
    within 0.03 nats, accuracy >= 0.9, with a real posterior spread."""
    digits = bs.data.load_digits()
    n = len(digits.x_train)
    prior = {nn.Linear: powerlaw_prior}

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))

    bn = bs.bayesian(mlp(), prior, num_data=n)
    res_map = bs.fit(bn, digits, "map", epochs=8, batch_size=64, lr=1e-2, progress=False)
    start = bs.map_values(res_map.guide)
    metrics = {}
    for kind in ("normal", "fused_normal", "local_reparam"):
        bn2 = bs.bayesian(mlp(), prior, num_data=n)
        for layer in ("0", "2"):
            bn2.net.get_submodule(layer).bias.data.copy_(bn.net.get_submodule(layer).bias.data)
        guide = bs.make_guide(bn2, kind, init_scale=0.02, init_values=start)
        res = bs.fit(bn2, digits, "svi", guide=guide, epochs=6, batch_size=64, lr=3e-3,
                     progress=False, seed=1)
        torch.manual_seed(0)
        metrics[kind] = res.evaluate(digits.x_test, digits.y_test, num_samples=32)
    for kind in ("fused_normal", "local_reparam"):
        m = metrics[kind]
        assert abs(m.nll - metrics["normal"].nll) < 0.03, metrics
        assert m.accuracy >= 0.9 and m.mutual_information > 1e-3, metrics


@pytest.mark.parametrize("local_params", [False, True])
def test_fit_trains_with_module_local_params(local_params):
    """The fused ELBO reads the guide's parameters in both of Pyro's parameter modes."""
    old = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=local_params)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        prior = {nn.Linear: lambda shape: dist.Normal(torch.zeros(shape), 0.5).to_event(2)}
        bn = bs.bayesian(net, prior, num_data=N)
        x, y = data()
        x = x.float()
        guide = bs.make_guide(bn, "fused_normal", init_scale=0.05)
        res = bs.fit(bn, (x, y), "svi", guide=guide, epochs=30, lr=0.05, progress=False)
        assert res.history["loss"][-1] < 0.8 * res.history["loss"][0]
        scales = [v for k, v in res.params().items() if "scales" in k]
        assert scales and all(not torch.allclose(s, torch.full_like(s, 0.05)) for s in scales)
    finally:
        pyro.settings.set(module_local_params=old)
        pyro.clear_param_store()


@pytest.mark.slow
def test_local_reparam_conv_net_unbiased():
    """A Conv2d + Linear net: local reparameterisation (both layers hooked) has the mean
    loss of Trace_ELBO within 3 standard errors (200 independent draws each)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                        nn.Linear(3 * 5 * 5, 3)).double()
    bn = bs.bayesian(net, {nn.Conv2d: normal_prior, nn.Linear: normal_prior}, num_data=N)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=g)
    guide = guide_for(bn, x, y, local=True)
    elbo = FusedELBO(local_reparam=True)
    assert len([s for s in elbo._plan(bn, guide, (x, y), {}) if s.layer is not None]) == 2
    ref = torch.stack([loss_and_grad(Trace_ELBO(), bn, guide, x, y, s)[0] for s in range(200)])
    out = torch.stack([loss_and_grad(elbo, bn, guide, x, y, s)[0] for s in range(200)])
    se = math.sqrt(float(ref.var() / 200 + out.var() / 200))
    assert abs(float(ref.mean() - out.mean())) < 3 * se, (float(ref.mean()), float(out.mean()))
    assert float(out.var()) < float(ref.var())
