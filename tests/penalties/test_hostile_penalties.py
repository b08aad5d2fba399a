"""Hostile and careless input to the penalties (issue 18: tail penalties, table rows).

Rows ``(id, callable, expectation, regex)``: an exception type whose message must match
``regex`` (naming the layer/value), or ``Finite(dtype)`` / ``Approx(value)``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch

import bayes_spectral as bs
from bayes_spectral.penalties import FrechetPrior, PowerLawPrior, WeightedAlpha
from bayes_spectral.spectra.powerlaw import fit_powerlaw


@dataclass(frozen=True)
class Finite:
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Approx:
    value: float
    rel: float = 1e-6


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _shrunk(k: int, factor: float, n: int = 20) -> torch.Tensor:
    """A 20 x 20 Gaussian matrix with its ``n - k`` smallest singular values scaled."""
    u, s, vh = torch.linalg.svd(_randn(n, n, seed=5, dtype=torch.float64))
    s = s.clone()
    s[k:] *= factor
    return ((u * s) @ vh).float()


def _rank2() -> torch.Tensor:
    """The issue's float32 rank-2 case: exhaustive alpha 7.61 at index 28 (N = 30)."""
    g1, g2 = _randn(30, 2, seed=1, dtype=torch.float64), _randn(30, 2, seed=2,
                                                                dtype=torch.float64)
    q1, q2 = torch.linalg.qr(g1)[0], torch.linalg.qr(g2)[0]
    s = torch.tensor([1.0, math.exp(-1.0 / 6.61)], dtype=torch.float64)
    return ((q1 * s) @ q2.T).float()


def _exhaustive_weighted_alpha(w):
    ev = bs.esd(w)
    return float(fit_powerlaw(ev, exhaustive=True).alpha) * math.log10(float(ev.max()))


META = torch.empty(8, 6, device="meta")
BIG = _randn(8, 6) * 1e20
Q = PowerLawPrior(2.0, 1.0, xmin_quantile=0.5)

CASES = [
    # -- PowerLawPrior(xmin_quantile=0.5) rewarded rank collapse without bound: guard
    ("powerlaw-quantile-collapsed", lambda: Q.weight_penalty(_shrunk(8, 0.0), name="fc1"),
     ValueError, r"power-law prior \(layer 'fc1'\): xmin_quantile=0\.5 .*numerically zero.*"
                 r"rank collapsed"),
    ("powerlaw-quantile-collapsed-call", lambda: Q(_shrunk(5, 0.0)), ValueError,
     r"xmin_quantile=0\.5.*unbounded below"),
    ("powerlaw-quantile-collapsed-q0.3", lambda: PowerLawPrior(2.0, 1.0, xmin_quantile=0.3)(
        _shrunk(12, 0.0)), ValueError, r"xmin_quantile=0\.3"),
    ("powerlaw-quantile-nearly-collapsed", lambda: Q(_shrunk(8, 1e-9), name="fc"), ValueError,
     r"layer 'fc'.*xmin_quantile=0\.5.*numerically zero"),
    ("powerlaw-quantile-tracked-collapsed", lambda: PowerLawPrior(
        2.0, 1.0, xmin_quantile=0.5, tracked=True)(_shrunk(8, 1e-9), name="fc"), ValueError,
     r"layer 'fc'.*xmin_quantile=0\.5.*rank collapsed"),
    ("powerlaw-quantile-healthy", lambda: Q(_shrunk(20, 1.0)), Finite(torch.float32), ""),
    ("powerlaw-quantile-half-collapse-finite", lambda: Q(_shrunk(12, 0.0)), Finite(), ""),
    ("powerlaw-fixed-xmin-collapsed-finite", lambda: PowerLawPrior(2.0, 1.0)(_shrunk(8, 0.0)),
     Finite(), ""),
    # -- weighted alpha on the rank-2 float32 case (item 3): the exhaustive fit
    ("weighted-alpha-rank2", lambda: WeightedAlpha()(_rank2()),
     Approx(_exhaustive_weighted_alpha(_rank2())), ""),
    ("weighted-alpha-rank2-value", lambda: WeightedAlpha()(_rank2()) / math.log10(
        float(bs.esd(_rank2()).max())), Approx(7.61, rel=2e-3), ""),
    # -- half precision, meta, overflow
    ("weighted-alpha-float16", lambda: WeightedAlpha()(_randn(30, 20, dtype=torch.float16)),
     Finite(torch.float32), ""),
    ("powerlaw-prior-bfloat16", lambda: PowerLawPrior(2.0, 1.0)(
        _randn(30, 20, dtype=torch.bfloat16)), Finite(torch.float32), ""),
    ("frechet-prior-float16", lambda: FrechetPrior(2.0, 1.0, 1.0)(
        _randn(30, 20, dtype=torch.float16)), Finite(torch.float32), ""),
    ("weighted-alpha-meta", lambda: WeightedAlpha().weight_penalty(META, name="enc"),
     ValueError, r"layer 'enc'.*meta device"),
    ("powerlaw-prior-meta", lambda: PowerLawPrior(2.0, 1.0).weight_penalty(META, name="d"),
     ValueError, r"layer 'd'.*meta device"),
    ("weighted-alpha-overflow", lambda: WeightedAlpha().weight_penalty(BIG, name="big"),
     ValueError, r"layer 'big'.*overflows torch\.float32"),
    ("frechet-prior-overflow", lambda: FrechetPrior(2.0, 1.0, 1.0).weight_penalty(BIG, "big"),
     ValueError, r"layer 'big'.*overflows"),
]


def _run(fn, expect, regex):
    if isinstance(expect, (Finite, Approx)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            out = fn()
        assert bool(torch.isfinite(torch.as_tensor(out)).all())
        if isinstance(expect, Finite) and expect.dtype is not None:
            assert out.dtype == expect.dtype
        if isinstance(expect, Approx):
            assert float(out) == pytest.approx(expect.value, rel=expect.rel)
        return
    with pytest.raises(expect, match=regex):
        fn()


@pytest.mark.parametrize("fn, expect, regex", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_penalty_input(fn, expect, regex):
    _run(fn, expect, regex)


def test_quantile_penalty_rewards_collapse_as_documented():
    """The docstring's numbers: shrinking the 12 smallest of 20 singular values 1000-fold
    lowers the q = 0.5 penalty from 182 to 27 (why a fixed xmin is preferred)."""
    torch.manual_seed(0)
    w = torch.randn(20, 20)
    u, s, vh = torch.linalg.svd(w)
    shrunk = (u * torch.cat([s[:8], s[8:] * 1e-3])) @ vh
    assert float(Q(w)) == pytest.approx(181.68, abs=0.01)
    assert float(Q(shrunk)) == pytest.approx(26.78, abs=0.05)
