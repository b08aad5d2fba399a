"""Layer 4: :class:`BayesianNetwork`, the Pyro model that :func:`~bayes_spectral.bayesian`
builds from any ``torch.nn.Module``.

Scaling of the data plate (mini-batches): the likelihood sits in
``pyro.plate("data", N, subsample=arange(B))`` with ``N = num_data`` and ``B`` the batch
size, so Pyro multiplies the batch log-likelihood by ``N / B``. One SVI/MAP step therefore
minimises an unbiased estimate of the full-data loss
``-log p(W) - sum_{n=1}^N log p(y_n | x_n, W)`` (the prior is *not* scaled). Dividing by
``N`` gives ``mean_batch NLL - log p(W) / N``: the penalty loop with weight ``1 / N``.

The observation model is the :class:`~bayes_spectral.bnn.likelihoods.Likelihood` registered
under the model's ``likelihood`` name (``LIKELIHOODS``). A learned Gaussian noise
(``noise="learned"``, or a prior given to :meth:`BayesianNetwork.set_noise`) is the latent
site ``"noise"``, prior :func:`default_noise_prior` (``sigma ~ LogNormal(0, 1)``), drawn
outside the data plate (its prior is not scaled by ``N / B``); it is one of
:attr:`BayesianNetwork.latent_sites`, so MAP finds its MAP point, SVI guides cover it and
NUTS samples it, like the weights.
The priors of the latent sites live in :mod:`~bayes_spectral.bnn.site_priors`, their
installation in :mod:`~bayes_spectral.bnn.sites` and the construction in
:mod:`~bayes_spectral.bnn.build`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule
from torch import nn

from ..distributions import SpikeAndSlabSpectrum
from .batches import call_net, first_leaf, leaves, num_rows, take_rows
from .likelihoods import LIKELIHOODS, Likelihood
from .site_priors import SingularValuePrior, TrackedSpectralPrior, _prior_to, _tail_penalty_for
from .tracker_state import load_tracker_state, tracker_state

__all__ = ["NOISE_SITE", "BayesianNetwork", "SingularValuePrior", "TrackedSpectralPrior",
           "default_noise_prior"]

#: the latent site of a learned Gaussian noise scale
NOISE_SITE = "noise"


def default_noise_prior() -> dist.Distribution:
    """The prior of ``noise="learned"``: ``sigma ~ LogNormal(0, 1)`` (median 1, central 95%
    in [0.14, 7.1], mode 0.37; density 0 at ``sigma -> 0``, so a MAP fit cannot collapse the
    noise), for targets of unit scale (e.g. standardised). Other scales: give the prior
    itself: ``bn.set_noise(dist.LogNormal(log s, 1))`` before the fit."""
    return dist.LogNormal(torch.tensor(0.0), torch.tensor(1.0))


def _median(prior: dist.Distribution) -> torch.Tensor:
    """The prior's median (``icdf(0.5)``), or its mean where it has no ``icdf``."""
    try:
        return prior.icdf(torch.tensor(0.5)).detach().clone()
    except NotImplementedError:
        return prior.mean.detach().clone()


def _moved(prior: dist.Distribution, like: torch.Tensor) -> dist.Distribution:
    """A shallow copy of ``prior`` (and of its base distributions) whose tensors follow
    ``like``'s device and dtype."""
    if all(v.device == like.device and v.dtype == like.dtype for v in vars(prior).values()
           if isinstance(v, torch.Tensor) and v.is_floating_point()) and not any(
            isinstance(v, torch.distributions.Distribution) for v in vars(prior).values()):
        return prior
    new = copy.copy(prior)
    for k, v in vars(prior).items():
        if isinstance(v, torch.Tensor):
            new.__dict__[k] = v.to(device=like.device,
                                   dtype=like.dtype if v.is_floating_point() else v.dtype)
        elif isinstance(v, torch.distributions.Distribution):
            new.__dict__[k] = _moved(v, like)
    return new



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
        # follows .to(device, dtype) even when every weight is latent and no parameter is
        # left to say where the model lives (not in the state_dict); starts as the net's
        like = next((p for p in net.parameters() if p.is_floating_point()), torch.zeros(()))
        self.register_buffer("_device_like", torch.zeros((), device=like.device,
                                                         dtype=like.dtype), persistent=False)
        self._tail_penalties: dict[str, Any] = {}  # tracked power-law, fast/fused/subspace
        self.output_fn: Callable[[Any], torch.Tensor] | None = None  # set by bayesian()
        self.noise_value: float | None = None
        self.noise_prior: dist.Distribution | None = None
        self.set_noise(noise)

    # -- helpers ----------------------------------------------------------------------------
    @property
    def latent_sites(self) -> list[str]:
        """Names of the latent sample sites (weights or singular values, and ``"noise"``
        when the noise is learned), not indicators."""
        return list(self.prior_sites.values()) + self.noise_sites

    # -- the observation noise --------------------------------------------------------------
    @property
    def noise_sites(self) -> list[str]:
        """``["noise"]`` when the Gaussian noise is a latent variable, else ``[]``."""
        return [NOISE_SITE] if self.noise_prior is not None else []

    def set_noise(self, noise) -> None:
        """The Gaussian noise (before a fit): a fixed positive scale (a float), or the latent
        site ``"noise"`` (``"learned"``: prior :func:`default_noise_prior`; a positive
        ``Distribution``: that prior), started at the prior's median."""
        self.noise_value = self.noise_prior = None
        self._initial.pop(NOISE_SITE, None)
        if not (noise == "learned" if isinstance(noise, str)
                else isinstance(noise, torch.distributions.Distribution)):
            if isinstance(noise, str) or not 0 < float(noise) < float("inf"):
                raise ValueError(f"noise must be a positive float, 'learned' or a prior, got "
                                 f"{noise!r}")
            self.noise_value = float(noise)
            return
        if not self.observation.has_noise:
            raise ValueError(f"noise='learned' needs a likelihood with a noise scale "
                             f"('gaussian'), got likelihood {self.likelihood!r}")
        self.noise_prior = default_noise_prior() if isinstance(noise, str) else noise
        if "_noise_like" not in self._buffers:  # follows .to(device, dtype)
            self.register_buffer("_noise_like", torch.zeros(()))
        self._initial[NOISE_SITE] = _median(self.noise_prior)

    def sample_noise(self):
        """The noise scale: the fixed ``noise_value`` or a draw of the site ``"noise"``."""
        if self.noise_prior is None:
            return self.noise_value
        return pyro.sample(NOISE_SITE, _moved(self.noise_prior, self._noise_like))

    def layer(self, name: str) -> nn.Module:
        """The module owning row ``name`` of the parameter view (or module ``name``)."""
        for row in getattr(self, "weight_rows", ()):
            if row.name == name:
                return row.module
        return self.net.get_submodule(name) if name else self.net

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Site -> the module's weights at :func:`bayesian` time (or their singular values).

        On the current device/dtype of the model's parameters (of the model itself when
        every weight is latent and no parameter is left).
        """
        ref = next(iter(self.parameters()), self._device_like)
        return {site: value.to(device=ref.device, dtype=ref.dtype)
                for site, value in self._initial.items()}

    def renew_tracking(self) -> None:
        """Start the tail trackers of tracked power-law layers (and the penalties of
        ``tracked_mode="fast"`` / ``"fused"`` / ``"subspace"``) afresh (their next call
        re-decomposes or re-warms).
        :func:`~bayes_spectral.fit` calls it at its start (a second fit of the same model
        repeats the first) and the samplers at each chain's (:mod:`~bayes_spectral.bnn.chains`);
        :func:`~bayes_spectral.fit`'s checkpoints save and restore this state instead of
        renewing it (:mod:`~bayes_spectral.bnn.tracker_state`), so a checkpoint boundary
        does not change the run and a resumed run repeats the uninterrupted one."""
        self._tail_penalties = {n: _tail_penalty_for(self._priors[n], p.mode)
                                for n, p in self._tail_penalties.items()}

    def tracker_state_dict(self) -> dict:
        """The tracked priors' state (tail trackers, fast-mode blocks, probe generators) as
        tensors and plain data, what ``fit``'s checkpoints save
        (:func:`~bayes_spectral.bnn.tracker_state.tracker_state`)."""
        return tracker_state(self)

    def load_tracker_state_dict(self, state: dict, where: str = "tracker state") -> None:
        """Restore :meth:`tracker_state_dict`, checked in full first (a ``ValueError``
        naming ``where``, the layer and what differs; a refused state changes nothing)."""
        load_tracker_state(self, state, where)

    def _prior_for(self, name: str, like: torch.Tensor):
        return _prior_to(self._priors[name], like)

    def weight_of(self, name: str, value: torch.Tensor | None = None) -> torch.Tensor:
        """Current weight of layer ``name`` (``value``: a value of its latent site)."""
        if name in self.spectral_layers:
            factors = self.spectral_factors[name]
            s = value if value is not None else self._initial[self.prior_sites[name]]
            return factors(s.to(next(factors.parameters())))
        return value if value is not None else self._initial[self.prior_sites[name]]

    # -- model ------------------------------------------------------------------------------
    def net_output(self, x) -> torch.Tensor:
        """``output_fn(net(x))``: the net called as ``net(x)``, ``net(*x)`` (tuple) or
        ``net(**x)`` (dict), its output mapped by ``output_fn`` (default: identity) to the
        tensor the likelihood takes."""
        out = call_net(self.net, x)
        if self.output_fn is not None:
            out = self.output_fn(out)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"the network returned a {type(out).__name__}, not a tensor: give "
                            "bayesian(..., output_fn=...) mapping its output to the tensor the "
                            "likelihood takes (e.g. output_fn=lambda out: out[0] or "
                            "out['logits'])")
        return out

    def forward(self, x, y: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: a tensor (any dtype), a tuple or a dict of tensors (:meth:`net_output`)."""
        batch = num_rows(x)
        out = self.net_output(x)
        for name in self.enumerated_layers:
            site = self.prior_sites[name]
            w = self.layer(name).weight
            self._prior_for(name, w).rank_model(w, name=site)
        size = self.num_data if self.num_data is not None and self.num_data >= batch else batch
        law = self.observation
        out = law.prepare_output(out, y)
        params = law.parameters(self)  # noise site and PyroParams: outside the data plate
        if y is not None:
            y = law.prepare_target(y, out)
        with pyro.plate("data", size, subsample=torch.arange(batch,
                                                             device=first_leaf(x).device)):
            pyro.sample("obs", law.law(out, params), obs=y)
        return out

    def deterministic_forward(self, x, values: Mapping | None = None):
        """Network output with the latent sites fixed to ``values`` (default: initial)."""
        values = self.initial_values() if values is None else values
        with poutine.block(), poutine.condition(data=dict(values)):
            return self.net_output(x)

    # -- checks -----------------------------------------------------------------------------
    def check_data(self, x, y, what: str = "data") -> None:
        """Clear ``ValueError``/``TypeError`` for data the model cannot take: ``x`` a tensor
        of any dtype (token ids stay integer), a tuple or a dict of tensors with as many rows
        as ``y``; floating-point inputs finite; the network runs on two rows; the targets
        suit the likelihood (:meth:`Likelihood.check_targets`)."""
        xs = leaves(x) if isinstance(x, (tuple, list, Mapping)) else [x]
        if not xs or not all(isinstance(t, torch.Tensor) for t in xs) \
                or not isinstance(y, torch.Tensor):
            raise TypeError(f"{what}: x (a tensor, a tuple or a dict of tensors) and y must be "
                            f"torch tensors, got {type(x).__name__} and {type(y).__name__}")
        shapes = [tuple(t.shape) for t in xs]
        if y.dim() < 1 or any(len(s) < 1 or s[0] != y.shape[0] for s in shapes):
            shown = shapes[0] if len(shapes) == 1 else shapes
            raise ValueError(f"{what}: x of shape {shown} and y of shape "
                             f"{tuple(y.shape)} do not have the same number of rows")
        if y.shape[0] == 0:
            raise ValueError(f"{what}: no rows")
        if any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in xs):
            raise ValueError(f"{what}: x contains NaN or Inf")
        try:
            with torch.no_grad():
                out = self.deterministic_forward(take_rows(x, slice(0, 2)))
        except (RuntimeError, IndexError) as exc:
            raise ValueError(f"{what}: x of shape {shapes[0] if len(shapes) == 1 else shapes} "
                             f"does not fit the network: {exc}") from exc
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
