"""Layer 1: Marchenko-Pastur (MP) bulk fit of an ESD, WeightWatcher 0.7.7's ``mp_fit``.

For an ``N x M`` matrix (``N >= M``, aspect ratio ``Q = N/M``) with i.i.d. entries of
variance ``sigma^2``, the ESD of ``W^T W / N`` fills the bulk ``[lambda_-, lambda_+]``,

    lambda_(+/-) = (sigma (1 +/- 1/sqrt(Q)))^2,
    rho(x) = sqrt((lambda_+ - x)(x - lambda_-)) / (2 pi sigma^2 x / Q).

The fit, as WeightWatcher's (its conventions, not a textbook MLE):

1. rescale the ESD to mean 1: ``s^2 = n / sum(lambda)``, ``x = s^2 lambda``;
2. estimate the density of ``x`` (of ``sqrt(x)`` when ``Q == 1``) with a linear
   (triangular) kernel of bandwidth ``0.1`` on 1000 points ``t`` of ``[0, max + 0.5]``
   and keep the points where it exceeds ``0.01``;
3. ``sigma_mp`` minimises ``sum_t (rho_sigma(t) - kde(t))^2`` (rho: MP law, or the
   quarter circle ``sqrt(4 - t^2) / (pi sigma^2)`` when ``Q == 1``) over the grid
   ``sigma = c (0.05, 0.06, ..., < 2)``, ``c = sqrt(max x) / (1 + 1/sqrt(Q))``, then
   polished by scipy ``fmin``'s 1-D Nelder-Mead from the best grid point (as ``brute``);
   a ``sigma`` whose bulk does not contain the density's mode, or whose ``lambda_+``
   passes the last kept point, costs ``1e6`` per point;
4. ``num_spikes = #{x > lambda_+ + sqrt(TW)}``, ``TW = lambda_+^(2/3) / (sqrt(Q) M^(2/3))``
   (a Tracy-Widom margin), ``mp_softrank = lambda_+ / max x``; the edges are reported in
   the units of the input ESD (``lambda_(+/-) / s^2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._checks import float_tensor

__all__ = ["MPFit", "mp_fit", "mp_bulk_edges", "mp_density", "linear_kde"]

_GRID_POINTS = 1000
_DENSITY_FLOOR = 0.01
_PENALTY = 1000.0


@dataclass
class MPFit:
    """Result of :func:`mp_fit` (plain floats; ``sigma_mp`` in units of the rescaled ESD).

    ``lambda_minus``/``lambda_plus``: bulk edges in the input's units (WeightWatcher's
    ``bulk_min``/``bulk_max``); ``w_scale``: ``s`` of the rescaling; ``cutoff``: the spike
    threshold ``lambda_+ + sqrt(TW)`` (rescaled units).
    """

    sigma_mp: float
    num_spikes: int
    lambda_minus: float
    lambda_plus: float
    mp_softrank: float
    w_scale: float
    cutoff: float
    q: float

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """WeightWatcher's column names (``sigma_mp``, ``num_spikes``, ``bulk_min``...)."""
        return {f"{prefix}sigma_mp": self.sigma_mp, f"{prefix}num_spikes": self.num_spikes,
                f"{prefix}bulk_min": self.lambda_minus, f"{prefix}bulk_max": self.lambda_plus,
                f"{prefix}mp_softrank": self.mp_softrank, f"{prefix}W_scale": self.w_scale}


def mp_bulk_edges(sigma: torch.Tensor | float, q: float) -> tuple:
    """``(lambda_-, lambda_+) = ((sigma (1 -/+ 1/sqrt(Q)))^2)``."""
    r = 1.0 / math.sqrt(q)
    return (sigma * (1.0 - r)) ** 2, (sigma * (1.0 + r)) ** 2


def mp_density(x: torch.Tensor, q: float, sigma: torch.Tensor | float) -> torch.Tensor:
    """MP density ``sqrt((l+ - x)(x - l-)) Q / (2 pi sigma^2 x)``, 0 outside ``(l-, l+)``;
    broadcasts ``sigma`` against ``x``. For ``Q == 1`` the quarter circle of singular
    values, ``sqrt(4 - x^2) / (pi sigma^2)`` on ``[0, 2]`` (WeightWatcher's convention)."""
    sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if q == 1.0:
        inside = (x >= 0) & (x <= 2.0)
        val = torch.sqrt((4.0 - x * x).clamp_min(0.0)) / (math.pi * sigma**2)
        return torch.where(inside, val, torch.zeros_like(val))
    lo, hi = mp_bulk_edges(sigma, q)
    inside = (x > lo) & (x < hi) & (x > 0)
    val = torch.sqrt(((hi - x) * (x - lo)).clamp_min(0.0)) * q / (2 * math.pi * sigma**2
                                                                  * x.clamp_min(1e-300))
    return torch.where(inside, val, torch.zeros_like(val))


def linear_kde(samples: torch.Tensor, points: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """Triangular-kernel density ``(1/(n h)) sum_i max(0, 1 - |t - x_i| / h)`` at ``points``
    (scikit-learn's ``KernelDensity(kernel="linear")``), in chunks of points."""
    n = samples.numel()
    out = torch.empty_like(points)
    step = max(1, (1 << 22) // max(1, n))
    for a in range(0, points.numel(), step):
        d = (points[a:a + step, None] - samples[None, :]).abs() / bandwidth
        out[a:a + step] = (1.0 - d).clamp_min(0.0).sum(-1)
    return out / (n * bandwidth)


def _objective(sigmas: torch.Tensor, t: torch.Tensor, dens: torch.Tensor, q: float
               ) -> torch.Tensor:
    """``sum_t (rho_sigma(t) - kde(t))^2`` per sigma, with WeightWatcher's penalty."""
    rho = mp_density(t[None, :], q, sigmas[:, None])
    cost = ((rho - dens[None, :]) ** 2).sum(-1)
    if q == 1.0:
        return cost
    lo, hi = mp_bulk_edges(sigmas, q)
    mode = t[torch.argmax(dens)]
    bad = (hi < mode) | (hi > t[-1]) | (lo > mode)
    return torch.where(bad, torch.full_like(cost, _PENALTY**2 * t.numel()), cost)


def _nelder_mead_1d(f, x0: float, tol: float = 1e-4, max_evals: int = 200) -> float:
    """1-D Nelder-Mead as scipy's ``fmin`` (simplex ``x0, 1.05 x0``; reflect 1, expand 2,
    contract 1/2, shrink 1/2; stop when ``|x1 - x0| <= tol`` and ``|f1 - f0| <= tol``)."""
    sim = [x0, 1.05 * x0 if x0 != 0 else 0.00025]
    fs = [f(sim[0]), f(sim[1])]
    calls = 2
    if fs[1] < fs[0]:
        sim, fs = sim[::-1], fs[::-1]
    while calls < max_evals:
        if abs(sim[1] - sim[0]) <= tol and abs(fs[0] - fs[1]) <= tol:
            break
        xbar, worst = sim[0], sim[1]
        xr = 2 * xbar - worst
        fr, calls = f(xr), calls + 1
        if fr < fs[0]:
            xe = 3 * xbar - 2 * worst
            fe, calls = f(xe), calls + 1
            sim[1], fs[1] = (xe, fe) if fe < fr else (xr, fr)
        else:
            xc = 1.5 * xbar - 0.5 * worst if fr < fs[1] else 0.5 * xbar + 0.5 * worst
            fc, calls = f(xc), calls + 1
            if (fc <= fr) if fr < fs[1] else (fc < fs[1]):
                sim[1], fs[1] = xc, fc
            else:
                sim[1] = sim[0] + 0.5 * (sim[1] - sim[0])
                fs[1], calls = f(sim[1]), calls + 1
        if fs[1] < fs[0]:
            sim, fs = sim[::-1], fs[::-1]
    return sim[0]


def _fit_sigma(x: torch.Tensor, q: float, bandwidth: float) -> float:
    """Step 3 of the module docstring on the rescaled ESD ``x``."""
    fit_on = x.sqrt() if q == 1.0 else x
    t = torch.linspace(0.0, float(fit_on.max()) + 0.5, _GRID_POINTS, dtype=x.dtype,
                       device=x.device)
    dens = linear_kde(fit_on, t, bandwidth)
    keep = dens > _DENSITY_FLOOR
    t, dens = t[keep], dens[keep]
    c = math.sqrt(float(x.max())) / (1.0 + 1.0 / math.sqrt(q))
    step = 0.01 * c
    size = math.ceil((2.0 * c - 0.05 * c) / step)
    grid = 0.05 * c + step * torch.arange(size, dtype=x.dtype, device=x.device)
    best = float(grid[torch.argmin(_objective(grid, t, dens, q))])

    def f(s: float) -> float:
        return float(_objective(torch.tensor([s], dtype=x.dtype, device=x.device), t, dens, q))

    return _nelder_mead_1d(f, best)


def mp_fit(evals: torch.Tensor, q: float, m: int | None = None, bandwidth: float = 0.1,
           name: str | None = None) -> MPFit:
    """Marchenko-Pastur bulk fit of the ESD ``evals`` (1-D) of a matrix of aspect ratio
    ``q = N/M >= 1`` and smaller dimension ``m`` (default: the number of eigenvalues);
    the steps are in the module docstring."""
    where = f" (layer {name!r})" if name else ""
    ev = float_tensor(evals, f"evals{where}").to(torch.float64).reshape(-1)
    if ev.numel() < 2 or not bool(torch.isfinite(ev).all()) or bool((ev < 0).any()):
        raise ValueError(f"mp_fit{where}: need >= 2 finite non-negative eigenvalues, got "
                         f"shape {tuple(evals.shape)}")
    if not q >= 1.0:
        raise ValueError(f"mp_fit{where}: aspect ratio q = N/M must be >= 1, got {q}")
    total = float(ev.sum())
    if not total > 0:
        raise ValueError(f"mp_fit{where}: all eigenvalues are zero")
    m = ev.numel() if m is None else int(m)
    w_scale = math.sqrt(ev.numel() / total)
    x = ev * w_scale**2
    sigma = _fit_sigma(x, float(q), bandwidth)
    lo, hi = mp_bulk_edges(sigma, float(q))
    cutoff = hi + math.sqrt(hi ** (2.0 / 3.0) / (math.sqrt(q) * m ** (2.0 / 3.0)))
    return MPFit(sigma_mp=sigma, num_spikes=int((x > cutoff).sum()),
                 lambda_minus=lo / w_scale**2, lambda_plus=hi / w_scale**2,
                 mp_softrank=hi / float(x.max()), w_scale=w_scale, cutoff=cutoff, q=float(q))
