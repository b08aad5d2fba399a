"""Hostile and careless input to the spectral core (issue 18, items 3 and 9 and the table).

One table of rows ``(id, callable, expectation, regex)``: the expectation is an exception
type (the message must match ``regex``, naming the layer/shape/value), ``Warns(category)``
or ``Finite`` (the call returns a finite result). Then the KS property test: the pruned
scan must choose the exhaustive scan's xmin on low-rank, tied and scaled spectra.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bayes_spectral as bs
from bayes_spectral.penalties import WeightedAlpha
from bayes_spectral.spectra.powerlaw import fit_powerlaw


@dataclass(frozen=True)
class Warns:
    category: type[Warning]


@dataclass(frozen=True)
class Finite:
    """The call returns a tensor (or dict of tensors) of finite values of this dtype."""

    dtype: torch.dtype | None = None


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed), dtype=torch.float64).to(dtype)


def _sparse():
    return _randn(6, 4).to_sparse()


def _meta():
    return torch.empty(6, 4, device="meta")


BIG = _randn(8, 5) * 1e20  # finite in float32, sigma^2 is not
TINY = _randn(8, 5) * 1e-25  # sigma^2 underflows float32

CASES = [
    # -- overflow / underflow of lambda = sigma^2 (item 9, "tiny float32 weights underflow")
    ("esd-overflow-f32", lambda: bs.esd(BIG), ValueError, r"overflows torch\.float32.*double"),
    ("esd-overflow-names-layer", lambda: bs.esd(BIG, name="fc1"), ValueError,
     r"layer 'fc1'.*overflows"),
    ("esd-overflow-conv", lambda: bs.esd(_randn(4, 3, 3, 3) * 1e20), ValueError, r"overflows"),
    ("esd-overflow-batch", lambda: bs.esd(BIG.expand(2, 8, 5), batch=True), ValueError,
     r"overflows"),
    ("esd-gram-overflow", lambda: bs.esd(BIG, method="gram", name="g"), ValueError,
     r"layer 'g'.*overflows torch\.float32"),
    ("metrics-overflow", lambda: bs.spectral_metrics(BIG, name="fc2"), ValueError,
     r"layer 'fc2'.*overflows"),
    ("esd-underflow-f32", lambda: bs.esd(TINY), ValueError, r"underflows torch\.float32"),
    ("esd-underflow-names-layer", lambda: bs.esd(TINY, name="head"), ValueError,
     r"layer 'head'.*underflows"),
    ("metrics-underflow", lambda: bs.spectral_metrics(TINY), ValueError, r"underflows"),
    ("esd-overflow-f64-fine", lambda: bs.esd(BIG.double()), Finite(torch.float64), ""),
    ("esd-underflow-f64-fine", lambda: bs.esd(TINY.double()), Finite(torch.float64), ""),
    # -- float16 / bfloat16 (computed in float32)
    ("esd-float16", lambda: bs.esd(_randn(6, 4, dtype=torch.float16)), Finite(torch.float32), ""),
    ("esd-bfloat16", lambda: bs.esd(_randn(6, 4, dtype=torch.bfloat16)), Finite(torch.float32),
     ""),
    ("svals-float16", lambda: bs.singular_values(_randn(6, 4, dtype=torch.float16)),
     Finite(torch.float32), ""),
    ("metrics-bfloat16", lambda: bs.spectral_metrics(_randn(30, 20, dtype=torch.bfloat16)),
     Finite(torch.float32), ""),
    ("fit-float16-evals", lambda: fit_powerlaw(bs.esd(_randn(30, 20)).half()).alpha,
     Finite(torch.float32), ""),
    # -- meta and sparse tensors
    ("esd-meta", lambda: bs.esd(_meta()), ValueError, r"\(6, 4\).*meta device"),
    ("esd-meta-names-layer", lambda: bs.esd(_meta(), name="enc.0"), ValueError,
     r"layer 'enc\.0'.*meta"),
    ("metrics-meta", lambda: bs.spectral_metrics(_meta(), name="x"), ValueError, r"'x'.*meta"),
    ("fit-meta", lambda: fit_powerlaw(torch.empty(10, device="meta")), ValueError, r"meta"),
    ("esd-sparse", lambda: bs.esd(_sparse()), TypeError, r"sparse.*to_dense"),
    ("fit-sparse", lambda: fit_powerlaw(torch.ones(10).to_sparse()), TypeError, r"sparse"),
    # -- flat spectra: alpha is inf/meaningless, warn (naming the layer)
    ("fit-flat", lambda: fit_powerlaw(torch.ones(10)), Warns(RuntimeWarning), r"flat tail"),
    ("metrics-identity", lambda: bs.spectral_metrics(torch.eye(12), name="proj"),
     Warns(RuntimeWarning), r"layer 'proj'.*flat.*alpha = inf"),
    ("fit-flat-batch", lambda: fit_powerlaw(torch.stack([torch.ones(8), torch.arange(1., 9)**2,
                                                         torch.ones(8)])),
     Warns(RuntimeWarning), r"2 of 3 ESDs"),
    ("fit-flat-orthogonal-f32", lambda: fit_powerlaw(bs.esd(torch.linalg.qr(_randn(16, 16))[0]),
                                                     name="q"),
     Warns(RuntimeWarning), r"'q'"),
]


def _run(fn, expect, regex):
    if isinstance(expect, Warns):
        with pytest.warns(expect.category, match=regex):
            fn()
        return
    if isinstance(expect, Finite):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            out = fn()
        values = out.values() if isinstance(out, dict) else [out]
        for v in values:
            assert bool(torch.isfinite(v).all()), v
            if expect.dtype is not None and v.is_floating_point():
                assert v.dtype == expect.dtype
        return
    with pytest.raises(expect, match=regex):
        fn()


@pytest.mark.parametrize("fn, expect, regex", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_spectral_input(fn, expect, regex):
    _run(fn, expect, regex)


def test_half_precision_matches_float32_bit_for_bit():
    w16 = _randn(9, 7, dtype=torch.float16)
    torch.testing.assert_close(bs.esd(w16), bs.esd(w16.float()), rtol=0, atol=0)


# -- item 3: the pruned KS scan must never choose a numerically-zero eigenvalue -------------


def _rank2_reported_case() -> torch.Tensor:
    """float32 30 x 30 of rank 2: the two eigenvalues 1 and exp(-2/6.61), so the exhaustive
    fit is alpha = 1 + 2/ln(ratio) = 7.61 at index 28; the other 28 are float32 noise."""
    q1 = torch.linalg.qr(_randn(30, 2, seed=1, dtype=torch.float64))[0]
    q2 = torch.linalg.qr(_randn(30, 2, seed=2, dtype=torch.float64))[0]
    s = torch.tensor([1.0, math.exp(-1.0 / 6.61)], dtype=torch.float64)
    return ((q1 * s) @ q2.T).float()


def test_reported_rank2_float32_case():
    ev = bs.esd(_rank2_reported_case())
    pruned, full = fit_powerlaw(ev), fit_powerlaw(ev, exhaustive=True)
    assert int(full.xmin_index) == 28
    assert float(full.alpha) == pytest.approx(7.61, abs=0.01)
    assert int(pruned.xmin_index) == 28
    assert float(pruned.alpha) == float(full.alpha)
    assert float(pruned.ks_distance) == float(full.ks_distance)


def test_reported_case_weighted_alpha_is_the_exhaustive_one():
    W = _rank2_reported_case()
    ev = bs.esd(W)
    full = fit_powerlaw(ev, exhaustive=True)
    expect = float(full.alpha) * math.log10(float(ev.max()))
    assert float(WeightedAlpha()(W)) == pytest.approx(expect, rel=1e-6)
    m = bs.spectral_metrics(W)
    assert float(m["alpha"]) == pytest.approx(7.61, abs=0.01)
    assert float(m["alpha_weighted"]) == pytest.approx(expect, rel=1e-6)


@pytest.mark.parametrize("seed", range(12))
def test_low_rank_float32_pruned_equals_exhaustive(seed):
    m, n = [(64, 48), (40, 40), (100, 30), (30, 60)][seed % 4]
    r = 2 + seed % 4
    W = _randn(m, r, seed=seed) @ _randn(r, n, seed=seed + 100)
    ev = bs.esd(W)
    pruned, full = fit_powerlaw(ev), fit_powerlaw(ev, exhaustive=True)
    assert int(pruned.xmin_index) == int(full.xmin_index)
    assert int(pruned.xmin_index) >= ev.numel() - r  # never a numerically-zero eigenvalue


def _spectrum(kind: str, seed: int, rank: int, n: int, scale: float,
              dtype: torch.dtype) -> torch.Tensor:
    g = _gen(seed)
    if kind == "lowrank":
        m = n + 3
        w = torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, n, generator=g, dtype=torch.float64)
        return bs.esd((w * scale).to(dtype))
    if kind == "tied":  # a few distinct values, each repeated
        vals = torch.randint(1, 5, (n,), generator=g).to(torch.float64) ** 2
        return (vals * scale).to(dtype)
    t = torch.distributions.StudentT(2.5).sample((n + 5, n)).to(torch.float64)  # heavy tail
    return bs.esd((t * math.sqrt(scale)).to(dtype))


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["lowrank", "tied", "heavy"]), seed=st.integers(0, 10_000),
       rank=st.integers(2, 8), n=st.integers(10, 70),
       scale=st.sampled_from([1e-12, 1e-3, 1.0, 1e4, 1e12]),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_property_pruned_scan_equals_exhaustive(kind, seed, rank, n, scale, dtype):
    torch.manual_seed(seed)
    ev = _spectrum(kind, seed, rank, n, scale, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tied spectra may be flat
        try:
            full = fit_powerlaw(ev, exhaustive=True)
        except ValueError:  # too few non-zero values: the pruned scan must agree
            with pytest.raises(ValueError):
                fit_powerlaw(ev)
            return
        pruned = fit_powerlaw(ev)
    assert int(pruned.xmin_index) == int(full.xmin_index)
    assert float(pruned.ks_distance) == float(full.ks_distance)
    assert float(pruned.alpha) == float(full.alpha) or (
        math.isinf(float(pruned.alpha)) and math.isinf(float(full.alpha)))
