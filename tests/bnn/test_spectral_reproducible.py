"""``bayesian(..., spectral=True)`` fits are reproducible: two fits of the same network with
the same seed give bit-identical losses and parameters, whatever the global RNG state when
the model was built and whatever was fitted before (another network with the same layer
names); another seed gives other numbers."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn.spectral_factors import SpectralFactors
from bayes_spectral.distributions import PowerLawSpectrum

PRIOR = {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)}


def _data(n=64, outputs=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    if outputs == 1:
        return x, x[:, :1] * 2.0
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _bn(rng_before: int, outputs: int = 2, hidden: int = 16):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, outputs))
    torch.manual_seed(rng_before)  # the global RNG state when the model is built
    lik = "categorical" if outputs == 2 else "gaussian"
    return bs.bayesian(net, PRIOR, num_data=64, spectral=True, likelihood=lik)


def _fit(bn, method, seed, outputs=2):
    return bs.fit(bn, _data(outputs=outputs), method, epochs=3, batch_size=16, lr=0.05,
                  seed=seed, progress=False)


@pytest.mark.parametrize("method", ["map", "svi"])
def test_same_seed_same_fit_other_seed_other_fit(method):
    a = _fit(_bn(rng_before=1), method, seed=0)
    _fit(_bn(rng_before=2, hidden=12), method, seed=5)  # other shapes, same names
    b = _fit(_bn(rng_before=3), method, seed=0)
    assert a.history["loss"] == b.history["loss"]
    pa, pb = a.params(), b.params()
    assert pa.keys() == pb.keys()
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    c = _fit(_bn(rng_before=1), method, seed=1)
    assert c.history["loss"] != a.history["loss"]
    pc = c.params()
    assert any(not torch.equal(pa[k], pc[k]) for k in pa)


def test_fit_after_a_spectral_fit_of_other_shapes_runs():
    """A spectral fit under the same layer names but other shapes left in the param store
    must not reach the next model's factors (it raised a shape error)."""
    _fit(_bn(1), "map", seed=0)
    res = _fit(_bn(1, outputs=1), "map", seed=0, outputs=1)
    assert len(res.history["loss"]) == 3


def test_forward_outside_a_fit_does_not_rebind_the_factors():
    """A forward of one model while the store holds another's entries (same names) keeps its
    own U, V tensors."""
    a, b = _bn(1), _bn(1)
    _fit(a, "map", seed=0)
    u = b.net[0].spectral.u.parametrizations.weight.original
    b.deterministic_forward(_data()[0][:2])
    assert b.net[0].spectral.u.parametrizations.weight.original is u


def test_building_the_factors_is_deterministic_and_leaves_the_global_rng_alone():
    w = torch.randn(16, 5, dtype=torch.float64)
    state = torch.get_rng_state()
    f1 = SpectralFactors(w)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)
    f2 = SpectralFactors(w)
    for x, y in zip(f1.state_dict().values(), f2.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    # the factors rebuild the weight: U diag(s) V^T = W
    assert torch.allclose(f1(f1.initial_s), w, atol=1e-12)


@pytest.fixture
def local_params():
    old = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=True)
    yield
    pyro.settings.set(module_local_params=old)
    pyro.clear_param_store()


def test_spectral_fit_with_module_local_params_trains_the_factors(local_params):
    bn = _bn(1)
    u0 = bn.net[0].spectral.u.weight.detach().clone()
    res = _fit(bn, "map", seed=0)
    assert res.history["loss"][-1] < res.history["loss"][0]
    with res.active():
        u1 = bn.net[0].spectral.u.weight.detach().clone()
    assert not torch.equal(u0, u1)
    assert torch.allclose(u1.T @ u1, torch.eye(u1.shape[1]), atol=1e-5)
