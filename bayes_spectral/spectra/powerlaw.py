"""Layer 1: power-law fits of the tail of an ESD (batched, vectorised, differentiable alpha).

Default rule (``xmin="ks"``, the one WeightWatcher uses): for every candidate
``xmin = lambda_i`` (ascending order, tail size ``n = N - i >= min_tail``)

    alpha_i = 1 + n / sum_{j>=i} ln(lambda_j / lambda_i)
    D_i     = max_{j>=i} | 1 - (lambda_j/lambda_i)^(1 - alpha_i) - (j - i)/n |

and the fit is the first ``argmin_i D_i`` (``D_i = 1`` where ``alpha_i <= 1``). All
candidates are evaluated at once, in chunks of candidates so that memory stays bounded
(``O(chunk * N)``; ``N = 16384`` needs a few tens of MiB).

Eigenvalues ``<= lambda_max * (N * eps)^2`` (``sigma <= N eps sigma_max``, the numerical-rank
cut) are treated as zero and never used as ``xmin``; WeightWatcher instead drops
``lambda <= 1e-5`` in absolute terms, which makes its fit depend on the scale of ``W``.

The returned ``alpha`` is differentiable: the xmin index is chosen without gradient and
``alpha`` is recomputed at that index from the eigenvalues, so gradients flow through them
(``d alpha / d lambda`` of the MLE formula above).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch

from .._checks import float_tensor

__all__ = ["PowerLawFit", "fit_powerlaw", "hill_estimator", "hill_tail_size", "alpha_at_index"]

_CHUNK_ELEMENTS = 1 << 21  # elements per temporary in the KS scan (16 MiB in float64)


@dataclass
class PowerLawFit:
    """Result of a tail fit; tensors have the batch shape of the input (0-d for one ESD).

    ``alpha`` (pdf exponent, differentiable), ``xmin`` (tail start), ``xmin_index`` (into
    the ascending ESD), ``num_tail`` (eigenvalues >= xmin used), ``ks_distance`` (``D``),
    ``sigma = (alpha - 1)/sqrt(num_tail)``, ``xmax`` (``lambda_max``; in the truncated fit
    the largest eigenvalue kept) and ``ks_distances`` (``D_i`` of every candidate, ``inf``
    where not a candidate) for plots.
    """

    alpha: torch.Tensor
    xmin: torch.Tensor
    xmin_index: torch.Tensor
    num_tail: torch.Tensor
    ks_distance: torch.Tensor
    sigma: torch.Tensor
    xmax: torch.Tensor
    method: str
    ks_distances: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, float]:
        """Plain floats of an unbatched fit (``alpha``, ``xmin``, ``ks_distance``...)."""
        if self.alpha.dim() != 0:
            raise ValueError("to_dict() is for a single ESD; index the batch first")
        return {
            "alpha": float(self.alpha),
            "xmin": float(self.xmin),
            "xmax": float(self.xmax),
            "ks_distance": float(self.ks_distance),
            "num_tail": int(self.num_tail),
            "sigma": float(self.sigma),
        }


def _prepare(evals: torch.Tensor, min_tail: int, name: str | None) -> tuple[torch.Tensor, int]:
    """Validate, sort ascending, and return (sorted evals (B, N), first usable index per row)."""
    where = _where(name)
    evals = float_tensor(evals, f"evals{where}")  # half -> float32: half loses the tail
    if evals.dim() == 0 or evals.shape[-1] < 2:
        raise ValueError(f"evals{where} of shape {tuple(evals.shape)}: need >= 2 eigenvalues")
    if not bool(torch.isfinite(evals).all()):
        raise ValueError(f"evals{where} contain NaN or Inf")
    if bool((evals < 0).any()):
        raise ValueError(f"evals{where} contain negative values; an ESD is >= 0")
    if min_tail < 2:
        raise ValueError(f"min_tail must be >= 2, got {min_tail}")
    return torch.sort(evals, dim=-1).values, evals.shape[-1]


def _zero_cut(lam: torch.Tensor, rtol: float | None) -> torch.Tensor:
    """Index of the first eigenvalue above the zero cut, per row (lam sorted ascending)."""
    n = lam.shape[-1]
    if rtol is None:
        rtol = (n * torch.finfo(lam.dtype).eps) ** 2
    thresh = lam[..., -1:] * rtol
    return (lam <= thresh).sum(-1)


def alpha_at_index(evals_sorted: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
    """MLE ``alpha = 1 + n / sum_{j>=i} ln(lambda_j/lambda_i)`` at a fixed xmin index ``i``.

    ``evals_sorted`` ascending along the last dim; differentiable in the eigenvalues.
    """
    N = evals_sorted.shape[-1]
    idx = torch.as_tensor(index, device=evals_sorted.device).expand(evals_sorted.shape[:-1])
    logs = torch.log(evals_sorted.clamp_min(torch.finfo(evals_sorted.dtype).tiny))
    j = torch.arange(N, device=evals_sorted.device)
    in_tail = j >= idx.unsqueeze(-1)
    log_xmin = torch.gather(logs, -1, idx.unsqueeze(-1).long())
    total = torch.where(in_tail, logs - log_xmin, torch.zeros_like(logs)).sum(-1)
    n = (N - idx).to(evals_sorted.dtype)
    return 1.0 + n / total


def _candidate_sums(lam: torch.Tensor, min_tail: int):
    """Per-candidate quantities shared by every scan (rows of ``lam`` ascending, ``(B, N)``).

    Returns ``logs = ln lambda``, candidate indices ``i = 0 .. N - min_tail``, tail sizes
    ``n_i = N - i`` and ``S_i = sum_{j>=i} ln(lambda_j / lambda_i)`` (suffix sums).
    """
    N = lam.shape[-1]
    logs = torch.log(lam.clamp_min(torch.finfo(lam.dtype).tiny))
    n_cand = N - min_tail + 1
    i_all = torch.arange(n_cand, device=lam.device)
    n_all = (N - i_all).to(lam.dtype)
    suffix = torch.flip(torch.cumsum(torch.flip(logs, [-1]), -1), [-1])[:, :n_cand]
    return logs, i_all, n_all, suffix - n_all * logs[:, :n_cand]


def _ks_scan(
    lam: torch.Tensor, first: torch.Tensor, min_tail: int, lo: int = 0, hi: int | None = None
) -> tuple[torch.Tensor, ...]:
    """alpha_i and D_i for candidates ``lo <= i < hi`` (default all ``i <= N - min_tail``).

    Rows of ``lam`` are ascending ESDs ``(B, N)``; no gradient. Other candidates get
    ``D = inf``.
    """
    B, N = lam.shape
    dtype = lam.dtype
    logs, i_all, n_all, log_sums = _candidate_sums(lam, min_tail)
    n_cand = len(i_all)
    hi = n_cand if hi is None else hi
    alphas = 1.0 + n_all / log_sums
    D = torch.full((B, n_cand), float("inf"), dtype=dtype, device=lam.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * N))
    for c0 in range(lo, hi, chunk):
        c1 = min(hi, c0 + chunk)
        idx = i_all[c0:c1]
        tail_logs = logs[:, c0:]  # (B, N - c0)
        rel = torch.arange(c0, N, device=lam.device)[None, :] - idx[:, None]  # (c, N - c0)
        a = alphas[:, c0:c1, None]
        log_ratio = tail_logs[:, None, :] - logs[:, c0:c1, None]
        theo = -torch.expm1((1.0 - a) * log_ratio)
        emp = rel.to(dtype) / n_all[c0:c1, None]
        dev = (theo - emp).abs().masked_fill(rel < 0, 0.0)
        D[:, c0:c1] = dev.amax(-1)
    bad_alpha = ~(alphas > 1) | ~torch.isfinite(alphas)
    D = torch.where(bad_alpha, torch.ones_like(D), D)
    D = torch.where(i_all[None, :] < first[:, None], torch.full_like(D, float("inf")), D)
    return alphas, D


def _ks_at(logs: torch.Tensor, alphas: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Exact ``D_i`` of one ascending ESD (``logs``: ``(N,)``) at candidate indices ``idx``."""
    N = logs.shape[0]
    c0 = int(idx.min())
    rel = torch.arange(c0, N, device=logs.device)[None, :] - idx[:, None]
    n = (N - idx).to(logs.dtype)
    a = alphas[idx]
    theo = -torch.expm1((1.0 - a)[:, None] * (logs[None, c0:] - logs[idx][:, None]))
    dev = (theo - rel.to(logs.dtype) / n[:, None]).abs().masked_fill(rel < 0, 0.0)
    D = dev.amax(-1)
    return torch.where((a > 1) & torch.isfinite(a), D, torch.ones_like(D))


def _ks_pruned(
    lam: torch.Tensor, first: torch.Tensor, min_tail: int, grid: int = 96, block: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The KS rule's exact argmin without evaluating every candidate in full.

    ``D_i`` evaluated on a subset of ``grid`` tail points is a lower bound of ``D_i``.
    Candidates are then evaluated exactly in order of increasing bound until the next
    bound exceeds the best exact ``D`` found (ties resolved to the smallest index), so the
    chosen index equals the exhaustive scan's. Returns ``(alphas, D, idx)`` where ``D``
    holds exact values for evaluated candidates and the lower bound for pruned ones.
    """
    B, N = lam.shape
    dtype = lam.dtype
    logs, i_all, n_all, log_sums = _candidate_sums(lam, min_tail)
    n_cand = len(i_all)
    alphas = 1.0 + n_all / log_sums
    stride = max(1, N // grid)
    j_sub = torch.arange(0, N, stride, device=lam.device)
    rel = j_sub[None, :] - i_all[:, None]  # (n_cand, G)
    theo = -torch.expm1((1.0 - alphas)[:, :, None] * (logs[:, None, j_sub] - logs[:, :n_cand,
                                                                                  None]))
    emp = rel.to(dtype) / n_all[:, None]
    lower = (theo - emp).abs().masked_fill(rel < 0, 0.0).amax(-1)
    bad = ~(alphas > 1) | ~torch.isfinite(alphas)
    lower = torch.where(bad, torch.ones_like(lower), lower)
    lower = torch.where(i_all[None, :] < first[:, None], torch.full_like(lower, float("inf")),
                        lower)
    D = lower.clone()
    best_idx = torch.empty(B, dtype=torch.long, device=lam.device)
    for b in range(B):
        best_idx[b] = _pruned_argmin(logs[b], alphas[b], lower[b], D[b], block)
    return alphas, D, best_idx


def _pruned_argmin(logs: torch.Tensor, alphas: torch.Tensor, lower: torch.Tensor,
                   D: torch.Tensor, block: int) -> int:
    """Smallest ``i`` with the least exact ``D_i`` among candidates whose lower bound is
    finite (``inf`` marks candidates below the zero cut: never evaluated, never chosen).

    Candidates are evaluated in blocks, by increasing lower bound, keeping only those with
    ``lower_i <= best`` (the others cannot reach ``best``); ``D`` is filled in place.
    Returns ``-1`` when no candidate is usable.
    """
    order = torch.argsort(lower, stable=True)
    evaluated = torch.zeros_like(lower, dtype=torch.bool)
    best = float("inf")
    for s0 in range(0, order.numel(), block):
        cand = order[s0:s0 + block]
        low = lower[cand]
        cand = cand[torch.isfinite(low) & (low <= best)]
        if cand.numel() == 0:
            break
        exact = _ks_at(logs, alphas, cand)
        D[cand] = exact
        evaluated[cand] = True
        best = min(best, float(exact.min()))
    hits = torch.nonzero(evaluated & (D == best)).flatten()
    return int(hits[0]) if hits.numel() else -1


def _truncated_rate(mean_log: torch.Tensor, t: torch.Tensor, iters: int = 80) -> torch.Tensor:
    """MLE rate ``b = alpha - 1`` of a power law truncated to ``[xmin, xmax]``.

    With ``y = ln(x/xmin)`` on ``[0, t]``, ``t = ln(xmax/xmin)``, the density is a truncated
    exponential ``b e^{-b y} / (1 - e^{-b t})`` and the MLE solves
    ``mean(y) = 1/b - t / (e^{b t} - 1)`` (bisection on ``log b``; ``b -> 0`` where
    ``mean(y) >= t/2``).
    """
    lo = torch.full_like(mean_log, -30.0)
    hi = torch.full_like(mean_log, 30.0)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        b = torch.exp(mid)
        rhs = 1.0 / b - t / torch.expm1(b * t)
        go_up = rhs > mean_log  # rhs decreasing in b
        lo = torch.where(go_up, mid, lo)
        hi = torch.where(go_up, hi, mid)
    return torch.exp(0.5 * (lo + hi))


def _truncated_fit(
    lam: torch.Tensor, first: torch.Tensor, min_tail: int, lo: int = 0, hi: int | None = None
):
    """alpha_i and D_i for the truncated power law on ``[lambda_i, lambda_max]`` (as _ks_scan)."""
    B, N = lam.shape
    dtype = lam.dtype
    logs, i_all, n_all, log_sums = _candidate_sums(lam, min_tail)
    n_cand = len(i_all)
    hi = n_cand if hi is None else hi
    mean_log = log_sums / n_all
    t = logs[:, -1:] - logs[:, :n_cand]
    b = _truncated_rate(mean_log, t)
    alphas = 1.0 + b
    D = torch.full((B, n_cand), float("inf"), dtype=dtype, device=lam.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, B * N))
    for c0 in range(lo, hi, chunk):
        c1 = min(hi, c0 + chunk)
        rel = torch.arange(c0, N, device=lam.device)[None, :] - i_all[c0:c1, None]
        y = logs[:, None, c0:] - logs[:, c0:c1, None]
        bb = b[:, c0:c1, None]
        theo = torch.expm1(-bb * y) / torch.expm1(-bb * t[:, c0:c1, None])
        emp = rel.to(dtype) / n_all[c0:c1, None]
        dev = (theo - emp).abs().masked_fill(rel < 0, 0.0)
        D[:, c0:c1] = dev.amax(-1)
    bad = ~torch.isfinite(D) | ~(t > 0)
    D = torch.where(bad, torch.ones_like(D), D)
    D = torch.where(i_all[None, :] < first[:, None], torch.full_like(D, float("inf")), D)
    return alphas, D


def _truncated_alpha_grad(lam_sorted: torch.Tensor, idx: torch.Tensor, b0: torch.Tensor):
    """One Newton step from the detached root ``b0``: same value, implicit-function gradient."""
    N = lam_sorted.shape[-1]
    logs = torch.log(lam_sorted.clamp_min(torch.finfo(lam_sorted.dtype).tiny))
    j = torch.arange(N, device=lam_sorted.device)
    in_tail = j >= idx.unsqueeze(-1)
    log_xmin = torch.gather(logs, -1, idx.unsqueeze(-1)).squeeze(-1)
    n = (N - idx).to(lam_sorted.dtype)
    mean_log = torch.where(in_tail, logs - log_xmin.unsqueeze(-1), 0.0).sum(-1) / n
    t = logs[..., -1] - log_xmin
    b0 = b0.detach()

    def g(b):
        return 1.0 / b - t / torch.expm1(b * t) - mean_log

    ebt = torch.exp(b0 * t)
    dg = -1.0 / b0**2 + t**2 * ebt / torch.expm1(b0 * t) ** 2
    return 1.0 + b0 - g(b0) / dg


def fit_powerlaw(
    evals: torch.Tensor,
    xmin: str | float = "ks",
    *,
    xmin_quantile: float | None = None,
    xmin_index: int | None = None,
    xmin_range: tuple[float, float] | None = None,
    xmax: float | None = None,
    num_fingers: int = 0,
    min_tail: int = 2,
    rtol: float | None = None,
    exhaustive: bool = False,
    tail_fraction: float | None = None,
    name: str | None = None,
) -> PowerLawFit:
    """Fit a power law ``p(lambda) ~ lambda^(-alpha)`` to the tail of an ESD.

    ``evals``: eigenvalues ``(..., N)`` (any order; batched over leading dims).
    xmin choice, exactly one of: ``xmin="ks"`` (default, scan all candidates, minimise the
    KS distance), ``xmin=<float>`` (tail is ``lambda >= xmin``), ``xmin_quantile=q``
    (``xmin = lambda_(floor(q N))``, 0-based ascending), ``xmin_index=i`` or
    ``xmin_range=(lo, hi)`` (the KS rule over candidates ``lo <= lambda_i < hi`` but the
    largest of them, as ``powerlaw.Fit(xmin=(lo, hi))``; every candidate evaluated exactly).
    Truncated variant: ``xmax=<float>`` drops eigenvalues above ``xmax`` and
    ``num_fingers=k`` drops the ``k`` largest (outlier "fingers"); then the law is the
    power law truncated to ``[xmin, xmax]`` (MLE by bisection, see ``_truncated_rate``).
    ``exhaustive=True`` computes the exact ``D_i`` of every candidate (for plots); the
    default prunes candidates by a lower bound and returns the same xmin (``_ks_pruned``).
    ``xmin="hill"``: Hill at a fixed tail fraction (Xiao et al. 2023), ``k =``
    :func:`hill_tail_size` ``(N, tail_fraction)`` (default ``0.5``), returned by
    :func:`hill_estimator` (its xmin is the ``(k+1)``-th largest, not in the sum).
    """
    hill = isinstance(xmin, str) and xmin == "hill"
    if hill or tail_fraction is not None:
        if not hill or xmin_quantile is not None or xmin_index is not None \
                or xmin_range is not None or xmax is not None or num_fingers:
            raise ValueError("tail_fraction goes with xmin='hill' alone (no xmin_quantile, "
                             "xmin_index, xmax or num_fingers)")
        return _fit_hill(evals, 0.5 if tail_fraction is None else tail_fraction, name)
    rule, value = _xmin_rule(xmin, xmin_quantile, xmin_index, xmin_range)
    if num_fingers < 0:
        raise ValueError(f"num_fingers must be >= 0, got {num_fingers}")
    lam, N = _prepare(evals, min_tail, name)
    where = _where(name)
    truncated = xmax is not None or num_fingers > 0
    batch_shape = lam.shape[:-1]
    lam2 = _drop_top(lam.reshape(-1, N), xmax, num_fingers, min_tail, where)
    with torch.no_grad():
        lam_d = lam2.detach()
        first = _first_usable(lam_d, rtol, min_tail, where)
        scan = _TailScan(lam_d, first, min_tail, truncated, exhaustive, where)
        alphas, D, idx = _XMIN_RULES[rule](scan, value)
        ks = D.gather(-1, idx[:, None]).squeeze(-1)
    alpha = _tail_alpha(lam2, idx, alphas, truncated)
    _warn_if_flat(lam2, idx, alpha, where)
    method = "truncated" if truncated else ("ks" if rule in ("ks", "range") else "fixed")
    return _fit_result(lam2, idx, alpha, ks, D, batch_shape, method)


def _warn_if_flat(lam2: torch.Tensor, idx: torch.Tensor, alpha: torch.Tensor,
                  where: str) -> None:
    """RuntimeWarning when a fit means nothing: ``alpha`` is not a finite number > 1, or
    the tail is flat to rounding, ``ln(lambda_max / xmin) <= sqrt(eps)`` (equal
    eigenvalues, e.g. an orthogonal matrix: alpha is then inf or ~ 1/eps)."""
    a = alpha.detach().reshape(-1)
    lam = lam2.detach()
    span = torch.log(lam[:, -1] / lam.gather(-1, idx[:, None]).squeeze(-1))
    flat = span <= torch.finfo(lam.dtype).eps ** 0.5
    bad = ~(torch.isfinite(a) & (a > 1)) | flat
    if bool(bad.any()):
        warnings.warn(
            f"fit_powerlaw{where}: {int(bad.sum())} of {a.numel()} ESDs have a flat tail "
            f"(equal eigenvalues above xmin, ln(lambda_max/xmin) = {float(span[bad][0]):.3g}): "
            f"alpha = {a[bad][0].item():.6g} is meaningless", RuntimeWarning, stacklevel=3)


def _where(name: str | None) -> str:
    """The `` (layer 'name')`` suffix of error messages (empty without a name)."""
    return f" (layer {name!r})" if name else ""


def _xmin_rule(xmin, xmin_quantile, xmin_index, xmin_range=None) -> tuple[str, object]:
    """The xmin rule asked for, ``(rule, value)``: ``("ks", None)``, ``("value", xmin)``,
    ``("quantile", q)``, ``("index", i)`` or ``("range", (lo, hi))``; at most one."""
    given = [(rule, v) for rule, v, on in (("value", xmin, xmin != "ks"),
                                          ("quantile", xmin_quantile, xmin_quantile is not None),
                                          ("index", xmin_index, xmin_index is not None),
                                          ("range", xmin_range, xmin_range is not None)) if on]
    if len(given) > 1:
        raise ValueError("give at most one of xmin=<value>, xmin_quantile, xmin_index, "
                         "xmin_range")
    if isinstance(xmin, str) and xmin != "ks":
        raise ValueError(f"xmin must be 'ks' or a number (or 'hill'), got {xmin!r}")
    return given[0] if given else ("ks", None)


def _drop_top(lam2: torch.Tensor, xmax: float | None, num_fingers: int, min_tail: int,
              where: str) -> torch.Tensor:
    """The rows ``(B, N)`` (ascending) without their ``num_fingers`` largest values and,
    for one ESD, without the values above ``xmax`` (the truncated fit's range)."""
    N = lam2.shape[-1]
    if num_fingers:
        if N - num_fingers < min_tail:
            raise ValueError(f"num_fingers={num_fingers} leaves fewer than {min_tail} eigenvalues")
        lam2 = lam2[:, : N - num_fingers]
    if xmax is not None:
        if lam2.shape[0] != 1:
            raise ValueError("xmax=<value> is for a single ESD; use num_fingers for batches")
        keep = int((lam2[0] <= xmax).sum())
        if keep < min_tail:
            raise ValueError(f"xmax={xmax} leaves {keep} eigenvalues{where}, need {min_tail}")
        lam2 = lam2[:, :keep]
    return lam2


def _first_usable(lam_d: torch.Tensor, rtol: float | None, min_tail: int,
                  where: str) -> torch.Tensor:
    """Per row, the first index above the zero cut (:func:`_zero_cut`); raises when fewer
    than ``min_tail`` values are above it."""
    first = _zero_cut(lam_d, rtol)
    usable = lam_d.shape[-1] - first
    if bool((usable < min_tail).any()):
        raise ValueError(
            f"too few non-zero eigenvalues for a tail fit{where}: {int(usable.min())} "
            f"above the zero cut, need at least {min_tail} (is the matrix all zeros or "
            "rank-deficient?)"
        )
    return first


@dataclass
class _TailScan:
    """What every xmin rule needs: detached ascending rows ``lam`` ``(B, N)``, the first
    usable index per row, ``min_tail``, the law (plain or truncated), whether a KS choice
    evaluates every candidate exactly, and the message suffix naming the layer."""

    lam: torch.Tensor
    first: torch.Tensor
    min_tail: int
    truncated: bool
    exhaustive: bool
    where: str

    def scan(self, lo: int = 0, hi: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_i`` and ``D_i`` of candidates ``lo <= i < hi`` under the law."""
        fit = _truncated_fit if self.truncated else _ks_scan
        return fit(self.lam, self.first, self.min_tail, lo=lo, hi=hi)


def _xmin_by_ks(s: _TailScan, _value=None):
    """``argmin_i D_i`` (first on ties): pruned by a lower bound for the plain law, an
    exact scan of every candidate when truncated or ``exhaustive``."""
    if not s.truncated and not s.exhaustive:
        alphas, D, idx = _ks_pruned(s.lam, s.first, s.min_tail)
        if bool((idx < 0).any()):
            raise ValueError(f"no valid xmin candidate{s.where}")
        return alphas, D, idx
    alphas, D = s.scan()
    idx = torch.argmin(D, dim=-1)
    if bool(torch.isinf(D.gather(-1, idx[:, None])).any()):
        raise ValueError(f"no valid xmin candidate{s.where}")
    return alphas, D, idx


def _xmin_at_index(s: _TailScan, i: int):
    """The fit at the fixed xmin index ``i`` (the same for every row)."""
    N2, min_tail, where = s.lam.shape[-1], s.min_tail, s.where
    if not 0 <= i <= N2 - min_tail:
        raise ValueError(
            f"xmin choice gives tail index {i}{where}: need 0 <= index <= "
            f"{N2 - min_tail} so that at least {min_tail} eigenvalues are in the tail"
        )
    idx = torch.full((s.lam.shape[0],), i, dtype=torch.long, device=s.lam.device)
    alphas, D = s.scan(lo=i, hi=i + 1)
    if bool((idx < s.first).any()):
        raise ValueError(f"xmin index {i}{where} falls on a zero eigenvalue")
    return alphas, D, idx


def _xmin_by_index(s: _TailScan, index):
    """``xmin_index=i``: the tail starts at ``lambda_i`` (0-based ascending)."""
    return _xmin_at_index(s, int(index))


def _xmin_by_quantile(s: _TailScan, q):
    """``xmin_quantile=q``: index ``floor(q N)``."""
    if not 0.0 <= float(q) < 1.0:
        raise ValueError(f"xmin_quantile must be in [0, 1), got {q}")
    return _xmin_at_index(s, int(float(q) * s.lam.shape[-1]))


def _xmin_by_value(s: _TailScan, xmin):
    """``xmin=<value>``: the first index with ``lambda_i >= xmin`` (one ESD only)."""
    if not float(xmin) > 0:
        raise ValueError(f"xmin must be > 0, got {xmin}")
    lam = s.lam
    if lam.shape[0] != 1:
        raise ValueError("xmin=<value> is for a single ESD")
    i = int(torch.searchsorted(lam[0].contiguous(), torch.tensor(
        [float(xmin)], dtype=lam.dtype, device=lam.device))[0])
    return _xmin_at_index(s, i)


def _xmin_by_range(s: _TailScan, bounds):
    """``xmin_range=(lo, hi)``: ``argmin D_i`` over candidates with ``lo <= lambda_i < hi``,
    leaving out the largest of them (``powerlaw.Fit``'s rule for an xmin range)."""
    lo, hi = min(map(float, bounds)), max(map(float, bounds))
    alphas, D = s.scan()
    lam = s.lam[:, : D.shape[-1]]
    inside = (lam >= lo) & (lam < hi)
    pos = torch.arange(D.shape[-1], device=D.device).expand_as(D)
    last = torch.where(inside, pos, -1).amax(-1, keepdim=True)
    inside = inside & (pos != last)
    D = torch.where(inside, D, torch.full_like(D, float("inf")))
    idx = torch.argmin(D, dim=-1)
    if bool(torch.isinf(D.gather(-1, idx[:, None])).any()):
        raise ValueError(f"no xmin candidate in [{lo:.6g}, {hi:.6g}){s.where}")
    return alphas, D, idx


#: xmin rule -> ``(scan, value) -> (alphas, D, idx)``
_XMIN_RULES = {
    "ks": _xmin_by_ks,
    "index": _xmin_by_index,
    "quantile": _xmin_by_quantile,
    "value": _xmin_by_value,
    "range": _xmin_by_range,
}


def _tail_alpha(lam2: torch.Tensor, idx: torch.Tensor, alphas: torch.Tensor,
                truncated: bool) -> torch.Tensor:
    """Differentiable ``alpha`` at the chosen (detached) xmin index: the MLE recomputed
    from the eigenvalues (:func:`alpha_at_index`), or for the truncated law one Newton step
    from the bisection root (:func:`_truncated_alpha_grad`)."""
    if truncated:
        b0 = alphas.gather(-1, idx[:, None]).squeeze(-1) - 1.0
        return _truncated_alpha_grad(lam2, idx, b0)
    return alpha_at_index(lam2, idx)


def _fit_result(lam2: torch.Tensor, idx: torch.Tensor, alpha: torch.Tensor, ks: torch.Tensor,
                D: torch.Tensor, batch_shape: torch.Size, method: str) -> PowerLawFit:
    """Assemble the :class:`PowerLawFit` in the input's batch shape; ``n = N - i`` tail
    values, ``sigma = (alpha - 1) / sqrt(n)``."""
    n_tail = lam2.shape[-1] - idx
    xmin_val = lam2.gather(-1, idx[:, None]).squeeze(-1)
    sigma = (alpha - 1.0) / n_tail.to(alpha.dtype).sqrt()
    return PowerLawFit(
        alpha=alpha.reshape(batch_shape),
        xmin=xmin_val.reshape(batch_shape),
        xmin_index=idx.reshape(batch_shape),
        num_tail=n_tail.reshape(batch_shape),
        ks_distance=ks.reshape(batch_shape),
        sigma=sigma.reshape(batch_shape),
        xmax=lam2[:, -1].reshape(batch_shape),
        method=method,
        ks_distances=D.reshape(*batch_shape, -1),
    )


def _fit_hill(evals: torch.Tensor, tail_fraction: float, name: str | None) -> PowerLawFit:
    """``fit_powerlaw(xmin="hill")``: :func:`hill_estimator` at ``k = hill_tail_size``."""
    n = evals.shape[-1] if isinstance(evals, torch.Tensor) and evals.dim() else 0
    k = hill_tail_size(max(n, 2), tail_fraction)  # n < 2: hill_estimator names the shape
    return hill_estimator(evals, k, name=name)


def hill_tail_size(num_evals: int, tail_fraction: float) -> int:
    """Hill's ``k`` for a tail fraction ``f`` of ``N`` eigenvalues: ``k = floor(f N)``
    clipped to ``[1, N - 1]`` (``f = 0.5``: ``k = floor(N/2)``, xmin = the ``(k+1)``-th
    largest, the lower median for even ``N``; Xiao et al.'s ``k = n/2``)."""
    f = float(tail_fraction)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    if num_evals < 2:
        raise ValueError(f"a Hill fit needs >= 2 eigenvalues, got {num_evals}")
    return min(max(int(f * num_evals), 1), num_evals - 1)


def hill_estimator(evals: torch.Tensor, k: int, name: str | None = None) -> PowerLawFit:
    """Hill estimator at fixed ``k`` (the ``k`` largest eigenvalues).

    ``alpha = 1 + k / sum_{i=1..k} ln(lambda_(N-i+1) / lambda_(N-k))`` with the threshold
    ``xmin = lambda_(N-k)`` the (k+1)-th largest (1-based order statistics).
    """
    lam, N = _prepare(evals, 2, name)
    if not 1 <= k <= N - 1:
        raise ValueError(f"Hill k must be in [1, {N - 1}] for {N} eigenvalues{_where(name)}, "
                         f"got {k}")
    logs = torch.log(lam.clamp_min(torch.finfo(lam.dtype).tiny))
    thr = logs[..., N - k - 1]
    if bool((lam[..., N - k - 1] <= 0).any()):
        raise ValueError(f"Hill threshold eigenvalue{_where(name)} is zero; choose k < "
                         "number of non-zeros")
    total = (logs[..., N - k:] - thr.unsqueeze(-1)).sum(-1)
    alpha = 1.0 + k / total
    num = torch.full(alpha.shape, k, dtype=torch.long, device=lam.device)
    return PowerLawFit(
        alpha=alpha,
        xmin=lam[..., N - k - 1],
        xmin_index=torch.full_like(num, N - k - 1),
        num_tail=num,
        ks_distance=torch.full_like(alpha, float("nan")).detach(),
        sigma=(alpha - 1.0) / k**0.5,
        xmax=lam[..., -1],
        method="hill",
    )
