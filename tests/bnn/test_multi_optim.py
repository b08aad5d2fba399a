"""``MultiAdam``: one multi-tensor ``torch.optim.Adam`` behind Pyro's ``PyroOptim`` interface.

The same update as ``pyro.optim.Adam`` (one Adam per parameter): bit for bit with the
``foreach`` kernels, within rounding with ``fused``; only the parameters SVI passes are
stepped; per-parameter clipping and per-parameter arguments as Pyro's; ``get_state`` in
Pyro's format (checkpoints move both ways); ``fit`` with it equals ``fit`` with Pyro's Adam.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn import training
from bayes_spectral.bnn.multi_optim import MultiAdam, svi_optim
from bayes_spectral.distributions import FrechetTopEigenvalue

N = 50


def _prior(shape):
    return dist.Normal(torch.zeros(shape), 0.5).to_event(len(shape))


def _data(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def _svi_params(guide_kind: str, optim, steps: int = 25, prior=_prior) -> dict:
    """The param store after ``steps`` SVI steps from fixed seeds."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    bn = bs.bayesian(net, {nn.Linear: prior}, num_data=N,
                     tracked=nn.Linear if prior is not _prior else None)
    guide = bs.make_guide(bn, guide_kind)
    elbo = guide.make_elbo() if hasattr(guide, "make_elbo") else Trace_ELBO()
    svi = SVI(bn, guide, optim, elbo)
    x, y = _data()
    with torch.no_grad():
        guide(x, y)  # registers the parameters (steps=0: their initial values)
    pyro.set_rng_seed(1)
    for _ in range(steps):
        svi.step(x, y)
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


def _frechet(shape):
    return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)


@pytest.mark.parametrize("guide_kind", ["normal", "fused_normal", "delta"])
@pytest.mark.parametrize("prior", [_prior, _frechet], ids=["normal", "frechet_tracked"])
def test_foreach_svi_equals_pyro_adam_bit_for_bit(guide_kind, prior):
    ref = _svi_params(guide_kind, pyro.optim.Adam({"lr": 0.05}), prior=prior)
    new = _svi_params(guide_kind, MultiAdam({"lr": 0.05}), prior=prior)
    init = _svi_params(guide_kind, pyro.optim.Adam({"lr": 0.05}), steps=0, prior=prior)
    assert sorted(ref) == sorted(new) == sorted(init) and len(ref) >= 4
    assert all(not torch.equal(ref[k], init[k]) for k in ref), "a parameter did not move"
    assert all(torch.equal(ref[k], new[k]) for k in ref), \
        [k for k in ref if not torch.equal(ref[k], new[k])]


@pytest.mark.parametrize("guide_kind", ["normal", "fused_normal"])
def test_fused_svi_equals_pyro_adam_within_rounding(guide_kind):
    """``fused=True``: one kernel per tensor, other rounding; 1e-6 relative (norm-wise, per
    parameter tensor) after 25 steps."""
    ref = _svi_params(guide_kind, pyro.optim.Adam({"lr": 0.05}))
    new = _svi_params(guide_kind, MultiAdam({"lr": 0.05}, fused=True))
    for k in ref:
        err = float((ref[k] - new[k]).norm() / ref[k].norm())
        assert err < 1e-6, (k, err)


def _two_param_run(optim, steps=12):
    """``b`` takes part only on even steps: the optimiser must leave it (value and moments)
    alone on odd steps, as Pyro's per-parameter Adam does."""
    pyro.clear_param_store()

    def model(t):
        a = pyro.param("a", torch.tensor([1.0, -2.0, 0.5]))
        loss = (a - 3.0).square().sum()
        if t % 2 == 0:
            b = pyro.param("b", torch.tensor([0.3, 0.7]))
            loss = loss + (b * a[:2]).sin().sum()
        pyro.factor("f", -loss)

    def guide(t):
        pass

    svi = SVI(model, guide, optim, Trace_ELBO())
    for t in range(steps):
        svi.step(t)
    store = pyro.get_param_store()
    return {k: store[k].detach().clone() for k in ("a", "b")}, optim


def test_only_the_parameters_passed_are_stepped():
    ref, _ = _two_param_run(pyro.optim.Adam({"lr": 0.1}))
    new, opt = _two_param_run(MultiAdam({"lr": 0.1}))
    assert torch.equal(ref["a"], new["a"]) and torch.equal(ref["b"], new["b"])
    assert float(opt.get_state()["b"]["state"][0]["step"]) == 6.0
    assert float(opt.get_state()["a"]["state"][0]["step"]) == 12.0


def test_clip_norm_and_per_parameter_args_as_pyro():
    def args(name):
        return {"lr": 0.2 if name == "a" else 0.05, "betas": (0.8, 0.99)}

    clip = {"clip_norm": 0.5}
    ref, pyro_opt = _two_param_run(pyro.optim.Adam(args, clip))
    new, opt = _two_param_run(MultiAdam(args, clip))
    assert torch.equal(ref["a"], new["a"]) and torch.equal(ref["b"], new["b"])
    assert len(opt.torch_optim.param_groups) == 2
    # without the clip the result differs (the clip is active)
    unclipped, _ = _two_param_run(MultiAdam(args))
    assert not torch.equal(unclipped["a"], new["a"])


def _resume_equal(first, second):
    """Steps 0-5 with ``first``, its state into ``second``, steps 6-11: equal to 12 steps of
    Pyro's Adam."""
    full, _ = _two_param_run(pyro.optim.Adam({"lr": 0.1}))
    _, opt = _two_param_run(first, steps=6)
    state = opt.get_state()
    second.set_state(state)
    store = pyro.get_param_store()

    def model(t):
        a = pyro.param("a")
        loss = (a - 3.0).square().sum()
        if t % 2 == 0:
            loss = loss + (pyro.param("b") * a[:2]).sin().sum()
        pyro.factor("f", -loss)

    svi = SVI(model, lambda t: None, second, Trace_ELBO())
    for t in range(6, 12):
        svi.step(t)
    return all(torch.equal(full[k], store[k]) for k in ("a", "b"))


@pytest.mark.parametrize("first, second", [
    ("multi", "multi"), ("pyro", "multi"), ("multi", "pyro")])
def test_state_moves_between_pyro_adam_and_multi_adam(first, second):
    make = {"multi": lambda: MultiAdam({"lr": 0.1}), "pyro": lambda: pyro.optim.Adam({"lr": 0.1})}
    assert _resume_equal(make[first](), make[second]())


def test_get_state_has_pyro_adam_format():
    _, ref = _two_param_run(pyro.optim.Adam({"lr": 0.1}))
    a = ref.get_state()  # names read from the param store: before it is cleared
    _, new = _two_param_run(MultiAdam({"lr": 0.1}))
    b = new.get_state()
    assert sorted(a) == sorted(b) == ["a", "b"]
    for name in a:
        assert sorted(a[name]["state"][0]) == sorted(b[name]["state"][0])
        for key, value in a[name]["state"][0].items():
            assert torch.equal(value, b[name]["state"][0][key]), (name, key)
        assert b[name]["param_groups"][0]["params"] == [0]
        assert b[name]["param_groups"][0]["lr"] == 0.1


def test_set_state_applies_to_parameters_already_seen():
    """Unlike ``PyroOptim`` (which loads the state of parameters not seen yet only), a state
    set after steps replaces the moments of the parameters already seen."""
    _, opt = _two_param_run(MultiAdam({"lr": 0.1}), steps=4)
    saved = {k: {"state": {0: {s: v.clone() for s, v in d["state"][0].items()}},
                 "param_groups": d["param_groups"]} for k, d in opt.get_state().items()}
    _, later = _two_param_run(MultiAdam({"lr": 0.1}), steps=6)
    before = later.get_state()["a"]["state"][0]["exp_avg"].clone()
    assert not torch.equal(before, saved["a"]["state"][0]["exp_avg"])
    later.set_state(saved)
    for name in ("a", "b"):
        now = later.get_state()[name]["state"][0]
        assert all(torch.equal(now[s], saved[name]["state"][0][s]) for s in now), name


def test_save_and_load_round_trip(tmp_path):
    _, opt = _two_param_run(MultiAdam({"lr": 0.1}), steps=6)
    opt.save(tmp_path / "o.pt")
    fresh = MultiAdam({"lr": 0.1})
    fresh.load(tmp_path / "o.pt")
    assert sorted(fresh._waiting) == ["a", "b"]


def test_svi_optim_kinds_and_bad_kind():
    assert isinstance(svi_optim(0.1), MultiAdam)
    assert type(svi_optim(0.1, "pyro")) is pyro.optim.PyroOptim
    assert svi_optim(0.1, "fused").fused
    with pytest.raises(ValueError, match="optimizer"):
        svi_optim(0.1, "sgd")


def _fit_params(method, seed=2, **kw):
    x, y = _data(n=40)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    bn = bs.bayesian(net, {nn.Linear: _prior}, num_data=40)
    return bs.fit(bn, (x, y), method, epochs=3, batch_size=16, lr=0.05, progress=False,
                  seed=seed, **kw).params()


@pytest.mark.parametrize("method", ["map", "svi"])
def test_fit_default_is_fused_multi_adam_within_rounding_of_pyro_adam(method):
    """fit's default (``optimizer="fused"``) within 1e-6 relative of Pyro's Adam
    (``"pyro"``) after 9 steps; ``"multi"`` equal to it bit for bit."""
    opt = training.svi_optim(0.1)
    assert isinstance(opt, MultiAdam) and opt.fused
    new = _fit_params(method)
    ref = _fit_params(method, optimizer="pyro")
    multi = _fit_params(method, optimizer="multi")
    assert sorted(new) == sorted(ref) == sorted(multi)
    assert all(torch.equal(multi[k], ref[k]) for k in ref)
    for k in ref:
        err = float((ref[k] - new[k]).norm() / ref[k].norm())
        assert err < 1e-6, (k, err)


def test_fused_group_falls_back_to_foreach_for_unsupported_parameters():
    opt = MultiAdam({"lr": 0.1}, fused=True)
    assert opt._kernel_args(torch.zeros(2)) == {"fused": True, "foreach": False}
    assert opt._kernel_args(torch.zeros(2, dtype=torch.int64)) == {"fused": False,
                                                                   "foreach": True}
    assert MultiAdam({"lr": 0.1})._kernel_args(torch.zeros(2))["fused"] is False


def test_fused_run_resumes_bit_for_bit_and_refuses_a_pyro_checkpoint(tmp_path):
    """The default (fused) run: interrupted after epoch 2 and resumed equals the
    uninterrupted run bit for bit; its checkpoint resumed by a ``"pyro"`` run is refused
    (fingerprint ``optimizer``)."""
    x, y = _data(n=40)

    def run(folder, callbacks=(), **kw):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
        bn = bs.bayesian(net, {nn.Linear: _prior}, num_data=40)
        return bs.fit(bn, (x, y), "svi", epochs=4, batch_size=16, lr=0.05, progress=False,
                      seed=1, checkpoint_dir=tmp_path / folder, callbacks=callbacks, **kw)

    def stop(info):
        if info["epoch"] == 2:
            raise KeyboardInterrupt

    full = run("a").params()
    with pytest.raises(KeyboardInterrupt):
        run("b", [stop])
    resumed = run("b").params()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    with pytest.raises(ValueError, match="optimizer"):
        run("b", optimizer="pyro")
    with pytest.raises(ValueError, match=r"optimizer must be one of.*'sgd'"):
        run("c", optimizer="sgd")
    assert not (tmp_path / "c").exists()  # refused before anything is written
