"""Power-law tail fits: the KS rule against a direct loop, known answers, powerlaw package."""

import warnings

import numpy as np
import pytest
import scipy.stats as st
import torch

import bayes_spectral as bs
import bayes_spectral.spectra.powerlaw as bpl


def reference_ks_fit(evals: np.ndarray):
    """The DESIGN.md rule written as a plain loop (independent of the vectorised code)."""
    lam = np.sort(evals)
    N = len(lam)
    best = (np.inf, None, None)
    for i in range(N - 1):
        n = N - i
        tail = lam[i:]
        alpha = 1 + n / np.sum(np.log(tail / lam[i]))
        if not alpha > 1 or not np.isfinite(alpha):
            D = 1.0
        else:
            D = np.max(np.abs(1 - (tail / lam[i]) ** (1 - alpha) - np.arange(n) / n))
        if D < best[0]:
            best = (D, alpha, i)
    return best


def pareto_evals(alpha, n, seed, xmin=1.0):
    """lambda ~ pdf (alpha-1)/xmin (lambda/xmin)^-alpha  == scipy pareto(b=alpha-1)."""
    return st.pareto(b=alpha - 1, scale=xmin).rvs(size=n, random_state=seed)


@pytest.mark.parametrize("seed", range(4))
def test_vectorised_ks_fit_equals_direct_loop(seed):
    rng = np.random.default_rng(seed)
    W = rng.standard_t(2.5 + seed, size=(120, 80))
    ev = np.linalg.svd(W, compute_uv=False) ** 2
    D, alpha, i = reference_ks_fit(ev)
    fit = bs.fit_powerlaw(torch.tensor(ev))
    assert int(fit.xmin_index) == i
    assert float(fit.alpha) == pytest.approx(alpha, rel=1e-10)
    assert float(fit.ks_distance) == pytest.approx(D, rel=1e-10)
    assert int(fit.num_tail) == len(ev) - i
    assert float(fit.sigma) == pytest.approx((alpha - 1) / np.sqrt(len(ev) - i), rel=1e-10)


def test_chunking_does_not_change_the_result(monkeypatch):
    ev = torch.tensor(pareto_evals(2.2, 700, seed=3))
    full = bs.fit_powerlaw(ev, exhaustive=True)
    monkeypatch.setattr(bpl, "_CHUNK_ELEMENTS", 1000)  # ~1 candidate per chunk
    chunked = bs.fit_powerlaw(ev, exhaustive=True)
    assert int(chunked.xmin_index) == int(full.xmin_index)
    torch.testing.assert_close(chunked.ks_distances, full.ks_distances, rtol=0, atol=1e-14)


@pytest.mark.parametrize("seed", range(12))
def test_pruned_search_picks_the_exhaustive_argmin(seed):
    rng = np.random.default_rng(seed)
    kind = seed % 3
    if kind == 0:
        ev = np.linalg.svd(rng.standard_t(2 + seed % 5, size=(400, 250)), compute_uv=False) ** 2
    elif kind == 1:
        ev = pareto_evals(1.5 + seed / 4, 900, seed=seed)
    else:  # plateaus and exact ties
        ev = np.repeat(rng.uniform(1, 50, size=60), 5)
    pruned = bs.fit_powerlaw(torch.tensor(ev))
    full = bs.fit_powerlaw(torch.tensor(ev), exhaustive=True)
    assert int(pruned.xmin_index) == int(full.xmin_index)
    assert float(pruned.ks_distance) == float(full.ks_distance)
    # evaluated candidates are exact, pruned ones hold lower bounds
    assert bool((pruned.ks_distances <= full.ks_distances + 1e-15).all())


def test_batched_fit_equals_one_by_one():
    rows = [torch.tensor(pareto_evals(a, 300, seed=s)) for s, a in enumerate([2, 3, 4])]
    stack = torch.stack(rows)
    batched = bs.fit_powerlaw(stack)
    for k in range(3):
        one = bs.fit_powerlaw(stack[k])
        assert int(batched.xmin_index[k]) == int(one.xmin_index)
        assert float(batched.alpha[k]) == pytest.approx(float(one.alpha), rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_pareto_alpha_recovered_within_three_sigma(seed):
    ev = torch.tensor(pareto_evals(2.5, 2000, seed=seed))
    fit = bs.fit_powerlaw(ev)
    assert abs(float(fit.alpha) - 2.5) < 3 * float(fit.sigma)
    # at the true xmin (all data) the MLE is tighter still
    fixed = bs.fit_powerlaw(ev, xmin_index=0)
    assert abs(float(fixed.alpha) - 2.5) < 3 * float(fixed.sigma)


def test_fixed_xmin_value_quantile_and_index_agree():
    ev = torch.tensor(np.sort(pareto_evals(3.0, 400, seed=1)))
    by_index = bs.fit_powerlaw(ev, xmin_index=100)
    by_value = bs.fit_powerlaw(ev, xmin=float(ev[100]))
    by_quant = bs.fit_powerlaw(ev, xmin_quantile=0.25)  # floor(0.25 * 400) = 100
    for f in (by_value, by_quant):
        assert int(f.xmin_index) == 100
        assert float(f.alpha) == pytest.approx(float(by_index.alpha), rel=1e-12)
    tail = ev[100:].numpy()
    assert float(by_index.alpha) == pytest.approx(1 + 300 / np.log(tail / tail[0]).sum(), rel=1e-12)


def test_hill_estimator_matches_its_formula_and_recovers_alpha():
    ev = np.sort(pareto_evals(2.5, 5000, seed=7))
    k = 1000
    fit = bs.hill_estimator(torch.tensor(ev), k=k)
    expected = 1 + k / np.log(ev[-k:] / ev[-k - 1]).sum()
    assert float(fit.alpha) == pytest.approx(expected, rel=1e-12)
    assert abs(float(fit.alpha) - 2.5) < 3 * float(fit.sigma)


def test_truncated_fit_recovers_alpha_of_truncated_pareto_and_ignores_fingers():
    alpha, xmin, xmax = 2.5, 1.0, 8.0
    # inverse-CDF sampling of the power law truncated to [xmin, xmax]
    u = np.random.default_rng(0).uniform(size=4000)
    b = alpha - 1
    x = xmin * (1 - u * (1 - (xmax / xmin) ** (-b))) ** (-1 / b)
    fit = bs.fit_powerlaw(torch.tensor(x), xmin_index=0, xmax=xmax)
    assert abs(float(fit.alpha) - alpha) < 3 * float(fit.sigma)
    # the plain power-law fit over-estimates alpha on truncated data
    plain = bs.fit_powerlaw(torch.tensor(x), xmin_index=0)
    assert float(plain.alpha) > alpha + 4 * float(plain.sigma)
    # outlier "fingers" far above the tail: dropping them restores the fit
    with_fingers = np.concatenate([x, [1e5, 2e5, 3e5]])
    clipped = bs.fit_powerlaw(torch.tensor(with_fingers), xmin_index=0, num_fingers=3)
    assert float(clipped.alpha) == pytest.approx(float(fit.alpha), rel=1e-6)


def test_truncated_rate_solves_the_likelihood_equation():
    t = torch.tensor([0.5, 2.0, 10.0], dtype=torch.float64)
    b_true = torch.tensor([0.3, 1.5, 4.0], dtype=torch.float64)
    mean = 1 / b_true - t / torch.expm1(b_true * t)
    b = bpl._truncated_rate(mean, t)
    torch.testing.assert_close(b, b_true, rtol=1e-9, atol=0)


def test_differentiable_alpha_gradcheck_and_index_fixed():
    ev = torch.tensor(np.sort(pareto_evals(2.8, 60, seed=2))).requires_grad_()
    fit = bs.fit_powerlaw(ev)
    i = int(fit.xmin_index)

    def alpha_fixed(e):
        return bpl.alpha_at_index(torch.sort(e).values, i)

    assert torch.autograd.gradcheck(alpha_fixed, (ev,), eps=1e-7, atol=1e-6)
    (g,) = torch.autograd.grad(fit.alpha, ev)
    (g_ref,) = torch.autograd.grad(alpha_fixed(ev), ev)
    torch.testing.assert_close(g, g_ref)
    assert float(g[:i].abs().sum()) == 0.0  # bulk below xmin does not move alpha


def test_truncated_alpha_gradient_matches_finite_differences():
    x = torch.tensor(np.sort(pareto_evals(2.5, 50, seed=4)))
    x = x[x < 30].requires_grad_()

    def alpha_of(e):
        return bs.fit_powerlaw(e, xmin_index=0, xmax=30.0).alpha

    assert torch.autograd.gradcheck(alpha_of, (x,), eps=1e-6, atol=1e-5)


@pytest.mark.slow
def test_large_spectrum_n16384_runs_with_bounded_chunks():
    ev = torch.tensor(pareto_evals(2.5, 16384, seed=0))
    fit = bs.fit_powerlaw(ev)
    # memory bound: every temporary holds at most _CHUNK_ELEMENTS * N / N elements per row
    chunk = max(1, bpl._CHUNK_ELEMENTS // 16384)
    assert chunk * 16384 * 8 <= 32 * 2**20  # < 32 MiB per float64 temporary
    assert abs(float(fit.alpha) - 2.5) < 3 * float(fit.sigma)


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"xmin_index": 99}, "tail index"),
        ({"xmin_quantile": 1.5}, r"\[0, 1\)"),
        ({"xmin": -1.0}, "> 0"),
        ({"xmin": "peak"}, "'ks' or a number"),
        ({"xmin_index": 3, "xmin_quantile": 0.5}, "at most one"),
        ({"min_tail": 1}, "min_tail"),
    ],
)
def test_bad_fit_arguments(kwargs, words):
    ev = torch.linspace(1, 10, 20, dtype=torch.float64)
    with pytest.raises(ValueError, match=words):
        bs.fit_powerlaw(ev, **kwargs)


@pytest.mark.parametrize(
    "evals, words",
    [
        (torch.tensor([1.0, float("nan"), 2.0]), "NaN or Inf"),
        (torch.tensor([1.0, -2.0, 3.0]), "negative"),
        (torch.tensor([1.0]), ">= 2 eigenvalues"),
        (torch.zeros(10), "too few non-zero"),
        (torch.tensor([0.0] * 9 + [1.0]), "too few non-zero"),
    ],
)
def test_bad_spectra(evals, words):
    with pytest.raises(ValueError, match=words):
        bs.fit_powerlaw(evals, name="fc2")


# ---------------------------------------------------------------- the powerlaw package
powerlaw = pytest.importorskip("powerlaw")


@pytest.mark.parametrize("seed", range(3))
def test_per_candidate_alpha_and_ks_equal_powerlaw_package(seed):
    """powerlaw.Fit evaluates the same MLE and the same KS distance at every candidate
    (its empirical CDF is (0..n-1)/n, as ours). It differs by design in the *selection*:
    candidates whose alpha falls outside its default range (0, 3) are discarded. With
    ``parameter_ranges={'alpha': [1, 100]}`` the two fits coincide."""
    rng = np.random.default_rng(seed)
    ev = np.sort(np.linalg.svd(rng.standard_t(3, size=(300, 200)), compute_uv=False) ** 2)
    ours = bs.fit_powerlaw(torch.tensor(ev))
    alphas, D = bpl._ks_scan(torch.tensor(ev)[None], torch.tensor([0]), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        default = powerlaw.Fit(ev, verbose=False)
        wide = powerlaw.Fit(ev, verbose=False, parameter_ranges={"alpha": [1, 100]})
    res = default.xmin_fitting_results
    n = len(res["xmins"])
    np.testing.assert_allclose(res["xmins"], ev[:n])
    valid = res["valid_fits"]
    np.testing.assert_allclose(res["alphas"][valid], alphas[0, :n].numpy()[valid], rtol=1e-10)
    np.testing.assert_allclose(res["distances"][valid], D[0, :n].numpy()[valid], atol=1e-12)
    # default selection == our D restricted to candidates with alpha < 3
    restricted = np.where(alphas[0, :n].numpy() < 3, D[0, :n].numpy(), np.inf)
    assert default.xmin == pytest.approx(ev[np.argmin(restricted)], rel=1e-12)
    # widened range: identical fit
    assert wide.xmin == pytest.approx(float(ours.xmin), rel=1e-12)
    assert wide.alpha == pytest.approx(float(ours.alpha), rel=1e-10)
    assert wide.D == pytest.approx(float(ours.ks_distance), rel=1e-10)


def _spectra_without_ties():
    """Seeded spectra of several shapes of tail: ESDs of Gaussian (Marchenko-Pastur, steep:
    alpha > 3) and Student-t random matrices, Pareto samples with alpha 2.5 and 3.5."""
    for seed in range(2):
        rng = np.random.default_rng(100 + seed)
        yield f"gaussian-{seed}", np.linalg.svd(rng.standard_normal((300, 150)),
                                                compute_uv=False) ** 2
        yield f"student-t-{seed}", np.linalg.svd(rng.standard_t(2.5 + 2 * seed, (250, 200)),
                                                 compute_uv=False) ** 2
    yield "pareto-2.5", pareto_evals(2.5, 300, seed=0)
    yield "pareto-3.5", pareto_evals(3.5, 300, seed=1)


@pytest.mark.parametrize("ev", [pytest.param(np.sort(ev), id=name)
                                for name, ev in _spectra_without_ties()])
def test_fit_equals_powerlaw_package_with_wide_alpha_range(ev):
    """README ("Where we differ from WeightWatcher"): with ``parameter_ranges={"alpha":
    [1, 100]}`` powerlaw.Fit equals ours (alpha and KS distance to 1e-10 relative, the same
    xmin); with its default range it keeps only candidates with alpha in (0, 3): its xmin is
    the KS argmin over our candidates with alpha < 3, and when no candidate has alpha < 3 it
    flags the fit (``noise_flag``) and returns alpha at the bound 3 (ours is the MLE > 3)."""
    assert len(np.unique(ev)) == len(ev)  # no ties: both searches see the same candidates
    ours = bs.fit_powerlaw(torch.tensor(ev))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wide = powerlaw.Fit(ev, verbose=False, parameter_ranges={"alpha": [1, 100]})
        default = powerlaw.Fit(ev, verbose=False)
    assert wide.xmin == float(ours.xmin)
    assert wide.alpha == pytest.approx(float(ours.alpha), rel=1e-10)
    assert wide.D == pytest.approx(float(ours.ks_distance), rel=1e-10)
    assert not wide.noise_flag

    alphas, D = bpl._ks_scan(torch.tensor(ev)[None], torch.tensor([0]), 2)
    n = len(default.xmin_fitting_results["xmins"])
    alphas, D = alphas[0, :n].numpy(), D[0, :n].numpy()
    if (alphas < 3).any():
        best = int(np.argmin(np.where(alphas < 3, D, np.inf)))
        assert default.xmin == ev[best] and not default.noise_flag
        assert default.alpha == pytest.approx(alphas[best], rel=1e-10)
        assert default.D == pytest.approx(D[best], rel=1e-10)
    else:
        assert default.noise_flag and default.alpha == pytest.approx(3.0, abs=1e-9)
    if float(ours.alpha) < 3:  # our KS argmin is in its range: the default fit is ours
        assert default.xmin == float(ours.xmin)
    else:  # the default-range answer differs, as the README says
        assert default.alpha <= 3 + 1e-9 and default.xmin != float(ours.xmin)
