"""Guides: initialisation at the module's (pretrained) weights, restriction to layers,
spectral guide, errors."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import GaussianSpectrum, PowerLawSpectrum


def make_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def pretrained():
    net = make_net()
    x, y = torch.randn(40, 6), torch.randint(0, 3, (40,))
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for _ in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net, x, y


PRIOR = {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)}


@pytest.mark.parametrize("kind", ["delta", "normal", "lowrank"])
def test_guides_start_at_pretrained_weights(kind):
    net, x, y = pretrained()
    fresh = make_net()
    assert not torch.allclose(fresh[0].weight, net[0].weight)  # really trained
    bn = bs.bayesian(net, PRIOR, num_data=40)
    pyro.clear_param_store()
    guide = bs.make_guide(bn, kind)
    guide(x, y)
    med = guide.median()
    assert torch.allclose(med["net.0.weight"], net[0].weight, atol=1e-6)
    assert torch.allclose(med["net.2.weight"], net[2].weight, atol=1e-6)
    # and not Pyro's default (near zero / prior median)
    assert float(med["net.0.weight"].abs().mean()) > 0.1
    if kind == "normal":
        assert torch.equal(pyro.param("AutoNormal.locs.net.0.weight").detach(), net[0].weight)


def test_map_starts_from_pretrained_network_predictions():
    net, x, y = pretrained()
    bn = bs.bayesian(net, PRIOR, num_data=40)
    res = bs.fit(bn, (x, y), "map", epochs=1, lr=1e-12, progress=False)
    probs = res.predict(x)
    assert torch.allclose(probs[0], torch.softmax(net(x), -1), atol=1e-5)


def test_auto_normal_restricted_to_layers():
    net, x, y = pretrained()
    bn = bs.bayesian(net, PRIOR, num_data=40)
    pyro.clear_param_store()
    guide = bs.auto_normal(bn, layers=["0"], init_scale=0.05)
    assert isinstance(guide, AutoGuideList)
    assert isinstance(guide[0], AutoNormal) and isinstance(guide[1], AutoDelta)
    guide(x, y)
    q = guide[0].quantiles([0.25, 0.75])
    assert set(q) == {"net.0.weight"}
    width0 = (q["net.0.weight"][1] - q["net.0.weight"][0]).abs().mean()
    assert float(width0) > 0.01
    assert set(guide[1].median()) == {"net.2.weight"}
    draws = [guide(x, y) for _ in range(2)]
    assert not torch.equal(draws[0]["net.0.weight"], draws[1]["net.0.weight"])
    assert torch.equal(draws[0]["net.2.weight"], draws[1]["net.2.weight"])
    lr_guide = bs.auto_lowrank(bn, layers=nn.Linear, rank=2)
    lr_guide(x, y)
    assert lr_guide.median()["net.2.weight"].shape == (3, 5)
    with pytest.raises(ValueError, match="matches no layer"):
        bs.auto_normal(bn, layers=["fc9"])
    with pytest.raises(ValueError, match="rank"):
        bs.auto_lowrank(bn, rank=0)


def test_layers_without_prior_are_rejected():
    bn = bs.bayesian(make_net(), {"0": GaussianSpectrum(1.0, (5, 6))})
    with pytest.raises(ValueError, match="have no prior"):
        bs.auto_normal(bn, layers=["2"])
    with pytest.raises(ValueError, match="nothing to infer"):
        bs.auto_delta(bs.bayesian(make_net(), {}))
    with pytest.raises(ValueError, match="guide kind"):
        bs.make_guide(bn, "laplace")
    with pytest.raises(ValueError, match="unknown sites"):
        bs.auto_delta(bn, init_values={"net.9.weight": torch.zeros(2)})


def test_spectral_guide_lognormal_singular_values():
    net, x, y = pretrained()
    bn = bs.bayesian(net, PRIOR, num_data=40, spectral=["0"])
    with pytest.raises(ValueError, match="spectral"):
        bs.spectral_guide(bs.bayesian(net, PRIOR))
    pyro.clear_param_store()
    guide = bs.spectral_guide(bn, init_scale=0.1)
    guide(x, y)
    sv = torch.linalg.svdvals(net[0].weight)
    med = guide.median()
    assert torch.allclose(med["net.0.spectral_s"], sv, atol=1e-5)
    draws = torch.stack([guide(x, y)["net.0.spectral_s"] for _ in range(200)])
    assert bool((draws > 0).all())
    # LogNormal: log s has std init_scale
    assert float(torch.log(draws.detach()).std(0).mean()) == pytest.approx(0.1, rel=0.2)
    assert torch.allclose(med["net.2.weight"], net[2].weight)  # AutoDelta elsewhere
    res = bs.fit(bn, (x, y), "svi", guide=guide, epochs=3, batch_size=20, progress=False)
    assert res.predict(x, num_samples=4).shape == (4, 40, 3)


# --- the guide registry -----------------------------------------------------------------


def test_guide_registry_lists_builtin_kinds():
    from bayes_spectral.bnn.guides import GUIDES

    assert GUIDES.names()[:4] == ["delta", "normal", "lowrank", "spectral"]
    assert GUIDES.get("normal") is bs.auto_normal


def test_user_registered_guide_is_used_by_name(monkeypatch):
    from pyro import poutine
    from pyro.infer.autoguide import AutoDiagonalNormal, init_to_value

    from bayes_spectral.bnn.guides import GUIDES

    monkeypatch.setattr(GUIDES, "_items", dict(GUIDES._items))  # restored after the test

    @GUIDES.register("diagonal")
    def diagonal(model, init_scale=0.05):
        return AutoDiagonalNormal(poutine.block(model, expose=model.latent_sites),
                                  init_loc_fn=init_to_value(values=model.initial_values()),
                                  init_scale=init_scale)

    net, x, y = pretrained()
    bn = bs.bayesian(net, PRIOR, num_data=40)
    pyro.clear_param_store()
    guide = bs.make_guide(bn, "diagonal", init_scale=0.2)
    assert isinstance(guide, AutoDiagonalNormal)
    guide(x, y)
    med = guide.median()
    assert torch.allclose(med["net.0.weight"], net[0].weight, atol=1e-6)
    assert float(guide.scale.detach().mean()) == pytest.approx(0.2, rel=1e-5)
    res = bs.fit(bn, (x, y), "svi", guide="diagonal", epochs=2, batch_size=20, progress=False)
    assert isinstance(res.guide, AutoDiagonalNormal)
    assert all(math.isfinite(v) for v in res.history["loss"])
    with pytest.raises(ValueError, match=r"guide kind must be one of \(.*'diagonal'\)"):
        bs.make_guide(bn, "laplace")
