"""Layer 4: the spectral parameterisation ``W = U diag(s) V^T`` of one layer's weight.

``W`` (flattened view ``m x n`` for conv kernels, reshaped back) is rebuilt on every read of
the weight (a :mod:`torch.nn.utils.parametrize` parametrization, :class:`SpectralWeight`)
from orthonormal ``U`` (``m x r``) and ``V`` (``n x r``), kept orthonormal by
:func:`torch.nn.utils.parametrizations.orthogonal` (point estimates, registered with
``pyro.module``), and the singular values ``s`` (the latent site ``<layer>.spectral_s``, or
``<module>.<attr>_spectral_s`` for another attribute such as ``in_proj_weight[q]``;
prior :class:`~bayes_spectral.bnn.site_priors.SingularValuePrior`): no SVD per step.
"""

from __future__ import annotations

import math

import pyro
import torch
from pyro.params.param_store import param_with_module_name
from pyro.poutine.runtime import effectful
from torch import nn
from torch.distributions import constraints
from torch.nn.utils.parametrizations import orthogonal

__all__ = ["ORTHOGONAL_MAPS", "SpectralFactors", "SpectralWeight", "register_factors"]

#: the maps of :func:`torch.nn.utils.parametrizations.orthogonal`
ORTHOGONAL_MAPS = ("cayley", "matrix_exp", "householder")


class SpectralFactors(nn.Module):
    """Orthonormal ``U`` (``m x r``) and ``V`` (``n x r``) of a weight, initialised by SVD.

    Deterministic: ``orthogonal`` keeps ``U = B Q(A)[:, :r]`` with a fixed orthonormal basis
    ``B`` (``m x m``) whose first ``r`` columns are the SVD's vectors; torch completes ``B``
    with a ``randn`` draw, here it is the full SVD's basis (a function of the weight only),
    and building draws nothing from the global RNG (so a fit with a given seed does not
    depend on the RNG state when the model was built). The unconstrained tensors are
    contiguous, so the param store holds the module's own tensors, never a copy."""

    def __init__(self, weight: torch.Tensor, orthogonal_map: str = "cayley"):
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        m, n = weight.shape[0], math.prod(weight.shape[1:])
        r = min(m, n)
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.detach().reshape(m, n), full_matrices=True)
        devices = [weight.device] if weight.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # nn.Linear's init, torch's completion
            self.u = _orthonormal(u, r, orthogonal_map)
            self.v = _orthonormal(vh.transpose(0, 1), r, orthogonal_map)
        self.initial_s = s.detach().clone()

    def initial_s_like(self) -> torch.Tensor:
        """A tensor on the factors' device and dtype (priors follow it)."""
        return self.u.parametrizations.weight.original

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``U diag(s) V^T``, reshaped to the weight's shape."""
        return ((self.u.weight * s) @ self.v.weight.transpose(0, 1)).reshape(self.weight_shape)


def _orthonormal(basis: torch.Tensor, r: int, orthogonal_map: str) -> nn.Module:
    """``orthogonal(Linear(r, k))`` (``k = basis.shape[0]``) whose weight is
    ``basis[:, :r]``, with the completion ``base = basis`` (the whole orthonormal basis)."""
    k = basis.shape[0]
    lin = orthogonal(nn.Linear(r, k, bias=False, dtype=basis.dtype, device=basis.device),
                     orthogonal_map=orthogonal_map)
    with torch.no_grad():
        lin.weight = basis[:, :r].contiguous()
        param = lin.parametrizations.weight
        if getattr(param[0], "base", None) is not None:
            param[0].base.copy_(basis)
        param.original.data = param.original.data.contiguous()
    return lin


class SpectralWeight(nn.Module):
    """Parametrization (:mod:`torch.nn.utils.parametrize`) of ``owner.<attr>`` as
    ``U diag(s) V^T``, ``U, V`` from ``owner.<factors>`` (a :class:`SpectralFactors`) and ``s``
    from ``owner.<singular_values>`` (the latent site). Read on every access of the
    attribute, so it also holds where a module reads another's weight without calling it
    (``nn.MultiheadAttention`` and ``out_proj.weight``), unlike a forward hook."""

    def __init__(self, owner: nn.Module, factors: str, singular_values: str):
        super().__init__()
        self.__dict__["_owner"] = owner  # not a submodule: no cycle; deepcopy maps it
        self.factors, self.singular_values = factors, singular_values

    def forward(self, _unused: torch.Tensor) -> torch.Tensor:
        owner = self.__dict__["_owner"]
        factors = owner._modules[self.factors]
        register_factors(owner._pyro_get_fullname(self.factors), factors)
        return factors(getattr(owner, self.singular_values))


def register_factors(name: str, factors: nn.Module) -> None:
    """Param statements ``<name>$$$<param>`` for the factors' (unconstrained) tensors.

    The module owns them: with global parameters the store's entry is pointed at the
    module's own tensor (an entry that another network left under the same name is
    replaced, never adopted: adopting it made a fit start from, or crash on, the previous
    network's ``U``, ``V``); with module-local parameters only the statements are made (as
    ``PyroModule`` does for a plain submodule)."""
    local = pyro.settings.get("module_local_params")
    store = pyro.get_param_store()
    for pname, p in factors.named_parameters():
        full = param_with_module_name(name, pname)
        if local:
            effectful(type="param")(lambda *_, _p=p, **__: _p)(
                full, p, constraint=constraints.real, name=full)
            continue
        live = store._params.get(full)
        if live is not p:
            if live is not None:
                store._param_to_name.pop(live, None)
            store._params[full] = p
            store._param_to_name[p] = full
            store._constraints[full] = constraints.real
        pyro.param(full)
