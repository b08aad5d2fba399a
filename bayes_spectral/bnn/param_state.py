"""Layer 4: the parameter state a fit owns (its param store entries, its modules' tensors).

Pyro keeps point estimates in a global param store that every ``fit`` clears, and
``PyroModule`` / ``AutoGuide`` parameters re-read the store by name: with two fits of
networks with the same layer names, the first one's guide would silently read the second
one's values. :class:`ParamState` is a snapshot (detached clones, ties kept) of

* the param store entries (unconstrained values and constraints), and
* every parameter and buffer of the fit's modules (the network and its guide),

taken when the fit ends. :meth:`ParamState.installed` swaps them in (the store's dicts and the
modules' tensor *objects*, nothing is copied into tensors that another fit may share) and
swaps the previous ones back on exit. With ``pyro.settings.set(module_local_params=True)``
the store is empty and the module tensors carry the whole state.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pyro
import torch
from torch import nn

__all__ = ["ParamState", "register_local_params", "restart_modules"]

Slots = dict[tuple[str, str, str], torch.Tensor]  # (module path, "p" or "b", name) -> tensor


def _slots(module: nn.Module) -> Slots:
    """The tensor objects held by ``module`` and its submodules, by slot."""
    out: Slots = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        for name, t in sub._parameters.items():
            if t is not None:
                out[(path, "p", name)] = t
        for name, t in sub._buffers.items():
            if t is not None:
                out[(path, "b", name)] = t
    return out


def _clone(t: torch.Tensor, memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """A detached clone (an ``nn.Parameter`` for a parameter), one per original tensor."""
    if id(t) not in memo:
        c = t.detach().clone()
        memo[id(t)] = nn.Parameter(c, requires_grad=t.requires_grad) \
            if isinstance(t, nn.Parameter) else c
    return memo[id(t)]


def _put(module: nn.Module, slots: Slots) -> None:
    """Point ``module``'s slots at the given tensor objects (missing slots are skipped)."""
    subs = dict(module.named_modules(remove_duplicate=False))
    for (path, kind, name), t in slots.items():
        sub = subs.get(path)
        table = None if sub is None else (sub._parameters if kind == "p" else sub._buffers)
        if table is not None and name in table:
            table[name] = t


class ParamState:
    """Snapshot of a fit's parameters: see the module docstring."""

    def __init__(self, modules: dict[str, nn.Module | None]):
        store = pyro.get_param_store()
        memo: dict[int, torch.Tensor] = {}
        self.store = {k: _clone(v, memo) for k, v in store._params.items()}
        self.constraints = dict(store._constraints)
        self.modules = {key: (m, {s: _clone(t, memo) for s, t in _slots(m).items()})
                        for key, m in modules.items() if m is not None}
        self._depth = 0

    @contextmanager
    def installed(self) -> Iterator[None]:
        """Context: the snapshot installed in the param store and the modules; everything
        put back on exit (re-entrant)."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        store = pyro.get_param_store()
        saved_store = (store._params, store._param_to_name, store._constraints)
        saved_mods = [(m, _slots(m)) for m, _ in self.modules.values()]
        self._depth = 1
        try:
            store._params = dict(self.store)
            store._param_to_name = {v: k for k, v in self.store.items()}
            store._constraints = dict(self.constraints)
            for m, slots in self.modules.values():
                _put(m, slots)
            yield
        finally:
            self._depth = 0
            for m, slots in saved_mods:
                _put(m, slots)
            store._params, store._param_to_name, store._constraints = saved_store

    def named_values(self) -> dict[str, torch.Tensor]:
        """Detached clones by name: the param store's names (unconstrained values); with an
        empty store (module-local params) the modules' parameters, named as the store
        would (``<guide name>.<path>``, ``_unconstrained`` dropped)."""
        if self.store:
            return {k: v.detach().clone() for k, v in self.store.items()}
        out = {}
        for key, (m, slots) in self.modules.items():
            prefix = "" if key == "model" else getattr(m, "_pyro_name", key) + "."
            for (path, kind, name), t in slots.items():
                if kind == "p":
                    full = ".".join(x for x in (path, name.removesuffix("_unconstrained")) if x)
                    out.setdefault(prefix + full, t.detach().clone())
        return out


def restart_modules(model: nn.Module) -> None:
    """Refitting is a restart: the first call records ``model``'s parameters and buffers
    (the state :func:`~bayes_spectral.bayesian` left); every later call points the model at
    fresh clones of that record, so a refit never continues half of a previous fit (the
    guide's values restart at the module's weights as well)."""
    record = getattr(model, "_bs_start_state", None)
    if record is None:
        memo: dict[int, torch.Tensor] = {}
        model.__dict__["_bs_start_state"] = {s: _clone(t, memo) for s, t in _slots(model).items()}
        return
    memo = {}
    _put(model, {s: _clone(t, memo) for s, t in record.items()})


def register_local_params(model: nn.Module, guide: nn.Module | None) -> None:
    """With ``pyro.settings.set(module_local_params=True)`` the modules keep their own
    parameters and the param store stays empty; enter them in the store under the names the
    store would use (the same tensor objects, which local-parameter modules never read back)
    so that early stopping, checkpoints and optimiser state, which address parameters by
    store name, work in both modes. A no-op with global parameters."""
    if not pyro.settings.get("module_local_params"):
        return
    store = pyro.get_param_store()
    for key, module in (("model", model), ("guide", guide)):
        if module is None:
            continue
        prefix = "" if key == "model" else getattr(module, "_pyro_name", key) + "."
        for name, p in module.named_parameters():
            full = prefix + name.removesuffix("_unconstrained")
            if full not in store._params:
                store._params[full] = p
                store._param_to_name[p] = full
                store._constraints.setdefault(full, _constraint_of(module, name))


def _constraint_of(module: nn.Module, name: str):
    """The constraint of PyroParam ``name`` (``<path>.<attr>_unconstrained``), else real."""
    from torch.distributions import constraints

    path, _, attr = name.rpartition(".")
    sub = module.get_submodule(path) if path else module
    entry = sub.__dict__.get("_pyro_params", {}).get(attr.removesuffix("_unconstrained"))
    return entry[0] if entry else constraints.real
