"""The penalty protocol: a callable on a weight (or on every weight layer of a module)."""

from __future__ import annotations

import torch
from torch import nn

from .._checks import check_weight
from ..select import LINEAR_CONV, weight_modules

__all__ = ["Penalty", "weight_layers_of", "check_finite"]

def weight_layers_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every Linear / Conv1d-3d layer (``<root>`` for the module itself).

    The weights are taken as they are (no shape check); see
    :func:`bayes_spectral.select.weight_modules`.
    """
    view = weight_modules(module, types=LINEAR_CONV, min_dim=None)
    return [(row.name, row.weight) for row in view.rows]


def check_finite(value: torch.Tensor, name: str | None, what: str) -> torch.Tensor:
    """Raise a ValueError naming the layer if a penalty value is NaN or Inf."""
    if not bool(torch.isfinite(value).all()):
        where = f" of layer {name!r}" if name else ""
        raise ValueError(f"{what} penalty{where} is not finite ({float(value.detach())}); "
                         "check the weight scale and the hyperparameters")
    return value


class Penalty:
    """Base class: ``penalty(weight, name=None)`` or ``penalty(module)`` -> scalar tensor.

    Subclasses implement :meth:`weight_penalty` for one weight tensor. Calling on an
    ``nn.Module`` sums over its Linear/Conv weights (biases and norms are never
    penalised); use :class:`~bayes_spectral.penalties.Regularizer` to select layers and log
    per-layer values. ``name`` identifies the layer in errors and keys the per-layer state
    of stateful penalties (power iteration vectors, tracked subspaces).
    """

    label = "penalty"

    def weight_penalty(self, weight: torch.Tensor, name: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Hook for schedules; plain penalties ignore it."""

    def __call__(self, target: torch.Tensor | nn.Module, name: str | None = None) -> torch.Tensor:
        if isinstance(target, nn.Module):
            layers = weight_layers_of(target)
            if not layers:
                raise ValueError(f"{type(target).__name__} has no Linear/Conv weight to penalise")
            vals = [self(w, name=n) for n, w in layers]
            return torch.stack(vals).sum()
        if not isinstance(target, torch.Tensor) or not target.is_floating_point() \
                or target.dim() < 2:
            check_weight(target, name)  # raises the clear TypeError / ValueError
        # Hot path: no pass over the weight for finiteness; a non-finite weight shows up as
        # a non-finite value (or a linalg failure) and is diagnosed then, naming the layer.
        try:
            value = self.weight_penalty(target, name)
        except RuntimeError:
            check_weight(target, name)
            raise
        return self._checked_value(value, target, name)

    def accumulate_grad(self, weight: torch.Tensor, grad: torch.Tensor, name: str | None = None,
                        scale: float = 1.0) -> torch.Tensor:
        """``grad += scale * dR/dW`` in place; returns ``scale * R(W)`` (detached).

        The penalty's gradient without a graph through the training loss: call it after
        ``loss.backward()`` (see :meth:`Regularizer.accumulate_grad`). This default runs
        autograd on a detached copy of ``weight`` (right for every penalty, and advances
        stateful ones exactly as a call does); penalties with a closed-form gradient
        override it with one fused in-place update (weight decay: ``grad += scale coef W``;
        spectral norm: ``grad += scale coef sigma u v^T``).
        """
        leaf = weight.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self(leaf, name=name)
        if value.requires_grad:
            (g,) = torch.autograd.grad(value, leaf)
            grad.add_(g, alpha=scale)
        return scale * value.detach()

    def _checked_value(self, value: torch.Tensor, weight: torch.Tensor,
                       name: str | None) -> torch.Tensor:
        """The finiteness check of ``__call__`` for values computed without it."""
        if not bool(torch.isfinite(value)):
            check_weight(weight, name)
        return check_finite(value, name, self.label)

    @staticmethod
    def _key(weight: torch.Tensor, name: str | None) -> str:
        return name if name is not None else f"id{id(weight)}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
