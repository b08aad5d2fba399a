"""Layer 4: :class:`MultiAdam`, Pyro's ``Adam`` as ONE multi-tensor ``torch.optim.Adam``.

``pyro.optim.Adam`` (a :class:`~pyro.optim.optim.PyroOptim`) keeps one ``torch.optim.Adam``
per parameter and steps them one by one: a Python-level ``Optimizer.step`` and a loop of
single-tensor kernels per parameter, every SVI step. :class:`MultiAdam` keeps the
``PyroOptim`` interface (``SVI`` accepts it; ``get_state``/``set_state``/``save``/``load``)
and holds one ``torch.optim.Adam`` whose param groups collect every parameter SVI passes
(one group per distinct argument dict; a new parameter joins its group when first seen).
The update is Adam's, per parameter ``p`` with gradient ``g`` and step ``t``::

    m <- beta1 m + (1 - beta1) g,   v <- beta2 v + (1 - beta2) g^2
    p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

* ``fused=False``: torch's ``foreach`` kernels; the same operations as the single-tensor
  path in the same order, so the result equals ``pyro.optim.Adam``'s bit for bit
  (``tests/bnn/test_multi_optim.py``). On CPU about as fast as Pyro's (``_foreach`` ops
  loop over the tensors there); on CUDA fewer kernel launches.
* ``fused=True``: torch's fused kernel, one pass over each tensor's memory instead of about
  seven (the optimiser step 4-5x faster than Pyro's on CPU for the 784-512-512-10 mean-field
  guide, ``benchmarks/bench_svi.py``); other rounding: each update within ~1e-6 relative of
  Pyro's (measured 6e-7 after 20 steps). A parameter the fused kernel does not support
  (integer dtype, a device torch lists no fused kernel for) joins a ``foreach`` group.

As with ``PyroOptim``, only the parameters passed are stepped (a parameter SVI did not pass
keeps its value and moments: its gradient is hidden for that step), ``clip_args``
(``clip_norm`` / ``clip_value``) clip each parameter's gradient on its own, and
``optim_args`` may be a callable of the parameter's name. ``get_state`` has Pyro's format,
``{param_name: torch Adam state_dict of that parameter alone}``, so checkpoints move between
``pyro.optim.Adam`` and :class:`MultiAdam` both ways; ``set_state`` loads the moments of
parameters already seen at once, the others when first seen. The hyperparameters are the
constructor's (the saved ``param_groups`` are not applied). The torch optimiser is
``torch_optim`` (``None`` before the first step): a ``torch.optim.lr_scheduler`` may wrap it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pyro
import torch
from pyro.optim import PyroOptim

from .._io import atomic_path, load_tensors

try:  # torch's list of the devices with fused optimiser kernels (private, since torch 2.0)
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
except ImportError:  # pragma: no cover - an older or newer torch without it
    def _get_fused_kernels_supported_devices() -> list[str]:
        return ["cpu", "cuda"]

__all__ = ["OPTIMIZERS", "MultiAdam", "svi_optim"]

#: the kinds :func:`svi_optim` builds (the first is ``fit``'s default)
OPTIMIZERS = ("fused", "multi", "pyro")


def load_by_name(optim, state_dict: dict) -> None:
    """``{param_name: state}`` into a one-optimiser ``PyroOptim`` (``optim._seen``, its
    parameters so far; ``optim._load(p, state)``): a parameter already seen at once, the
    others kept in ``optim._waiting`` until SVI first passes them."""
    store = pyro.get_param_store()
    by_name = {store.param_name(p): p for p in optim._seen}
    for name, state in state_dict.items():
        if name in by_name:
            optim._load(by_name[name], state)
        else:
            optim._waiting[name] = state


class MultiAdam(PyroOptim):
    """``pyro.optim.Adam`` as one multi-tensor ``torch.optim.Adam`` (module docstring).

    :param optim_args: ``torch.optim.Adam``'s arguments (``lr``, ``betas``, ``eps``,
        ``weight_decay``, ``amsgrad``, ...), or a callable of the parameter's name giving them.
    :param clip_args: ``{"clip_norm": c}`` and/or ``{"clip_value": c}``, per parameter (as
        Pyro's).
    :param fused: torch's fused kernel instead of ``foreach`` (within rounding of Pyro's).
    """

    def __init__(self, optim_args: dict | Callable[..., dict],
                 clip_args: dict | Callable[..., dict] | None = None, *, fused: bool = False):
        super().__init__(torch.optim.Adam, optim_args, clip_args)
        self.fused = bool(fused)
        self.torch_optim: torch.optim.Adam | None = None
        self._groups: dict[Any, dict] = {}  # argument key -> its param group
        self._seen: dict[torch.Tensor, dict] = {}  # parameter -> its param group
        self._waiting: dict[str, dict] = {}  # name -> state of a parameter not seen yet

    # -- parameters -------------------------------------------------------------------
    def _kernel_args(self, p: torch.Tensor) -> dict:
        """``fused=True`` where torch has the fused kernel for ``p``, else ``foreach``."""
        fused = (self.fused and p.is_floating_point()
                 and p.device.type in _get_fused_kernels_supported_devices())
        return {"fused": True, "foreach": False} if fused else {"fused": False, "foreach": True}

    def _add(self, p: torch.Tensor) -> None:
        """Put ``p`` in the group of its arguments (a new group, or the optimiser, first)."""
        args = {**self._get_optim_args(p), **self._kernel_args(p)}
        key = repr(sorted(args.items()))
        group = self._groups.get(key)
        if group is not None:
            group["params"].append(p)
        elif self.torch_optim is None:
            self.torch_optim = torch.optim.Adam([p], **args)
            group = self.torch_optim.param_groups[0]
        else:
            self.torch_optim.add_param_group({"params": [p], **args})
            group = self.torch_optim.param_groups[-1]
        self._groups[key] = group
        self._seen[p] = group
        self.grad_clip[p] = self._get_grad_clip(p)
        state = self._waiting.pop(pyro.get_param_store().param_name(p), None)
        if state is not None:
            self._load(p, state)

    def __call__(self, params: Iterable[torch.Tensor], *args, **kwargs) -> None:
        """One Adam step of the parameters ``params`` (those with a gradient), in one call
        of the multi-tensor kernels; the other parameters are left as they are."""
        params = list(params)
        for p in params:
            if p not in self._seen:
                self._add(p)
            clip = self.grad_clip[p]
            if clip is not None:
                clip(p)
        if self.torch_optim is None:
            return
        passed = set(params)
        hidden = [(p, p.grad) for p in self._seen if p.grad is not None and p not in passed]
        for p, _ in hidden:
            p.grad = None
        try:
            self.torch_optim.step(*args, **kwargs)
        finally:
            for p, grad in hidden:
                p.grad = grad

    # -- state ------------------------------------------------------------------------
    def _param_state(self, p: torch.Tensor) -> dict:
        """``p``'s state as the ``state_dict`` of a ``torch.optim.Adam`` holding ``p`` alone."""
        group = {k: v for k, v in self._seen[p].items() if k != "params"}
        state = self.torch_optim.state.get(p) if self.torch_optim is not None else None
        return {"state": {0: dict(state)} if state else {},
                "param_groups": [{**group, "params": [0]}]}

    def get_state(self) -> dict:
        """``{param_name: state_dict}`` in ``pyro.optim.Adam``'s format (tensors not copied,
        as ``state_dict``)."""
        store = pyro.get_param_store()
        return {store.param_name(p): self._param_state(p) for p in self._seen}

    def set_state(self, state_dict: dict) -> None:
        """Load ``get_state()``'s output (of :class:`MultiAdam` or ``pyro.optim.Adam``):
        parameters already seen at once, the others when first seen."""
        load_by_name(self, state_dict)

    def _load(self, p: torch.Tensor, state: dict) -> None:
        """The moments and step of one parameter's ``state_dict`` into the optimiser (cast
        as ``Optimizer.load_state_dict`` does: ``step`` stays a float32 CPU tensor unless
        fused; the moments take ``p``'s dtype and device)."""
        inner = next(iter(state.get("state", {}).values()), None)
        if inner is None:
            self.torch_optim.state.pop(p, None)
            return
        loaded = {}
        for key, value in inner.items():
            if key == "step":
                device = p.device if self._seen[p]["fused"] else "cpu"
                value = torch.as_tensor(value).to(device, torch.float32)
            elif torch.is_tensor(value):
                value = value.to(p.device, p.dtype)
            loaded[key] = value.clone() if torch.is_tensor(value) else value
        self.torch_optim.state[p] = loaded

    def save(self, filename) -> None:
        """Write :meth:`get_state` atomically (``bayes_spectral._io.atomic_path``)."""
        with atomic_path(filename) as tmp:
            torch.save(self.get_state(), tmp)

    def load(self, filename, map_location=None) -> None:
        """Read a :meth:`save`-d state safely (``weights_only=True``) and :meth:`set_state`
        it."""
        self.set_state(load_tensors(filename, map_location=map_location or "cpu"))


def svi_optim(lr: float, kind: str = "fused") -> PyroOptim:
    """The optimiser of ``fit``'s MAP/SVI runs: ``"fused"`` (default; :class:`MultiAdam`
    with the fused kernel: within rounding of ``pyro.optim.Adam``, the fastest), ``"multi"``
    (:class:`MultiAdam`, foreach: equal to ``pyro.optim.Adam`` bit for bit) or ``"pyro"``
    (``pyro.optim.Adam``, one torch Adam per parameter)."""
    if kind == "multi":
        return MultiAdam({"lr": lr})
    if kind == "fused":
        return MultiAdam({"lr": lr}, fused=True)
    if kind == "pyro":
        return pyro.optim.Adam({"lr": lr})
    raise ValueError(f"bnn: optimizer must be one of {OPTIMIZERS}, got {kind!r}")
