"""Frechet law on the top eigenvalue, exponential base law on the rest of the spectrum."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from ..spectra.laws import exponential_log_pdf, frechet_log_pdf
from ._spectral import SpectralDistribution
from .frechet import Frechet

__all__ = ["FrechetTopEigenvalue"]


class FrechetTopEigenvalue(SpectralDistribution):
    """Frechet prior on the **top eigenvalue** ``lambda_max = sigma_max(W)^2`` (not on
    ``sigma_max``), scipy's ``invweibull(c=concentration, loc=loc, scale=scale)``; the other
    eigenvalues follow an exponential base law of mean ``tau``.

    * ``measure="penalty"`` (**default**): ``frechet_log_pdf(lambda_max) + sum_{i>1}
      exponential_log_pdf(lambda_i; tau)`` over the (pooled) ESD, which depends only on
      ``lambda_max`` and ``||W||_F^2``.
    * ``measure="generative"``: a proper joint law. ``lambda_1 ~ Frechet``; given it, the other
      ``r - 1`` eigenvalues are i.i.d. exponential(mean ``tau``) **truncated to**
      ``[0, lambda_1]``, so ``lambda_1`` is the largest and its marginal is exactly Frechet::

          log p(lambda) = log Frechet(lambda_1) + log (r-1)!
                          + sum_{i>1} [log Exp(lambda_i) - log(1 - exp(-lambda_1/tau))]

      then ``+ sum_i log(2 sigma_i) - log J(sigma) - log vol(m, n)`` (density of ``W``).
    """

    arg_constraints = {
        "concentration": constraints.positive,
        "scale": constraints.positive,
        "tau": constraints.positive,
        "loc": constraints.nonnegative,
    }
    _param_names = ("concentration", "scale", "tau", "loc")

    def __init__(
        self,
        concentration,
        scale,
        tau,
        event_shape,
        loc=0.0,
        measure="penalty",
        validate_args=None,
        *,
        conv="pool",
    ):
        params = {"concentration": concentration, "scale": scale, "tau": tau, "loc": loc}
        super().__init__(params, event_shape, measure, conv, validate_args)

    @property
    def top_eigenvalue_law(self) -> Frechet:
        """The Frechet law of ``lambda_max`` (batch shape of this prior)."""
        return Frechet(self.concentration, self.scale, self.loc, validate_args=False)

    def _frechet(self, lam_max):
        a, s, m = (self._param(k, lam_max).squeeze(-1) for k in ("concentration", "scale", "loc"))
        return frechet_log_pdf(lam_max, a, s, m)

    def _penalty_from_sv(self, sv):
        lam = sv.square()
        tau = self._param("tau", lam)
        return self._frechet(lam[..., 0]) + exponential_log_pdf(lam[..., 1:], tau).sum(-1)

    def _sv_log_density(self, sv):
        lam = sv.square()
        tau = self._param("tau", lam)
        lam1 = lam[..., :1]
        log_trunc = torch.log(-torch.expm1(-lam1 / tau))
        rest = (exponential_log_pdf(lam[..., 1:], tau) - log_trunc).sum(-1)
        change = (math.log(2.0) + torch.log(sv)).sum(-1)
        return self._frechet(lam[..., 0]) + self._log_factorial(self._rank - 1) + rest + change

    _sv_power = 1  # lambda = sigma^2: p(sigma) carries 2 sigma per value

    def _law_vanishes(self, sv):
        """The Frechet density is 0 (faster than any power) at ``lambda_max <= loc``."""
        return sv[..., 0].square() <= self.loc.to(sv.dtype)

    def _sample_sv(self, shape):
        """``lambda_1`` by inverse CDF and the rest truncated-exponential, computed in
        float64 from uniforms drawn in the parameters' dtype, then cast back (a heavy
        Frechet tail overflows ``lambda`` in float32 long before ``sigma``)."""
        f64 = torch.float64
        fi = torch.finfo(self._dtype)
        u1 = torch.rand(shape, dtype=self._dtype, device=self._device)
        u1 = u1.clamp(fi.tiny, 1.0 - fi.eps).to(f64)
        a, s, m, tau = (getattr(self, k).to(f64) for k in ("concentration", "scale", "loc",
                                                           "tau"))
        lam1 = (m + s * (-torch.log(u1)).pow(-1.0 / a)).unsqueeze(-1)
        u = torch.rand(*shape, self._rank - 1, dtype=self._dtype, device=self._device).to(f64)
        tau = tau.unsqueeze(-1)
        rest = -tau * torch.log1p(u * torch.expm1(-lam1 / tau))
        lam = torch.cat([lam1, self._sort_desc(rest)], dim=-1)
        return lam.sqrt().to(self._dtype)
