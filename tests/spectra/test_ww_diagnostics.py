"""Layer 1 of WeightWatcher's remaining diagnostics against WeightWatcher 0.7.7 / powerlaw.

* MP bulk fit against ``weightwatcher.WeightWatcher.mp_fit`` on the same ESD.
* Randomised ESD: WeightWatcher shuffles with numpy's global RNG; the same permutations
  (``np.random.permutation`` after the same seed) make ours equal to its numbers.
* ``clip_xmax`` against ``weightwatcher.RMT_Util.fit_clipped_powerlaw`` (its own PL fit).
* TPL / xmin ranges: WeightWatcher 0.7.7 fails with powerlaw 2.0 (it passes the
  ``distribution=`` keyword powerlaw.Fit no longer takes: every TPL / E_TPL / xmin_peak row
  is ``status="failed"``, ``alpha=-1``), so these are compared with ``powerlaw.Fit`` called
  as WeightWatcher means to call it (``xmin_distribution=``, ``xmin=(lo, hi)``).
* Ties: ours equals WeightWatcher's own fit; powerlaw.Fit differs (stated and checked).
"""

import logging
import math
import warnings

import numpy as np
import pytest
import torch

import bayes_spectral.spectra.powerlaw as bpl
from bayes_spectral.spectra.fingers import fit_clipped_powerlaw, xmin_peak_range
from bayes_spectral.spectra.marchenko_pastur import mp_bulk_edges, mp_fit
from bayes_spectral.spectra.randomize import esd_distance, randomized_diagnostics
from bayes_spectral.spectra.tpl import fit_truncated_powerlaw

ww = pytest.importorskip("weightwatcher")
powerlaw = pytest.importorskip("powerlaw")
from weightwatcher import RMT_Util  # noqa: E402
from weightwatcher.WW_powerlaw import WWFit  # noqa: E402
from weightwatcher_numerics import pin_cpu_numerics  # noqa: E402

logging.getLogger("weightwatcher").setLevel(logging.ERROR)
logging.getLogger("RMT_Util").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _weightwatcher_cpu_numerics(monkeypatch):
    """WeightWatcher with CUDA reads weights as float16 (tests/weightwatcher_numerics.py)."""
    pin_cpu_numerics(monkeypatch)


def spiked(seed, n=150, m=60, spikes=3, scale=6.0):
    """Gaussian matrix / sqrt(n) plus ``spikes`` rank-one signals (a 'trained-like' ESD)."""
    g = np.random.default_rng(seed)
    w = g.standard_normal((n, m)) / math.sqrt(n)
    for k in range(spikes):
        u, v = g.standard_normal(n), g.standard_normal(m)
        w += scale * (k + 1) / 3 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))
    return w


def heavy(seed, n=150, m=60, df=1.0):
    """Student-t (df=1: Cauchy) entries, heavy-tailed ESD."""
    g = np.random.default_rng(seed)
    return g.standard_t(df, (n, m)) / math.sqrt(n)


MATRICES = {
    "gaussian": lambda s: np.random.default_rng(s).standard_normal((150, 60)) / math.sqrt(150),
    "square": lambda s: np.random.default_rng(s).standard_normal((80, 80)) / math.sqrt(80),
    "spiked": spiked,
    "cauchy": heavy,
    "student3": lambda s: heavy(s, df=3.0),
}


def evals_of(w):
    return np.sort(np.linalg.svd(w, compute_uv=False) ** 2)


def ww_mp_fit(ev, n, m):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher().mp_fit(ev, n, m, 1, "", 0, 0, False, False, "", "b", 0.5,
                                         True, ev)


# ----------------------------------------------------------------------------- MP fit
@pytest.mark.parametrize("kind,seed", [("gaussian", 0), ("gaussian", 1), ("square", 0),
                                       ("spiked", 0), ("cauchy", 0), ("cauchy", 1),
                                       ("student3", 0)])
def test_mp_fit_equals_weightwatcher(kind, seed):
    """Same grid, same KDE, same 1-D Nelder-Mead polish as WeightWatcher's scipy ``brute``
    + ``fmin``: sigma_mp, bulk edges, mp_softrank to 1e-9 relative (measured: 1e-15),
    num_spikes exactly."""
    w = MATRICES[kind](seed)
    n, m = max(w.shape), min(w.shape)
    ev = evals_of(w)
    spikes, sigma, softrank, bmin, bmax, wscale = ww_mp_fit(ev, n, m)
    ours = mp_fit(torch.tensor(ev), n / m, m)
    assert ours.num_spikes == spikes
    assert ours.sigma_mp == pytest.approx(sigma, rel=1e-9)
    assert ours.lambda_plus == pytest.approx(bmax, rel=1e-9)
    assert ours.lambda_minus == pytest.approx(bmin, rel=1e-9, abs=1e-15)
    assert ours.mp_softrank == pytest.approx(softrank, rel=1e-9)
    assert ours.w_scale == pytest.approx(wscale, rel=1e-12)


def test_mp_edges_and_spikes_known_answer():
    """A large Gaussian matrix: sigma_mp ~ 1 (rescaled), edges (1 -/+ 1/sqrt(Q))^2, and
    planted spikes far outside the bulk are counted."""
    g = np.random.default_rng(3)
    n, m = 1200, 400
    w = g.standard_normal((n, m)) / math.sqrt(n)
    fit = mp_fit(torch.tensor(evals_of(w)), n / m, m)
    assert fit.sigma_mp == pytest.approx(1.0, abs=0.03)
    lo, hi = mp_bulk_edges(1.0, n / m)
    assert fit.lambda_plus == pytest.approx(hi, rel=0.06)
    assert fit.lambda_minus == pytest.approx(lo, rel=0.15)
    assert fit.num_spikes == 0
    ev = evals_of(w)
    ev[-3:] = [20.0, 30.0, 40.0]
    assert mp_fit(torch.tensor(np.sort(ev)), n / m, m).num_spikes == 3


# ------------------------------------------------------------------ randomised ESD
def _replayed_perms(seed, size, count):
    np.random.seed(seed)  # noqa: NPY002 (WeightWatcher's global RNG)
    return [torch.from_numpy(np.random.permutation(size))  # noqa: NPY002
            for _ in range(count)]


@pytest.mark.parametrize("kind,shape", [("gaussian", (150, 60)), ("spiked", (150, 60)),
                                        ("cauchy", (150, 60)), ("big", (120, 110))])
def test_randomized_esd_equals_weightwatcher_with_the_same_permutations(kind, shape):
    """WeightWatcher's apply_random_esd + random mp_fit: 5 shuffles (1 when the layer has
    >= 100 eigenvalues) for max_rand_eval and the random MP fit, then one more for
    rand_distance / ww_softrank / ww_maxdist. Same permutations: equal to 1e-9."""
    make = MATRICES.get(kind, lambda s: np.random.default_rng(s).standard_normal(shape) / 11)
    w32 = torch.tensor(make(7)).float()
    model = torch.nn.Linear(w32.shape[1], w32.shape[0])
    with torch.no_grad():
        model.weight.copy_(w32)
    np.random.seed(11)  # noqa: NPY002 (WeightWatcher's global RNG)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ww.WeightWatcher(model=model).analyze(randomize=True).iloc[0]
    n_comp = min(w32.shape)
    replicas = 5 if n_comp < 100 else 1
    perms = _replayed_perms(11, w32.numel(), replicas + 1)
    w = w32.double()
    ev = torch.linalg.svdvals(w) ** 2
    ours = randomized_diagnostics(w, ev.sort().values, perms=perms)
    for key in ("max_rand_eval", "rand_distance", "ww_softrank", "ww_maxdist", "rand_W_scale"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-12), key
    assert ours["rand_num_spikes"] == ref["rand_num_spikes"] == ours["num_traps"]
    for key in ("rand_sigma_mp", "rand_mp_softrank", "rand_bulk_max", "rand_bulk_min"):
        assert ours[key] == pytest.approx(ref[key], rel=1e-9, abs=1e-15), key


def test_esd_distance_is_weightwatchers_jensen_shannon():
    g = np.random.default_rng(0)
    p, q = np.sort(g.random(40)), np.sort(g.random(40) * 2)
    ref = RMT_Util.jensen_shannon_distance(p, q)
    assert float(esd_distance(torch.tensor(p), torch.tensor(q))) == pytest.approx(ref,
                                                                                rel=1e-12)
    assert float(esd_distance(torch.tensor(p), torch.tensor(p))) == pytest.approx(0, abs=1e-7)


def test_correlation_trap_survives_randomisation():
    """A single huge element (a 'correlation trap') stays a spike after any permutation of
    the elements: num_traps >= 1 for every seed; a Gaussian matrix has none."""
    g = np.random.default_rng(5)
    w = torch.tensor(g.standard_normal((200, 120)) / math.sqrt(200))
    clean = randomized_diagnostics(w, (torch.linalg.svdvals(w) ** 2).sort().values,
                                   generator=torch.Generator().manual_seed(0))
    assert clean["num_traps"] == 0
    w[3, 4] = 8.0
    ev = (torch.linalg.svdvals(w) ** 2).sort().values
    for seed in range(3):
        out = randomized_diagnostics(w, ev, generator=torch.Generator().manual_seed(seed))
        assert out["num_traps"] >= 1
        assert out["ww_softrank"] > 0.9  # the trap dominates both spectra


# ---------------------------------------------------------------------- clip_xmax
def _ww_clipped(ev):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        best, num, raw = RMT_Util.fit_clipped_powerlaw(ev[ev > 1e-5], max_fingers=10)
    return best, num, raw


@pytest.mark.parametrize("kind", ["gaussian", "spiked", "cauchy", "student3", "fingers"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_xmax_equals_weightwatcher(kind, seed):
    """alpha, xmin, D, num_fingers (WeightWatcher's count: one less than the eigenvalues
    removed) and raw_alpha equal fit_clipped_powerlaw with WeightWatcher's own PL fit."""
    if kind == "fingers":
        ev = evals_of(MATRICES["student3"](seed))
        ev[-4:] *= np.array([8.0, 12.0, 20.0, 40.0])
        ev = np.sort(ev)
    else:
        ev = evals_of(MATRICES[kind](seed))
    best, num, raw = _ww_clipped(ev)
    fit, num_fingers, raw_alpha = fit_clipped_powerlaw(torch.tensor(ev))
    assert num_fingers == num
    assert float(fit.alpha) == pytest.approx(best.alpha, rel=1e-9)
    assert float(fit.xmin) == pytest.approx(best.xmin, rel=1e-12)
    assert float(fit.ks_distance) == pytest.approx(best.D, rel=1e-9)
    assert raw_alpha == pytest.approx(raw.alpha, rel=1e-9)


@pytest.mark.parametrize("kind", ["gaussian", "student3"])
def test_clip_xmax_clips_fingers(kind):
    """Seed 1 of these spectra has a finger: dropping the two largest eigenvalues lowers
    alpha by more than finger_thresh = 1, so the clipped fit is kept (num_fingers = 1)."""
    ev = evals_of(MATRICES[kind](1))
    fit, num, raw = fit_clipped_powerlaw(torch.tensor(ev))
    assert num == 1 and float(fit.alpha) + 1.0 < raw
    assert float(fit.xmax) == pytest.approx(ev[-3], rel=1e-12)


def bpl_pareto(alpha, n, seed):
    g = np.random.default_rng(seed)
    return (1 - g.random(n)) ** (-1.0 / (alpha - 1.0))


# --------------------------------------------------------------- TPL and xmin ranges
def _powerlaw_fit(ev, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return powerlaw.Fit(ev, verbose=False, **kw)


def tpl_sample(alpha, lam, n, seed, xmin=1.0):
    """Draws from x^-alpha e^-lam x on [xmin, inf): Pareto proposals, accept w.p. e^-lam(x-xmin)."""
    g = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        x = xmin * (1 - g.random(4 * n)) ** (-1.0 / (alpha - 1.0))
        out.extend(x[g.random(4 * n) < np.exp(-lam * (x - xmin))])
    return np.sort(np.array(out[:n]))


TPL_DATA = {
    "spiked": lambda: evals_of(MATRICES["spiked"](0)[:, :40] * 3.0),
    "cauchy": lambda: evals_of(MATRICES["cauchy"](0)[:, :40] * 3.0),
    "tpl-1.6": lambda: tpl_sample(1.6, 0.05, 80, seed=3),
    "tpl-2.2": lambda: tpl_sample(2.2, 0.02, 80, seed=4),
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cauchy", "tpl-1.6", "tpl-2.2"])
def test_tpl_equals_powerlaw_as_weightwatcher_calls_it(kind):
    """fit='TPL': powerlaw.Fit(evals, xmin_distribution='truncated_power_law'); the xmin
    scan fits the TPL (alpha in (0, 3), Lambda >= 0, Nelder-Mead tol 1e-4) at each
    candidate and keeps the least KS distance among fits away from the bounds. Ours solves
    the same (concave) likelihood exactly: same xmin; alpha, Lambda, D to 2e-3. (Fits at
    a bound, which both flag invalid, are Nelder-Mead's guess and not compared.)"""
    ev = TPL_DATA[kind]()
    ref = _powerlaw_fit(ev, xmin_distribution="truncated_power_law")
    ours = fit_truncated_powerlaw(torch.tensor(ev))
    assert float(ours.xmin) == pytest.approx(ref.xmin, rel=1e-12)
    tpl = ref.truncated_power_law
    assert float(ours.alpha) == pytest.approx(tpl.alpha, rel=2e-3, abs=2e-3)
    assert float(ours.Lambda) == pytest.approx(tpl.Lambda, rel=2e-3, abs=1e-4)
    assert float(ours.ks_distance) == pytest.approx(ref.D, rel=2e-3, abs=1e-4)


def test_tpl_likelihood_is_maximal():
    """Our TPL (alpha, Lambda) at a fixed xmin beats every neighbour in powerlaw's own
    log-likelihood (a check independent of its optimiser)."""
    ev = np.sort(bpl_pareto(2.2, 300, seed=2))
    ev = ev[ev < 40]
    xmin = float(ev[len(ev) // 3])  # a data point: our tail starts at an eigenvalue
    ours = fit_truncated_powerlaw(torch.tensor(ev), xmin=xmin)
    assert float(ours.xmin) == xmin
    tail = ev[ev >= xmin]

    def ll(a, lam):
        d = powerlaw.Truncated_Power_Law(xmin=xmin, parameters=[a, lam], verbose=0)
        return float(np.sum(d.loglikelihoods(tail)))

    a0, l0 = float(ours.alpha), float(ours.Lambda)
    best = ll(a0, l0)
    for da, dl in [(1e-3, 0), (-1e-3, 0), (0, 1e-3), (0, -1e-3)]:
        if l0 + dl > 0:
            assert ll(a0 + da, l0 + dl) <= best + 1e-9


def test_xmin_peak_range_is_weightwatchers():
    """WeightWatcher's xmin_peak: the peak p is the left edge of the fullest of 100 bins of
    log10(evals); the xmin search range is (log10(0.95 p), 1.5 p) (its lower bound is the
    log10 of the value, as in WeightWatcher 0.7.7)."""
    ev = evals_of(MATRICES["student3"](1))
    counts, edges = np.histogram(np.log10(ev[ev > 1e-5]), bins=100)
    p = 10 ** edges[np.argmax(counts)]
    lo, hi = xmin_peak_range(torch.tensor(ev))
    assert lo == pytest.approx(np.log10(0.95 * p), rel=1e-12)
    assert hi == pytest.approx(1.5 * p, rel=1e-12)


@pytest.mark.parametrize("kind", ["spiked", "cauchy", "student3"])
def test_xmin_peak_equals_powerlaw_with_the_range(kind):
    """fix_fingers='xmin_peak' with fit='PL': powerlaw.Fit(evals, xmin=(lo, hi)) with the
    alpha range widened (its default discards alpha >= 3, see README): same xmin, alpha, D."""
    ev = evals_of(MATRICES[kind](2))
    lo, hi = xmin_peak_range(torch.tensor(ev))
    ref = _powerlaw_fit(ev, xmin=(lo, hi), parameter_ranges={"alpha": [1, 100]})
    ours = bpl.fit_powerlaw(torch.tensor(ev), xmin_range=(lo, hi))
    assert float(ours.xmin) == pytest.approx(ref.xmin, rel=1e-12)
    assert float(ours.alpha) == pytest.approx(ref.alpha, rel=1e-9)
    assert float(ours.ks_distance) == pytest.approx(ref.D, rel=1e-9)


@pytest.mark.slow
def test_e_tpl_equals_powerlaw_with_the_peak_range():
    """fit='E_TPL' = TPL with the xmin_peak range."""
    ev = evals_of(MATRICES["cauchy"](1)[:, :40] * 3.0)
    lo, hi = xmin_peak_range(torch.tensor(ev))
    ref = _powerlaw_fit(ev, xmin=(lo, hi), xmin_distribution="truncated_power_law")
    ours = fit_truncated_powerlaw(torch.tensor(ev), xmin_range=(lo, hi))
    assert float(ours.xmin) == pytest.approx(ref.xmin, rel=1e-12)
    assert float(ours.alpha) == pytest.approx(ref.truncated_power_law.alpha, rel=2e-3,
                                              abs=2e-3)


# ------------------------------------------------------------------------------- ties
def test_ties_ours_equals_weightwatcher_and_differs_from_powerlaw_as_stated():
    """Tied eigenvalues (e.g. a matrix with repeated singular values). We follow
    WeightWatcher's own fit (WWFit): every eigenvalue is an xmin candidate (also inside a
    run of ties) and the KS distance compares the model CDF with j/n at every tail point.
    powerlaw.Fit instead (a) takes each distinct value once as a candidate and (b)
    evaluates the empirical CDF once per distinct value, as #{x < value}/n. Checked:
    ours == WWFit exactly; powerlaw.Fit == a direct implementation of (a)+(b); the two
    answers differ on this spectrum."""
    g = np.random.default_rng(0)
    base = np.sort(bpl_pareto(2.5, 120, seed=1))
    ev = np.sort(np.concatenate([base, np.repeat(base[60:90:3], 3), g.choice(base, 20)]))
    assert len(np.unique(ev)) < len(ev)
    ours = bs_fit = bpl.fit_powerlaw(torch.tensor(ev))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = WWFit(ev)
    assert float(bs_fit.xmin) == ref.xmin
    assert float(ours.alpha) == pytest.approx(ref.alpha, rel=1e-10)
    assert float(ours.ks_distance) == pytest.approx(ref.D, rel=1e-10)

    pl = _powerlaw_fit(ev, parameter_ranges={"alpha": [1, 100]})
    xmin, alpha, D = _distinct_value_ks(ev)
    assert pl.xmin == xmin
    assert pl.alpha == pytest.approx(alpha, rel=1e-10)
    assert pl.D == pytest.approx(D, rel=1e-10)
    assert (pl.xmin, round(pl.D, 12)) != (float(ours.xmin), round(float(ours.ks_distance), 12))


def _distinct_value_ks(ev):
    """powerlaw's rule on sorted data: candidates = distinct values but the largest; D over
    the distinct tail values u of |1 - (u/xmin)^(1-alpha) - #{x < u, x >= xmin}/n|."""
    best = (None, None, np.inf)
    for xmin in np.unique(ev)[:-1]:
        tail = ev[ev >= xmin]
        n = len(tail)
        alpha = 1 + n / np.sum(np.log(tail / xmin))
        u = np.unique(tail)
        emp = np.searchsorted(tail, u, side="left") / n
        D = np.max(np.abs(1 - (u / xmin) ** (1 - alpha) - emp))
        if D < best[2]:
            best = (xmin, alpha, D)
    return best
