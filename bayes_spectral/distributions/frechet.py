"""Frechet (inverse Weibull) law, scipy's ``invweibull(c=concentration, loc=loc, scale=scale)``."""

from __future__ import annotations

import math

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .._checks import check_finite_params
from ..spectra.laws import frechet_log_pdf

__all__ = ["Frechet"]

_EULER_GAMMA = 0.5772156649015329


class Frechet(TorchDistribution):
    """Frechet law with concentration ``a``, scale ``s`` and location ``m``.

    With ``z = (x - m) / s > 0``::

        log f(x) = log a - log s - (1 + a) log z - z^(-a)     (spectral_laws.frechet_log_pdf)
        F(x)     = exp(-z^(-a))
        F^-1(u)  = m + s (-log u)^(-1/a)

    ``rsample`` is reparameterised through the inverse CDF, computed in log space,
    ``x = m + exp(log s - log(-log u) / a)`` with ``u`` uniform clamped to
    ``[tiny, 1 - eps]`` of the dtype (so the largest quantile reached is
    ``F^-1(1 - eps) ~ m + s eps^(-1/a)``). A quantile beyond the dtype's largest finite
    number (e.g. ``a = 0.05``, ``s = 1`` in float32: every ``u > F(finfo.max) ~ 0.988``) is
    returned as ``finfo(dtype).max``, never ``inf`` (its gradient is then zero); ``icdf``
    does the same. ``mean = m + s Gamma(1 - 1/a)``
    for ``a > 1`` (``inf`` otherwise), ``variance = s^2 (Gamma(1 - 2/a) - Gamma(1 - 1/a)^2)``
    for ``a > 2`` (``inf`` otherwise), ``entropy = 1 + gamma (1 + 1/a) + log(s / a)``.
    In bayes-spectral it is the law of the top eigenvalue ``lambda_max = sigma_max^2``.
    """

    arg_constraints = {
        "concentration": constraints.positive,
        "scale": constraints.positive,
        "loc": constraints.real,
    }
    has_rsample = True

    def __init__(self, concentration, scale, loc=0.0, validate_args=None):
        self.concentration, self.scale, self.loc = broadcast_all(concentration, scale, loc)
        super().__init__(self.concentration.shape, validate_args=validate_args)
        if self._validate_args:
            check_finite_params("Frechet", {"concentration": self.concentration,
                                            "scale": self.scale, "loc": self.loc})

    @constraints.dependent_property(is_discrete=False, event_dim=0)
    def support(self):
        return constraints.greater_than(self.loc)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(Frechet, _instance)
        batch_shape = torch.Size(batch_shape)
        new.concentration = self.concentration.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        new.loc = self.loc.expand(batch_shape)
        super(Frechet, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return frechet_log_pdf(value, self.concentration, self.scale, self.loc)

    def cdf(self, value):
        if self._validate_args:
            self._validate_sample(value)
        z = (value - self.loc) / self.scale
        zpos = z.clamp_min(torch.finfo(z.dtype).tiny)
        return torch.where(z > 0, torch.exp(-zpos.pow(-self.concentration)), 0.0)

    def icdf(self, value):
        """``F^-1(u) = m + exp(log s - log(-log u) / a)``, capped at ``finfo.max`` (class
        docstring): the power ``(-log u)^(-1/a)`` overflows for small ``a`` long before the
        quantile does."""
        value = torch.as_tensor(value, dtype=self.scale.dtype, device=self.scale.device)
        big = torch.finfo(value.dtype).max
        log_z = -torch.log(-torch.log(value)) / self.concentration
        log_x = (torch.log(self.scale) + log_z).clamp_max(math.log(big))
        return (self.loc + torch.exp(log_x)).clamp_max(big)

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        info = torch.finfo(self.scale.dtype)
        u = torch.rand(shape, dtype=self.scale.dtype, device=self.scale.device)
        return self.icdf(u.clamp(info.tiny, 1.0 - info.eps))

    @property
    def mean(self):
        a = self.concentration
        g1 = torch.exp(torch.lgamma(1.0 - 1.0 / a.clamp_min(1.0 + 1e-12)))
        return torch.where(a > 1, self.loc + self.scale * g1, math.inf)

    @property
    def mode(self):
        a = self.concentration
        return self.loc + self.scale * (a / (1.0 + a)).pow(1.0 / a)

    @property
    def variance(self):
        a = self.concentration
        safe = a.clamp_min(2.0 + 1e-12)
        g1 = torch.exp(torch.lgamma(1.0 - 1.0 / safe))
        g2 = torch.exp(torch.lgamma(1.0 - 2.0 / safe))
        return torch.where(a > 2, self.scale.square() * (g2 - g1.square()), math.inf)

    def entropy(self):
        a = self.concentration
        return 1.0 + _EULER_GAMMA * (1.0 + 1.0 / a) + torch.log(self.scale / a)
