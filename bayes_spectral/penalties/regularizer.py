"""Attach a penalty to selected layers of any ``nn.Module``: ``loss = task + reg(model)``."""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from .base import Penalty

__all__ = ["Regularizer"]

_DEFAULT_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _has_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= 2


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
        modules = dict(model.named_modules())
        if "" in modules:
            modules["<root>"] = modules.pop("")
        if types is None and names is None and pattern is None:
            chosen = [n for n, m in modules.items() if isinstance(m, _DEFAULT_TYPES)]
            if not chosen:
                raise ValueError(f"{type(model).__name__} has no Linear/Conv layer; "
                                 "select layers with types=, names= or pattern=")
        else:
            chosen = list(modules)
            if names is not None:
                wanted = [names] if isinstance(names, str) else list(names)
                unknown = [w for w in wanted if w not in modules]
                if unknown:
                    known = [n for n, m in modules.items() if _has_weight(m)]
                    raise ValueError(f"unknown layer names {unknown}; layers with weights: {known}")
                chosen = [n for n in chosen if n in wanted]
            if types is not None:
                tt = types if isinstance(types, tuple) else (types,)
                chosen = [n for n in chosen if isinstance(modules[n], tt)]
                if not chosen:
                    raise ValueError(f"no layer of type {[t.__name__ for t in tt]} selected")
            if pattern is not None:
                rx = re.compile(pattern)
                chosen = [n for n in chosen if rx.search(n) and
                          (names is not None or types is not None or _has_weight(modules[n]))]
                if not chosen:
                    raise ValueError(f"pattern {pattern!r} matches no layer with a weight; "
                                     f"layers: {[n for n, m in modules.items() if _has_weight(m)]}")
        bad = [n for n in chosen if not _has_weight(modules[n])]
        if bad:
            raise ValueError(f"selected layers without a >= 2-D weight: {bad}")
        self.layers: dict[str, nn.Module] = {n: modules[n] for n in chosen}
        self.history: dict[str, list[float]] = {n: [] for n in chosen}

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
