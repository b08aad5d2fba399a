"""Layer 1: truncated power-law (TPL) tail fit, ``p(x) ~ x^(-alpha) e^(-Lambda x)`` on
``[xmin, inf)`` (WeightWatcher's ``fit="TPL"``, computed there by ``powerlaw.Fit(...,
xmin_distribution="truncated_power_law")``; its conventions are kept).

At a candidate ``xmin`` write ``u = ln(x / xmin)``, ``kappa = Lambda xmin``; the tail
is an exponential family in ``(alpha, kappa)`` with statistics ``(u, e^u)``:

    l(alpha, kappa) = -alpha mean(u) - kappa mean(e^u) - ln J,
    J(alpha, kappa) = int_0^inf exp((1 - alpha) u - kappa e^u) du,

concave, so damped Newton steps (gradient ``E[.] - mean(.)``, Hessian ``-Cov``; moments
by Gauss-Legendre quadrature on ``[0, ln(1 + 150/kappa)]``) reach the MLE. As powerlaw:
``alpha`` is kept in ``[0, 3]`` and ``Lambda >= 0``, and a fit is *valid* when
``0.01 < alpha < 2.99`` and ``Lambda > 0.01`` (powerlaw flags fits within 0.01 of a bound
as noise). Candidates are the distinct eigenvalues but the largest (within
``xmin_range``, also without the largest in the range); the KS distance compares the TPL
CDF with ``#{x < u}/n`` at each distinct tail value ``u``; the fit is the valid candidate
of least distance (else the least distance, ``valid=False``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .._checks import float_tensor
from .powerlaw import _zero_cut

__all__ = ["TPLFit", "fit_truncated_powerlaw"]

_ALPHA_BOUNDS = (0.0, 3.0)
_LAMBDA_FLOOR = 1e-12  # kappa floor; far below the validity cut Lambda > 0.01
_EPS_BOUND = 1e-2
_PANELS, _NODES = 32, 16
_CHUNK = 1 << 21


@dataclass
class TPLFit:
    """Result of :func:`fit_truncated_powerlaw` (0-d tensors / plain values)."""

    alpha: torch.Tensor
    Lambda: torch.Tensor
    xmin: torch.Tensor
    xmin_index: int
    num_tail: int
    ks_distance: torch.Tensor
    valid: bool
    method: str = "tpl"


@functools.lru_cache(maxsize=8)
def _gauss_legendre(n: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes and weights on ``[0, 1]`` (Golub-Welsch)."""
    k = torch.arange(1, n, dtype=dtype)
    off = k / torch.sqrt(4 * k * k - 1)
    jac = torch.diag(off, 1) + torch.diag(off, -1)
    nodes, vecs = torch.linalg.eigh(jac)
    w = 2 * vecs[0] ** 2
    return ((nodes + 1) / 2).to(device), (w / 2).to(device)


def _quad_nodes(alpha: torch.Tensor, kappa: torch.Tensor):
    """Composite GL nodes ``u`` (C, K) on ``[0, ln(1 + 150/kappa)]`` and log weights."""
    x, w = _gauss_legendre(_NODES, alpha.dtype, alpha.device)
    top = torch.log1p(150.0 / kappa)  # kappa e^U ~ 150 (or 150 decay lengths if big)
    pan = torch.arange(_PANELS, dtype=alpha.dtype, device=alpha.device)
    rel = ((pan[:, None] + x[None, :]) / _PANELS).reshape(-1)  # (K,) in [0, 1]
    u = top[:, None] * rel[None, :]
    logw = torch.log(top / _PANELS)[:, None] + torch.log(w).repeat(_PANELS)[None, :]
    return u, logw


def _log_integrand(u, alpha, kappa):
    return (1.0 - alpha)[:, None] * u - kappa[:, None] * torch.exp(u)


def _objective_and_moments(alpha, kappa, mean_u, mean_e, need_moments=True):
    """``l`` per candidate and (optionally) gradient and Hessian in ``(alpha, kappa)``."""
    u, logw = _quad_nodes(alpha, kappa)
    lg = _log_integrand(u, alpha, kappa) + logw
    logj = torch.logsumexp(lg, -1)
    ll = -alpha * mean_u - kappa * mean_e - logj
    if not need_moments:
        return ll, None, None
    p = torch.exp(lg - logj[:, None])
    eu = torch.exp(u)
    m_u, m_e = (p * u).sum(-1), (p * eu).sum(-1)
    c_uu = (p * u * u).sum(-1) - m_u**2
    c_ue = (p * u * eu).sum(-1) - m_u * m_e
    c_ee = (p * eu * eu).sum(-1) - m_e**2
    grad = torch.stack([m_u - mean_u, m_e - mean_e], -1)
    hess = -torch.stack([torch.stack([c_uu, c_ue], -1), torch.stack([c_ue, c_ee], -1)], -2)
    return ll, grad, hess


def _newton(mean_u, mean_e, alpha0, kappa0, kappa_lo, iters: int = 100):
    """Damped projected Newton ascent of ``l`` in the box of the module docstring; a
    candidate stops when a step gains at most ``1e-14 (1 + |l|)``."""
    a, k = alpha0.clone(), kappa0.clone()
    active = torch.arange(a.numel(), device=a.device)
    for _ in range(iters):
        if active.numel() == 0:
            break
        a_new, k_new, gain, ll = _newton_step(a[active], k[active], mean_u[active],
                                              mean_e[active], kappa_lo[active])
        a[active], k[active] = a_new, k_new
        active = active[gain > 1e-14 * (1.0 + ll.abs())]
    return a, k


def _newton_step(a, k, mean_u, mean_e, kappa_lo):
    """One Newton step, the best of 8 halvings (kappa falls at most 10x: stays > 0);
    returns the new point, the gain in ``l`` (0 when no halving improves) and ``l``."""
    ll, g, h = _objective_and_moments(a, k, mean_u, mean_e)
    eye = torch.eye(2, dtype=a.dtype, device=a.device) * 1e-12
    step = -torch.linalg.solve(h - eye, g.unsqueeze(-1)).squeeze(-1)
    room = torch.where(step[:, 1] < 0, 0.9 * k / (-step[:, 1]), torch.ones_like(k))
    s = room.clamp(max=1.0)[:, None] * 0.5 ** torch.arange(8, dtype=a.dtype, device=a.device)
    ta = (a[:, None] + s * step[:, None, 0]).clamp(*_ALPHA_BOUNDS)
    tk = torch.maximum(k[:, None] + s * step[:, None, 1], kappa_lo[:, None])
    C, S = ta.shape
    tll = _objective_and_moments(ta.reshape(-1), tk.reshape(-1), mean_u.repeat_interleave(S),
                                 mean_e.repeat_interleave(S), need_moments=False)[0]
    tll = tll.reshape(C, S)
    tll = torch.where(torch.isfinite(tll), tll, torch.full_like(tll, -float("inf")))
    best = tll.argmax(-1, keepdim=True)
    gain = (tll.gather(-1, best).squeeze(-1) - ll).clamp_min(0.0)
    better = gain > 0
    a = torch.where(better, ta.gather(-1, best).squeeze(-1), a)
    k = torch.where(better, tk.gather(-1, best).squeeze(-1), k)
    return a, k, gain, ll


def _tail_cdf_ks(logs: torch.Tensor, cand: torch.Tensor, alpha, kappa) -> torch.Tensor:
    """KS distance of each candidate's TPL: max over distinct tail values ``v`` of
    ``|F(v) - #{x < v}/n|``, ``F(v) = int_0^{ln(v/xmin)} e^{g} du / J``."""
    N = logs.numel()
    x, w = _gauss_legendre(_NODES, logs.dtype, logs.device)
    u_all, logw = _quad_nodes(alpha, kappa)
    logj = torch.logsumexp(_log_integrand(u_all, alpha, kappa) + logw, -1)
    first_of_value = torch.searchsorted(logs, logs, right=False)  # index of first tie
    out = torch.empty(cand.numel(), dtype=logs.dtype, device=logs.device)
    step = max(1, _CHUNK // (N * _NODES))
    for c0 in range(0, cand.numel(), step):
        ci = cand[c0:c0 + step]
        a, k, lj = alpha[c0:c0 + step], kappa[c0:c0 + step], logj[c0:c0 + step]
        u = (logs[None, :] - logs[ci][:, None]).clamp_min(0.0)  # (c, N)
        u_prev = torch.cat([torch.zeros_like(u[:, :1]), u[:, :-1]], -1)
        width = u - u_prev
        nodes = u_prev[..., None] + width[..., None] * x  # (c, N, G)
        lg = (1.0 - a)[:, None, None] * nodes - k[:, None, None] * torch.exp(nodes)
        piece = torch.exp(lg - lj[:, None, None]) @ w * width
        cdf = torch.cumsum(piece, -1)
        j = torch.arange(N, device=logs.device)
        n = (N - ci).to(logs.dtype)
        emp = (first_of_value[None, :] - ci[:, None]).to(logs.dtype) / n[:, None]
        dev = (cdf - emp).abs().masked_fill(j[None, :] < ci[:, None], 0.0)
        out[c0:c0 + step] = dev.amax(-1)
    return out


def _candidates(lam: torch.Tensor, xmin, xmin_range) -> torch.Tensor:
    """powerlaw's candidates: the first index of each distinct value in ``[lo, hi)``
    (default ``[min, max)``) but the largest of them; a fixed ``xmin``: the first index
    with ``lambda >= xmin``."""
    if xmin is not None:
        i = int(torch.searchsorted(lam, torch.tensor([float(xmin)], dtype=lam.dtype,
                                                      device=lam.device))[0])
        if i > lam.numel() - 2:
            raise ValueError(f"xmin={xmin} leaves fewer than 2 eigenvalues in the tail")
        return torch.tensor([i], device=lam.device)
    lo, hi = (float(lam[0]), float(lam[-1])) if xmin_range is None else (
        min(map(float, xmin_range)), max(map(float, xmin_range)))
    first = torch.ones_like(lam, dtype=torch.bool)
    first[1:] = lam[1:] != lam[:-1]
    idx = torch.nonzero(first & (lam >= lo) & (lam < hi)).flatten()
    return idx[:-1]


def fit_truncated_powerlaw(evals: torch.Tensor, xmin: float | None = None,
                           xmin_range: tuple[float, float] | None = None,
                           name: str | None = None) -> TPLFit:
    """TPL fit of one ESD (module docstring): xmin by the KS rule over the distinct
    eigenvalues (``xmin_range=(lo, hi)``: within ``lo <= lambda < hi``), or fixed ``xmin``.
    Zero eigenvalues (below the relative numerical-rank cut) are left out."""
    where = f" (layer {name!r})" if name else ""
    ev = float_tensor(evals, f"evals{where}").detach().to(torch.float64).reshape(-1)
    if ev.numel() < 3 or not bool(torch.isfinite(ev).all()) or bool((ev < 0).any()):
        raise ValueError(f"fit_truncated_powerlaw{where}: need >= 3 finite non-negative "
                         "eigenvalues")
    lam = torch.sort(ev).values
    lam = lam[int(_zero_cut(lam[None], None)[0]):]
    cand = _candidates(lam, xmin, xmin_range)
    if cand.numel() == 0:
        raise ValueError(f"fit_truncated_powerlaw{where}: no xmin candidate")
    alpha, kappa = _fit_at(lam, cand)
    logs = torch.log(lam)
    D = _tail_cdf_ks(logs, cand, alpha, kappa)
    Lambda = kappa / lam[cand]
    valid = (alpha > _ALPHA_BOUNDS[0] + _EPS_BOUND) & (alpha < _ALPHA_BOUNDS[1] - _EPS_BOUND) \
        & (Lambda > _EPS_BOUND)
    pick = torch.where(valid, D, torch.full_like(D, float("inf")))
    b = int(torch.argmin(pick)) if bool(valid.any()) else int(torch.argmin(D))
    i = int(cand[b])
    return TPLFit(alpha=alpha[b], Lambda=Lambda[b], xmin=lam[i], xmin_index=i,
                  num_tail=lam.numel() - i, ks_distance=D[b], valid=bool(valid[b]))


def _fit_at(lam: torch.Tensor, cand: torch.Tensor):
    """MLE ``(alpha, kappa)`` at each candidate index, started where powerlaw starts
    (``alpha0 = 1 + n / sum ln(x/xmin)``, ``Lambda0 = 1/mean(x)``)."""
    N = lam.numel()
    logs = torch.log(lam)
    n = (N - cand).to(lam.dtype)
    suffix_log = torch.flip(torch.cumsum(torch.flip(logs, [0]), 0), [0])
    suffix_x = torch.flip(torch.cumsum(torch.flip(lam, [0]), 0), [0])
    xmin = lam[cand]
    mean_u = suffix_log[cand] / n - logs[cand]
    mean_e = suffix_x[cand] / n / xmin
    alpha0 = (1.0 + 1.0 / mean_u.clamp_min(1e-300)).clamp(0.05, 2.95)
    kappa_lo = torch.full_like(xmin, _LAMBDA_FLOOR)
    kappa0 = (1.0 / mean_e).clamp_min(1e-6)
    return _newton(mean_u, mean_e, alpha0, kappa0, kappa_lo)
