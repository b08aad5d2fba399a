"""Layer 4: plain ``nn.Module`` copies of a fitted network with given weights.

:func:`plain_module` deep-copies ``bn.net`` (the converted copy of the user's module),
turns every ``PyroModule[Base]`` back into ``Base``, and sets each prior layer's ``weight``
to an ``nn.Parameter`` holding its value for the given latent draw (spectrally
parameterised layers: ``U diag(s) V^T`` through :meth:`BayesianNetwork.weight_of`, the
factors and the pre-hook removed). Parameters without a prior keep their fitted values; a
``PyroParam`` becomes an ``nn.Parameter`` holding its constrained value. The result runs
without Pyro: its forward is the network's forward at those weights.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import transform_to

from .network import BayesianNetwork
from .slots import freeze_slots

__all__ = ["plain_module"]


def _depyro(module: nn.Module) -> None:
    """In place: ``PyroModule[Base]`` -> ``Base``; PyroSample sites dropped, PyroParams
    replaced by parameters holding their constrained values."""
    for sub in module.modules():
        if not isinstance(sub, PyroModule):
            continue
        params = sub.__dict__.get("_pyro_params", {})
        for name, (constraint, _) in list(params.items()):
            raw = sub._parameters.pop(name + "_unconstrained")
            value = transform_to(constraint)(raw.detach()).clone()
            sub._parameters[name] = nn.Parameter(value)
        for key in ("_pyro_params", "_pyro_samples", "_pyro_name", "_pyro_context"):
            sub.__dict__.pop(key, None)
        base = type(sub).__bases__[0]
        if _generated(type(sub), base):
            sub.__class__ = base
        for hooks in (sub._forward_pre_hooks, sub._forward_hooks):
            for key in [k for k, h in hooks.items() if _ours(h)]:
                del hooks[key]


def _generated(cls: type, base: type) -> bool:
    """Whether ``cls`` is ``PyroModule[base]`` (made by ``to_pyro_module_``)."""
    try:
        return issubclass(base, nn.Module) and not issubclass(base, PyroModule) \
            and PyroModule[base] is cls
    except TypeError:  # pragma: no cover - a base PyroModule cannot index
        return False


def _ours(hook) -> bool:
    """A hook this library put on the network (the bare-call warning of ``result.py``)."""
    return getattr(hook, "_bayes_spectral_hook", False)


def plain_module(bn: BayesianNetwork, latent: Mapping[str, torch.Tensor]) -> nn.Module:
    """A plain copy of ``bn.net`` whose prior rows hold the weights of ``latent``
    (``{site: value}``, one draw), in eval mode."""
    net = copy.deepcopy(bn.net)
    freeze_slots(net, latent)
    _depyro(net)
    return net.eval()
