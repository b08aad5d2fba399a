"""``mode="fast"`` of the tail penalties against the exact path along a digits trajectory.

Frechet prior: deterministic (warm-started power iteration), value within 1e-3 relative
and gradient cosine >= 0.99. Power-law prior: stochastic (Hutchinson x Chebyshev on the
tail function, bulk exact), unbiased for the interpolant with the stated sd, interpolation
bias measured; one draw's gradient is noisy (its cosine is measured, not promised).
"""

import math

import pytest
import torch
from torch import nn

from bayes_spectral import penalties as P
from bayes_spectral.data import load_digits

COS = nn.functional.cosine_similarity


@pytest.fixture(scope="module")
def trajectory():
    return digits_trajectory()


def digits_trajectory():
    """Both weights of an MLP 64-64-64-10 along 120 Adam steps on digits (float64); also
    ``test_fused_frechet.py``'s trajectory."""
    torch.manual_seed(0)
    d = load_digits(dtype=torch.float64)
    net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                        nn.Linear(64, 10)).double()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    traj = []
    for _ in range(120):
        idx = torch.randint(0, len(d.x_train), (64,))
        loss = nn.functional.cross_entropy(net(d.x_train[idx]), d.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        traj.append({"0": net[0].weight.detach().clone(), "2": net[2].weight.detach().clone()})
    return traj


def _grad(pen, W, name):
    w = W.clone().requires_grad_(True)
    v = pen(w, name=name)
    (g,) = torch.autograd.grad(v, w)
    return v.detach(), g


def _worst_along(trajectory, fast, exact):
    """``(largest relative value error, smallest gradient cosine)`` of ``fast`` against
    ``exact`` every 10 steps of the trajectory; ``fast`` is called at every step (its
    iteration follows ``W``)."""
    worst_v, worst_c = 0.0, 1.0
    for step, ws in enumerate(trajectory):
        for name, W in ws.items():
            v, g = _grad(fast, W, name)
            if step % 10:
                continue
            ve, ge = _grad(exact, W, name)
            worst_v = max(worst_v, float((v - ve).abs() / ve.abs()))
            worst_c = min(worst_c, float(COS(g.flatten(), ge.flatten(), dim=0)))
    return worst_v, worst_c


def test_frechet_fast_matches_exact_along_training(trajectory):
    fast = P.FrechetPrior(2.0, 1.0, 0.5, mode="fast")
    exact = P.FrechetPrior(2.0, 1.0, 0.5)
    worst_v, worst_c = _worst_along(trajectory, fast, exact)
    assert worst_v < 1e-3, worst_v
    assert worst_c > 0.99, worst_c


def test_frechet_fast_in_place_equals_autograd_of_the_call(trajectory):
    """``accumulate_grad`` (closed form) vs autograd of the call, same power-iteration state."""
    for W in (trajectory[50]["2"], torch.randn(3, 5, 4, 4, dtype=torch.float64)):
        a = P.FrechetPrior(2.0, 1.0, 0.5, mode="fast")
        b = P.FrechetPrior(2.0, 1.0, 0.5, mode="fast")
        grad = torch.full_like(W, 0.25)
        val = a.accumulate_grad(W, grad, name="l", scale=3.0)
        v, g = _grad(b, W, "l")
        torch.testing.assert_close(val, 3.0 * v, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, 0.25 + 3.0 * g, rtol=1e-10, atol=1e-12)


def _power(**kw):
    return P.PowerLawPrior(3.0, 0.5, mode="fast", **kw)


def _tail_fro(W):
    """``||h(G)||_F`` for the prior's tail function ``h`` (alpha 3, xmin = tau = 0.5)."""
    ev = torch.linalg.eigvalsh(W.mT @ W if W.shape[0] >= W.shape[1] else W @ W.mT)
    return float(P.PowerLawPrior(3.0, 0.5)._tail_function(ev).square().sum().sqrt())


@pytest.mark.slow
def test_powerlaw_fast_is_unbiased_with_the_stated_sd(trajectory):
    """At steps 0, 60, 119 of both layers: 200 draws (16 probes) have mean within 3 SE of
    the exact-probe value (``probes="exact"``: the interpolant's trace), that value within
    5e-2 relative of the exact penalty at ``degree=32`` (the interpolation bias), and the sd
    of one draw below the documented ``sqrt(2/p) ||h(G)||_F`` (15% sampling slack)."""
    for step in (0, 60, 119):
        for name in ("0", "2"):
            W = trajectory[step][name]
            exact = float(P.PowerLawPrior(3.0, 0.5)(W))
            pen = _power(probes=16)
            pen(W, name="l")  # the block iteration's first call
            interp = float(_power(probes="exact")(W))
            draws = torch.stack([pen(W, name="l") for _ in range(200)]).detach()
            sd = float(draws.std())
            assert abs(float(draws.mean()) - interp) < 3 * sd / math.sqrt(200), (step, name)
            assert abs(interp - exact) < 5e-2 * abs(exact), (step, name, interp, exact)
            assert sd < 1.15 * math.sqrt(2 / 16) * _tail_fro(W), (step, name, sd)


@pytest.mark.slow
def test_powerlaw_fast_gradient_is_unbiased(trajectory):
    """The mean of 200 gradients has cosine > 0.99 with the exact-probe gradient and > 0.97
    with the exact penalty's (interpolation bias); one draw's cosine is ~0.7 (measured)."""
    W = trajectory[60]["0"]
    ref = _grad(_power(probes="exact", degree=64), W, "l")[1].flatten()
    exact = _grad(P.PowerLawPrior(3.0, 0.5), W, "l")[1].flatten()
    pen = _power(probes=16, degree=64)
    gs = torch.stack([_grad(pen, W, "l")[1].flatten() for _ in range(200)])
    assert float(COS(gs.mean(0), ref, dim=0)) > 0.99
    assert float(COS(gs.mean(0), exact, dim=0)) > 0.97
    assert float(COS(gs[0], exact, dim=0)) < 0.95  # one draw: noisy, as documented


def test_powerlaw_fast_exact_probes_converge_to_exact_value(trajectory):
    W = trajectory[119]["0"]
    exact = float(P.PowerLawPrior(3.0, 0.5)(W))
    errs = [abs(float(_power(probes="exact", degree=d)(W)) - exact) for d in (8, 128)]
    assert errs[1] < 2e-3 * abs(exact) and errs[1] < errs[0], errs


def test_powerlaw_fast_in_place_equals_autograd_of_the_call(trajectory):
    W = trajectory[30]["2"]
    a, b = _power(seed=3), _power(seed=3)  # same seed: same probes, same power iteration
    grad = torch.zeros_like(W)
    val = a.accumulate_grad(W, grad, name="l", scale=2.0)
    v, g = _grad(b, W, "l")
    torch.testing.assert_close(val, 2.0 * v, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad, 2.0 * g, rtol=1e-12, atol=1e-14)


def test_powerlaw_fast_on_pooled_conv_kernel():
    torch.manual_seed(0)
    W = torch.randn(6, 5, 3, 3, dtype=torch.float64) * 0.3
    exact = float(P.PowerLawPrior(3.0, 0.5)(W))
    fast = float(_power(probes="exact", degree=128)(W))
    assert fast == pytest.approx(exact, rel=2e-3)


def test_fast_mode_float32_keeps_dtype():
    W = torch.randn(40, 30) * 0.2
    for pen in (_power(), P.FrechetPrior(2.0, 1.0, 0.5, mode="fast")):
        v = pen(W, name="l")
        assert v.dtype == torch.float32 and math.isfinite(float(v))


@pytest.mark.parametrize("make, match", [
    (lambda: P.WeightedAlpha(mode="fast"), "not available"),
    (lambda: P.PowerLawPrior(3.0, 0.5, xmin_quantile=0.9, mode="fast"), "fixed xmin"),
    (lambda: P.FrechetPrior(2.0, 1.0, 0.5, tracked=True, mode="exact"), "contradicts"),
    (lambda: P.FrechetPrior(2.0, 1.0, 0.5, mode="quick"), "mode must be one of"),
    (lambda: P.PowerLawPrior(3.0, 0.5, mode="fast", probes=0), "probes"),
])
def test_bad_modes_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_mode_tracked_is_tracked_true():
    assert P.FrechetPrior(2.0, 1.0, 0.5, mode="tracked").tracked
    assert P.PowerLawPrior(3.0, 0.5, tracked=True).mode == "tracked"
    assert P.WeightedAlpha().mode == "exact"


# ----------------------------------------------------------------------------- digits


def _train(seed, penalty, epochs=6):
    """MLP 64-64-10, Adam 1e-2, batch 64, the penalty through ``accumulate_grad``."""
    d = _DIGITS()
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    reg = P.Regularizer(model, penalty, log=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(d.x_train), generator=gen)
        for i in range(0, len(perm), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            nn.functional.cross_entropy(model(d.x_train[idx]), d.y_train[idx]).backward()
            reg.accumulate_grad()
            opt.step()
    with torch.no_grad():
        return float((model(d.x_test).argmax(1) == d.y_test).double().mean())


_CACHE = {}


def _DIGITS():
    if "d" not in _CACHE:
        _CACHE["d"] = load_digits()
    return _CACHE["d"]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["power law", "Frechet"])
def test_fast_mode_reaches_the_exact_accuracy_on_digits(name):
    """Three seeds each, coefficient 1e-3;
    the fast mode's mean accuracy within 0.015 of the exact path's (5 of 359 digits)."""
    make = {"power law": lambda m: P.PowerLawPrior(3.0, 0.5, coef=1e-3, mode=m),
            "Frechet": lambda m: P.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3, mode=m)}[name]
    acc = {m: [_train(s, make(m)) for s in range(3)] for m in ("exact", "fast")}
    mean = {m: sum(v) / 3 for m, v in acc.items()}
    assert min(mean.values()) > 0.94, acc
    assert abs(mean["fast"] - mean["exact"]) <= 0.015, acc


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fast_mode_in_place_makes_no_host_sync():
    model = nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 32)).cuda()
    for pen in (_power(), P.FrechetPrior(2.0, 1.0, 0.5, mode="fast")):
        reg = P.Regularizer(model, pen, log=False)
        reg.accumulate_grad()  # first call: state built
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                reg.accumulate_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_frechet_sync_free_density_equals_the_shared_formula():
    pen = P.FrechetPrior(2.5, 1.5, 0.3, loc=0.2, mode="fast")
    lam = torch.tensor([0.5, 3.0, 40.0], dtype=torch.float64)
    rest = torch.tensor([7.0, 1.0, 100.0], dtype=torch.float64)
    for n_rest in (0, 9):
        torch.testing.assert_close(pen._fast_log_density(lam, rest, n_rest),
                                   pen._log_density(lam, rest, n_rest), rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("name", ["0", "2"])
def test_powerlaw_bound_survives_a_block_left_60_steps_behind(trajectory, name):
    """Called at steps 0 and 60 only: the default 4 block steps per call bring the bound back
    above ``lambda_max`` (with 1 step the Ritz value was 0.29 ``lambda_max`` and the
    polynomial, extrapolated above its interval, gave a value off by orders of magnitude)."""
    W0, W60 = trajectory[0][name], trajectory[60][name]
    exact = float(P.PowerLawPrior(3.0, 0.5)(W60))
    pen = _power(probes="exact")
    pen(W0, name="l")
    assert abs(float(pen(W60, name="l")) - exact) < 5e-2 * abs(exact)


# ----------------------------------------------------------------------------- stable rank


def test_stable_rank_fast_matches_exact_along_training(trajectory):
    """``||W||_F^2 / lambda_max`` with the block iteration's ``lambda_max``, called at every
    step: value within 1e-3 relative of exact and gradient cosine >= 0.99 (checked every
    10 steps, after the first call's 16 warm-up steps)."""
    fast, exact = P.StableRank(mode="fast"), P.StableRank()
    worst_v, worst_c = _worst_along(trajectory, fast, exact)
    assert worst_v < 1e-3, worst_v
    assert worst_c > 0.99, worst_c


def test_stable_rank_fast_is_a_lower_ritz_bound_inverted():
    """``lambda`` is a Ritz value (``<= lambda_max``), so the fast value is ``>=`` the exact
    one; on a fixed conv kernel (pooled slices) repeated calls converge to it (1e-10)."""
    torch.manual_seed(1)
    W = torch.randn(6, 5, 3, 3, dtype=torch.float64)
    pen, exact = P.StableRank(mode="fast"), float(P.StableRank()(W))
    first = float(pen(W, name="c"))
    for _ in range(60):
        last = float(pen(W, name="c"))
    assert first >= exact * (1 - 1e-12)
    assert last == pytest.approx(exact, rel=1e-10)


def test_stable_rank_fast_gradient_is_the_closed_form():
    """At a converged block: ``d/dW (F / lambda) = 2 W / lambda - 2 F u v^T / lambda^2``,
    the exact gradient of the stable rank (simple top eigenvalue), to 1e-8."""
    torch.manual_seed(2)
    W = torch.randn(30, 20, dtype=torch.float64)
    pen = P.StableRank(coef=2.0, mode="fast")
    for _ in range(40):
        pen(W, name="l")
    g = _grad(pen, W, "l")[1]
    ge = _grad(P.StableRank(coef=2.0), W, "l")[1]
    torch.testing.assert_close(g, ge, rtol=1e-8, atol=1e-10)


def test_stable_rank_fast_float32_and_bad_modes():
    v = P.StableRank(mode="fast")(torch.randn(40, 30) * 0.2, name="l")
    assert v.dtype == torch.float32 and math.isfinite(float(v))
    for bad in ("tracked", "quick"):
        with pytest.raises(ValueError, match=r"StableRank: mode must be one of \('exact', "
                                             r"'fast'\)"):
            P.StableRank(mode=bad)
    with pytest.raises(ValueError, match="power_iters"):
        P.StableRank(mode="fast", power_iters=-1)
