"""Xiao et al.'s Hill estimator (fixed tail fraction) and the logarithm as explicit settings
of ``WeightedAlpha`` / ``PowerLawPrior`` (issue 22, item 1).

Hill at ``k = floor(f N)``: with the eigenvalues descending ``lambda_(1) >= ... >= lambda_(N)``,
``xmin = lambda_(k+1)`` (not in the sum), ``alpha = 1 + k / sum_{i<=k} ln(lambda_(i)/xmin)``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import bayes_spectral as bs
from bayes_spectral import penalties as P
from bayes_spectral.spectra.powerlaw import fit_powerlaw, hill_tail_size


def _weight(m=30, n=20, seed=11):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, n, generator=gen, dtype=torch.float64) / 5


def _value_grad(pen, W, name="w"):
    leaf = W.clone().requires_grad_(True)
    value = pen(leaf, name=name)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach(), grad


def _hand_hill(W, frac):
    """numpy: ``(alpha, lambda_max, k)`` of the Hill estimator written out."""
    lam = np.sort(np.linalg.svd(W.numpy(), compute_uv=False) ** 2)[::-1]  # descending
    k = min(max(int(frac * lam.size), 1), lam.size - 1)
    xmin = lam[k]  # lambda_(k+1), 1-based
    return 1.0 + k / np.log(lam[:k] / xmin).sum(), lam[0], k


@pytest.mark.parametrize("shape,frac,k", [((30, 20), 0.5, 10), ((30, 21), 0.5, 10),
                                          ((30, 20), 0.3, 6), ((30, 20), 1.0, 19)])
def test_hill_value_equals_hand_computation(shape, frac, k):
    W = _weight(*shape)
    alpha, lam_max, k_hand = _hand_hill(W, frac)
    assert k_hand == k == hill_tail_size(shape[1], frac)
    pen = P.WeightedAlpha(0.7, estimator="hill", tail_fraction=frac)
    assert float(pen(W)) == pytest.approx(0.7 * alpha * np.log10(lam_max), rel=1e-12)


@pytest.mark.parametrize("frac", [0.5, 0.3])
def test_hill_alpha_is_fit_powerlaws_hill_rule(frac):
    W = _weight()
    ev = bs.esd(W)
    fit = fit_powerlaw(ev, xmin="hill", tail_fraction=frac)
    k = hill_tail_size(20, frac)
    assert fit.method == "hill" and int(fit.num_tail) == k
    assert int(fit.xmin_index) == 20 - k - 1  # ascending: the (k+1)-th largest
    assert torch.equal(fit.alpha, bs.hill_estimator(ev, k).alpha)
    pen = P.WeightedAlpha(estimator="hill", tail_fraction=frac)
    assert torch.equal(pen(W), fit.alpha * torch.log10(ev[-1]))
    # the fixed-index rule of fit_powerlaw counts xmin in the tail: n = k + 1 values
    idx = fit_powerlaw(ev, xmin_index=20 - k - 1)
    assert float(fit.alpha) - 1 == pytest.approx(k / (k + 1) * (float(idx.alpha) - 1),
                                                 rel=1e-12)


@pytest.mark.parametrize("log", ["log10", "ln"])
def test_hill_gradient_matches_central_differences(log):
    W = _weight(9, 7, seed=3)
    pen = P.WeightedAlpha(0.7, estimator="hill", log=log)
    _, grad = _value_grad(pen, W)
    h = 1e-6
    fd = torch.zeros_like(W)
    for i in range(W.shape[0]):
        for j in range(W.shape[1]):
            E = torch.zeros_like(W)
            E[i, j] = h
            fd[i, j] = (float(pen(W + E)) - float(pen(W - E))) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("estimator", ["ks", "hill"])
@pytest.mark.parametrize("tracked", [False, True])
def test_ln_is_log10_times_ln10(estimator, tracked):
    W = _weight()
    v10, g10 = _value_grad(P.WeightedAlpha(0.7, estimator=estimator, tracked=tracked), W)
    vln, gln = _value_grad(P.WeightedAlpha(0.7, estimator=estimator, tracked=tracked,
                                           log="ln"), W)
    assert float(vln) == pytest.approx(float(v10) * math.log(10), rel=1e-13)
    torch.testing.assert_close(gln, g10 * math.log(10), rtol=1e-12, atol=0)


def _walk(shape, steps=6, seed=5):
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(*shape, generator=gen, dtype=torch.float64) / 5
    for _ in range(steps):
        W = W + 1e-3 * torch.randn(*shape, generator=gen, dtype=torch.float64)
        yield W


HILL = {
    "weighted_alpha": lambda **kw: P.WeightedAlpha(0.7, estimator="hill", **kw),
    "weighted_alpha_ln": lambda **kw: P.WeightedAlpha(0.7, estimator="hill", log="ln",
                                                      tail_fraction=0.3, **kw),
    "powerlaw_prior": lambda **kw: P.PowerLawPrior(3.0, 0.05, coef=0.3, estimator="hill",
                                                   **kw),
}


@pytest.mark.parametrize("key", sorted(HILL))
@pytest.mark.parametrize("shape", [(40, 24), (12, 10, 3, 3)], ids=["linear", "conv"])
def test_tracked_hill_equals_exact(key, shape):
    """The Hill tail is ~N/2 eigenpairs, wider than the tracker's ``wide = 0.4``: every
    tracked call decomposes ("wide") and agrees with the exact path to rounding."""
    tracked, exact = HILL[key](tracked=True), HILL[key]()
    for W in _walk(shape):
        vt, gt = _value_grad(tracked, W)
        ve, ge = _value_grad(exact, W)
        assert float(vt) == pytest.approx(float(ve), rel=1e-10)
        torch.testing.assert_close(gt, ge, rtol=1e-8, atol=1e-10)
        assert tracked.tracker("w").last_reason in ("init", "wide")
    assert tracked.tracker("w").last_reason == "wide"


@pytest.mark.parametrize("key", sorted(HILL))
@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (12, 10, 3, 3)],
                         ids=["tall", "wide", "conv"])
def test_hill_accumulate_grad_equals_autograd(key, shape):
    by_autograd, in_place = HILL[key](tracked=True), HILL[key](tracked=True)
    for W in _walk(shape, steps=4):
        value, expected = _value_grad(by_autograd, W)
        grad = torch.full_like(W, 0.25)
        got = in_place.accumulate_grad(W, grad, name="w", scale=0.7)
        assert float(got) == pytest.approx(0.7 * float(value), rel=1e-12)
        torch.testing.assert_close(grad - 0.25, 0.7 * expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("key", sorted(HILL))
def test_hill_closed_form_tracked_grad_equals_autograd(key):
    pen = HILL[key](tracked=True)
    gen = torch.Generator().manual_seed(3)
    evals = torch.rand(60, generator=gen, dtype=torch.float64) * 3 + 0.05
    n = pen._sizes(torch.sort(evals).values, "w")
    pen._pooled_need["w"] = n
    top = torch.sort(evals, descending=True).values[:n].clone().requires_grad_(True)
    total = evals.sum().clone().requires_grad_(True)
    value = pen._tracked(top, total, 60, "w")
    g_top, g_total = torch.autograd.grad(value, (top, total), allow_unused=True)
    d_top, d_total = pen._tracked_grad(top.detach(), total.detach(), 60)
    torch.testing.assert_close(d_top, g_top, rtol=1e-10, atol=1e-12)
    assert d_total == pytest.approx(0.0 if g_total is None else float(g_total), rel=1e-10)


def test_powerlaw_prior_hill_is_the_quantile_rule_at_the_hill_threshold():
    W = _weight()  # N = 20, k = 10: xmin = lambda_(11) descending = index 9 ascending
    hill = P.PowerLawPrior(3.0, 0.05, coef=0.3, estimator="hill")
    quant = P.PowerLawPrior(3.0, 0.05, coef=0.3, xmin_quantile=9 / 20)
    vh, gh = _value_grad(hill, W)
    vq, gq = _value_grad(quant, W)
    assert torch.equal(vh, vq) and torch.equal(gh, gq)


def test_defaults_are_unchanged():
    """Values and gradients pinned from the code before the settings existed (same seed),
    and bit-equal to the explicit default settings."""
    W = _weight()
    pinned = [
        (P.WeightedAlpha(0.7), P.WeightedAlpha(0.7, estimator="ks", tail_fraction=0.5,
                                               log="log10"), 1.7061359729410457,
         34.20131358901793),
        (P.WeightedAlpha(0.7, tracked=True),
         P.WeightedAlpha(0.7, tracked=True, estimator="ks", log="log10"),
         1.7061359729410381, 34.20131358901734),
        (P.PowerLawPrior(3.0, 0.05, xmin_quantile=0.5, coef=0.3),
         P.PowerLawPrior(3.0, 0.05, xmin_quantile=0.5, coef=0.3, estimator="ks"),
         72.64076344866639, 11519.189537239201),
    ]
    for default, explicit, value, grad_sq in pinned:
        v, g = _value_grad(default, W)
        ve, ge = _value_grad(explicit, W)
        assert torch.equal(v, ve) and torch.equal(g, ge)
        assert float(v) == pytest.approx(value, rel=1e-12)
        assert float(g.square().sum()) == pytest.approx(grad_sq, rel=1e-10)
    a, b = P.WeightedAlpha(0.7, tracked=True), P.WeightedAlpha(0.7, tracked=True, log="log10")
    ga, gb = torch.zeros_like(W), torch.zeros_like(W)
    assert float(a.accumulate_grad(W, ga, name="w")) == float(b.accumulate_grad(W, gb,
                                                                                name="w"))
    assert torch.equal(ga, gb)


def test_registry_entry():
    pen = P.PENALTIES.get("weighted_alpha_hill")(0.7)
    assert isinstance(pen, P.WeightedAlpha) and pen.estimator == "hill" and pen.log == "log10"
    assert "weighted_alpha_hill" not in P.BUILTIN_PENALTIES  # not a default compare baseline
    W = _weight()
    assert torch.equal(pen(W), P.WeightedAlpha(0.7, estimator="hill")(W))


@pytest.mark.parametrize("make,match", [
    (lambda: P.WeightedAlpha(estimator="hil"), "WeightedAlpha: estimator must be one of"),
    (lambda: P.WeightedAlpha(log="log2"), "WeightedAlpha: log must be one of"),
    (lambda: P.WeightedAlpha(tail_fraction=0.0), r"tail_fraction must be in \(0, 1\]"),
    (lambda: P.WeightedAlpha(tail_fraction=1.5), r"tail_fraction must be in \(0, 1\]"),
    (lambda: P.WeightedAlpha(tail_fraction=float("nan")), "tail_fraction"),
    (lambda: P.WeightedAlpha(tail_fraction="half"), "tail_fraction"),
    (lambda: P.WeightedAlpha(estimator="hill", min_tail=5), "no KS fit settings"),
    (lambda: P.PowerLawPrior(3.0, 0.05, estimator="KS"), "PowerLawPrior: estimator"),
    (lambda: P.PowerLawPrior(3.0, 0.05, tail_fraction=-0.1), "PowerLawPrior: tail_fraction"),
    (lambda: P.PowerLawPrior(3.0, 0.05, estimator="hill", xmin_quantile=0.5),
     "estimator='hill' sets xmin itself"),
    (lambda: fit_powerlaw(torch.rand(10) + 0.1, tail_fraction=0.5), "xmin='hill' alone"),
    (lambda: fit_powerlaw(torch.rand(10) + 0.1, xmin="hill", xmin_index=3), "xmin='hill' alone"),
    (lambda: fit_powerlaw(torch.rand(10) + 0.1, xmin="hill", tail_fraction=2.0),
     "tail_fraction must be in"),
    (lambda: fit_powerlaw(torch.rand(10) + 0.1, xmin="hills"), "'ks' or a number \\(or 'hill'\\)"),
])
def test_bad_settings_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_heavy_tailed_model_estimator_setting():
    """``models/heavy_tailed.py``: ``Config(estimator="hill")`` puts the paper's estimator in
    the weighted-alpha methods and the power-law prior's xmin; the default stays KS/log10."""
    from bayes_spectral.models import heavy_tailed as ht

    W = _weight()
    base = ht.make_penalty("weighted_alpha", ht.Config(), 100)
    assert torch.equal(base(W), P.WeightedAlpha(1e-3)(W))
    cfg = ht.Config(estimator="hill", log="ln")
    for method in ("weighted_alpha", "weighted_alpha_decayed", "weighted_alpha_thresholded"):
        pen = ht.make_penalty(method, cfg, 100)
        inner = getattr(pen, "inner", pen)
        assert (inner.estimator, inner.tail_fraction, inner.log) == ("hill", 0.5, "ln")
    want = P.WeightedAlpha(1e-3, estimator="hill", log="ln")(W)
    assert torch.equal(ht.make_penalty("weighted_alpha", cfg, 100)(W), want)
    prior = ht.make_penalty("powerlaw_prior_map", cfg, 100)
    ev = bs.esd(W)
    expect = P.PowerLawPrior(2.0, float(ev.mean()), coef=0.01, estimator="hill")(W)
    assert torch.equal(prior(W, name="w"), expect)
    df = ht.run(ht.Config(archs=("mlp",), methods=("weighted_alpha", "powerlaw_prior_map"),
                          seeds=(0,), width=16, epochs=1, num_train=64, estimator="hill"))
    assert np.isfinite(df.alpha).all() and len(df) == 2 * 3
    for bad in (dict(estimator="hil"), dict(log="log2"), dict(tail_fraction=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ht.Config(**bad)


def test_zero_hill_threshold_names_the_layer():
    W = torch.zeros(20, 10, dtype=torch.float64)
    W[:3, :3] = torch.eye(3, dtype=torch.float64) + 0.1  # rank 3: the median is zero
    for pen in (P.WeightedAlpha(estimator="hill"), P.WeightedAlpha(estimator="hill",
                                                                    tracked=True)):
        with pytest.raises(ValueError, match="layer 'fc'.* is zero"):
            pen(W, name="fc")
