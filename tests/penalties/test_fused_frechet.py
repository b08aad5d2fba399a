"""FrechetPrior(mode="fused") and StableRank(mode="fused"): the gradient of a penalty of
``lambda_max = sigma_max^2`` (and ``||W||_F^2``) rides along with each nn.Linear's own
forward/backward like SpectralNorm's fused mode: ``dR/dW = c(lambda, total) r v^T + d W``
with ``r = W v`` from one power-iteration step per training step. Checked against autograd
of the exact penalties written here from ``torch.linalg.svdvals``."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
from fused_helpers import check_fused_resume, steps_without_host_sync
from fused_helpers import data as _data
from fused_helpers import loss as _loss
from fused_helpers import mlp as _mlp
from fused_helpers import train as _train
from torch import nn

from bayes_spectral import penalties as P

COEF = 0.3
A, S, TAU = 2.0, 1.0, 2.0  # Frechet concentration, scale; exponential mean of the bulk


def _frechet(**kw):
    return P.FrechetPrior(A, S, TAU, coef=COEF, mode="fused", fuse_min=0, **kw)


def _stable(**kw):
    return P.StableRank(COEF, mode="fused", fuse_min=0, **kw)


def exact_frechet(w):
    """``-coef [log Frechet(lambda_1; a, s) + sum_{i>1} log Exp(lambda_i; tau)]`` from the
    singular values (``lambda_i = s_i^2``, descending)."""
    lam = torch.linalg.svdvals(w).square()
    z = lam[0] / S
    log_f = math.log(A) - math.log(S) - (1 + A) * torch.log(z) - z.pow(-A)
    log_e = (-math.log(TAU) - lam[1:] / TAU).sum()
    return -COEF * (log_f + log_e)


def exact_stable(w):
    """``coef ||W||_F^2 / ||W||_2^2``."""
    return COEF * w.square().sum() / torch.linalg.matrix_norm(w, 2).square()


KINDS = {"frechet": (_frechet, exact_frechet), "stable rank": (_stable, exact_stable)}


@pytest.fixture(params=sorted(KINDS))
def kind(request):
    return request.param


def test_fixed_weights_gradient_and_value_are_the_exact_ones(kind):
    """After 300 one-step iterations at fixed weights the fused gradient (penalised minus
    plain) equals autograd of the exact penalty (cosine >= 0.9999 on the whole gradient and
    on its part beside the ``W`` multiple, relative error <= 1e-8; float64), and the value
    returned by accumulate_grad equals the exact value to 1e-6 relative."""
    make, exact = KINDS[kind]
    model = _mlp()
    plain = copy.deepcopy(model)
    x, y = _data()
    reg = P.Regularizer(model, make(), log=False)
    assert reg.fused == ["0", "2", "4"]
    for _ in range(300):
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        reg.accumulate_grad()
    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()
    value = reg.accumulate_grad()
    _loss(plain, x, y).backward()
    total = 0.0
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if not name.endswith("weight"):
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
            continue
        w = p.detach().clone().requires_grad_(True)
        r = exact(w)
        (g_exact,) = torch.autograd.grad(r, w)
        total += float(r.detach())
        g_fused = p.grad - q.grad
        cos = nn.functional.cosine_similarity(g_fused.flatten(), g_exact.flatten(), dim=0)
        assert cos >= 0.9999, (name, float(cos))
        assert float((g_fused - g_exact).norm() / g_exact.norm()) <= 1e-8, name
        # the rank-1 part alone (the W multiple is 2 coef/tau for Frechet, 2 coef/lambda for
        # stable rank: taken out with the exact lambda)
        lam = torch.linalg.matrix_norm(w.detach(), 2).square()
        d = 2 * COEF / TAU if kind == "frechet" else 2 * COEF / lam
        cos1 = nn.functional.cosine_similarity((g_fused - d * w.detach()).flatten(),
                                               (g_exact - d * w.detach()).flatten(), dim=0)
        assert cos1 >= 0.9999, (name, float(cos1))
    assert abs(float(value) - total) <= 1e-6 * abs(total)


def test_one_step_is_plain_plus_the_closed_form(kind):
    """One hooked step: outputs bit for bit, bias gradients untouched, every weight gradient
    the plain one plus the gradient of R(|W v|^2, ||W||_F^2) at the held v (autograd), v
    the top Ritz vector of W on the held 2-column block V (eigh here) after the rule's extra
    block steps at W (StableRank's ``power_iters - 1``: V <- span(W^T W V)); afterwards V
    spans W^T W V (one block power step; projectors equal)."""
    make, _ = KINDS[kind]
    model = _mlp()
    plain = copy.deepcopy(model)
    x, y = _data()
    pen = make()
    reg = P.Regularizer(model, pen, log=False)
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        reg.accumulate_grad()
    blocks = {n: st.v.t().clone() for n, st in pen._fused.items()}  # stored as 2 x n rows
    assert all(b.shape[1] == 2 for b in blocks.values())
    model.zero_grad(set_to_none=True)
    out, ref = model(x), plain(x)
    assert torch.equal(out, ref)
    (out - y).square().mean().backward()
    (ref - y).square().mean().backward()
    for name in ("0", "2", "4"):
        w = getattr(plain, name).weight.detach()
        vb = blocks[name]
        torch.testing.assert_close(vb.t() @ vb, torch.eye(2, dtype=vb.dtype), rtol=0,
                                   atol=1e-12)
        for _ in range(pen._rule.extra):
            vb = torch.linalg.qr(w.t() @ (w @ vb)).Q
        rb = w @ vb
        v = vb @ torch.linalg.eigh(rb.t() @ rb).eigenvectors[:, -1]
        leaf = w.clone().requires_grad_(True)
        value = pen._rank_one_value((leaf @ v).square().sum(), leaf.square().sum(),
                                    min(w.shape))
        (g_ref,) = torch.autograd.grad(value, leaf)
        torch.testing.assert_close(getattr(model, name).weight.grad,
                                   getattr(plain, name).weight.grad + g_ref,
                                   rtol=1e-10, atol=1e-13)
        assert torch.equal(getattr(model, name).bias.grad, getattr(plain, name).bias.grad)
        q = torch.linalg.qr(w.t() @ rb).Q
        new = pen._fused[name].v.t()
        torch.testing.assert_close(new @ new.t(), q @ q.t(), rtol=0, atol=1e-10)


def _fast_of(kind):
    if kind == "frechet":
        return P.FrechetPrior(A, S, TAU, coef=COEF, mode="fast")
    return P.StableRank(COEF, mode="fast")


def _exact_of(kind):
    if kind == "frechet":
        return P.FrechetPrior(A, S, TAU, coef=COEF)
    return P.StableRank(COEF)


#: (max abs from the fast mode, L2 distance from the exact path / the penalty's own effect)
TRAJECTORY_TOL = {"frechet": (6e-3, 0.02), "stable rank": (4e-3, 0.008)}


def test_trajectory_matches_fast_mode_and_the_unhooked_math(kind):
    """40 SGD steps (lr 0.05) after 100 iteration steps at the initial weights. The fused
    run (a 2-column block, one step behind) trails the moving top eigenvector more than the
    fast mode's 8-column block: max abs from the fast run <= TRAJECTORY_TOL (measured
    3.4e-3 Frechet, 2.1e-3 stable rank), and its L2 distance from the exact-SVD run <= 2% /
    0.8% of the penalty's own effect (exact run minus unpenalised run; measured 0.9% /
    0.38%, the fast mode 0.27% / 0.016%; one vector instead of the block: 2.8% / 0.5%).
    The same fused math through the loss and without hooks (accumulate_grad or the loss
    after remove_hooks) within 1e-12."""
    make, _ = KINDS[kind]
    x, y = _data()
    runs = {}
    for run in ("exact", "fast", "fused", "fused loss", "unhooked", "unhooked loss"):
        model = _mlp()
        pen = {"exact": _exact_of, "fast": _fast_of}.get(run, lambda k: make())(kind)
        reg = P.Regularizer(model, pen, log=False)
        if run.startswith("unhooked"):
            reg.remove_hooks()
            assert reg.fused == []
        for _ in range(100):  # converge the vectors at fixed weights (no step)
            if run in ("fused", "fused loss"):
                model(x).sum().backward()  # hooks: one iteration step
            reg.accumulate_grad(scale=0.0)
        _train(model, reg, 40, x, y, in_place=not run.endswith("loss"))
        runs[run] = torch.cat([p.detach().flatten() for p in model.parameters()])
        reg.remove_hooks()
    model = _mlp()
    _train(model, P.Regularizer(model, P.WeightDecay(1e-12), log=False), 40, x, y)
    free = torch.cat([p.detach().flatten() for p in model.parameters()])
    to_fast, to_exact = TRAJECTORY_TOL[kind]
    assert float((runs["fused"] - runs["fast"]).abs().max()) <= to_fast
    effect = (runs["exact"] - free).norm()
    assert float(effect) >= 0.1  # the penalty moved the weights
    assert float((runs["fused"] - runs["exact"]).norm() / effect) <= to_exact
    assert float((runs["fused"] - runs["fused loss"]).abs().max()) <= 1e-12
    assert float((runs["fused"] - runs["unhooked"]).abs().max()) <= 1e-12
    assert float((runs["fused"] - runs["unhooked loss"]).abs().max()) <= 1e-12


def test_fused_step_reads_nothing_back_from_the_device(monkeypatch, kind):
    """Forward, backward, accumulate_grad (log=False) and the optimiser step with item,
    float, bool, int and tolist raising; a hooked layer (784 x 96) and an unhooked one
    (96 x 10, below the default fuse_min)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 96), nn.ReLU(), nn.Linear(96, 10))
    pen = (P.FrechetPrior(A, S, TAU, coef=COEF, mode="fused") if kind == "frechet"
           else P.StableRank(COEF, mode="fused"))
    reg = P.Regularizer(model, pen, log=False)
    assert reg.fused == ["0"]
    x, y = torch.randn(8, 784), torch.randn(8, 10)
    value = steps_without_host_sync(monkeypatch, model, reg, x, y, 2)
    assert math.isfinite(float(value))
    reg.remove_hooks()


def test_resume_bit_for_bit_through_regularizer_state(kind):
    saved, r2 = check_fused_resume(KINDS[kind][0], _mlp)
    fast = P.Regularizer(_mlp(dtype=torch.float32), _fast_of(kind), log=False)
    fast.accumulate_grad()
    with pytest.raises(ValueError, match="mode"):
        r2.load_state_dict(fast.state_dict())
    with pytest.raises(ValueError, match="mode"):
        fast.load_state_dict(saved["r"])
    r2.remove_hooks()


def test_hooks_are_removable_and_refusals(kind):
    make, _ = KINDS[kind]
    x, y = _data()
    model = _mlp()
    plain = copy.deepcopy(model)
    with P.Regularizer(model, make(), log=False) as reg:
        assert all(len(m._forward_hooks) == 1 for m in model if isinstance(m, nn.Linear))
        with pytest.raises(ValueError, match="already"):
            P.Regularizer(model, make())
    assert reg.fused == []
    assert all(not m._forward_hooks for m in model)
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    _loss(model, x, y).backward()
    _loss(plain, x, y).backward()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    reg2 = P.Regularizer(model, make(), log=False)
    del reg2
    gc.collect()
    assert all(not m._forward_hooks for m in model)
    with pytest.raises(ValueError, match="every must be an integer"):
        P.Regularizer(model, make(), every=0)
    assert all(not m._forward_hooks for m in model)
    lazy = P.Regularizer(model, make(), every=4)  # lazy fused: test_fused_every.py
    assert lazy.fused == ["0", "2", "4"]
    lazy.remove_hooks()
    with pytest.raises(ValueError, match="fuse_min"):
        P.StableRank(COEF, mode="fused", fuse_min=-1) if kind == "stable rank" else \
            P.FrechetPrior(A, S, TAU, mode="fused", fuse_min=-1)


def test_pooled_conv_rows_take_the_fast_path(kind):
    """A conv kernel with conv="pool" (no single right vector) gets the fast mode's block
    iteration in accumulate_grad: the same gradient and value as mode="fast"."""
    make, _ = KINDS[kind]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(64, 3)).double()
    reg = P.Regularizer(model, make(), log=False)
    assert reg.fused == ["2"]
    w = model[0].weight.detach().clone()
    g = torch.zeros_like(w)
    ref = _fast_of(kind).accumulate_grad(w, g, name="0")
    model(torch.randn(5, 2, 6, 6, dtype=torch.float64)).sum().backward()
    task = model[0].weight.grad.clone()
    reg.accumulate_grad()
    torch.testing.assert_close(model[0].weight.grad - task, g, rtol=1e-12, atol=1e-14)
    pen = reg.penalty
    assert "0" in pen._tops and "0" not in pen._fused
    reg.remove_hooks()
    assert torch.isfinite(ref)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", sorted(KINDS))
def test_fused_on_cuda_equals_cpu_without_sync(name):
    """Device check (``-m cuda``): 5 fused SGD steps on CUDA equal the CPU ones (float64,
    1e-10), steps 2-5 under ``torch.cuda.set_sync_debug_mode("error")`` (log=False)."""
    make, _ = KINDS[name]
    x, y = _data()
    out = []
    for dev in ("cpu", "cuda"):
        model = _mlp().to(dev)
        reg = P.Regularizer(model, make(), log=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        xd, yd = x.to(dev), y.to(dev)
        for step in range(5):
            if dev == "cuda" and step == 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.zero_grad(set_to_none=True)
                _loss(model, xd, yd).backward()
                reg.accumulate_grad()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out.append(torch.cat([p.detach().cpu().flatten() for p in model.parameters()]))
        reg.remove_hooks()
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("make", [
    lambda: P.FrechetPrior(2.5, 1.5, 0.3, loc=0.2, coef=0.7, mode="fused"),
    lambda: P.FrechetPrior(2.0, 0.8, 0.3, coef=0.7, mode="fused"),
    lambda: P.StableRank(0.7, mode="fused")])
def test_rank_one_value_and_coefs_are_the_penalty_and_its_derivatives(make):
    """The fused mode's value (constants folded) equals the fast mode's density formula to
    1e-13, and its coefficients are 2 dR/dlambda, 2 dR/dtotal by autograd (N = 1 and 9)."""
    pen = make()
    for n in (1, 9):
        lam = torch.tensor(1.7, dtype=torch.float64, requires_grad=True)
        total = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
        value = pen._rank_one_value(lam, total, n)
        if isinstance(pen, P.FrechetPrior):
            ref = -pen.coef * pen._log_density(lam.detach(), total.detach() - lam.detach(),
                                               n - 1)
        else:
            ref = pen.coef * total.detach() / lam.detach()
        torch.testing.assert_close(value.detach(), ref, rtol=1e-13, atol=1e-13)
        d_lam, d_total = torch.autograd.grad(value, (lam, total), allow_unused=True)
        d_total = torch.zeros(()) if d_total is None else d_total  # N = 1: no bulk
        c, d = pen._rank_one_coefs(lam.detach(), total.detach(), n)
        torch.testing.assert_close(c, 2 * d_lam, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(torch.as_tensor(0.0 if d is None else d,
                                                   dtype=torch.float64),
                                   2 * d_total.double(), rtol=1e-12, atol=1e-14)


@pytest.fixture(scope="module")
def digits_trajectory():
    """Both hidden weights of an MLP 64-64-64-10 along 120 Adam steps (lr 1e-2) on digits
    (float64): test_fast_mode.py's trajectory."""
    from test_fast_mode import digits_trajectory as trajectory

    return trajectory()


#: (worst relative value error, smallest gradient cosine) at steps 20, 30, ..., 110
ALONG_TOL = {"frechet": (5e-4, 0.999), "stable rank": (1e-3, 0.995)}


def test_value_and_gradient_along_a_digits_trajectory(kind, digits_trajectory):
    """The fused step at every weight of the trajectory (accumulate_grad: the hooks'
    identical step), checked every 10 steps from step 20 against autograd of the exact
    penalty: value within ALONG_TOL relative and gradient cosine above it (measured: Frechet
    4.9e-5 / 0.99986, stable rank 2.9e-4 / 0.99925 with its default power_iters=2, one
    block step at the current weights before the value; 1.9e-3 / 0.995 with power_iters=1,
    the earlier default; in steps 0-10, while Adam moves fastest, Frechet 2.6e-4 / 0.991;
    the fast mode's 8-column block, 2 steps per call, does better on stable rank: 1.2e-6 /
    0.99999)."""
    make, exact = KINDS[kind]
    pen = make()
    worst, low = 0.0, 1.0
    for step, ws in enumerate(digits_trajectory):
        for name, w in ws.items():
            g = torch.zeros_like(w)
            value = pen.accumulate_grad(w, g, name=name)
            if step < 20 or step % 10:
                continue
            leaf = w.clone().requires_grad_(True)
            ref = exact(leaf)
            (g_ref,) = torch.autograd.grad(ref, leaf)
            worst = max(worst, float((value - ref.detach()).abs() / ref.detach().abs()))
            low = min(low, float(nn.functional.cosine_similarity(g.flatten(), g_ref.flatten(),
                                                                 dim=0)))
    tol_value, tol_cos = ALONG_TOL[kind]
    assert worst <= tol_value and low >= tol_cos, (worst, low)


def test_top_ritz_and_orth2_closed_forms():
    """The 2 x 2 top eigenvector in closed form equals eigh's (up to sign) on random and
    nearly degenerate blocks, gives e_1 for a multiple of the identity; orth2 returns
    orthonormal rows spanning the input's."""
    from bayes_spectral.penalties.fused import orth2, top_ritz

    g = torch.Generator().manual_seed(3)
    for gap in (1.0, 1e-3, 1e-9):
        rb = torch.randn(2, 30, generator=g, dtype=torch.float64)
        rb[1] = rb[1] / rb[1].norm() * rb[0].norm() * (1 - gap)
        y = top_ritz(rb)
        e = torch.linalg.eigh(rb @ rb.t()).eigenvectors[:, -1]
        assert abs(float(torch.dot(y, e))) >= 1 - 1e-9, gap
    eye = torch.zeros(2, 5, dtype=torch.float64)
    eye[0, 0] = eye[1, 1] = 2.0
    assert torch.equal(top_ritz(eye), torch.tensor([1.0, 0.0], dtype=torch.float64))
    raw = torch.randn(2, 30, generator=g, dtype=torch.float64)
    q = orth2(raw)
    torch.testing.assert_close(q @ q.t(), torch.eye(2, dtype=torch.float64), rtol=0,
                               atol=1e-14)
    torch.testing.assert_close(raw @ q.t() @ q, raw, rtol=0, atol=1e-12)


def _digits_accuracy(seed, penalty):
    """MLP 64-64-10, Adam 1e-2, batch 64, the penalty through accumulate_grad (hooks on
    both Linear layers when fused); test accuracy: test_fast_mode.py's loop (its
    Regularizer, and so its hooks, end with it; no hook acts under ``no_grad``)."""
    from test_fast_mode import _train

    return _train(seed, penalty)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["frechet", "stable rank"])
def test_fused_mode_reaches_the_exact_accuracy_on_digits(name):
    """Three seeds each, coefficient 1e-3: the fused mode's mean test accuracy within 0.015
    of the exact path's (5 of 359 digits), as the fast mode's test (measured: Frechet 0.959
    fused / 0.963 exact, stable rank 0.968 / 0.968)."""
    make = {"frechet": lambda m: P.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3, mode=m,
                                                fuse_min=0),
            "stable rank": lambda m: P.StableRank(1e-3, mode=m, fuse_min=0)}[name]
    acc = {m: [_digits_accuracy(s, make(m)) for s in range(3)] for m in ("exact", "fused")}
    mean = {m: sum(v) / 3 for m, v in acc.items()}
    assert min(mean.values()) > 0.94, acc
    assert abs(mean["fused"] - mean["exact"]) <= 0.015, acc
