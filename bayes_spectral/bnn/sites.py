"""Layer 4: site installers, one per kind of latent site (the strategies of :func:`bayesian`).

:func:`~bayes_spectral.bayesian` gives every layer with a prior one :class:`SiteInstaller`,
chosen by the selector that names the layer (none: :class:`LatentWeightSite`):

=================  ==========================  =============================================
kind               selector                    latent site and its prior
=================  ==========================  =============================================
``"weight"``       (a prior, nothing else)     ``<layer>.weight``, the prior itself
``"tracked"``      ``tracked=``                ``<layer>.weight``, :class:`TrackedSpectralPrior`
``"spectral"``     ``spectral=``               ``<layer>.spectral_s``, :class:`SingularValuePrior`
``"enumerated"``   ``enumerate_rank=``         ``<layer>.weight``, no density (improper); the
                                               indicators ``<site>_z`` come from
                                               :meth:`SpikeAndSlabSpectrum.rank_model`
=================  ==========================  =============================================

Before anything is built, an installer checks each layer selected for its kind
(:meth:`~SiteInstaller.check_prior`, :meth:`~SiteInstaller.check`: the law and clashes with
other selectors); then :meth:`~SiteInstaller.install` puts the site on the converted layer
and records it in the network (``_priors``, ``_initial``, the kind's layer list). Trackers of
tracked laws are looked up by law class (:data:`~bayes_spectral.bnn.site_priors.TRACKED_LAWS`),
then by tracker kind (:data:`TRACKERS`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import pyro.distributions as dist
import torch
from pyro.nn import PyroSample
from torch import nn
from torch.distributions import constraints

from ..distributions import SpectralDistribution, SpikeAndSlabSpectrum
from ..spectra.spectrum import PowerIteration
from .site_priors import (
    TRACKED_LAWS,
    SingularValuePrior,
    TrackedSpectralPrior,
    _tail_penalty_for,
    law_entry,
)
from .spectral_factors import SpectralFactors, spectral_pre_hook

if TYPE_CHECKING:
    from .network import BayesianNetwork

__all__ = [
    "CHECK_ORDER",
    "TRACKERS",
    "EnumeratedRankSite",
    "LatentWeightSite",
    "SiteInstaller",
    "SpectralSite",
    "TrackedSite",
    "site_installers",
]

#: kinds selected by an argument of ``bayesian`` (a layer gets the first kind naming it)
CHECK_ORDER = ("tracked", "spectral", "enumerated")


def site_prefix(name: str) -> str:
    """Pyro name of layer ``name`` inside the network (``"net"`` or ``"net.<name>"``)."""
    return "net" + ("." + name if name else "")


def _any_param(layer: nn.Module, bn: BayesianNetwork) -> torch.Tensor:
    """A tensor on the device/dtype the layer's prior should follow."""
    for p in layer.parameters():
        return p
    for p in bn.parameters():
        return p
    return torch.zeros(())


class SiteInstaller:
    """One kind of latent site: :meth:`check` a selected layer, :meth:`install` its site."""

    kind = ""
    #: message of the ``ValueError`` for a selected layer without a prior
    missing_prior = ""

    def check_prior(self, name: str, prior: Any) -> None:
        """``ValueError`` for a layer selected for this kind without a prior."""
        if prior is None:
            raise ValueError(f"layer {name!r} is selected for {self.missing_prior} but has no "
                             "prior")

    def check(self, name: str, prior: Any, selected: Mapping[str, list[str]]) -> None:
        """Raise for a layer of this kind (with a prior) whose law or selection does not
        fit; ``selected``: kind -> selected layer names."""

    def install(self, bn: BayesianNetwork, name: str, layer: nn.Module,
                prior: dist.Distribution) -> str:
        """Put the site on ``layer``; return its name."""
        raise NotImplementedError


class LatentWeightSite(SiteInstaller):
    """The weight itself is the latent site, with the prior as given."""

    kind = "weight"

    def install(self, bn, name, layer, prior):
        weight = layer.weight.detach().clone()
        bn._priors[name] = prior
        layer.weight = PyroSample(lambda self, _n=name: bn._prior_for(_n, _any_param(self, bn)))
        site = site_prefix(name) + ".weight"
        bn._initial[site] = weight
        return site


class SpectralSite(SiteInstaller):
    """``W = U diag(s) V^T``: the singular values ``s`` are the latent site
    (:mod:`~bayes_spectral.bnn.spectral_factors`)."""

    kind = "spectral"
    missing_prior = "a spectral parameterisation or rank enumeration"

    def __init__(self, orthogonal_map: str) -> None:
        self.orthogonal_map = orthogonal_map

    def check(self, name, prior, selected):
        if not isinstance(prior, SpectralDistribution):
            raise TypeError(f"layer {name!r}: the spectral parameterisation needs a spectral law "
                            f"of bayes_spectral.distributions, got {type(prior).__name__}")

    def install(self, bn, name, layer, prior):
        weight = layer.weight.detach().clone()
        factors = SpectralFactors(weight, self.orthogonal_map)
        del layer._parameters["weight"]
        layer.spectral = factors
        bn._priors[name] = SingularValuePrior(prior)
        layer.spectral_s = PyroSample(
            lambda self, _n=name: bn._prior_for(_n, self.spectral.initial_s_like())
        )
        layer.register_forward_pre_hook(spectral_pre_hook)
        site = site_prefix(name) + ".spectral_s"
        bn._initial[site] = factors.initial_s
        bn.spectral_layers.append(name)
        return site


class EnumeratedRankSite(SiteInstaller):
    """A ``SpikeAndSlabSpectrum`` weight whose indicators are explicit and enumerated: the
    weight site is improper and :meth:`SpikeAndSlabSpectrum.rank_model` (called by the
    model's forward) adds the density."""

    kind = "enumerated"
    missing_prior = SpectralSite.missing_prior

    def check(self, name, prior, selected):
        if not isinstance(prior, SpikeAndSlabSpectrum):
            raise TypeError(f"layer {name!r}: rank enumeration needs a SpikeAndSlabSpectrum prior, "
                            f"got {type(prior).__name__}")
        if name in selected["spectral"]:
            raise ValueError(f"layer {name!r}: rank enumeration works on the weight, not with the "
                             "spectral parameterisation")

    def install(self, bn, name, layer, prior):
        weight = layer.weight.detach().clone()
        bn._priors[name] = prior
        improper = dist.ImproperUniform(constraints.real, (), weight.shape)
        layer.weight = PyroSample(improper)
        bn.enumerated_layers.append(name)
        site = site_prefix(name) + ".weight"
        bn._initial[site] = weight
        return site


# --- trackers of tracked laws -----------------------------------------------------------

PriorMaker = Callable[[nn.Module], dist.Distribution]


def _power_iteration_tracker(bn, name, layer, law, weight, n_iter: int) -> PriorMaker:
    """A warm-started :class:`PowerIteration` as a buffer of the layer (in checkpoints)."""
    layer.power_iteration = PowerIteration(weight.shape, n_iter=n_iter)
    return lambda self, _n=name: TrackedSpectralPrior(
        bn._prior_for(_n, self.power_iteration.u), self.power_iteration)


def _tail_tracker(bn, name, layer, law, weight, n_iter: int) -> PriorMaker:
    """A tracked :class:`PowerLawPrior` held by the network, renewed by
    :meth:`BayesianNetwork.renew_tracking` (not a buffer)."""
    bn._tail_penalties[name] = _tail_penalty_for(law)
    return lambda self, _n=name: TrackedSpectralPrior(
        bn._prior_for(_n, _any_param(self, bn)), bn._tail_penalties[_n])


#: tracker kind (``TrackedLaw.tracker``) -> builder of the tracking state and the prior
TRACKERS: dict[str, Callable[..., PriorMaker]] = {
    "power_iteration": _power_iteration_tracker,
    "tail": _tail_tracker,
}


class TrackedSite(SiteInstaller):
    """The weight is the latent site; its penalty prior is a :class:`TrackedSpectralPrior`
    (no full SVD per call), tracked as its law's entry of ``TRACKED_LAWS`` says."""

    kind = "tracked"
    missing_prior = "tracked spectra"

    def __init__(self, power_iterations: int) -> None:
        self.power_iterations = int(power_iterations)

    def check(self, name, prior, selected):
        if name in selected["spectral"] or name in selected["enumerated"]:
            raise ValueError(f"layer {name!r}: tracked spectra apply to a plain weight prior, not "
                             "with spectral= or enumerate_rank=")
        TrackedSpectralPrior(prior, None)  # validates the law, measure and shape

    def install(self, bn, name, layer, prior):
        weight = layer.weight.detach().clone()
        bn._priors[name] = prior
        tracker = TRACKERS[law_entry(TRACKED_LAWS, prior).tracker]
        layer.weight = PyroSample(tracker(bn, name, layer, prior, weight, self.power_iterations))
        site = site_prefix(name) + ".weight"
        bn._initial[site] = weight
        return site


def site_installers(orthogonal_map: str, power_iterations: int) -> dict[str, SiteInstaller]:
    """Kind -> installer, with the options of :func:`bayesian` that shape the sites."""
    return {
        "weight": LatentWeightSite(),
        "tracked": TrackedSite(power_iterations),
        "spectral": SpectralSite(orthogonal_map),
        "enumerated": EnumeratedRankSite(),
    }
