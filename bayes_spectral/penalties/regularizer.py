"""Attach a penalty to selected layers of any ``nn.Module``: ``loss = task + reg(model)``."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..select import pick_modules
from .base import Penalty

__all__ = ["Regularizer"]


class Regularizer:
    """A penalty applied to the selected weight layers of ``model``, with a per-layer log.

    Selection (all given criteria must hold; none given = every Linear/Conv layer):

    * ``types``: module classes (e.g. ``nn.Linear``);
    * ``names``: exact module names (``model.named_modules()``);
    * ``pattern``: a regular expression, ``re.search`` on module names.

    Unknown names, a pattern or type that selects nothing, and selected modules without a
    ``>= 2``-D ``weight`` raise a ValueError. ``reg(model)`` (or ``reg()``) returns the
    summed penalty; ``reg.loss(task_loss)`` returns ``task_loss + reg(model)``.
    ``history[layer]`` lists the penalty value of every call (``log=False`` to skip; the
    values are read back with one device sync per call). ``set_epoch`` is forwarded to the
    penalty (schedules).
    """

    def __init__(self, model: nn.Module, penalty: Penalty, *,
                 types: type | tuple[type, ...] | None = None,
                 names: str | Iterable[str] | None = None,
                 pattern: str | None = None, log: bool = True) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Regularizer needs an nn.Module, got {type(model).__name__}")
        if not isinstance(penalty, Penalty):
            raise TypeError(f"penalty must be a Penalty, got {type(penalty).__name__}")
        self.model = model
        self.penalty = penalty
        self.log = bool(log)
        selection = pick_modules(model, types=types, names=names, pattern=pattern,
                                 mode="search")
        self.layers: dict[str, nn.Module] = selection.modules()
        self.history: dict[str, list[float]] = {n: [] for n in self.layers}

    def set_epoch(self, epoch: int) -> None:
        self.penalty.set_epoch(epoch)

    def per_layer(self) -> dict[str, torch.Tensor]:
        """Penalty of every selected layer (scalar tensors, with graph)."""
        out = {}
        for n, m in self.layers.items():
            out[n] = self.penalty(m.weight, name=n)  # checked for finiteness, naming n
        return out

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        if model is not None and model is not self.model:
            raise ValueError("this Regularizer is attached to another model")
        return self._record(self.per_layer())

    def _record(self, vals: dict[str, torch.Tensor]) -> torch.Tensor:
        """Log the per-layer values (one device sync) and return their sum."""
        if self.log:
            floats = torch.stack([v.detach() for v in vals.values()]).tolist()
            for n, f in zip(vals, floats, strict=True):
                self.history[n].append(f)
        return torch.stack(list(vals.values())).sum()

    def accumulate_grad(self, scale: float = 1.0) -> torch.Tensor:
        """After ``task_loss.backward()``: add ``scale * dR/dW`` to every selected weight's
        ``.grad`` in place (allocated if ``None``) and return ``scale * R`` (detached).

        The same update as ``(task_loss + scale * reg()).backward()`` (tested to float64
        round-off) without a graph through the penalty: weight decay and spectral norm then
        cost one fused pass over each weight instead of autograd's extra gradient buffers
        and accumulation (``benchmarks/bench_penalties.py``, rows ``[grad]``).
        """
        vals = {}
        for n, m in self.layers.items():
            w = m.weight
            if w.grad is None:
                w.grad = torch.zeros_like(w)
            vals[n] = self.penalty.accumulate_grad(w, w.grad, name=n, scale=scale)
        return self._record(vals)

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``task_loss + reg(model)``."""
        return task_loss + self()
