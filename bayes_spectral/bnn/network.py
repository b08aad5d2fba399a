"""Layer 4: :class:`BayesianNetwork`, the Pyro model that :func:`~bayes_spectral.bayesian`
builds from any ``torch.nn.Module``.

Scaling of the data plate (mini-batches): the likelihood sits in
``pyro.plate("data", N, subsample=arange(B))`` with ``N = num_data`` and ``B`` the batch
size, so Pyro multiplies the batch log-likelihood by ``N / B``. One SVI/MAP step therefore
minimises an unbiased estimate of the full-data loss
``-log p(W) - sum_{n=1}^N log p(y_n | x_n, W)`` (the prior is *not* scaled). Dividing by
``N`` gives ``mean_batch NLL - log p(W) / N``: the penalty loop with weight ``1 / N``.

The observation model is the :class:`~bayes_spectral.bnn.likelihoods.Likelihood` registered
under the model's ``likelihood`` name (``LIKELIHOODS``). The priors of the latent sites live
in :mod:`~bayes_spectral.bnn.site_priors`, their installation in :mod:`~bayes_spectral.bnn.sites`
and the construction in :mod:`~bayes_spectral.bnn.build`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import constraints

from ..distributions import SpikeAndSlabSpectrum
from .likelihoods import LIKELIHOODS, Likelihood
from .site_priors import SingularValuePrior, TrackedSpectralPrior, _prior_to, _tail_penalty_for

__all__ = ["BayesianNetwork", "SingularValuePrior", "TrackedSpectralPrior"]


class BayesianNetwork(PyroModule):
    """A Pyro model ``model(x, y=None)`` built by :func:`bayesian` (see there).

    Attributes: ``net`` (the converted copy), ``prior_sites`` (layer name -> latent site
    name), ``spectral_layers``, ``enumerated_layers``, ``likelihood`` (its name) and
    ``observation`` (its :class:`~bayes_spectral.bnn.likelihoods.Likelihood`), ``num_data``.

    The model: the network's latent sites (installed by :mod:`~bayes_spectral.bnn.sites`),
    the rank models of enumerated layers, then ``y`` observed at ``"obs"`` in
    ``pyro.plate("data", N, subsample=arange(B))`` (the batch log-likelihood scaled by
    ``N / B``; ``N = num_data``, no scaling when ``None``).
    """

    def __init__(self, net: nn.Module, likelihood: str, noise, num_data: int | None):
        super().__init__()
        self.net = net
        self.likelihood = likelihood
        self.observation: Likelihood = LIKELIHOODS.get(likelihood)
        self.num_data = num_data
        self.prior_sites: dict[str, str] = {}
        self.spectral_layers: list[str] = []
        self.enumerated_layers: list[str] = []
        self.weight_layer_names: list[str] = []
        self._priors: dict[str, dist.Distribution] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._tail_penalties: dict[str, Any] = {}  # tracked power-law layers
        if noise == "learned":
            self.noise = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        else:
            self.noise_value = float(noise)

    # -- helpers ----------------------------------------------------------------------------
    @property
    def latent_sites(self) -> list[str]:
        """Names of the latent sample sites (weights or singular values), not indicators."""
        return list(self.prior_sites.values())

    def layer(self, name: str) -> nn.Module:
        return self.net.get_submodule(name) if name else self.net

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Site -> the module's weights at :func:`bayesian` time (or their singular values).

        On the current device/dtype of the model's parameters.
        """
        ref = next(iter(self.parameters()), None)
        out = {}
        for site, value in self._initial.items():
            out[site] = value if ref is None else value.to(device=ref.device, dtype=ref.dtype)
        return out

    def renew_tracking(self) -> None:
        """Start the tail trackers of tracked power-law layers afresh (their next call
        re-decomposes). :func:`~bayes_spectral.fit` calls it at every checkpoint boundary,
        whether or not a file is written, so results do not depend on checkpointing and a
        resumed run (fresh trackers) repeats the uninterrupted one bit for bit."""
        self._tail_penalties = {n: _tail_penalty_for(self._priors[n])
                                for n in self._tail_penalties}

    def _prior_for(self, name: str, like: torch.Tensor):
        return _prior_to(self._priors[name], like)

    def weight_of(self, name: str, value: torch.Tensor | None = None) -> torch.Tensor:
        """Current weight of layer ``name`` (``value``: a value of its latent site)."""
        layer = self.layer(name)
        if name in self.spectral_layers:
            s = value if value is not None else self._initial[self.prior_sites[name]]
            return layer.spectral(s.to(next(layer.spectral.parameters())))
        return value if value is not None else self._initial[self.prior_sites[name]]

    # -- model ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        out = self.net(x)
        for name in self.enumerated_layers:
            site = self.prior_sites[name]
            w = self.layer(name).weight
            self._prior_for(name, w).rank_model(w, name=site)
        size = self.num_data if self.num_data is not None and self.num_data >= batch else batch
        law = self.observation
        out = law.prepare_output(out, y)
        params = law.parameters(self)  # PyroParams are read outside the data plate
        with pyro.plate("data", size, subsample=torch.arange(batch, device=x.device)):
            pyro.sample("obs", law.law(out, params), obs=y)
        return out

    def deterministic_forward(self, x: torch.Tensor, values: Mapping | None = None):
        """Network output with the latent sites fixed to ``values`` (default: initial)."""
        values = self.initial_values() if values is None else values
        with poutine.block(), poutine.condition(data=dict(values)):
            return self.net(x)

    # -- checks -----------------------------------------------------------------------------
    def check_data(self, x, y, what: str = "data") -> None:
        """Clear ``ValueError``/``TypeError`` for data the model cannot take."""
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{what}: x and y must be torch tensors, got "
                            f"{type(x).__name__} and {type(y).__name__}")
        if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: x of shape {tuple(x.shape)} and y of shape "
                             f"{tuple(y.shape)} do not have the same number of rows")
        if x.shape[0] == 0:
            raise ValueError(f"{what}: no rows")
        if not x.is_floating_point():
            raise TypeError(f"{what}: x must be floating point, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what}: x contains NaN or Inf")
        try:
            with torch.no_grad():
                out = self.deterministic_forward(x[:2])
        except RuntimeError as exc:
            raise ValueError(f"{what}: x of shape {tuple(x.shape)} does not fit the network: "
                             f"{exc}") from exc
        self.observation.check_targets(out, y, what)

    # -- spike-and-slab rank posterior ------------------------------------------------------
    def rank_posterior(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``P(rank = k | W)``, ``k = 0..r``, of an enumerated spike-and-slab layer.

        The indicator marginals come from ``TraceEnum_ELBO.compute_marginals`` of the
        indicator model (the sites of :meth:`SpikeAndSlabSpectrum.rank_model`); the rank is
        their Poisson-binomial sum. ``weight`` defaults to the layer's initial weight.
        """
        prior = self._priors.get(name)
        if not isinstance(prior, SpikeAndSlabSpectrum):
            raise ValueError(f"layer {name!r} has no SpikeAndSlabSpectrum prior")
        w = (weight if weight is not None else self._initial[self.prior_sites[name]]).detach()
        site = self.prior_sites[name]

        def model():
            prior.rank_model(w, name=site)

        def guide():
            pass

        elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
        marg = elbo.compute_marginals(model, guide)
        p = marg[f"{site}_z"].probs if hasattr(marg[f"{site}_z"], "probs") else None
        if p is None:  # pragma: no cover - pyro returns Bernoulli/Categorical marginals
            p = marg[f"{site}_z"].log_prob(torch.ones(1)).exp()
        p = p.reshape(-1)
        out = torch.zeros(p.shape[-1] + 1, dtype=p.dtype)
        out[0] = 1.0
        for i in range(p.shape[-1]):
            out = out * (1 - p[i]) + torch.nn.functional.pad(out[:-1], (1, 0)) * p[i]
        return out
