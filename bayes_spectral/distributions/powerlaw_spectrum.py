"""Spliced exponential-bulk / power-law-tail law on the eigenvalues ``lambda = sigma^2``."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from ..spectra.laws import spliced_powerlaw_log_norm, spliced_powerlaw_log_pdf
from ._spectral import SpectralDistribution

__all__ = ["PowerLawSpectrum"]


class PowerLawSpectrum(SpectralDistribution):
    """Eigenvalues ``lambda_i = sigma_i(W)^2`` i.i.d. from the spliced law of
    :func:`bayes_spectral.spectra.laws.spliced_powerlaw_log_pdf`: an exponential bulk of
    mean ``tau`` below ``xmin`` joined continuously to a power-law tail
    ``p(lambda) ~ lambda^(-alpha)`` above it (``alpha > 1``).

    :param alpha: tail exponent (> 1); may be a tensor, e.g. a latent sampled elsewhere.
    :param tau: mean of the exponential bulk (> 0).
    :param event_shape: the weight shape ``(out, in)`` or ``(out, in, *k)``.
    :param xmin: start of the tail (> 0). Defaults to ``tau`` when neither ``xmin`` nor
        ``xmin_quantile`` is given.
    :param xmin_quantile: instead of ``xmin``, take ``xmin = lambda_(floor(q N))`` (0-based,
        ascending) of the current spectrum. The index is chosen without gradient; gradients
        flow through the eigenvalue at that index, as in ``fit_powerlaw``. Penalty measure
        only (a data-dependent ``xmin`` defines no normalised density); ``sample()`` then
        draws with ``xmin = tau`` (useful as an initialisation, not as the prior).
        Caution: the normaliser ``Z -> 0`` as ``xmin -> 0``, so with a quantile xmin the
        penalty rewards collapsing the eigenvalues below the quantile (rank collapse).
    :param measure: ``"penalty"`` (**default**) ``sum_i log f(lambda_i)`` over the (pooled)
        ESD, or ``"generative"``: the normalised density of ``W``,
        ``log r! + sum_i [log f(sigma_i^2) + log(2 sigma_i)] - log J(sigma) - log vol(m, n)``.
    :param conv: ``"pool"`` (default) or ``"flatten"`` spectrum of a conv kernel (penalty).
    """

    _param_names = ("alpha", "tau", "xmin")

    def __init__(
        self,
        alpha,
        tau,
        event_shape,
        xmin=None,
        xmin_quantile=None,
        measure="penalty",
        validate_args=None,
        *,
        conv="pool",
    ):
        if xmin is not None and xmin_quantile is not None:
            raise ValueError("PowerLawSpectrum: give xmin or xmin_quantile, not both")
        if xmin_quantile is not None:
            q = float(xmin_quantile)
            if not 0.0 <= q < 1.0:
                raise ValueError(f"PowerLawSpectrum: xmin_quantile must be in [0, 1), got {q}")
            if measure == "generative":
                raise ValueError(
                    "PowerLawSpectrum: measure='generative' needs a fixed xmin value; "
                    "xmin_quantile makes xmin depend on W (penalty measure only)"
                )
        self.xmin_quantile = None if xmin_quantile is None else float(xmin_quantile)
        if xmin is None:
            xmin = tau
        super().__init__(
            {"alpha": alpha, "tau": tau, "xmin": xmin}, event_shape, measure, conv, validate_args
        )

    arg_constraints = {
        "alpha": constraints.greater_than(1.0),
        "tau": constraints.positive,
        "xmin": constraints.positive,
    }

    def _xmin_for(self, lam_desc: torch.Tensor) -> torch.Tensor:
        if self.xmin_quantile is None:
            return self._param("xmin", lam_desc)
        N = lam_desc.shape[-1]
        i = int(self.xmin_quantile * N)  # ascending index, chosen without gradient
        return lam_desc[..., N - 1 - i].unsqueeze(-1)

    def _penalty_from_sv(self, sv):
        lam = sv.square()
        alpha, tau = self._param("alpha", lam), self._param("tau", lam)
        return spliced_powerlaw_log_pdf(lam, alpha, self._xmin_for(lam), tau).sum(-1)

    def _sv_log_density(self, sv):
        lam = sv.square()
        alpha, tau = self._param("alpha", lam), self._param("tau", lam)
        per = spliced_powerlaw_log_pdf(lam, alpha, self._param("xmin", lam), tau)
        per = per + math.log(2.0) + torch.log(sv)
        return self._log_factorial(self._rank) + per.sum(-1)

    def sample_eigenvalues(self, sample_shape=(), num: int | None = None,
                           dtype: torch.dtype | None = None):
        """``num`` (default ``r``) i.i.d. eigenvalues from the spliced law (inverse CDF),
        computed in ``dtype`` (default the parameters')."""
        num = self._rank if num is None else num
        dtype = self._dtype if dtype is None else dtype
        shape = torch.Size(sample_shape) + self.batch_shape
        alpha, tau, xmin = (getattr(self, k).unsqueeze(-1).to(dtype)
                            for k in ("alpha", "tau", "xmin"))
        # u in the parameters' dtype (the same random stream whatever ``dtype``)
        u = torch.rand(*shape, num, dtype=self._dtype, device=self._device)
        u = u.clamp(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps).to(dtype)
        bulk_mass = -torch.expm1(-xmin / tau)  # P(lambda < xmin) * Z / tau
        p_bulk = torch.exp(torch.log(tau * bulk_mass) - spliced_powerlaw_log_norm(alpha, xmin, tau))
        ub = (u / p_bulk).clamp(max=1.0)
        bulk = -tau * torch.log1p(-ub * bulk_mass)
        ut = ((u - p_bulk) / (1 - p_bulk)).clamp(0.0, 1 - torch.finfo(u.dtype).eps)
        tail = xmin * torch.exp(-torch.log1p(-ut) / (alpha - 1))
        return torch.where(u < p_bulk, bulk, tail)

    _sv_power = 1  # lambda = sigma^2: p(sigma) carries 2 sigma per value

    def _sample_sv(self, shape):
        """Ordered ``sigma = sqrt(lambda)``: eigenvalues drawn in float64 (``lambda`` of a
        heavy tail overflows float32 long before ``sigma`` does), then cast back."""
        lam = self.sample_eigenvalues(shape[: len(shape) - len(self.batch_shape)],
                                      dtype=torch.float64)
        return self._sort_desc(lam).sqrt().to(self._dtype)
