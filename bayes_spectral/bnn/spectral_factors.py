"""Layer 4: the spectral parameterisation ``W = U diag(s) V^T`` of one layer's weight.

``W`` (flattened view ``m x n`` for conv kernels, reshaped back) is rebuilt before every
forward call from orthonormal ``U`` (``m x r``) and ``V`` (``n x r``), kept orthonormal by
:func:`torch.nn.utils.parametrizations.orthogonal` (point estimates, registered with
``pyro.module``), and the singular values ``s`` (the latent site ``<layer>.spectral_s``,
prior :class:`~bayes_spectral.bnn.site_priors.SingularValuePrior`): no SVD per step.
"""

from __future__ import annotations

import math

import pyro
import torch
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

__all__ = ["ORTHOGONAL_MAPS", "SpectralFactors", "spectral_pre_hook"]

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


def spectral_pre_hook(layer: nn.Module, args) -> None:
    """Forward pre-hook of a spectrally parameterised layer: register ``U``, ``V`` with
    Pyro, draw ``s`` (its ``spectral_s`` site) and set ``layer.weight = U diag(s) V^T``."""
    factors = layer.spectral
    fullname = layer._pyro_get_fullname("spectral")
    pyro.module(fullname, factors, update_module_params=True)
    s = layer.spectral_s
    layer.weight = factors(s)
