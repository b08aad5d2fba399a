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

Laws on one singular value ``sigma >= 0``: half-normal and the spike-and-slab mixture of
two half-normals. The SVD change of variables (Jacobian ``J(sigma)`` and the Haar volume
constant) lives here too, so every spectral prior uses the same formula.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "frechet_log_pdf",
    "spliced_powerlaw_log_norm",
    "spliced_powerlaw_log_pdf",
    "spliced_powerlaw_spectrum_sum",
    "exponential_log_pdf",
    "half_normal_log_pdf",
    "spike_slab_log_pdf",
    "log_sv_jacobian",
    "log_haar_volume",
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


# --- laws on one singular value and the SVD change of variables ---------------------------


def half_normal_log_pdf(sigma: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Half-normal on ``sigma >= 0``: ``log(2) - log(s sqrt(2 pi)) - sigma^2 / (2 s^2)``."""
    s = torch.as_tensor(scale, dtype=sigma.dtype, device=sigma.device)
    return 0.5 * math.log(2.0 / math.pi) - torch.log(s) - 0.5 * (sigma / s).square()


def spike_slab_log_pdf(
    sigma: torch.Tensor,
    pi: torch.Tensor | float,
    spike_scale: torch.Tensor | float,
    slab_scale: torch.Tensor | float,
) -> torch.Tensor:
    """``log(pi HN(sigma; slab) + (1 - pi) HN(sigma; spike))`` (half-normal components)."""
    p = torch.as_tensor(pi, dtype=sigma.dtype, device=sigma.device)
    slab = torch.log(p) + half_normal_log_pdf(sigma, slab_scale)
    spike = torch.log1p(-p) + half_normal_log_pdf(sigma, spike_scale)
    return torch.logaddexp(slab, spike)


def log_sv_jacobian(sigma: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """``log J(sigma) = sum_{i<j} log|sigma_i^2 - sigma_j^2| + |m - n| sum_i log sigma_i``.

    ``sigma``: the ``r = min(m, n)`` singular values of an ``m x n`` matrix on the last dim
    (any order). ``dW = vol(m, n) J(sigma) d sigma dH`` with ``sigma`` ordered and ``dH`` the
    normalised Haar measure on the singular vectors (see :func:`log_haar_volume`).
    ``-inf`` where two singular values coincide (or one is zero when ``m != n``).
    """
    r = sigma.shape[-1]
    sq = sigma.square()
    i, j = torch.triu_indices(r, r, offset=1, device=sigma.device)
    pair = torch.log(torch.abs(sq[..., i] - sq[..., j])).sum(-1)
    return pair + abs(m - n) * torch.log(sigma).sum(-1)


def log_haar_volume(m: int, n: int) -> float:
    """``log vol(m, n)``: the constant with ``dW = vol J(sigma) d sigma dH`` (ordered sigma).

    With ``p = max(m, n)``, ``q = min(m, n)`` and ``Gamma_q`` the multivariate gamma function::

        vol = 2^q pi^{(q^2 + p q)/2} / (Gamma_q(p/2) Gamma_q(q/2))

    (from the real Wishart eigenvalue density, Muirhead 1982, Thm 3.2.18). For ``q = 1``
    this is the area ``2 pi^{p/2} / Gamma(p/2)`` of the unit sphere in ``R^p``.
    """
    p, q = max(m, n), min(m, n)

    def mvlgamma(a: float, d: int) -> float:
        return d * (d - 1) / 4 * math.log(math.pi) + sum(
            math.lgamma(a - k / 2) for k in range(d)
        )

    return (
        q * math.log(2.0)
        + (q * q + p * q) / 2 * math.log(math.pi)
        - mvlgamma(p / 2, q)
        - mvlgamma(q / 2, q)
    )
