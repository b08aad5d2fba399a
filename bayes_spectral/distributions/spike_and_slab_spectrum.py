"""Spike-and-slab law on the singular values, with an explicit-indicator (rank) form."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch.distributions import constraints

from ..spectra.laws import (
    half_normal_log_pdf,
    log_haar_volume,
    log_sv_jacobian,
    spike_slab_log_pdf,
)
from ._spectral import SpectralDistribution, open_unit_interval

__all__ = ["SpikeAndSlabSpectrum"]


class SpikeAndSlabSpectrum(SpectralDistribution):
    """Each singular value ``sigma_i`` i.i.d. from ``pi HN(slab) + (1 - pi) HN(spike)``
    (half-normal components, :func:`spectral_laws.spike_slab_log_pdf`); ``pi`` is the prior
    probability that a direction is "on", so ``E[rank] = pi r`` with ``spike << slab``.

    * ``measure="penalty"`` (**default**): ``sum_i log mix(sigma_i)`` over the (pooled) spectrum.
    * ``measure="generative"``: ``log r! + sum_i log mix(sigma_i) - log J - log vol(m, n)``.

    Explicit-indicator form: :meth:`rank_model` is a Pyro model with ``z_i ~ Bernoulli(pi)``
    for the ``i``-th largest singular value (``infer={"enumerate": "parallel"}``) and
    ``sigma_i | z_i ~ HN(slab if z_i else spike)``. Summing out ``z`` gives back exactly this
    distribution's ``log_prob`` (the mixture is symmetric, so labelling by rank order is
    exact), and ``TraceEnum_ELBO`` / ``infer_discrete`` give the posterior over the rank
    ``sum_i z_i``; :meth:`indicator_probs` and :meth:`rank_posterior` are the closed forms.
    """

    arg_constraints = {
        "pi": open_unit_interval,
        "spike_scale": constraints.positive,
        "slab_scale": constraints.positive,
    }
    _param_names = ("pi", "spike_scale", "slab_scale")

    def __init__(
        self,
        pi,
        spike_scale,
        slab_scale,
        event_shape,
        measure="penalty",
        validate_args=None,
        *,
        conv="pool",
    ):
        params = {"pi": pi, "spike_scale": spike_scale, "slab_scale": slab_scale}
        super().__init__(params, event_shape, measure, conv, validate_args)

    def _mix(self, sv):
        return spike_slab_log_pdf(
            sv, self._param("pi", sv), self._param("spike_scale", sv), self._param("slab_scale", sv)
        )

    def _penalty_from_sv(self, sv):
        return self._mix(sv).sum(-1)

    def _sv_log_density(self, sv):
        return self._log_factorial(self._rank) + self._mix(sv).sum(-1)

    def _sample_sv(self, shape):
        pi, spike, slab = (getattr(self, k).unsqueeze(-1) for k in self._param_names)
        z = torch.rand(*shape, self._rank, dtype=self._dtype, device=self._device) < pi
        scale = torch.where(z, slab, spike)
        g = torch.randn(*shape, self._rank, dtype=self._dtype, device=self._device)
        return self._sort_desc(g.abs() * scale)

    # -- explicit indicators ---------------------------------------------------------------
    def _spectrum(self, weight):
        if self.measure == "generative":
            return self.flat_singular_values(weight)
        return self.penalty_singular_values(weight)

    def indicator_probs(self, weight: torch.Tensor) -> torch.Tensor:
        """Posterior ``P(z_i = 1 | W)`` for each singular value (descending order)."""
        sv = self._spectrum(weight)
        pi = self._param("pi", sv)
        on = torch.log(pi) + half_normal_log_pdf(sv, self._param("slab_scale", sv))
        off = torch.log1p(-pi) + half_normal_log_pdf(sv, self._param("spike_scale", sv))
        return torch.sigmoid(on - off)

    def rank_posterior(self, weight: torch.Tensor) -> torch.Tensor:
        """``P(sum_i z_i = k | W)`` for ``k = 0..N`` (Poisson-binomial of the indicators)."""
        p = self.indicator_probs(weight)
        out = torch.zeros(*p.shape[:-1], p.shape[-1] + 1, dtype=p.dtype, device=p.device)
        out[..., 0] = 1.0
        for i in range(p.shape[-1]):
            pi = p[..., i : i + 1]
            shifted = torch.nn.functional.pad(out[..., :-1], (1, 0))
            out = out * (1 - pi) + shifted * pi
        return out

    def rank_model(self, weight: torch.Tensor, name: str = "W") -> torch.Tensor:
        """Pyro model of the indicators given ``weight`` (observed data or a latent's value).

        Sites: ``f"{name}_z"`` (Bernoulli, enumerated in parallel, in plate
        ``f"{name}_sv"`` at ``dim=-1``), factors ``f"{name}_sv_lik"`` (per-value half-normal
        terms) and, for the generative measure, ``f"{name}_jacobian"`` (``log r! - log J -
        log vol``). Needs ``max_plate_nesting >= 1`` and a scalar (unbatched) prior.
        Returns ``z``.
        """
        if self.batch_shape != torch.Size():
            raise ValueError(
                f"SpikeAndSlabSpectrum.rank_model needs scalar parameters, got batch shape "
                f"{tuple(self.batch_shape)}"
            )
        sv = self._spectrum(weight)
        if sv.dim() != 1:
            raise ValueError("SpikeAndSlabSpectrum.rank_model takes one weight, not a batch")
        pi = self.pi.to(sv)
        with pyro.plate(f"{name}_sv", sv.shape[-1], dim=-1):
            z = pyro.sample(f"{name}_z", dist.Bernoulli(pi), infer={"enumerate": "parallel"})
            scale = torch.where(z.bool(), self.slab_scale.to(sv), self.spike_scale.to(sv))
            pyro.factor(f"{name}_sv_lik", half_normal_log_pdf(sv, scale))
        if self.measure == "generative":
            const = (
                self._log_factorial(self._rank)
                - log_sv_jacobian(sv, self._m, self._n)
                - log_haar_volume(self._m, self._n)
            )
            pyro.factor(f"{name}_jacobian", const)
        return z
