"""Lazy priors (``fit(..., prior_every=k)``): the prior every k-th step times k, masked (not
evaluated) on the others; exact resume; every=1 is today's fit."""

from __future__ import annotations

import os

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn.guides import make_guide
from bayes_spectral.bnn.lazy import LazyPriorModel
from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum

PRIORS = {
    "powerlaw exact": ({nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)}, {}),
    "frechet tracked": ({nn.Linear: lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)},
                        {"tracked": True}),
    "frechet spectral": ({nn.Linear: lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)},
                         {"spectral": True}),
}


@pytest.fixture(scope="module")
def digits():
    return bs.data.load_digits()


def mlp(seed: int = 0, hidden: int = 16) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def _loss_and_grads(model, guide, x, y):
    params = sorted(pyro.get_param_store().items())
    loss = Trace_ELBO().differentiable_loss(model, guide, x, y)
    grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
    return loss.detach(), [torch.zeros_like(p) if g is None else g
                           for (_, p), g in zip(params, grads, strict=True)]


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_k_steps_at_fixed_weights_sum_to_k_exact_prior_gradients(digits, name):
    """Through the Pyro loss (MAP guide, float64): the k losses and gradients at the same
    weights sum to k times the exact ones (the likelihood is the same on every step); the
    due step's loss minus a masked step's is k times the prior's negative log-density."""
    k = 4
    x, y = digits.x_train[:50].double(), digits.y_train[:50]
    priors, kw = PRIORS[name]
    bn = bs.bayesian(mlp(), priors, num_data=400, **kw).double()
    pyro.clear_param_store()
    guide = make_guide(bn, "delta")
    guide(x, y)
    buffers = {n: v.clone() for n, v in bn.named_buffers()}  # power iterations: same start
    exact_loss, exact_grads = _loss_and_grads(bn, guide, x, y)
    with torch.no_grad():
        for n, v in bn.named_buffers():
            v.copy_(buffers[n])
    lazy = LazyPriorModel(bn, k)
    losses, summed = [], [torch.zeros_like(g) for g in exact_grads]
    for step in range(1, k + 1):
        lazy.set_step(step)
        loss, grads = _loss_and_grads(lazy, guide, x, y)
        losses.append(loss)
        summed = [a + b for a, b in zip(summed, grads, strict=True)]
    torch.testing.assert_close(torch.stack(losses).sum(), k * exact_loss, rtol=1e-10, atol=0)
    for a, b in zip(summed, exact_grads, strict=True):
        torch.testing.assert_close(a, k * b, rtol=1e-9, atol=1e-12)
    assert len({float(v) for v in losses[1:]}) == 1  # the masked steps: the likelihood only
    torch.testing.assert_close(losses[0] - losses[1], k * (exact_loss - losses[1]),
                               rtol=1e-10, atol=0)
    assert float(exact_loss - losses[1]) != 0.0


def test_masked_steps_do_no_spectral_work():
    """A tracked Frechet prior's power-iteration state moves on due steps only."""
    x, y = torch.randn(20, 64), torch.randint(0, 10, (20,))
    bn = bs.bayesian(mlp(), PRIORS["frechet tracked"][0], num_data=20, tracked=True)
    pyro.clear_param_store()
    guide = make_guide(bn, "delta")
    guide(x, y)
    lazy = LazyPriorModel(bn, 3)
    def after(step):
        lazy.set_step(step)
        before = bn.net[0].power_iteration.u.clone()
        Trace_ELBO().differentiable_loss(lazy, guide, x, y)
        return not torch.equal(before, bn.net[0].power_iteration.u)

    assert [after(s) for s in (1, 2, 3, 4)] == [True, False, False, True]


@pytest.mark.parametrize("k", [0, -1, 2.5, True, "8", None])
def test_bad_prior_every_is_a_clear_error(digits, k):
    bn = bs.bayesian(mlp(), PRIORS["powerlaw exact"][0], num_data=400)
    with pytest.raises(ValueError, match="prior_every must be an integer >= 1"):
        bs.fit(bn, (digits.x_train[:400], digits.y_train[:400]), "map", epochs=1,
               prior_every=k, progress=False)


def test_nuts_refuses_prior_every(digits):
    bn = bs.bayesian(mlp(), PRIORS["powerlaw exact"][0], num_data=400)
    with pytest.raises(ValueError, match="NUTS needs the exact density"):
        bs.fit(bn, (digits.x_train[:40], digits.y_train[:40]), "nuts", prior_every=2,
               progress=False)


def _small(digits, n=400):
    bn = bs.bayesian(mlp(), PRIORS["frechet tracked"][0], num_data=n, tracked=True)
    return bn, (digits.x_train[:n], digits.y_train[:n])


def test_prior_every_one_is_todays_fit_bit_for_bit(digits):
    kw = dict(epochs=2, batch_size=64, lr=1e-2, progress=False, seed=1)
    runs = []
    for extra in ({}, {"prior_every": 1}):
        bn, data = _small(digits)
        runs.append(bs.fit(bn, data, "map", **kw, **extra))
    a, b = (r.params() for r in runs)
    assert runs[0].history == runs[1].history
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["map", "svi"])
def test_resume_with_prior_every_4_is_bit_exact(digits, tmp_path, method):
    """7 steps per epoch: the run is stopped after epoch 2 (step 14, not a multiple of 4)."""
    kw = dict(epochs=4, batch_size=64, lr=1e-2, progress=False, seed=3, prior_every=4)
    bn, data = _small(digits)
    full = bs.fit(bn, data, method, checkpoint_dir=tmp_path / "a", **kw)

    class Interrupt(Exception):
        pass

    def stop_after_two(info):
        if info["epoch"] == 2:
            assert info["step"] == 14
            raise Interrupt

    bn, data = _small(digits)
    with pytest.raises(Interrupt):
        bs.fit(bn, data, method, checkpoint_dir=tmp_path / "b", callbacks=[stop_after_two], **kw)
    assert os.path.exists(tmp_path / "b" / "checkpoint.pt")
    bn, data = _small(digits)
    with pytest.raises(ValueError, match="prior_every"):
        bs.fit(bn, data, method, checkpoint_dir=tmp_path / "b", **{**kw, "prior_every": 2})
    bn, data = _small(digits)
    resumed = bs.fit(bn, data, method, checkpoint_dir=tmp_path / "b", **kw)
    assert resumed.history == full.history
    a, b = full.params(), resumed.params()
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_prior_every_8_reaches_the_exact_accuracy_on_digits(digits):
    """MAP with a tracked Frechet prior, 3 seeds, 6 epochs: the mean test accuracy of
    prior_every=8 within 0.015 (5 of 359 digits; seed spread ~0.01) of the exact one."""
    acc = {}
    for k in (1, 8):
        acc[k] = []
        for seed in range(3):
            bn = bs.bayesian(mlp(seed, hidden=64), PRIORS["frechet tracked"][0],
                             num_data=len(digits.x_train), tracked=True)
            res = bs.fit(bn, digits, "map", epochs=6, batch_size=64, lr=1e-2, seed=seed,
                         prior_every=k, progress=False)
            acc[k].append(res.evaluate(digits.x_test, digits.y_test).accuracy)
    mean = {k: sum(v) / 3 for k, v in acc.items()}
    assert min(mean.values()) > 0.93, acc
    assert abs(mean[8] - mean[1]) <= 0.015, acc


def test_lazy_map_step_equals_the_lazy_penalty_step():
    """Step s of a lazy MAP loss (``LazyPrior``, steps 1..k) and call s-1 of
    ``Regularizer(every=k)``: the same gradient, ``(N/B) grad CE + [due] k grad R`` (float64),
    so the prior and the penalty paths count the same steps."""
    from pyro.infer.autoguide import AutoDelta

    from bayes_spectral import penalties as P
    from bayes_spectral.bnn.lazy import LazyPrior

    k, N, B = 3, 50, 10
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (N,), generator=g)
    W0 = torch.randn(3, 6, generator=g, dtype=torch.float64)
    idx = torch.arange(B) * 3
    prior = PowerLawSpectrum(2.5, 0.2, event_shape=(3, 6), xmin=2.0)

    def model():
        w = pyro.sample("w", prior)
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("y", pyro.distributions.Categorical(logits=X[idx] @ w.T), obs=Y[idx])

    pyro.clear_param_store()
    guide = AutoDelta(model, init_loc_fn=lambda site: W0.clone())
    guide()
    loc = pyro.param("AutoDelta.w")
    lazy = LazyPrior(["w"], k)

    def lazy_model():
        with lazy:
            model()

    layer = nn.Linear(6, 3, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(W0)
    reg = P.Regularizer(layer, P.PowerLawPrior(alpha=2.5, tau=0.2, xmin=2.0), every=k)
    grads = []
    for step in range(1, 2 * k + 1):
        lazy.step = step
        loss = Trace_ELBO().differentiable_loss(lazy_model, guide)
        (g_pyro,) = torch.autograd.grad(loss, loc)
        layer.weight.grad = None
        ce = nn.functional.cross_entropy(layer(X[idx]), Y[idx], reduction="sum")
        ((N / B) * ce).backward()
        reg.accumulate_grad()
        # the tolerance of the every=1 equivalence (tests/penalties/test_penalties.py):
        # the distribution and the penalty sum the same terms in another order
        torch.testing.assert_close(g_pyro, layer.weight.grad, rtol=1e-6, atol=1e-6)
        grads.append(g_pyro)
    prior_grad = grads[0] - grads[1]  # k * grad R (due minus masked, same likelihood)
    assert float(prior_grad.abs().max()) > 1e-2
    torch.testing.assert_close(grads[k] - grads[k + 1], prior_grad, rtol=1e-10, atol=1e-12)
