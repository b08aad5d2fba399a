"""Layer 4: local reparameterisation (Kingma, Salimans & Welling 2015) of Linear and Conv
layers under a mean-field Normal posterior on their weight.

With ``W_jk = mu_jk + sigma_jk eps_jk`` the pre-activations of one input row ``x`` are
Gaussian, ``b_j ~ N((x mu^T)_j, sum_k x_k^2 sigma_jk^2)`` (for a convolution the same sum
over each receptive field: ``conv(x^2, sigma^2)``), so the layer can draw ``b`` directly:
``b = x mu^T + sqrt(x^2 (sigma^2)^T) * xi``, ``xi ~ N(0, 1)`` per row and output unit. Each
row's marginal is that of weight sampling, so the expected log-likelihood (a sum over rows)
is unchanged; rows of a batch get independent noise, which lowers the gradient variance,
and no ``out x in`` noise tensor is drawn. The layer must run once per forward pass (a
weight shared between two calls would get two independent draws): :func:`noise_hooks`
raises otherwise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["LOCAL_TYPES", "local_noise_std", "noise_hooks", "supports_local"]

#: layer types whose pre-activation noise :func:`local_noise_std` knows
LOCAL_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def supports_local(module: nn.Module, attr: str) -> bool:
    """``True`` for the ``weight`` of a Linear/ConvNd layer without parametrizations."""
    return (attr == "weight" and isinstance(module, LOCAL_TYPES)
            and not torch.nn.utils.parametrize.is_parametrized(module))


def local_noise_std(module: nn.Module, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``sqrt(Var[b])`` of the pre-activations ``b`` of ``module`` on input ``x`` under
    ``W = mu + sigma * eps``: ``sqrt(x^2 (sigma^2)^T)`` (Linear) or
    ``sqrt(conv(x^2, sigma^2))`` (Conv, the layer's stride/padding/dilation/groups)."""
    sq = sigma.square()
    if isinstance(module, nn.Linear):
        var = nn.functional.linear(x.square(), sq)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        var = module._conv_forward(x.square(), sq, None)
    else:
        raise TypeError(f"local reparameterisation needs a Linear or Conv layer, got "
                        f"{type(module).__name__}")
    return var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()


class _NoiseHook:
    """Forward hook adding ``local_noise_std(x) * xi`` to the layer's output ``x mu^T + b``
    (the layer runs with its weight conditioned on ``mu``)."""

    def __init__(self, name: str, sigma: torch.Tensor) -> None:
        self.name, self.sigma, self.calls = name, sigma, 0

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls > 1:
            raise ValueError(f"layer {self.name!r} ran twice in one forward pass: local "
                             "reparameterisation draws its pre-activations per call; use the "
                             "guide 'fused_normal' (weight sampling) for shared layers")
        std = local_noise_std(module, inputs[0], self.sigma)
        return output + std * torch.empty_like(std).normal_()


@contextlib.contextmanager
def noise_hooks(layers: Sequence[tuple[str, nn.Module, torch.Tensor]]) -> Iterator[None]:
    """Within the block, each ``(name, module, sigma)`` layer adds its local noise (before
    the layer's own forward hooks run: they see the noisy pre-activations)."""
    handles = [module.register_forward_hook(_NoiseHook(name, sigma), prepend=True)
               for name, module, sigma in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
