"""A fitted result owns its parameters (DESIGN.md, "State, files and modes"): ``map_values``
of its guide, its predictions and ``to_module()`` are bit-identical right after its fit,
after a second fit of another network (same layer names or not, another seed) and after
``pyro.clear_param_store()``, with global and with module-local parameters."""

from __future__ import annotations

import pyro
import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import PowerLawSpectrum

PRIOR = {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)}


def _data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _mlp(seed, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _fit(net, method, guide=None, seed=0, **kw):
    """``guide``: None, a kind, or ``(kind, kwargs)`` made on the network's model."""
    bn = bs.bayesian(net, PRIOR, num_data=64, **kw)
    if isinstance(guide, tuple):
        guide = bs.bnn.guides.make_guide(bn, guide[0], **guide[1])
    return bs.fit(bn, _data(), method, guide, epochs=3, batch_size=32, lr=0.05, seed=seed,
                  progress=False)


@pytest.fixture(params=[False, True], ids=["global_params", "module_local_params"])
def param_mode(request):
    old = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=request.param)
    yield request.param
    pyro.settings.set(module_local_params=old)
    pyro.clear_param_store()


def _view(res, x):
    """What must not change: the guide's point values, seeded predictions, to_module()'s
    state and forward."""
    with torch.random.fork_rng():
        torch.manual_seed(3)
        pred = res.predict(x, 4)
    module = res.to_module()
    with torch.no_grad():
        out = module(x)
    return {"map": bs.map_values(res.guide), "pred": pred, "out": out,
            "state": {k: v.clone() for k, v in module.state_dict().items()}}


def _assert_same(a, b):
    for key in ("map", "state"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert torch.equal(a["pred"], b["pred"]) and torch.equal(a["out"], b["out"])


#: (method, guide, bayesian kwargs); ("normal", {"layers": ["0"]}) is an AutoGuideList
#: (Normal on layer 0, AutoDelta on the rest)
CASES = [("map", None, {}), ("svi", None, {}), ("svi", ("normal", {"layers": ["0"]}), {}),
         ("map", None, {"spectral": True}), ("svi", "spectral", {"spectral": True})]


@pytest.mark.parametrize(("method", "guide", "kw"), CASES,
                         ids=["map", "svi", "svi-guide-list", "map-spectral", "svi-spectral"])
def test_result_is_unchanged_by_later_fits_and_a_cleared_store(param_mode, method, guide, kw):
    x, _ = _data(1)
    a = _fit(_mlp(0), method, guide, **kw)
    first = _view(a, x)
    _fit(_mlp(1), method, guide, seed=7, **kw)  # same layer names, another seed
    _assert_same(first, _view(a, x))
    _fit(_mlp(2, hidden=12), method, seed=3)  # other shapes under the same names
    _assert_same(first, _view(a, x))
    pyro.clear_param_store()
    _assert_same(first, _view(a, x))


def test_map_values_of_the_guide_equal_the_results_point_values():
    a = _fit(_mlp(0), "map")
    point = a.point_values()
    _fit(_mlp(1), "map", seed=5)
    values = bs.map_values(a.guide)
    assert values.keys() == point.keys()
    assert all(torch.equal(values[k], point[k]) for k in point)
