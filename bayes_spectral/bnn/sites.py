"""Layer 4: site installers, one per kind of latent site (the strategies of :func:`bayesian`).

:func:`~bayes_spectral.bayesian` gives every layer with a prior one :class:`SiteInstaller`,
chosen by the selector that names the layer (none: :class:`LatentWeightSite`):

=================  ==========================  =============================================
kind               selector                    latent site and its prior
=================  ==========================  =============================================
``"weight"``       (a prior, nothing else)     ``<module>.<attr>``, the prior itself
``"tracked"``      ``tracked=``                ``<module>.<attr>``, :class:`TrackedSpectralPrior`
``"spectral"``     ``spectral=``               ``<module>.spectral_s`` (``<attr>_spectral_s``
                                               for an attribute other than ``weight``),
                                               :class:`SingularValuePrior`
``"enumerated"``   ``enumerate_rank=``         ``<module>.weight``, no density (improper); the
                                               indicators ``<site>_z`` come from
                                               :meth:`SpikeAndSlabSpectrum.rank_model`
=================  ==========================  =============================================

Every installer works on a :class:`~bayes_spectral.bnn.slots.Slot` (a module and one
attribute: ``weight``, ``in_proj_weight``, ``weight_hh_l0``, a split part
``in_proj_weight[q]``), prepared by :mod:`~bayes_spectral.bnn.slots`. Pyro handles any
attribute name; the spectral parameterisation is a :mod:`torch.nn.utils.parametrize`
parametrization, so it also holds where a module reads another's weight without calling it.

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
    mode_kind,
)
from .slots import Slot, parametrize_attribute
from .spectral_factors import SpectralFactors, SpectralWeight

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
    """Pyro name of module ``name`` inside the network (``"net"`` or ``"net.<name>"``)."""
    return "net" + ("." + name if name else "")


def _aux_name(slot: Slot, what: str) -> str:
    """Attribute for a helper of the slot: ``what`` for a ``weight`` (``spectral``,
    ``power_iteration``), else ``<attr>_<what>`` (``in_proj_weight[q]_spectral``)."""
    return what if slot.attr == "weight" else f"{slot.attr}_{what}"


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

    def install(self, bn: BayesianNetwork, slot: Slot, prior: dist.Distribution) -> str:
        """Put the site on ``slot`` (row ``slot.row``); return its name."""
        raise NotImplementedError


class LatentWeightSite(SiteInstaller):
    """The weight itself is the latent site, with the prior as given."""

    kind = "weight"

    def install(self, bn, slot, prior):
        name = slot.row
        weight = getattr(slot.module, slot.attr).detach().clone()
        bn._priors[name] = prior
        setattr(slot.module, slot.attr,
                PyroSample(lambda self, _n=name: bn._prior_for(_n, _any_param(self, bn))))
        site = slot.site()
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

    def install(self, bn, slot, prior):
        name, layer = slot.row, slot.module
        factors = SpectralFactors(getattr(layer, slot.attr).detach().clone(),
                                  self.orthogonal_map)
        f_attr, s_attr = _aux_name(slot, "spectral"), _aux_name(slot, "spectral_s")
        setattr(layer, f_attr, factors)
        bn._priors[name] = SingularValuePrior(prior)
        setattr(layer, s_attr, PyroSample(
            lambda self, _n=name, _f=f_attr: bn._prior_for(_n, getattr(self, _f).initial_s_like())
        ))
        parametrize_attribute(layer, slot.attr, SpectralWeight(layer, f_attr, s_attr))
        site = f"{slot.prefix}.{s_attr}"
        bn._initial[site] = factors.initial_s
        bn.spectral_layers.append(name)
        bn.spectral_factors[name] = factors
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

    def install(self, bn, slot, prior):
        name = slot.row
        weight = slot.module.weight.detach().clone()
        bn._priors[name] = prior
        improper = dist.ImproperUniform(constraints.real, (), weight.shape)
        slot.module.weight = PyroSample(improper)
        bn.enumerated_layers.append(name)
        site = slot.site()
        bn._initial[site] = weight
        return site


# --- trackers of tracked laws -----------------------------------------------------------

PriorMaker = Callable[[nn.Module], dist.Distribution]


def _power_iteration_tracker(bn, slot, law, weight, n_iter: int) -> PriorMaker:
    """A warm-started :class:`PowerIteration` as a buffer of the layer (in checkpoints):
    ``power_iteration``, or ``<attr>_power_iteration`` for another attribute."""
    attr = _aux_name(slot, "power_iteration")
    setattr(slot.module, attr, PowerIteration(weight.shape, n_iter=n_iter))
    return lambda self, _n=slot.row, _a=attr: TrackedSpectralPrior(
        bn._prior_for(_n, getattr(self, _a).u), getattr(self, _a))


def _tail_tracker(bn, slot, law, weight, n_iter: int) -> PriorMaker:
    """A tracked :class:`PowerLawPrior` held by the network (not a buffer: its state
    travels in ``fit``'s checkpoints, :mod:`~bayes_spectral.bnn.tracker_state`; renewed by
    :meth:`BayesianNetwork.renew_tracking` at the start of each ``fit`` and sampler chain)."""
    bn._tail_penalties[slot.row] = _tail_penalty_for(law)
    return lambda self, _n=slot.row: TrackedSpectralPrior(
        bn._prior_for(_n, _any_param(self, bn)), bn._tail_penalties[_n])


def _mode_tracker(mode: str) -> Callable[..., PriorMaker]:
    """``tracked_mode="fast"`` / ``"fused"`` / ``"subspace"``: the law's penalty in that mode
    (its warm-started block / probe generator state; fused: the 2-column block; subspace:
    the power law's tail block, Frechet's fast block) held by the
    network as the tail trackers are (checkpointed and renewed as they are)."""

    def tracker(bn, slot, law, weight, n_iter: int) -> PriorMaker:
        bn._tail_penalties[slot.row] = _tail_penalty_for(law, mode)
        return lambda self, _n=slot.row: TrackedSpectralPrior(
            bn._prior_for(_n, _any_param(self, bn)), bn._tail_penalties[_n], mode=mode)

    return tracker


_fast_tracker = _mode_tracker("fast")


#: tracker kind (``TrackedLaw.tracker``, or the mode ``"fast"`` / ``"fused"`` /
#: ``"subspace"``) -> builder of the tracking state and the prior
TRACKERS: dict[str, Callable[..., PriorMaker]] = {
    "power_iteration": _power_iteration_tracker,
    "tail": _tail_tracker,
    "fast": _fast_tracker,
    "fused": _mode_tracker("fused"),
    "subspace": _mode_tracker("subspace"),
}


class TrackedSite(SiteInstaller):
    """The weight is the latent site; its penalty prior is a :class:`TrackedSpectralPrior`
    (no full SVD per call), tracked as its law's entry of ``TRACKED_LAWS`` says."""

    kind = "tracked"
    missing_prior = "tracked spectra"

    def __init__(self, power_iterations: int, mode: str = "tracked") -> None:
        self.power_iterations = int(power_iterations)
        self.mode = mode

    def _through_penalty(self, prior) -> bool:
        """Whether the layer's prior goes through its law's penalty in ``self.mode``
        (``"fast"``, ``"fused"`` or ``"subspace"``)."""
        return mode_kind(self.mode, prior) == "penalty"

    def check(self, name, prior, selected):
        if name in selected["spectral"] or name in selected["enumerated"]:
            raise ValueError(f"layer {name!r}: tracked spectra apply to a plain weight prior, not "
                             "with spectral= or enumerate_rank=")
        try:
            TrackedSpectralPrior(prior, None, self.mode)  # validates the law, measure, shape
            if self._through_penalty(prior):
                _tail_penalty_for(prior, self.mode)
        except ValueError as err:
            raise ValueError(f"layer {name!r}: {err}") from None

    def install(self, bn, slot, prior):
        weight = getattr(slot.module, slot.attr).detach().clone()
        bn._priors[slot.row] = prior
        tracker = TRACKERS[self.mode if self._through_penalty(prior)
                           else law_entry(TRACKED_LAWS, prior).tracker]
        setattr(slot.module, slot.attr,
                PyroSample(tracker(bn, slot, prior, weight, self.power_iterations)))
        bn.tracked_layers.append(slot.row)
        site = slot.site()
        bn._initial[site] = weight
        return site


def site_installers(orthogonal_map: str, power_iterations: int,
                    tracked_mode: str = "tracked") -> dict[str, SiteInstaller]:
    """Kind -> installer, with the options of :func:`bayesian` that shape the sites."""
    return {
        "weight": LatentWeightSite(),
        "tracked": TrackedSite(power_iterations, tracked_mode),
        "spectral": SpectralSite(orthogonal_map),
        "enumerated": EnumeratedRankSite(),
    }
