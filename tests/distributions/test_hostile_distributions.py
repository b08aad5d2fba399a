"""Hostile and careless input to the distributions (issue 18, item 9 and the table).

Rows ``(id, callable, expectation, regex)``: an exception type whose message must match
``regex`` (naming the law, parameter, shape or dtype), or ``Finite``/``Value``: the call
returns finite values (of a dtype) or exactly a given value, with a gradient free of NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from bayes_spectral.distributions import (
    Frechet,
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
    SpikeAndSlabSpectrum,
)
from bayes_spectral.spectra.laws import log_haar_volume, spliced_powerlaw_log_norm

INF = float("inf")


@dataclass(frozen=True)
class Finite:
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class Value:
    """The call returns exactly ``value`` (``+-inf`` allowed; ``approx`` for finite)."""

    value: float


def _seeded(fn, seed=0):
    def run():
        torch.manual_seed(seed)
        return fn()
    return run


def _laws(shape=(4, 3), measure="penalty"):
    return {
        "powerlaw": PowerLawSpectrum(2.0, 1.0, shape, measure=measure),
        "frechet_top": FrechetTopEigenvalue(2.0, 1.0, 1.0, shape, measure=measure),
        "gaussian": GaussianSpectrum(1.0, shape, measure=measure),
        "spike_slab": SpikeAndSlabSpectrum(0.3, 0.01, 1.0, shape, measure=measure),
    }


def _gen_lp_grad(law, w):
    """``(log_prob(w), d log_prob / dw)`` for a leaf copy of ``w``."""
    w = w.clone().requires_grad_(True)
    lp = law.log_prob(w)
    (g,) = torch.autograd.grad(lp.sum(), w)
    return lp, g


def _lp_only(law, w):
    return _gen_lp_grad(law, w)[0]


def _grad_only(law, w):
    return _gen_lp_grad(law, w)[1]


GEN = _laws(measure="generative")
PEN = _laws()
ZERO43 = torch.zeros(4, 3)
EYE33 = torch.eye(3) * 0.7  # repeated non-zero singular values
DIAG_ZERO = torch.diag(torch.tensor([2.0, 1.0, 0.0]))  # square, one zero singular value
PL21 = PowerLawSpectrum(2.5, 1.5, (2, 1), measure="generative")
# w in R^2 at 0: density f(0) 2 sigma / (2 pi sigma) = f(0) / pi, f(0) = 1/Z
PL21_AT_ZERO = -float(spliced_powerlaw_log_norm(torch.tensor(2.5), torch.tensor(1.5),
                                                torch.tensor(1.5))) - math.log(math.pi)

CASES = [
    # -- infinite parameters pass validate_args today: reject, naming the parameter
    ("powerlaw-alpha-inf", lambda: PowerLawSpectrum(INF, 1.0, (3, 3), validate_args=True),
     ValueError, r"PowerLawSpectrum: parameter alpha must be finite.*inf"),
    ("powerlaw-tau-inf", lambda: PowerLawSpectrum(2.0, INF, (3, 3), validate_args=True),
     ValueError, r"parameter tau must be finite"),
    ("powerlaw-xmin-inf", lambda: PowerLawSpectrum(2.0, 1.0, (3, 3), xmin=INF,
                                                   validate_args=True),
     ValueError, r"parameter xmin must be finite"),
    ("powerlaw-alpha-tensor-inf", lambda: PowerLawSpectrum(torch.tensor([2.0, INF]), 1.0, (3, 3),
                                                           validate_args=True),
     ValueError, r"alpha must be finite, got \[2\.0, inf\]"),
    ("gaussian-scale-inf", lambda: GaussianSpectrum(INF, (3, 3), validate_args=True),
     ValueError, r"GaussianSpectrum: parameter scale"),
    ("frechet-top-conc-inf", lambda: FrechetTopEigenvalue(INF, 1.0, 1.0, (3, 3),
                                                          validate_args=True),
     ValueError, r"FrechetTopEigenvalue: parameter concentration"),
    ("frechet-top-scale-inf", lambda: FrechetTopEigenvalue(2.0, INF, 1.0, (3, 3),
                                                           validate_args=True),
     ValueError, r"parameter scale"),
    ("frechet-top-tau-inf", lambda: FrechetTopEigenvalue(2.0, 1.0, INF, (3, 3),
                                                         validate_args=True),
     ValueError, r"parameter tau"),
    ("frechet-top-loc-inf", lambda: FrechetTopEigenvalue(2.0, 1.0, 1.0, (3, 3), loc=INF,
                                                         validate_args=True),
     ValueError, r"parameter loc"),
    ("spike-slab-scale-inf", lambda: SpikeAndSlabSpectrum(0.5, 0.1, INF, (3, 3),
                                                          validate_args=True),
     ValueError, r"SpikeAndSlabSpectrum: parameter slab_scale"),
    ("frechet-scalar-conc-inf", lambda: Frechet(INF, 1.0, validate_args=True), ValueError,
     r"Frechet: parameter concentration"),
    ("frechet-scalar-loc-inf", lambda: Frechet(2.0, 1.0, -INF, validate_args=True), ValueError,
     r"Frechet: parameter loc"),
    # -- non-integer event_shape was truncated: reject
    ("event-shape-float", lambda: PowerLawSpectrum(2.0, 1.0, (3.7, 3)), TypeError,
     r"PowerLawSpectrum: event_shape must be a tuple of ints.*3\.7"),
    ("event-shape-integral-float", lambda: GaussianSpectrum(1.0, (4, 3.0)), TypeError,
     r"GaussianSpectrum: event_shape.*ints"),
    ("event-shape-string", lambda: FrechetTopEigenvalue(2.0, 1.0, 1.0, ("4", 3)), TypeError,
     r"event_shape.*'4'"),
    ("event-shape-kernel-float", lambda: SpikeAndSlabSpectrum(0.5, 0.1, 1.0, (4, 3, 2.5)),
     TypeError, r"SpikeAndSlabSpectrum: event_shape"),
    # -- rsample / mean / variance: a message naming the law and what to use instead
    ("powerlaw-rsample", lambda: PEN["powerlaw"].rsample(), NotImplementedError,
     r"PowerLawSpectrum has no reparameterised sampler.*\.sample\(\)"),
    ("gaussian-rsample", lambda: PEN["gaussian"].rsample(), NotImplementedError,
     r"GaussianSpectrum.*\.sample\(\)"),
    ("frechet-top-rsample", lambda: PEN["frechet_top"].rsample(), NotImplementedError,
     r"FrechetTopEigenvalue.*guide"),
    ("spike-slab-rsample", lambda: PEN["spike_slab"].rsample(), NotImplementedError,
     r"SpikeAndSlabSpectrum"),
    ("powerlaw-mean", lambda: PEN["powerlaw"].mean, NotImplementedError,
     r"PowerLawSpectrum\.mean.*sample\(shape\)\.mean\(0\)"),
    ("frechet-top-mean", lambda: PEN["frechet_top"].mean, NotImplementedError,
     r"FrechetTopEigenvalue\.mean"),
    ("gaussian-variance", lambda: PEN["gaussian"].variance, NotImplementedError,
     r"GaussianSpectrum\.variance.*sample"),
    # -- meta / sparse / half weights
    ("log-prob-meta", lambda: PEN["powerlaw"].log_prob(torch.empty(4, 3, device="meta")),
     ValueError, r"PowerLawSpectrum: weight of shape \(4, 3\) is on the meta device"),
    ("log-prob-sparse", lambda: PEN["gaussian"].log_prob(torch.ones(4, 3).to_sparse()),
     TypeError, r"GaussianSpectrum: weight is a torch\.sparse_coo"),
    ("log-prob-float16", _seeded(lambda: PEN["powerlaw"].log_prob(
        torch.randn(4, 3).half())), Finite(torch.float32), ""),
    ("log-prob-bfloat16", _seeded(lambda: GEN["gaussian"].log_prob(
        torch.randn(4, 3).bfloat16())), Finite(torch.float32), ""),
    ("log-prob-float16-frechet", _seeded(lambda: PEN["frechet_top"].log_prob(
        torch.randn(4, 3).half())), Finite(torch.float32), ""),
    # -- generative log_prob at singular points: the limit, and a gradient without NaN
    ("powerlaw-gen-zero", lambda: _lp_only(GEN["powerlaw"], ZERO43), Value(INF), ""),
    ("powerlaw-gen-zero-grad", lambda: _grad_only(GEN["powerlaw"], ZERO43), Value(0.0), ""),
    ("frechet-top-gen-zero", lambda: _lp_only(GEN["frechet_top"], ZERO43), Value(-INF), ""),
    ("frechet-top-gen-zero-grad", lambda: _grad_only(GEN["frechet_top"], ZERO43), Value(0.0),
     ""),
    ("spike-slab-gen-zero-grad", lambda: _grad_only(GEN["spike_slab"], ZERO43), Value(0.0), ""),
    ("powerlaw-gen-repeated", lambda: _lp_only(PowerLawSpectrum(2.0, 1.0, (3, 3),
                                                                measure="generative"), EYE33),
     Value(INF), ""),
    ("powerlaw-gen-repeated-grad", lambda: _grad_only(
        PowerLawSpectrum(2.0, 1.0, (3, 3), measure="generative"), EYE33), Value(0.0), ""),
    ("powerlaw-gen-square-one-zero", lambda: _lp_only(
        PowerLawSpectrum(2.0, 1.0, (3, 3), measure="generative"), DIAG_ZERO), Value(-INF), ""),
    ("powerlaw-gen-square-one-zero-grad", lambda: _grad_only(
        PowerLawSpectrum(2.0, 1.0, (3, 3), measure="generative"), DIAG_ZERO), Value(0.0), ""),
    ("powerlaw-gen-2x1-zero-finite-limit", lambda: _lp_only(PL21, torch.zeros(2, 1)),
     Value(PL21_AT_ZERO), ""),
    ("powerlaw-gen-batch-one-zero-row", lambda: _lp_only(GEN["powerlaw"], torch.stack(
        [ZERO43, torch.randn(4, 3, generator=torch.Generator().manual_seed(1))])).isinf()
     .tolist() == [True, False], Value(1.0), ""),
    # -- valid parameters, numbers out of range (item 9)
    ("powerlaw-1.05-f32-sample", _seeded(lambda: PowerLawSpectrum(
        torch.tensor(1.05), torch.tensor(1.0), (20, 10)).sample((40,)), seed=3),
     Finite(torch.float32), ""),
    ("powerlaw-1.05-f64-sample", _seeded(lambda: PowerLawSpectrum(
        torch.tensor(1.05, dtype=torch.float64), 1.0, (20, 10)).sample((40,))),
     Finite(torch.float64), ""),
    ("powerlaw-1.01-f32-sample-overflow", _seeded(lambda: PowerLawSpectrum(
        1.01, 1.0, (20, 10)).sample((200,))), ValueError,
     r"PowerLawSpectrum\.sample \(alpha=\[1\.01\].*overflow torch\.float32.*float64"),
    ("gaussian-1e-30-gen-log-prob", _seeded(lambda: GaussianSpectrum(1e-30, (5, 4)).log_prob(
        GaussianSpectrum(1e-30, (5, 4)).sample())), Finite(torch.float32), ""),
    ("gaussian-1e-30-sample", _seeded(lambda: GaussianSpectrum(1e-30, (5, 4)).sample((3,))),
     Finite(torch.float32), ""),
    ("frechet-top-0.05-f32-sample", _seeded(lambda: FrechetTopEigenvalue(
        torch.tensor(0.05), 1.0, 1.0, (5, 4)).sample((200,)), seed=1), Finite(torch.float32),
     ""),
    ("frechet-top-0.02-f32-sample-overflow", _seeded(lambda: FrechetTopEigenvalue(
        0.02, 1.0, 1.0, (5, 4)).sample((500,))), ValueError,
     r"FrechetTopEigenvalue\.sample \(concentration=\[0\.02\].*overflow torch\.float32"),
]


def _run(fn, expect, regex):
    if isinstance(expect, Finite):
        out = fn()
        assert bool(torch.isfinite(out).all())
        if expect.dtype is not None:
            assert out.dtype == expect.dtype
        return
    if isinstance(expect, Value):
        out = torch.as_tensor(fn(), dtype=torch.float64)
        assert not bool(torch.isnan(out).any())
        if math.isinf(expect.value):
            assert bool((out == expect.value).all()), out
        else:
            torch.testing.assert_close(out, torch.full_like(out, expect.value), rtol=1e-5,
                                       atol=1e-5)
        return
    with pytest.raises(expect, match=regex):
        fn()


@pytest.mark.parametrize("fn, expect, regex", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_distribution_input(fn, expect, regex):
    _run(fn, expect, regex)


def test_powerlaw_sample_stream_and_law_unchanged_in_float32():
    """Draws are computed in float64 from the same float32 uniforms: to float32 rounding
    they are the old draws (same eigenvalues) wherever the old ones were finite."""
    d = PowerLawSpectrum(2.5, 1.0, (6, 4))
    torch.manual_seed(7)
    lam = d.sample_eigenvalues((50,))
    torch.manual_seed(7)
    lam64 = d.sample_eigenvalues((50,), dtype=torch.float64)
    torch.testing.assert_close(lam64.float(), lam, rtol=1e-5, atol=0)


def test_generative_regular_points_unchanged():
    """Away from singular points the value is the plain formula (bit for bit)."""
    from bayes_spectral.spectra.laws import log_sv_jacobian

    d = GEN["powerlaw"]
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    sv = torch.linalg.svdvals(w)
    expect = d._sv_log_density(sv) - log_sv_jacobian(sv, 4, 3) - log_haar_volume(4, 3)
    assert float(d.log_prob(w)) == float(expect)
