"""The fused SG-MCMC step (issue 19, speed): ONE sampler optimiser over all parameters;
the noise from the global RNG (default: the per-parameter samplers' numbers) or one draw
per step from an own generator (``NoiseStream``), optionally drawn ahead in a thread.

* the fused update equals the per-parameter reference update (``reference_step``): bit for
  bit with the global RNG and without noise; given the same numbers from a stream, within
  2 float32 ulps (float64: 1e-15) (it adds ``std * xi`` in one rounding instead of two);
* the noise: mean 0 and variance 1 per element (4 standard errors, fixed seeds), no
  correlation between the slices given to different parameters, successive draws and
  the streams of different chains (|r| <= 4 / sqrt(n));
* the numbers handed out do not depend on the prefetch, on a request of another size in
  between, on the thread count, and a stream resumed from ``state_dict`` continues bit for
  bit; a ``fit`` resumed from its checkpoint equals the uninterrupted one.
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
from bayes_spectral.bnn.samplers import SGHMC, SGLD, NoiseStream

SHAPES = [(7, 5), (5,), (3, 7), (1,)]


class Given:
    """A noise source handing out fixed numbers (the test's), as ``NoiseStream`` does."""

    def __init__(self, flat: torch.Tensor):
        self.flat, self.at = flat, 0

    def standard_normal(self, n, dtype, device):
        out = self.flat[self.at:self.at + n].clone()
        self.at += n
        return out


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in SHAPES]


def _grads(params, k):
    g = torch.Generator().manual_seed(100 + k)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * 50


def _pair(cls, dtype, steps, flat, **kw):
    """``steps`` fused and reference steps of the same parameters, gradients and noise:
    latent group = the first two parameters, a drift-only group = the others."""
    fused_p, ref_p = _params(dtype), _params(dtype)
    opt_f = cls([{"params": fused_p[:2]}, {"params": fused_p[2:], "noise": False}],
                lr=0.3, num_data=10, noise_source=Given(flat), **kw)
    opt_r = cls([{"params": ref_p[:2]}, {"params": ref_p[2:], "noise": False}],
                lr=0.3, num_data=10, **kw)
    at = {"i": 0}

    def given_like(p):  # the reference's randn_like: the same numbers, per parameter
        out = flat[at["i"]:at["i"] + p.numel()].view_as(p).clone()
        at["i"] += p.numel()
        return out

    for k in range(steps):
        _grads(fused_p, k)
        _grads(ref_p, k)
        opt_f.step()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch, "randn_like", given_like)
            opt_r.reference_step()
    return fused_p, ref_p


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_step_equals_the_per_parameter_step_given_the_same_noise(cls, precondition,
                                                                       dtype):
    n_latent = sum(math.prod(s) for s in SHAPES[:2])
    flat = torch.randn(10 * n_latent, generator=torch.Generator().manual_seed(7), dtype=dtype)
    fused, ref = _pair(cls, dtype, 10, flat, precondition=precondition, friction=0.2,
                       cycles=3, total_steps=10, explore=0.3)
    ulp = torch.finfo(dtype).eps
    for a, b in zip(fused, ref, strict=True):
        assert a.dtype == dtype
        tol = 2 * ulp * (1 + b.abs()) if dtype == torch.float32 else 1e-15 * (1 + b.abs())
        assert torch.all((a - b).abs() <= tol), (a - b).abs().max()
    for a, b in zip(fused[2:], ref[2:], strict=True):  # drift only: the same operations
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
@pytest.mark.parametrize("precondition", [False, True])
def test_with_the_global_rng_the_fused_step_is_the_reference_bit_for_bit(cls, precondition):
    """``fit``'s default noise (the global RNG, one ``normal_`` per parameter, scaled then
    added): the per-parameter samplers' runs, bit for bit."""
    fused_p, ref_p = _params(torch.float32), _params(torch.float32)
    kw = dict(lr=0.3, num_data=10, precondition=precondition, friction=0.2, cycles=3,
              total_steps=12, explore=0.3)
    opt_f = cls([{"params": fused_p[:2]}, {"params": fused_p[2:], "noise": False}], **kw)
    opt_r = cls([{"params": ref_p[:2]}, {"params": ref_p[2:], "noise": False}], **kw)
    for k in range(12):
        _grads(fused_p, k)
        _grads(ref_p, k)
        torch.manual_seed(k)
        opt_f.step()
        torch.manual_seed(k)
        opt_r.reference_step()
    for a, b in zip(fused_p, ref_p, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(fused_p[0], _params(torch.float32)[0])


@pytest.mark.parametrize("cls", [SGLD, SGHMC])
def test_without_noise_the_fused_step_is_the_reference_bit_for_bit(cls):
    fused, ref = _pair(cls, torch.float32, 6, torch.zeros(0), cycles=2, total_steps=6,
                       explore=0.99)  # every step in an exploration phase: no noise
    for a, b in zip(fused, ref, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noise_has_mean_0_and_variance_1(seed):
    n = 400_000
    xi = NoiseStream(seed).standard_normal(n, torch.float32, "cpu").double()
    assert abs(xi.mean().item()) <= 4 / math.sqrt(n)
    assert abs(xi.var().item() - 1) <= 4 * math.sqrt(2 / n)
    assert abs((xi**4).mean().item() - 3) <= 4 * math.sqrt(96 / n)  # Gaussian kurtosis


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_draws_slices_and_chains_are_uncorrelated():
    n = 200_000
    s = NoiseStream(5)
    first, second = s.standard_normal(n, torch.float32, "cpu").clone(), \
        s.standard_normal(n, torch.float32, "cpu")
    other = NoiseStream(6).standard_normal(n, torch.float32, "cpu")  # the next chain
    half = n // 2
    bound = 4 / math.sqrt(half)
    assert abs(_corr(first[:half], first[half:])) <= bound  # two parameters' slices
    assert abs(_corr(first, second)) <= 4 / math.sqrt(n)  # successive steps
    assert abs(_corr(first, other)) <= 4 / math.sqrt(n)  # chains seeded seed + c
    assert abs(_corr(first[1:], first[:-1])) <= 4 / math.sqrt(n)  # neighbours


@pytest.fixture
def ahead_always(monkeypatch):
    """Prefetch every draw, however small (the tests' sizes are below ``PREFETCH_MIN``)."""
    monkeypatch.setattr(samplers, "PREFETCH_MIN", 1)


@pytest.mark.parametrize("prefetch", [False, True])
def test_small_draws_are_uncorrelated_step_to_step(prefetch, ahead_always):
    """Draws of 2 numbers (torch's scalar path, e.g. one weight and a learned noise): mean 0,
    variance 1, no lag-1 or cross correlation over 20000 steps (4 standard errors)."""
    s, n = NoiseStream(1, prefetch=prefetch), 20_000
    d = torch.stack([s.standard_normal(2, torch.float32, "cpu").clone()
                     for _ in range(n)]).double()
    bound = 4 / math.sqrt(n)
    assert torch.all(d.mean(0).abs() <= bound)
    assert torch.all((d.var(0) - 1).abs() <= 4 * math.sqrt(2 / n))
    for i in range(2):
        assert abs(_corr(d[1:, i], d[:-1, i])) <= bound
    assert abs(_corr(d[:, 0], d[:, 1])) <= bound


def _sequence(stream: NoiseStream, sizes) -> list[torch.Tensor]:
    return [stream.standard_normal(n, torch.float32, "cpu").clone() for n in sizes]


SIZES = [1000, 1000, 1000, 37, 1000, 1000, 64, 64, 1000]


def test_prefetch_does_not_change_the_numbers(ahead_always):
    plain = _sequence(NoiseStream(3), SIZES)
    stream = NoiseStream(3, prefetch=True)
    ahead = _sequence(stream, SIZES)
    assert stream._pending is not None  # a draw is under way: the test is not vacuous
    for a, b in zip(plain, ahead, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain[0], plain[1])


@pytest.mark.parametrize("prefetch", [False, True])
def test_a_stream_resumed_from_its_state_continues_bit_for_bit(prefetch, ahead_always):
    s = NoiseStream(11, prefetch=prefetch)
    _sequence(s, SIZES[:3])
    state = {k: v.clone() for k, v in s.state_dict().items()}
    rest = _sequence(s, SIZES[3:])
    t = NoiseStream(99, prefetch=prefetch)  # another seed: the state overrides it
    _sequence(t, [5])  # a pending prefetch of another size is dropped
    t.load_state_dict(state)
    for a, b in zip(rest, _sequence(t, SIZES[3:]), strict=True):
        assert torch.equal(a, b)


def _optim_run(threads: int, prefetch: bool) -> list[torch.Tensor]:
    """Five fused SGHMC steps of ``SamplerOptim`` over param-store parameters."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pyro.clear_param_store()
        store = pyro.get_param_store()
        g = torch.Generator().manual_seed(0)
        ps = [pyro.param(f"AutoDelta.w{i}", torch.randn(300, 200, generator=g))
              .unconstrained() for i in range(3)]
        opt = sampling.SamplerOptim(SGHMC, dict(lr=0.1, num_data=10), lambda name: True,
                                    seed=4, noise="prefetch" if prefetch else "stream")
        for k in range(5):
            _grads(ps, k)
            opt(reversed(ps))  # SVI's order is a set's: the optimiser sorts by name
        return [store[f"AutoDelta.w{i}"].detach().clone() for i in range(3)]
    finally:
        torch.set_num_threads(old)


def test_prefetch_is_for_large_cpu_draws_only():
    s = NoiseStream(0, prefetch=True)
    s.standard_normal(samplers.PREFETCH_MIN - 1, torch.float32, "cpu")
    assert s._pending is None
    s.standard_normal(samplers.PREFETCH_MIN, torch.float32, "cpu")
    assert s._pending is not None
    assert not NoiseStream(0)._ahead((samplers.PREFETCH_MIN, torch.float32, "cpu"))


def test_sampler_optim_does_not_depend_on_threads_prefetch_or_order():
    ref = _optim_run(1, False)
    for threads, prefetch in [(2, False), (1, True), (2, True)]:
        for a, b in zip(_optim_run(threads, prefetch), ref, strict=True):
            assert torch.equal(a, b), (threads, prefetch)


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


def _sampler_fit(**kw):
    bn, data = _blr()
    res = bs.fit(bn, data, "sghmc", lr=1e-2, epochs=6, batch_size=16, burn_in=1,
                 num_chains=2, seed=3, progress=False, **kw)
    return res.samples


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fit_does_not_depend_on_the_prefetch(monkeypatch, ahead_always):
    monkeypatch.setattr(sampling, "NOISE_SOURCE", "stream")
    ref = _sampler_fit()
    monkeypatch.setattr(sampling, "NOISE_SOURCE", "prefetch")
    _same(_sampler_fit(), ref)
    monkeypatch.setattr(sampling, "NOISE_SOURCE", "global")
    other = _sampler_fit()
    assert any(not torch.equal(other[k], ref[k]) for k in ref)  # other numbers


@pytest.mark.parametrize("noise", sampling.NOISE_SOURCES)
def test_a_resumed_sampler_fit_equals_the_uninterrupted_one(tmp_path, monkeypatch, noise,
                                                           ahead_always):
    monkeypatch.setattr(sampling, "NOISE_SOURCE", noise)
    ref = _sampler_fit(checkpoint_dir=tmp_path / "a")
    for stop in (2, 9):  # inside chain 0, inside chain 1
        folder = tmp_path / f"b{stop}"
        with pytest.raises(Interrupt):
            _sampler_fit(checkpoint_dir=folder, callbacks=[_stop_at(stop)])
        _same(_sampler_fit(checkpoint_dir=folder), ref)


def test_the_noise_state_is_checkpointed_and_a_changed_one_changes_the_run(tmp_path,
                                                                           monkeypatch):
    """The own stream's state is what makes its resume exact: resuming with it reset to a
    fresh stream gives other draws (so the equality above is not vacuous)."""
    monkeypatch.setattr(sampling, "NOISE_SOURCE", "stream")
    ref = _sampler_fit(checkpoint_dir=tmp_path / "a")
    folder = tmp_path / "b"
    with pytest.raises(Interrupt):
        _sampler_fit(checkpoint_dir=folder, callbacks=[_stop_at(3)])
    orig = sampling.DrawCollector.load_state_dict

    def forget_noise(self, state):  # everything restored but the generator's state
        fresh = NoiseStream(0)
        fresh.standard_normal(1, torch.float32, "cpu")
        orig(self, {**state, "noise": fresh.state_dict()})

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sampling.DrawCollector, "load_state_dict", forget_noise)
        changed = _sampler_fit(checkpoint_dir=folder)
    assert any(not torch.equal(changed[k], ref[k]) for k in ref)


def test_fixed_free_parameters_do_not_move():
    pyro.clear_param_store()
    w = pyro.param("AutoDelta.w", torch.ones(4)).unconstrained()
    b = pyro.param("net.bias", torch.ones(2)).unconstrained()
    opt = sampling.SamplerOptim(SGLD, dict(lr=0.1, num_data=1, fixed_free=True),
                                lambda name: name.startswith("AutoDelta"), seed=0)
    w.grad, b.grad = torch.ones(4), torch.ones(2)
    opt([w, b])
    assert torch.equal(b.detach(), torch.ones(2)) and not torch.equal(w.detach(), torch.ones(4))
    state = opt.get_state()
    assert sorted(state) == ["AutoDelta.w", "net.bias"]
    assert state["AutoDelta.w"]["state"][0]["step"] == 1


def test_exploration_phase_draws_no_noise():
    """An exploration step (no noise) leaves the stream where it was; a sampling step
    takes one draw."""
    def run(steps):
        p = torch.nn.Parameter(torch.zeros(8))
        stream = NoiseStream(0)
        opt = samplers.SGLD([p], lr=0.1, cycles=1, total_steps=4, explore=0.5,
                            noise_source=stream)
        for _ in range(steps):
            p.grad = torch.ones(8)
            opt.step()
        return stream.standard_normal(8, torch.float32, "cpu")

    fresh = NoiseStream(0).standard_normal(8, torch.float32, "cpu")
    assert torch.equal(run(2), fresh)  # steps 0, 1 of 4: exploring
    assert not torch.equal(run(3), fresh)  # step 2: sampling
