"""Isotropic Gaussian prior ``N(0, scale^2)`` on ``W`` written in the spectral framework."""

from __future__ import annotations

import math

import torch
from torch.distributions import constraints

from ..spectra.laws import half_normal_log_pdf, log_haar_volume, log_sv_jacobian
from ._spectral import SpectralDistribution

__all__ = ["GaussianSpectrum"]


class GaussianSpectrum(SpectralDistribution):
    """``W_ij ~ N(0, s^2)`` i.i.d., seen through its singular values (the framework's anchor).

    * ``measure="generative"`` (**default** here, unlike the other spectral priors): the
      density of ``W``, ``-sum_i sigma_i^2 / (2 s^2) - (m n / 2) log(2 pi s^2)``, which is
      finite everywhere (also at repeated singular values). In the framework's terms
      the ordered singular values follow the real Laguerre (Wishart) ensemble, with ``q = r``,
      ``p = max(m, n)``, ``lambda = sigma^2`` (Muirhead 1982, Thm 3.2.18)::

          log p(sigma) = log vol(m, n) - (m n / 2) log(2 pi s^2)
                         - sum_i sigma_i^2 / (2 s^2) + log J(sigma)

      written in :meth:`singular_value_log_prob` from the Wishart eigenvalue density, so that
      ``singular_value_log_prob(sigma) - log J - log vol`` reproduces the Gaussian density:
      the test that the Jacobian and the Haar constant are right.
    * ``measure="penalty"``: ``sum_i log HN(sigma_i; s)`` (half-normal), i.e.
      ``-||W||_F^2 / (2 s^2)`` plus a constant: weight decay.

    ``sample()`` draws the singular values of a Gaussian matrix and Haar singular vectors.
    """

    arg_constraints = {"scale": constraints.positive}
    _param_names = ("scale",)

    def __init__(
        self, scale, event_shape, measure="generative", validate_args=None, *, conv="pool"
    ):
        super().__init__({"scale": scale}, event_shape, measure, conv, validate_args)

    def singular_value_log_prob(self, sv: torch.Tensor) -> torch.Tensor:
        """Log density of the ordered singular values (Wishart eigenvalues, ``lambda -> sigma``).

        Eigenvalues of ``W^T W / s^2`` (``q = min(m, n)``, ``p = max(m, n)`` dof)::

            log p(lambda) = (q^2/2) log pi - (p q/2) log 2 - log Gamma_q(p/2) - log Gamma_q(q/2)
                            + sum_i [(p - q - 1)/2 log lambda_i - lambda_i / 2]
                            + sum_{i<j} log |lambda_i - lambda_j|

        then ``lambda_i = sigma_i^2 / s^2`` (``d lambda_i = 2 sigma_i / s^2 d sigma_i``).
        """
        p, q = max(self._m, self._n), self._rank
        s = self._param("scale", sv).squeeze(-1)
        lam = (sv / s.unsqueeze(-1)).square()

        def mvlgamma(a: float, d: int) -> float:
            return d * (d - 1) / 4 * math.log(math.pi) + sum(
                math.lgamma(a - k / 2) for k in range(d)
            )

        log_c = (
            q * q / 2 * math.log(math.pi)
            - p * q / 2 * math.log(2.0)
            - mvlgamma(p / 2, q)
            - mvlgamma(q / 2, q)
        )
        i, j = torch.triu_indices(q, q, offset=1, device=sv.device)
        vander = torch.log(torch.abs(lam[..., i] - lam[..., j])).sum(-1)
        log_p_lam = log_c + ((p - q - 1) / 2 * torch.log(lam) - lam / 2).sum(-1) + vander
        jac = (math.log(2.0) + torch.log(sv) - 2 * torch.log(s).unsqueeze(-1)).sum(-1)
        return log_p_lam + jac

    def framework_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``singular_value_log_prob(sigma) - log J(sigma) - log vol(m, n)`` (generic W only)."""
        sv = self.flat_singular_values(value)
        return (
            self.singular_value_log_prob(sv)
            - log_sv_jacobian(sv, self._m, self._n)
            - log_haar_volume(self._m, self._n)
        )

    def generative_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Density of ``W`` from its singular values; finite at repeated values."""
        sv = self.flat_singular_values(value)
        s = self._param("scale", sv).squeeze(-1)
        mn = self._m * self._n
        # (sigma / s)^2 and log s, never s^2: s = 1e-30 underflows s^2 in float32
        return -0.5 * (sv / s.unsqueeze(-1)).square().sum(-1) - mn * (
            0.5 * math.log(2 * math.pi) + torch.log(s))

    def _sv_log_density(self, sv):
        return self.singular_value_log_prob(sv)

    def _penalty_from_sv(self, sv):
        return half_normal_log_pdf(sv, self._param("scale", sv)).sum(-1)

    def _sample_sv(self, shape):
        g = torch.randn(*shape, self._m, self._n, dtype=self._dtype, device=self._device)
        return torch.linalg.svdvals(g) * self.scale.unsqueeze(-1)
