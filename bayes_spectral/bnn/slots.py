"""Layer 4: where the latent value of one row of the parameter view lives in the converted
network (a :class:`Slot`: a module and one of its attributes), and the rewiring that makes
every row with a prior such an attribute.

* a plain weight (``fc.weight``, ``attn.out_proj.weight``, ``lstm.weight_hh_l0``,
  ``attn.in_proj_weight`` unsplit, ``emb.weight``): the attribute itself;
* a split row (``attn.in_proj_weight[q]``, ``lstm.weight_ih_l0[i]``): the fused parameter
  is cut into one parameter per part, named like the rows (``in_proj_weight[q]``, ...), and
  the fused attribute becomes a parametrization that concatenates the parts along dim 0
  (:class:`Concat`). Each part with a prior is then its own latent site, so the model's
  prior is the sum of the parts' priors; parts without a prior stay parameters;
* a parametrized weight (``weight_norm``, ``spectral_norm``): the parametrization is removed,
  keeping its effective value, which becomes the latent site (before conversion);
* a tied weight (one ``Parameter`` under several names): the first name holds the site;
  every other name becomes a parametrization returning it (:class:`TiedTo`), so the copies
  can never drift apart.

Parametrizations are :mod:`torch.nn.utils.parametrize` ones: the model reads them on every
attribute access, also where a module reads another's weight without calling it
(``nn.MultiheadAttention`` reads ``out_proj.weight``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from pyro.nn import PyroModule
from torch import nn
from torch.nn.utils import parametrize

from ..select import WeightRow

__all__ = ["Concat", "Slot", "TiedTo", "freeze_slots", "make_slots", "own_parametrized_class",
           "parametrize_attribute", "release_parametrizations", "unparametrize",
           "split_fused", "tie_aliases"]


@dataclass(frozen=True)
class Slot:
    """Row ``row`` lives at ``getattr(module, attr)``; ``module_name`` is its
    ``named_modules`` name (``""``: the model)."""

    row: str
    module_name: str
    attr: str
    module: nn.Module

    @property
    def prefix(self) -> str:
        """Pyro name of the module inside the network: ``"net"`` or ``"net.<module>"``."""
        return "net" + ("." + self.module_name if self.module_name else "")

    def site(self, suffix: str = "") -> str:
        """Pyro name of the attribute ``attr + suffix`` of the module."""
        return f"{self.prefix}.{self.attr}{suffix}"


class _Reads(nn.Module):
    """A parametrization whose value is read from attributes of ``owner`` (held outside
    ``_modules``: no cycle in ``named_modules``; ``deepcopy`` maps it to the copy)."""

    def __init__(self, owner: nn.Module):
        super().__init__()
        self.__dict__["_owner"] = owner

    @property
    def owner(self) -> nn.Module:
        return self.__dict__["_owner"]


class Concat(_Reads):
    """``cat([owner.<part> for part in parts], dim=0)``: a fused weight from its parts."""

    def __init__(self, owner: nn.Module, parts: list[str]):
        super().__init__(owner)
        self.parts = list(parts)

    def forward(self, _unused: torch.Tensor) -> torch.Tensor:
        return torch.cat([getattr(self.owner, p) for p in self.parts], dim=0)


class TiedTo(_Reads):
    """``getattr(owner, attr)``: a tied copy of another module's weight."""

    def __init__(self, owner: nn.Module, attr: str):
        super().__init__(owner)
        self.attr = attr

    def forward(self, _unused: torch.Tensor) -> torch.Tensor:
        return getattr(self.owner, self.attr)


def own_parametrized_class(module: nn.Module) -> None:
    """Give a parametrized ``module`` its own class: ``deepcopy`` shares the dynamically made
    ``Parametrized<Base>`` class (its properties) with the user's module, so adding or
    removing a parametrization on the copy would change the original."""
    cls = type(module)
    if parametrize.is_parametrized(module):
        body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
        module.__class__ = type(cls.__name__, cls.__bases__, body)


def parametrize_attribute(module: nn.Module, attr: str, parametrization: nn.Module) -> None:
    """Replace the parameter ``module.<attr>`` by ``parametrization`` (which ignores its
    input: the stored original is an empty buffer, so no dead copy of the weight remains)."""
    own_parametrized_class(module)
    if attr in module._parameters:
        del module._parameters[attr]
    elif hasattr(module, attr):
        delattr(module, attr)
    module.register_buffer(attr, torch.empty(0))
    parametrize.register_parametrization(module, attr, parametrization, unsafe=True)


def release_parametrizations(rows: list[WeightRow]) -> None:
    """Remove the user's parametrizations of the rows' weights, keeping their effective
    values as plain parameters (the value becomes the latent site)."""
    for r in rows:
        if r.module is not None and parametrize.is_parametrized(r.module, r.attr):
            own_parametrized_class(r.module)
            parametrize.remove_parametrizations(r.module, r.attr, leave_parametrized=True)


def _part_name(row: WeightRow) -> str:
    """``"in_proj_weight[q]"`` for the row ``"attn.in_proj_weight[q]"``."""
    return row.attr + row.name[row.name.rindex("["):]


def split_fused(module: nn.Module, parts: list[WeightRow]) -> dict[str, str]:
    """Cut ``module.<attr>`` into one parameter per row of ``parts`` (all the rows of that
    attribute, dim-0 slices in order) and make the attribute their :class:`Concat`.
    Returns row name -> the part's attribute."""
    attr = parts[0].attr
    with torch.no_grad():
        full = getattr(module, attr).detach()
        pieces = {r.name: full[r.index].clone() for r in parts}
    names = {r.name: _part_name(r) for r in parts}
    covered = sum(p.shape[0] for p in pieces.values())
    if covered != full.shape[0]:
        raise ValueError(f"split rows of {parts[0].param_name} cover {covered} of its "
                         f"{full.shape[0]} rows")
    parametrize_attribute(module, attr, Concat(module, [names[r.name] for r in parts]))
    for r in parts:
        module.register_parameter(names[r.name], nn.Parameter(pieces[r.name]))
    return names


def tie_aliases(net: nn.Module, slot: Slot, aliases: tuple[str, ...]) -> None:
    """Make each full parameter name in ``aliases`` read ``slot``'s value (:class:`TiedTo`)."""
    for full in aliases:
        mod_name, _, attr = full.rpartition(".")
        module = net.get_submodule(mod_name) if mod_name else net
        parametrize_attribute(module, attr, TiedTo(slot.module, slot.attr))


def make_slots(net: nn.Module, chosen: list[WeightRow], rows: list[WeightRow]) -> dict[str, Slot]:
    """The slot of every row in ``chosen`` (rows with a prior) of the converted ``net``:
    fused attributes with a chosen split row are split (all their parts, :func:`split_fused`),
    tied names of a chosen row read its slot (:func:`tie_aliases`)."""
    fused = {(r.module_name, r.attr) for r in chosen if r.index is not None}
    parts: dict[str, str] = {}
    for module_name, attr in fused:
        group = [r for r in rows
                 if (r.module_name, r.attr) == (module_name, attr) and r.index is not None]
        parts.update(split_fused(group[0].module, group))
    slots = {r.name: Slot(r.name, r.module_name, parts.get(r.name, r.attr), r.module)
             for r in chosen}
    for r in chosen:
        if r.tied:
            tie_aliases(net, slots[r.name], r.tied)
    return slots


# --- back to plain parameters (export) ------------------------------------------------------


def unparametrize(module: nn.Module, attr: str) -> None:
    """Remove the parametrization of ``module.<attr>`` (its class first made its own, so a
    deep copy never changes the module it was copied from)."""
    own_parametrized_class(module)
    parametrize.remove_parametrizations(module, attr, leave_parametrized=False)


def _rewired(module: nn.Module) -> dict[str, nn.Module]:
    """``{attr: our parametrization}`` of ``module`` (:class:`Concat`, :class:`TiedTo`,
    :class:`~bayes_spectral.bnn.spectral_factors.SpectralWeight`)."""
    from .spectral_factors import SpectralWeight

    plist = module._modules.get("parametrizations") or {}
    ours = (Concat, TiedTo, SpectralWeight)
    return {a: p[0] for a, p in plist.items() if isinstance(p[0], ours)}


def _consumed(module: nn.Module, rewired: dict[str, nn.Module]) -> set[str]:
    """Attributes read only by the rewiring: split parts, singular values, factors."""
    out: set[str] = set()
    for p in rewired.values():
        out |= set(getattr(p, "parts", ()))
        out |= {getattr(p, "singular_values", ""), getattr(p, "factors", "")} - {""}
    return out


def freeze_slots(net: nn.Module, latent: Mapping[str, torch.Tensor]) -> None:
    """In place, on a deep copy of ``bn.net``: every latent site and every rewired attribute
    becomes a plain ``nn.Parameter`` holding its value at ``latent`` (``{site: value}``):
    split parts concatenated back into the fused parameter, ``U diag(s) V^T`` for spectral
    rows, tied names sharing one ``Parameter`` object again. The spectral factors and split
    parts are removed; ``PyroModule`` classes stay (see ``bnn.export``)."""
    from pyro import poutine

    mods = [m for m in net.modules() if isinstance(m, PyroModule)]
    rewired = {id(m): _rewired(m) for m in mods}
    with torch.no_grad(), poutine.block(), poutine.condition(data=dict(latent)), \
            net._pyro_context:
        values = {(id(m), a): getattr(m, a).detach().clone()
                  for m in mods for a in [*rewired[id(m)], *m._pyro_samples]
                  if not isinstance(rewired[id(m)].get(a), TiedTo)}
    params: dict[tuple[int, str], nn.Parameter] = {}
    for m in mods:
        drop = _consumed(m, rewired[id(m)])
        for a in list(rewired[id(m)]):
            unparametrize(m, a)
            delattr(m, a)  # the empty original
        for a in list(m._pyro_samples) + [d for d in drop if d in m._parameters]:
            delattr(m, a)
        for a in drop:
            m._modules.pop(a, None)
        for (mid, a), v in values.items():
            if mid == id(m) and a not in drop:
                params[(mid, a)] = m._parameters[a] = nn.Parameter(v)
    for m in mods:
        for a, p in rewired[id(m)].items():
            if isinstance(p, TiedTo):
                m._parameters[a] = params[(id(p.owner), p.attr)]
