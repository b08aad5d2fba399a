"""SpectralNorm(mode="fused", block=2): a kept 2-column block and the closed-form top Ritz
pair (fused.RankOneFused / Rule) instead of one power-iteration vector, so the value and the
gradient follow the top singular pair where the top two singular values cross. The shared
fused-penalty checks of test_fused_every.py / test_fused_spectral_norm.py are run on it
(their penalty factories patched), plus the digits-trajectory accuracy at every=1."""

from __future__ import annotations

import copy

import pytest
import test_fused_every as E
import test_fused_spectral_norm as SN
import torch
from fused_helpers import data as _data
from fused_helpers import loss as _loss
from fused_helpers import run as _run
from fused_helpers import steps_without_host_sync
from torch import nn

from bayes_spectral import penalties as P

NAME = "spectral norm block 2"


def _make(**kw):
    return P.SpectralNorm(E.COEF, mode="fused", block=2, **kw)


@pytest.fixture
def block2(monkeypatch):
    """test_fused_every's KINDS / ALONG_TOL with the 2-column spectral norm added."""
    monkeypatch.setitem(E.KINDS, NAME, (_make, E.exact_spectral))
    monkeypatch.setitem(E.ALONG_TOL, NAME, (1e-3, 0.99))
    return NAME


@pytest.fixture
def sn_block2(monkeypatch):
    """test_fused_spectral_norm's ``_fused`` factory building the 2-column penalty."""
    monkeypatch.setattr(SN, "_fused", lambda fuse="adjacent", **kw: P.SpectralNorm(
        SN.COEF, mode="fused", fuse_min=0, fuse=fuse, block=2, **kw))


@pytest.fixture(scope="module")
def digits_trajectory():
    from test_fast_mode import digits_trajectory as trajectory

    return trajectory()


def along(trajectory, pen, every=1, start=20):
    """``(worst relative value error, smallest gradient cosine)`` of the fused ``pen`` against
    autograd of ``coef/2 ||W||_2^2`` on every due step from ``start``: the trajectory's two
    weights copied into two hooked Linear layers step by step (a plain twin gives the task
    gradient), the value read from ``reg.history`` (the unscaled value of the call)."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64)).double()
    plain = copy.deepcopy(model)  # a deep copy runs plain
    reg = P.Regularizer(model, pen, every=every)
    worst, low = 0.0, 1.0
    for step, ws in E.replay(model, plain, trajectory):
        reg.accumulate_grad()
        if step % every or step < start:
            continue
        for err, cos in E.layer_errors(model, plain, reg, ws, E.exact_spectral):
            worst, low = max(worst, err), min(low, cos)
    reg.remove_hooks()
    return worst, low


def test_every_1_along_a_digits_trajectory(digits_trajectory):
    """Every step from step 20 of the digits Adam trajectory (MLP 64-64-64-10, 120 steps,
    where the top two singular values cross): value within 1e-3 relative of the exact
    spectral-norm penalty, gradient cosine >= 0.99 (one vector, block=1: 7-11% off, cosine
    down to 0.01)."""
    worst, low = along(digits_trajectory, _make(fuse_min=0))
    assert worst <= 1e-3 and low >= 0.99, (worst, low)


def test_every_1_along_a_digits_trajectory_unhooked_rows(digits_trajectory):
    """The same with both layers under ``fuse_min`` (the step in accumulate_grad)."""
    worst, low = along(digits_trajectory, _make(fuse_min=10**9))
    assert worst <= 1e-3 and low >= 0.99, (worst, low)


def test_every_8_along_a_digits_trajectory(block2, digits_trajectory):
    """every=8, due steps from step 20: within 1e-3 / 0.99; off steps add nothing."""
    E.test_every_8_along_a_digits_trajectory(block2, digits_trajectory)


def test_fixed_weights_gradient_is_the_exact_gradient(sn_block2):
    """300 warm steps at fixed weights: cosine >= 0.9999, relative error <= 1e-9, value
    within 1e-9 (test_fused_spectral_norm's check)."""
    SN.test_fixed_weights_gradient_is_the_exact_spectral_norm_gradient("adjacent")


@pytest.mark.parametrize("how", ["accumulate_grad", "loss"])
def test_every_4_at_fixed_weights_adds_4_times_the_exact_gradient(block2, how):
    E.test_k_steps_at_fixed_weights_add_k_times_the_exact_gradient(block2, how)


def test_hooked_and_unhooked_rows_take_the_same_step():
    """10 SGD steps, every layer hooked (fuse_min=0) vs none (the step in accumulate_grad):
    the same weights (float64, 1e-12)."""
    x, y = _data()
    out = []
    for fuse_min in (0, 10**9):
        model = SN._mlp()
        reg = P.Regularizer(model, _make(fuse_min=fuse_min), log=False)
        assert len(reg.fused) == (3 if fuse_min == 0 else 0)
        _run(model, reg, torch.optim.SGD(model.parameters(), lr=0.05), x, y, 10)
        reg.remove_hooks()
        out.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(out[0], out[1], rtol=1e-12, atol=1e-12)


def test_off_steps_leave_the_block_alone(block2):
    E.test_off_steps_leave_the_state_alone(block2)


def test_no_host_sync_every_1(monkeypatch):
    """Forward, backward, accumulate_grad (log=False) and SGD's step with item, float, bool,
    int and tolist raising; a hooked (784 x 96) and an unhooked (96 x 10) layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 96), nn.ReLU(), nn.Linear(96, 10))
    reg = P.Regularizer(model, _make(), log=False)
    assert reg.fused == ["0"]
    x, y = torch.randn(8, 784), torch.randn(8, 10)
    value = steps_without_host_sync(monkeypatch, model, reg, x, y, 3)
    assert float(value) > 0
    reg.remove_hooks()


def test_no_host_sync_every_4(block2, monkeypatch):
    E.test_off_steps_read_nothing_back_from_the_device(monkeypatch, block2)


def test_resume_bit_for_bit(sn_block2):
    """Through Regularizer.state_dict and a real torch.save (every=1; the in-place state is
    refused naming the mode)."""
    SN.test_resume_bit_for_bit_through_regularizer_state("adjacent")


def test_resume_mid_window_bit_for_bit(block2):
    E.test_resume_mid_window_bit_for_bit(block2)


def test_removing_hooks_restores_plain_behaviour(sn_block2):
    SN.test_removing_hooks_restores_plain_behaviour("adjacent")


def test_block_1_and_block_2_states_are_refused_across():
    """A saved block=1 state under block=2 (and back) is refused, naming ``block``; the
    block=2 state holds ``block: 2`` and a 2 x n ``v`` per layer; block=1's is unchanged."""
    x, y = _data()
    regs = {}
    for block in (1, 2):
        model = SN._mlp()
        pen = P.SpectralNorm(E.COEF, mode="fused", fuse_min=0, block=block)
        regs[block] = P.Regularizer(model, pen, log=False)
        _loss(model, x, y).backward()
        regs[block].accumulate_grad()
    one, two = (regs[b].state_dict()["penalties"][0]["state"] for b in (1, 2))
    assert "block" not in one and one["layers"]["2"]["v"].shape == (48,)
    assert two["block"] == 2 and two["layers"]["2"]["v"].shape == (2, 48)
    with pytest.raises(ValueError, match="block"):
        regs[2].load_state_dict(regs[1].state_dict())
    with pytest.raises(ValueError, match="block"):
        regs[1].load_state_dict(regs[2].state_dict())
    for reg in regs.values():
        reg.remove_hooks()


def test_refusals():
    with pytest.raises(ValueError, match="block"):
        P.SpectralNorm(E.COEF, mode="fused", block=3)
    with pytest.raises(ValueError, match="block"):
        P.SpectralNorm(E.COEF, mode="inplace", block=2)
    with pytest.raises(ValueError, match="gemm"):
        P.SpectralNorm(E.COEF, mode="fused", block=2, fuse="gemm")
    with pytest.raises(ValueError, match="n_iter"):
        P.SpectralNorm(E.COEF, mode="fused", block=1, n_iter=2)
    with pytest.raises(ValueError, match="n_iter"):
        P.SpectralNorm(E.COEF, mode="fused", block=2, n_iter=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_every_4_on_cuda_equals_cpu_without_sync(block2):
    """Device check (``-m cuda``): test_fused_every's CUDA-vs-CPU check (9 SGD steps, every=4,
    steps 2-9 under ``set_sync_debug_mode("error")``) on the 2-column block."""
    E.test_every_4_on_cuda_equals_cpu_without_sync(block2)


def test_hookless_rank_one_loss_gives_the_exact_gradient():
    """penalties.rank_one.rank_one_loss (the path of weights no hook sees) takes the 2-column
    spectral norm: after 200 calls at a fixed 30 x 40 weight the value and the gradient equal
    autograd of coef/2 ||W||_2^2 (float64, 1e-9 relative)."""
    from bayes_spectral.penalties.rank_one import rank_one_loss

    w = torch.randn(30, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pen = _make()
    for _ in range(200):
        rank_one_loss(pen, w, "w")
    leaf = w.clone().requires_grad_(True)
    value = rank_one_loss(pen, leaf, "w")
    (g,) = torch.autograd.grad(value, leaf)
    ref_leaf = w.clone().requires_grad_(True)
    ref = E.exact_spectral(ref_leaf)
    (g_ref,) = torch.autograd.grad(ref, ref_leaf)
    value, ref = float(value.detach()), float(ref.detach())
    assert abs(value - ref) <= 1e-9 * ref
    assert float((g - g_ref).norm() / g_ref.norm()) <= 1e-9
    assert P.SpectralNorm(E.COEF, mode="fused").block == 1  # the default stays one vector
