"""The fused SG-MCMC step (issue 19, speed): ONE sampler optimiser over all parameters, its
noise drawn from the global torch RNG (one ``normal_`` per noisy parameter, scaled, then
added: the per-parameter samplers' numbers and operations).

* the fused update equals the per-parameter reference update (``reference_step``) bit for
  bit, with noise (float32, float64, preconditioned or not) and without;
* a seeded ``fit`` (SGLD, SGHMC; preconditioned, cyclical, fixed free parameters) gives
  the draws of the same fit stepped by ``reference_step``, bit for bit;
* the injected noise: mean 0, variance ``std^2`` per element (4 standard errors, fixed
  seeds), no correlation between parameters, successive steps and chains (|r| <= 4 /
  sqrt(n)); an exploration step draws nothing;
* the step does not depend on the thread count or on the order SVI passes the parameters;
  a ``fit`` resumed from its checkpoint equals the uninterrupted one; a checkpoint of the
  removed own noise streams (``noise`` ``"stream"`` / ``"prefetch"``) is refused by name.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from resume_helpers import Interrupt
from resume_helpers import stop_at_call as _stop_at
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn import samplers, sampling
from bayes_spectral.bnn.samplers import SGHMC, SGLD

SHAPES = [(7, 5), (5,), (3, 7), (1,)]


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _grads(params, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 50


def _pair(cls, dtype, steps, **kw):
    """``steps`` fused and reference steps of the same parameters, gradients and global
    RNG seeds: latent group = the first two parameters, a drift-only group = the others."""
    fused_p, ref_p = _params(dtype), _params(dtype)
    kw = dict(lr=0.3, num_data=10, **kw)
    opt_f = cls([{"params": fused_p[:2]}, {"params": fused_p[2:], "noise": False}], **kw)
    opt_r = cls([{"params": ref_p[:2]}, {"params": ref_p[2:], "noise": False}], **kw)
    for k in range(steps):
        _grads(fused_p, k)
        _grads(ref_p, k)
        torch.manual_seed(k)
        opt_f.step()
        torch.manual_seed(k)
        opt_r.reference_step()
    return fused_p, ref_p


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_with_the_global_rng_the_fused_step_is_the_reference_bit_for_bit(cls, precondition,
                                                                        dtype):
    """``fit``'s noise (the global RNG, one ``normal_`` per parameter, scaled then added):
    the per-parameter samplers' runs, bit for bit."""
    fused_p, ref_p = _pair(cls, dtype, 12, precondition=precondition, friction=0.2,
                           cycles=3, total_steps=12, explore=0.3)
    for a, b in zip(fused_p, ref_p, strict=True):
        assert a.dtype == dtype
        assert torch.equal(a, b)
    assert not torch.equal(fused_p[0], _params(dtype)[0])


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
def test_without_noise_the_fused_step_is_the_reference_bit_for_bit(cls):
    fused, ref = _pair(cls, torch.float32, 6, cycles=2, total_steps=6,
                       explore=0.99)  # every step in an exploration phase: no noise
    for a, b in zip(fused, ref, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fused[0], _params(torch.float32)[0])  # the drift moved it


# ----------------------------------------------------------------------------- the noise


def _noise_steps(seed: int, sizes, steps: int) -> list[list[torch.Tensor]]:
    """``xi`` of ``steps`` SGLD steps with zero gradients from 0 (``theta_k - theta_{k-1} =
    std xi``, divided by ``std``), per parameter of ``sizes``, global RNG seeded ``seed``."""
    ps = [torch.nn.Parameter(torch.zeros(n)) for n in sizes]
    opt = SGLD(ps, lr=0.5, num_data=2)
    std = opt.noise_std(0.25, opt.param_groups[0])
    torch.manual_seed(seed)
    out = []
    for _ in range(steps):
        before = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad = torch.zeros_like(p)
        opt.step()
        out.append([(p.detach() - b).double() / std for p, b in zip(ps, before, strict=True)])
    return out


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_has_mean_0_and_variance_1(seed):
    n = 400_000
    (xi,), = _noise_steps(seed, [n], 1)
    assert abs(xi.mean().item()) <= 4 / math.sqrt(n)
    assert abs(xi.var().item() - 1) <= 4 * math.sqrt(2 / n)
    assert abs((xi**4).mean().item() - 3) <= 4 * math.sqrt(96 / n)  # Gaussian kurtosis


def test_parameters_steps_and_chains_are_uncorrelated():
    n = 100_000
    (a1, b1), (a2, _) = _noise_steps(5, [n, n], 2)
    (other, _), = _noise_steps(6, [n, n], 1)  # the next chain: seed + 1
    bound = 4 / math.sqrt(n)
    assert abs(_corr(a1, b1)) <= bound  # two parameters of one step
    assert abs(_corr(a1, a2)) <= bound  # successive steps
    assert abs(_corr(a1, other)) <= bound  # chains seeded seed + c
    assert abs(_corr(a1[1:], a1[:-1])) <= bound  # neighbours


def test_small_parameters_are_uncorrelated_step_to_step():
    """Two parameters of one number each (torch's scalar path, e.g. one weight and a learned
    noise): mean 0, variance 1, no lag-1 or cross correlation over 10000 steps."""
    n = 10_000
    d = torch.stack([torch.cat(step) for step in _noise_steps(1, [1, 1], n)])
    bound = 4 / math.sqrt(n)
    assert torch.all(d.mean(0).abs() <= bound)
    assert torch.all((d.var(0) - 1).abs() <= 4 * math.sqrt(2 / n))
    for i in range(2):
        assert abs(_corr(d[1:, i], d[:-1, i])) <= bound
    assert abs(_corr(d[:, 0], d[:, 1])) <= bound


def test_exploration_phase_draws_no_noise():
    """An exploration step (no noise) leaves the global RNG where it was; a sampling step
    draws from it."""
    def run(steps):
        p = torch.nn.Parameter(torch.zeros(8))
        opt = samplers.SGLD([p], lr=0.1, cycles=1, total_steps=4, explore=0.5)
        torch.manual_seed(0)
        for _ in range(steps):
            p.grad = torch.ones(8)
            opt.step()
        return torch.randn(8)

    torch.manual_seed(0)
    fresh = torch.randn(8)
    assert torch.equal(run(2), fresh)  # steps 0, 1 of 4: exploring
    assert not torch.equal(run(3), fresh)  # step 2: sampling


# ----------------------------------------------------------------------------- SamplerOptim


def _store_params():
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(0)
    return [pyro.param(f"AutoDelta.w{i}", torch.randn(300, 200, generator=g)).unconstrained()
            for i in range(3)]


def _optim_run(threads: int, reverse: bool) -> list[torch.Tensor]:
    """Five fused SGHMC steps of ``SamplerOptim`` over param-store parameters."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ps = _store_params()
        opt = sampling.SamplerOptim(SGHMC, dict(lr=0.1, num_data=10), lambda name: True)
        torch.manual_seed(4)
        for k in range(5):
            _grads(ps, k)
            opt(list(reversed(ps)) if reverse else ps)  # the optimiser sorts by name
        return [p.detach().clone() for p in ps]
    finally:
        torch.set_num_threads(old)


def test_sampler_optim_is_the_reference_whatever_the_threads_or_order():
    ps = _store_params()  # the reference: SGHMC's per-parameter step, in name order
    opt = SGHMC(ps, lr=0.1, num_data=10)
    torch.manual_seed(4)
    for k in range(5):
        _grads(ps, k)
        opt.reference_step()
    ref = [p.detach().clone() for p in ps]
    for threads, reverse in [(1, False), (2, False), (1, True), (2, True)]:
        for a, b in zip(_optim_run(threads, reverse), ref, strict=True):
            assert torch.equal(a, b), (threads, reverse)


def test_fixed_free_parameters_do_not_move():
    pyro.clear_param_store()
    w = pyro.param("AutoDelta.w", torch.ones(4)).unconstrained()
    b = pyro.param("net.bias", torch.ones(2)).unconstrained()
    opt = sampling.SamplerOptim(SGLD, dict(lr=0.1, num_data=1, fixed_free=True),
                                lambda name: name.startswith("AutoDelta"))
    w.grad, b.grad = torch.ones(4), torch.ones(2)
    opt([w, b])
    assert torch.equal(b.detach(), torch.ones(2)) and not torch.equal(w.detach(), torch.ones(4))
    state = opt.get_state()
    assert sorted(state) == ["AutoDelta.w", "net.bias"]
    assert state["AutoDelta.w"]["state"][0]["step"] == 1


# ----------------------------------------------------------------------------- fit


def _blr():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.3 * torch.randn(64, generator=g)
    torch.manual_seed(0)  # the net's initial weights
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    bn = bs.bayesian(net, {nn.Linear: lambda s: dist.Normal(torch.zeros(s), 1.0).to_event(2)},
                     likelihood="gaussian", noise="learned", num_data=64,
                     output_fn=lambda o: o.squeeze(-1))
    return bn, (x, y)


def _sampler_fit(method="sghmc", **kw):
    bn, data = _blr()
    kw = {"burn_in": 1, **kw}
    res = bs.fit(bn, data, method, lr=1e-2, epochs=6, batch_size=16, num_chains=2, seed=3,
                 progress=False, **kw)
    return {**res.samples, **{"free:" + k: v for k, v in (res.free_draws or {}).items()}}


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("method", ["sgld", "sghmc"])
@pytest.mark.parametrize("kw", [{}, dict(precondition=True, cycles=3, explore=0.3, burn_in=0),
                                dict(precondition=True, free_params="fixed")])
def test_fit_draws_are_the_per_parameter_reference_bit_for_bit(monkeypatch, method, kw):
    """A seeded sampler fit (learned noise, free biases, 2 chains) equals the same fit whose
    optimiser steps by ``reference_step`` (one ``randn_like`` per parameter, in name order):
    the draws of the per-parameter samplers, bit for bit."""
    fused = _sampler_fit(method, **kw)
    with monkeypatch.context() as mp:
        mp.setattr(samplers.SGMCMC, "step_params", lambda self, params: self.reference_step())
        ref = _sampler_fit(method, **kw)
    _same(fused, ref)
    w = fused["net.0.weight"]
    assert w.shape[0] == 2 and w.shape[1] > 1 and not torch.equal(w[0, 0], w[0, -1])


def test_a_resumed_sampler_fit_equals_the_uninterrupted_one(tmp_path):
    ref = _sampler_fit(checkpoint_dir=tmp_path / "a")
    for stop in (2, 9):  # inside chain 0, inside chain 1
        folder = tmp_path / f"b{stop}"
        with pytest.raises(Interrupt):
            _sampler_fit(checkpoint_dir=folder, callbacks=[_stop_at(stop)])
        _same(_sampler_fit(checkpoint_dir=folder), ref)


def _interrupted(folder) -> dict:
    with pytest.raises(Interrupt):
        _sampler_fit(checkpoint_dir=folder, callbacks=[_stop_at(3)])
    return torch.load(folder / "checkpoint.pt", weights_only=True)


def test_the_checkpoint_keeps_the_format_of_the_global_rng_runs(tmp_path):
    """What a run of before wrote: no ``noise`` setting in the fingerprint, an empty noise
    state beside the draws (so checkpoints of before resume, and the other way round)."""
    saved = _interrupted(tmp_path)
    assert "noise" not in saved["fingerprint"]["sampler"]
    state = saved["state"]["sampler"]
    assert sorted(state) == ["chain", "chain_steps", "chunks", "draw_steps", "eligible",
                             "histories", "noise", "pending"]
    assert state["noise"] == {}


@pytest.mark.parametrize("kind", ["stream", "prefetch"])
def test_a_checkpoint_of_an_own_noise_stream_is_refused_by_name(tmp_path, kind):
    """A checkpoint of the removed own noise streams (``sampling.NOISE_SOURCE = "stream" /
    "prefetch"``): its fingerprint's ``sampler[noise]`` and its generator state are refused
    with a ``ValueError`` naming the setting, not resumed with other numbers."""
    saved = _interrupted(tmp_path)
    gen = torch.Generator().manual_seed(0)
    saved["fingerprint"]["sampler"]["noise"] = kind
    saved["state"]["sampler"]["noise"] = {"cpu": gen.get_state()}
    torch.save(saved, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=rf"sampler\[noise\]: '{kind}'"):
        _sampler_fit(checkpoint_dir=tmp_path)
    bn, _ = _blr()
    cfg = sampling.SamplerConfig("sghmc", burn_in=1, num_chains=2)
    col = sampling.DrawCollector(bn, cfg, epochs=6, steps=4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="noise stream"):
        col.load_state_dict(saved["state"]["sampler"])
