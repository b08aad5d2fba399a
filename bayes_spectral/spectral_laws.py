"""Layer 1: log-densities of the laws put on spectra, as pure tensor formulas.

One implementation of each formula, shared by the Pyro distributions (layer 2, their
*penalty* measure) and by the deterministic penalties (layer 3), so that MAP with a prior
and training with the matching penalty are the same computation.

Laws on one eigenvalue ``lambda = sigma^2 >= 0`` (parameters broadcast):

* Frechet (scipy ``invweibull(c=a, loc=m, scale=s)``), ``z = (x - m)/s > 0``::

      log f(x) = log a - log s - (1 + a) log z - z^(-a)

* Spliced power law (``PowerLawSpectrum``'s per-eigenvalue law): an exponential bulk
  ``exp(-lambda/tau)`` below ``xmin`` joined continuously to a power-law tail
  ``exp(-xmin/tau) (lambda/xmin)^(-alpha)`` above it, normalised by
  ``Z = tau (1 - e^{-xmin/tau}) + e^{-xmin/tau} xmin / (alpha - 1)``::

      log f(lambda) = -log Z - lambda/tau                               (lambda <  xmin)
      log f(lambda) = -log Z - xmin/tau - alpha log(lambda/xmin)         (lambda >= xmin)

  Because the bulk is linear in ``lambda``, the sum over a whole spectrum needs only the
  tail eigenvalues and ``sum_i lambda_i = ||W||_F^2`` (what tail tracking provides).

* Exponential on ``lambda`` with mean ``tau``: ``log f = -log tau - lambda/tau``; the
  spectral image of an isotropic Gaussian on ``W`` (``tau = 2 s^2`` up to the Jacobian).
"""

from __future__ import annotations

import torch

__all__ = [
    "frechet_log_pdf",
    "spliced_powerlaw_log_norm",
    "spliced_powerlaw_log_pdf",
    "spliced_powerlaw_spectrum_sum",
    "exponential_log_pdf",
]


def frechet_log_pdf(
    x: torch.Tensor,
    concentration: torch.Tensor | float,
    scale: torch.Tensor | float,
    loc: torch.Tensor | float = 0.0,
) -> torch.Tensor:
    """``log a - log s - (1+a) log z - z^(-a)``, ``z = (x-loc)/scale``; ``-inf`` for ``z <= 0``."""
    a = torch.as_tensor(concentration, dtype=x.dtype, device=x.device)
    s = torch.as_tensor(scale, dtype=x.dtype, device=x.device)
    z = (x - loc) / s
    zpos = z.clamp_min(torch.finfo(x.dtype).tiny)
    logz = torch.log(zpos)
    out = torch.log(a) - torch.log(s) - (1 + a) * logz - torch.exp(-a * logz)
    return torch.where(z > 0, out, torch.full_like(out, float("-inf")))


def exponential_log_pdf(lam: torch.Tensor, tau: torch.Tensor | float) -> torch.Tensor:
    """``-log tau - lambda/tau`` (``lambda >= 0``)."""
    tau = torch.as_tensor(tau, dtype=lam.dtype, device=lam.device)
    return -torch.log(tau) - lam / tau


def spliced_powerlaw_log_norm(
    alpha: torch.Tensor, xmin: torch.Tensor, tau: torch.Tensor
) -> torch.Tensor:
    """``log Z``, ``Z = tau (1 - e^{-xmin/tau}) + e^{-xmin/tau} xmin/(alpha-1)``."""
    r = xmin / tau
    bulk = tau * (-torch.expm1(-r))
    tail = torch.exp(-r) * xmin / (alpha - 1)
    return torch.log(bulk + tail)


def spliced_powerlaw_log_pdf(
    lam: torch.Tensor,
    alpha: torch.Tensor | float,
    xmin: torch.Tensor | float,
    tau: torch.Tensor | float,
) -> torch.Tensor:
    """Per-eigenvalue log-density of the spliced exponential-bulk / power-law-tail law."""
    alpha = torch.as_tensor(alpha, dtype=lam.dtype, device=lam.device)
    xmin = torch.as_tensor(xmin, dtype=lam.dtype, device=lam.device)
    tau = torch.as_tensor(tau, dtype=lam.dtype, device=lam.device)
    log_z = spliced_powerlaw_log_norm(alpha, xmin, tau)
    bulk = -lam / tau
    ratio = (lam / xmin).clamp_min(torch.finfo(lam.dtype).tiny)
    tail = -xmin / tau - alpha * torch.log(ratio)
    return torch.where(lam < xmin, bulk, tail) - log_z


def spliced_powerlaw_spectrum_sum(
    tail_evals: torch.Tensor,
    total: torch.Tensor,
    num_evals: int,
    alpha: torch.Tensor | float,
    xmin: torch.Tensor | float,
    tau: torch.Tensor | float,
) -> torch.Tensor:
    """``sum_i log f(lambda_i)`` over a whole spectrum from its top eigenvalues only.

    ``tail_evals`` (``(..., k)``) must contain every eigenvalue ``>= xmin`` (extra smaller
    ones are fine); ``total = sum_i lambda_i`` over all ``num_evals`` eigenvalues. Exact
    because the bulk log-density is linear: the bulk sum is ``-(total - sum_tail)/tau``.
    """
    alpha = torch.as_tensor(alpha, dtype=tail_evals.dtype, device=tail_evals.device)
    xmin = torch.as_tensor(xmin, dtype=tail_evals.dtype, device=tail_evals.device)
    tau = torch.as_tensor(tau, dtype=tail_evals.dtype, device=tail_evals.device)
    in_tail = tail_evals >= xmin
    ratio = (tail_evals / xmin).clamp_min(torch.finfo(tail_evals.dtype).tiny)
    tail_terms = torch.where(in_tail, -xmin / tau - alpha * torch.log(ratio), 0.0).sum(-1)
    tail_mass = torch.where(in_tail, tail_evals, 0.0).sum(-1)
    bulk_terms = -(total - tail_mass) / tau
    return tail_terms + bulk_terms - num_evals * spliced_powerlaw_log_norm(alpha, xmin, tau)
