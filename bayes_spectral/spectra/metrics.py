"""Layer 1: the WeightWatcher-style metric set of one weight (or one ESD).

    alpha              power-law exponent of the ESD tail (KS-chosen xmin, powerlaw.py)
    alpha_weighted     alpha * log10(lambda_max)
    log_norm           log10 sum_i lambda_i                (= log10 ||W||_F^2)
    log_spectral_norm  log10 lambda_max                    (= log10 ||W||_2^2)
    log_alpha_norm     log10 sum_i lambda_i^alpha          (computed with logsumexp)
    stable_rank        sum_i lambda_i / lambda_max
    effective_rank     exp(entropy(sigma / sum sigma))
    numerical_rank     #{sigma_i > max(m, n) * eps * sigma_max}
    schatten_<p>       (sum_i sigma_i^p)^(1/p)  (p = 1 is the nuclear norm)
"""

from __future__ import annotations

import math

import torch

from .powerlaw import fit_powerlaw
from .spectrum import (
    ConvMode,
    SpectrumMethod,
    effective_rank,
    esd,
    numerical_rank,
    schatten_norm,
    stable_rank,
)

__all__ = ["spectral_metrics", "metrics_from_esd", "METRIC_NAMES"]

METRIC_NAMES = (
    "alpha",
    "alpha_weighted",
    "log_norm",
    "log_spectral_norm",
    "log_alpha_norm",
    "stable_rank",
    "effective_rank",
    "numerical_rank",
    "lambda_max",
    "xmin",
    "num_tail",
    "ks_distance",
    "sigma",
    "num_evals",
)

_LN10 = math.log(10.0)


def metrics_from_esd(
    evals: torch.Tensor,
    schatten: tuple[float, ...] = (1.0,),
    max_dim: int | None = None,
    name: str | None = None,
    rank_rtol: float | None = None,
    **fit_kwargs,
) -> dict[str, torch.Tensor]:
    """All metrics of an ascending ESD ``evals`` (``(..., N)``); see the module docstring.

    ``rank_rtol``: relative tolerance on ``sigma`` for ``numerical_rank`` (default
    ``max_dim * eps``).
    """
    fit = fit_powerlaw(evals, name=name, **fit_kwargs)
    lam_max = evals.amax(-1)
    alpha = fit.alpha
    log_lam = torch.log(evals.clamp_min(torch.finfo(evals.dtype).tiny))
    positive = evals > 0
    powered = torch.where(positive, alpha.unsqueeze(-1) * log_lam, float("-inf"))
    out = {
        "alpha": alpha,
        "alpha_weighted": alpha * torch.log10(lam_max),
        "log_norm": torch.log10(evals.sum(-1)),
        "log_spectral_norm": torch.log10(lam_max),
        "log_alpha_norm": torch.logsumexp(powered, -1) / _LN10,
        "stable_rank": stable_rank(evals),
        "effective_rank": effective_rank(evals),
        "numerical_rank": numerical_rank(evals, rtol=rank_rtol, max_dim=max_dim),
        "lambda_max": lam_max,
        "xmin": fit.xmin,
        "num_tail": fit.num_tail,
        "ks_distance": fit.ks_distance,
        "sigma": fit.sigma,
        "num_evals": torch.full_like(fit.num_tail, evals.shape[-1]),
    }
    for p in schatten:
        key = "schatten_inf" if math.isinf(p) else f"schatten_{p:g}"
        out[key] = schatten_norm(evals, p)
    return out


def spectral_metrics(
    weight: torch.Tensor,
    conv: ConvMode = "pool",
    schatten: tuple[float, ...] = (1.0,),
    name: str | None = None,
    method: SpectrumMethod = "svd",
    **fit_kwargs,
) -> dict[str, torch.Tensor]:
    """Metrics of one weight (2-D matrix or conv kernel); ESD by :func:`bayes_spectral.esd`.

    Extra keyword arguments go to :func:`bayes_spectral.fit_powerlaw` (``xmin``, ...).
    All values are differentiable where the formula is (alpha via the fixed-index MLE).
    With ``method="gram"`` the numerical rank uses the Gram precision:
    ``sigma > sqrt(max_dim * eps) * sigma_max``.
    """
    evals = esd(weight, conv=conv, name=name, method=method)
    return metrics_from_esd(evals, schatten=schatten, name=name,
                            **rank_settings(weight.shape, conv, method, evals.dtype),
                            **fit_kwargs)


def rank_settings(shape: tuple[int, ...], conv: ConvMode, method: SpectrumMethod,
                  dtype: torch.dtype) -> dict:
    """``max_dim`` and ``rank_rtol`` of :func:`metrics_from_esd` for a weight of ``shape``:
    ``max_dim = max(out, prod(in, *k))`` (``conv="flatten"``) or ``max(out, in)``;
    ``rank_rtol = sqrt(max_dim * eps)`` for ``method="gram"`` (the Gram precision), else
    ``None`` (the default cut)."""
    max_dim = max(shape[0], math.prod(shape[1:])) if conv == "flatten" else max(shape[:2])
    rank_rtol = math.sqrt(max_dim * torch.finfo(dtype).eps) if method == "gram" else None
    return {"max_dim": max_dim, "rank_rtol": rank_rtol}
