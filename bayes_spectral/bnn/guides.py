"""Layer 4: guides for :class:`bayes_spectral.bnn.network.BayesianNetwork` models.

Every guide starts from the module's own weights (its Kaiming init, or pretrained weights
if the module was trained before :func:`bayes_spectral.bayesian`): ``init_to_value`` with
:meth:`BayesianNetwork.initial_values`, never Pyro's default (a draw near the prior median,
which for a spectral law centred on zero is a dead network). Pass ``init_values`` to start
elsewhere (e.g. from a MAP fit: ``map_values(guide)``).

Guides only see the latent weight / singular-value sites (``poutine.block(expose=...)``),
so the enumerated spike-and-slab indicators stay to ``TraceEnum_ELBO``.

``GUIDES`` names the guide makers ``maker(model, **kwargs) -> AutoGuide`` that
:func:`make_guide` (and ``fit(..., guide="<name>")``) reads; users register their own:

    >>> from pyro.infer.autoguide import AutoLaplaceApproximation, init_to_value
    >>> @GUIDES.register("laplace")
    ... def laplace(model):
    ...     return AutoLaplaceApproximation(
    ...         poutine.block(model, expose=model.latent_sites),
    ...         init_loc_fn=init_to_value(values=model.initial_values()))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext

import torch
from pyro import poutine
from pyro.infer.autoguide import (
    AutoDelta,
    AutoGuide,
    AutoGuideList,
    AutoLowRankMultivariateNormal,
    AutoNormal,
    init_to_value,
)

from ..registry import Registry
from .fused_elbo import FusedNormal
from .network import BayesianNetwork
from .row_keys import pick_row_union

__all__ = [
    "GUIDES",
    "auto_delta",
    "auto_lowrank",
    "auto_normal",
    "fused_normal",
    "local_reparam",
    "make_guide",
    "map_values",
    "spectral_guide",
]

GuideMaker = Callable[..., AutoGuide]

#: attribute (in the guide's ``__dict__``) holding the :class:`~.param_state.ParamState` of
#: the ``FitResult`` that owns the guide (set by ``FitResult``; read by :func:`map_values`)
OWNER_STATE = "_bs_owner_state"

#: guide kind -> maker ``maker(model, **kwargs) -> AutoGuide``
GUIDES: Registry[GuideMaker] = Registry("guide")


def _check_model(model) -> None:
    if not isinstance(model, BayesianNetwork):
        raise TypeError(f"guides need a model built by bayes_spectral.bayesian(), got "
                        f"{type(model).__name__}")
    if not model.latent_sites:
        raise ValueError("the model has no prior on any layer: nothing to infer (give priors)")


def _init(model: BayesianNetwork, init_values: Mapping | None):
    # clones: AutoDelta / AutoNormal wrap their initial value in a Parameter that shares
    # its storage, so training would otherwise rewrite the network's initial weights
    values = {k: v.detach().clone() for k, v in model.initial_values().items()}
    if init_values is not None:
        unknown = set(init_values) - set(values)
        if unknown:
            raise ValueError(f"init_values: unknown sites {sorted(unknown)}; latent sites are "
                             f"{sorted(values)}")
        values.update({k: torch.as_tensor(v).detach().clone() for k, v in init_values.items()})
    return init_to_value(values=values)


def _split_sites(model: BayesianNetwork, layers) -> tuple[list[str], list[str]]:
    if layers is None:
        chosen = list(model.latent_sites)
    else:
        names = pick_row_union(layers, model.weight_rows, "layers")
        missing = [n for n in names if n not in model.prior_sites]
        if missing:
            raise ValueError(f"layers {missing} have no prior; layers with priors are "
                             f"{sorted(model.prior_sites)}")
        chosen = [model.prior_sites[n] for n in names]
    rest = [s for s in model.latent_sites if s not in chosen]
    return chosen, rest


def _compose(model, chosen, rest, make, init_values) -> AutoGuide:
    init = _init(model, init_values)
    if not rest:
        return make(poutine.block(model, expose=chosen), init)
    guide = AutoGuideList(model)
    guide.append(make(poutine.block(model, expose=chosen), init))
    guide.append(AutoDelta(poutine.block(model, expose=rest), init_loc_fn=init))
    return guide


@GUIDES.register("delta")
def auto_delta(model: BayesianNetwork, init_values: Mapping | None = None) -> AutoDelta:
    """MAP: a point mass on every latent site, initialised at the module's weights."""
    _check_model(model)
    return AutoDelta(poutine.block(model, expose=model.latent_sites),
                     init_loc_fn=_init(model, init_values))


@GUIDES.register("normal")
def auto_normal(model: BayesianNetwork, layers=None, init_scale: float = 0.01,
                init_values: Mapping | None = None) -> AutoGuide:
    """Mean-field Normal on the chosen ``layers`` (all prior layers by default); the other
    latent sites get ``AutoDelta``. ``init_scale``: initial posterior std (unconstrained)."""
    _check_model(model)
    chosen, rest = _split_sites(model, layers)
    return _compose(model, chosen, rest,
                    lambda m, init: AutoNormal(m, init_loc_fn=init, init_scale=init_scale),
                    init_values)


@GUIDES.register("lowrank")
def auto_lowrank(model: BayesianNetwork, layers=None, rank: int = 10,
                 init_scale: float = 0.01, init_values: Mapping | None = None) -> AutoGuide:
    """Low-rank-plus-diagonal Normal (``AutoLowRankMultivariateNormal``) jointly over the
    chosen ``layers``; the other latent sites get ``AutoDelta``."""
    _check_model(model)
    if int(rank) < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    chosen, rest = _split_sites(model, layers)
    return _compose(model, chosen, rest,
                    lambda m, init: AutoLowRankMultivariateNormal(
                        m, init_loc_fn=init, init_scale=init_scale, rank=int(rank)),
                    init_values)


@GUIDES.register("spectral")
def spectral_guide(model: BayesianNetwork, init_scale: float = 0.01,
                   init_values: Mapping | None = None) -> AutoGuide:
    """Variational law over singular values: ``s_i ~ LogNormal(mu_i, sd_i)`` independently
    for every spectrally parameterised layer (``AutoNormal`` on ``log s``, the positive
    support's bijection), with point-estimated singular vectors ``U``, ``V`` (parameters)
    and ``AutoDelta`` on the other latent sites."""
    _check_model(model)
    if not model.spectral_layers:
        raise ValueError("spectral_guide needs layers with the spectral parameterisation "
                         "(bayesian(..., spectral=...))")
    chosen = [model.prior_sites[n] for n in model.spectral_layers]
    rest = [s for s in model.latent_sites if s not in chosen]
    return _compose(model, chosen, rest,
                    lambda m, init: AutoNormal(m, init_loc_fn=init, init_scale=init_scale),
                    init_values)


@GUIDES.register("fused_normal")
def fused_normal(model: BayesianNetwork, init_scale: float = 0.01,
                 init_values: Mapping | None = None) -> FusedNormal:
    """Mean-field Normal on every latent site (``AutoNormal``) trained by the fused ELBO
    :class:`~bayes_spectral.bnn.fused_elbo.FusedELBO` (one model pass, analytic Gaussian
    entropy and Normal-prior terms): ``fit`` uses it; in a loop of your own give
    ``loss=guide.make_elbo()`` to ``SVI`` (with ``Trace_ELBO`` it is an ``AutoNormal``)."""
    _check_model(model)
    return FusedNormal(poutine.block(model, expose=model.latent_sites),
                       init_loc_fn=_init(model, init_values), init_scale=init_scale)


@GUIDES.register("local_reparam")
def local_reparam(model: BayesianNetwork, init_scale: float = 0.01,
                  init_values: Mapping | None = None) -> FusedNormal:
    """:func:`fused_normal` whose ELBO draws the pre-activations of Linear/Conv layers with a
    plain or tracked weight site by local reparameterisation
    (:mod:`~bayes_spectral.bnn.local_reparam`) instead of their weights."""
    _check_model(model)
    return FusedNormal(poutine.block(model, expose=model.latent_sites), local_reparam=True,
                       init_loc_fn=_init(model, init_values), init_scale=init_scale)


def make_guide(model: BayesianNetwork, kind: str = "delta", **kwargs) -> AutoGuide:
    """The guide of ``kind``, a name of ``GUIDES``: ``"delta"`` (MAP), ``"normal"``,
    ``"lowrank"``, ``"spectral"``, ``"fused_normal"``, ``"local_reparam"`` or one
    registered by the user; ``kwargs`` go to its maker."""
    if kind not in GUIDES:
        raise ValueError(f"guide kind must be one of {tuple(GUIDES.names())}, got {kind!r}")
    return GUIDES.get(kind)(model, **kwargs)


def map_values(guide, sites: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
    """Point values (median) of a fitted guide, detached clones: e.g. to start SVI from MAP.

    ``guide``: a ``FitResult`` (:meth:`FitResult.point_values`) or its ``res.guide``. A
    guide that a ``FitResult`` owns is read with that result's parameter snapshot installed
    (:attr:`OWNER_STATE`), never through Pyro's global param store, so its values do not
    change with later fits or ``pyro.clear_param_store()``; any other guide is read as it
    stands (its ``median()``)."""
    if hasattr(guide, "point_values"):
        med = guide.point_values()
    else:
        state = getattr(guide, "__dict__", {}).get(OWNER_STATE)
        with state.installed() if state is not None else nullcontext(), torch.no_grad():
            med = guide.median()
    return {k: v.detach().clone() for k, v in med.items() if sites is None or k in sites}
