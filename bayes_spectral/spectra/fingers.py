"""Layer 1: WeightWatcher's ``fix_fingers`` rules for spurious large alphas.

"Fingers" are a few eigenvalues far out in the tail (finite-size outliers) that pull the
KS-chosen xmin up and make alpha large. WeightWatcher 0.7.7 has two fixes:

* ``"xmin_peak"``: search xmin only near the mode of the ESD. The mode ``p`` is the left
  edge of the fullest of 100 equal bins of ``log10(lambda)`` (non-zero eigenvalues); the
  range is ``(log10(0.95 p), 1.5 p)`` -- WeightWatcher's lower bound is the *log10* of
  ``0.95 p`` used as an eigenvalue (a units slip we keep for parity: it lies below every
  eigenvalue whenever ``p < ~1``, so in practice the rule is ``xmin < 1.5 p``).
* ``"clip_xmax"``: refit without the ``k = 2, 3, ..., max_fingers - 1`` largest
  eigenvalues; stop at the first ``k`` whose alpha is below the unclipped alpha by more
  than ``finger_thresh`` (keep that fit; WeightWatcher reports ``num_fingers = k - 1``,
  one less than the eigenvalues removed, kept here for parity) or whose alpha is
  ``<= min_alpha`` (keep the unclipped fit).
"""

from __future__ import annotations

import math

import torch

from .._checks import float_tensor
from .powerlaw import PowerLawFit, _zero_cut, fit_powerlaw

__all__ = ["xmin_peak_range", "fit_clipped_powerlaw", "log_histogram_peak"]


def _nonzero_sorted(evals: torch.Tensor, what: str) -> torch.Tensor:
    """Ascending 1-D float64 eigenvalues above the zero cut of :func:`fit_powerlaw`."""
    ev = float_tensor(evals, what).to(torch.float64).reshape(-1)
    if ev.numel() < 3 or not bool(torch.isfinite(ev).all()) or bool((ev < 0).any()):
        raise ValueError(f"{what}: need >= 3 finite non-negative eigenvalues")
    ev = torch.sort(ev).values
    return ev[int(_zero_cut(ev[None], None)[0]):]


def log_histogram_peak(evals: torch.Tensor, bins: int = 100) -> float:
    """Left edge ``p`` (in eigenvalue units) of the fullest of ``bins`` equal bins of
    ``log10(lambda)`` over ``[min, max]`` (numpy's histogram binning; first on ties)."""
    logs = torch.log10(_nonzero_sorted(evals, "log_histogram_peak"))
    lo, hi = float(logs[0]), float(logs[-1])
    if hi == lo:
        return 10**lo
    edges = torch.linspace(lo, hi, bins + 1, dtype=logs.dtype, device=logs.device)
    idx = ((logs - lo) * (bins / (hi - lo))).long().clamp(0, bins - 1)
    idx = idx - (logs < edges[idx]).long()
    idx = idx + ((logs >= edges[idx + 1]) & (idx != bins - 1)).long()
    counts = torch.bincount(idx, minlength=bins)
    return 10 ** float(edges[int(torch.argmax(counts))])


def xmin_peak_range(evals: torch.Tensor, bins: int = 100) -> tuple[float, float]:
    """WeightWatcher's ``xmin_peak`` search range ``(log10(0.95 p), 1.5 p)`` (module
    docstring), ``p`` = :func:`log_histogram_peak`."""
    p = log_histogram_peak(evals, bins)
    return math.log10(0.95 * p), 1.5 * p


def fit_clipped_powerlaw(evals: torch.Tensor, max_fingers: int = 10,
                         finger_thresh: float = 1.0, min_alpha: float = 2.0,
                         name: str | None = None, **fit_kwargs
                         ) -> tuple[PowerLawFit, int, float]:
    """``clip_xmax`` (module docstring): returns ``(fit, num_fingers, raw_alpha)``, the
    fit kept, WeightWatcher's finger count and the unclipped alpha. Extra keyword
    arguments go to :func:`fit_powerlaw`."""
    ev = _nonzero_sorted(evals, f"fit_clipped_powerlaw{f' (layer {name!r})' if name else ''}")
    first = fit_powerlaw(ev, name=name, **fit_kwargs)
    raw = float(first.alpha)
    for k in range(2, max_fingers):
        if ev.numel() - k < 3:
            break
        fit = fit_powerlaw(ev[:-k], name=name, **fit_kwargs)
        alpha = float(fit.alpha)
        if alpha + finger_thresh < raw:
            return fit, k - 1, raw
        if min_alpha is not None and alpha <= min_alpha:
            break
    return first, 0, raw
