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
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

__all__ = ["ORTHOGONAL_MAPS", "SpectralFactors", "SpectralWeight"]

#: the maps of :func:`torch.nn.utils.parametrizations.orthogonal`
ORTHOGONAL_MAPS = ("cayley", "matrix_exp", "householder")


class SpectralFactors(nn.Module):
    """Orthonormal ``U`` (``m x r``) and ``V`` (``n x r``) of a weight, initialised by SVD."""

    def __init__(self, weight: torch.Tensor, orthogonal_map: str = "cayley"):
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        m, n = weight.shape[0], math.prod(weight.shape[1:])
        r = min(m, n)
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.detach().reshape(m, n), full_matrices=False)
        self.u = orthogonal(nn.Linear(r, m, bias=False, dtype=weight.dtype),
                            orthogonal_map=orthogonal_map)
        self.v = orthogonal(nn.Linear(r, n, bias=False, dtype=weight.dtype),
                            orthogonal_map=orthogonal_map)
        with torch.no_grad():
            self.u.weight = u
            self.v.weight = vh.transpose(0, 1).contiguous()
        self.initial_s = s.detach().clone()

    def initial_s_like(self) -> torch.Tensor:
        """A tensor on the factors' device and dtype (priors follow it)."""
        return self.u.parametrizations.weight.original

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """``U diag(s) V^T``, reshaped to the weight's shape."""
        return ((self.u.weight * s) @ self.v.weight.transpose(0, 1)).reshape(self.weight_shape)


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
        # register U, V with Pyro and use the store's tensors (PyroModule's own statement
        # does not update the module: the store holds a contiguous copy of U's original)
        pyro.module(owner._pyro_get_fullname(self.factors), factors, update_module_params=True)
        return factors(getattr(owner, self.singular_values))
