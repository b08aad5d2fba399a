"""Shared: the one place that chooses weight layers and parameters of a model.

Three jobs, each a small function that takes its policy as explicit arguments:

* **enumerate** the weight-bearing modules of a model (:func:`weight_modules`), the
  weight entries of a state_dict (:func:`state_dict_weights`) or opted-in parameters
  (:func:`opt_in_parameters`), as :class:`Row` ``(name, kind, weight, module)``;
* **match** a selection spec by module type, exact name or regular expression, the regex
  mode an explicit argument (:data:`MatchMode`: ``"fullmatch"``, the whole name, or
  ``"search"``, anywhere in the name);
* **report** what was left out and why: every enumerator returns a :class:`Selection`
  whose ``left_out`` lists ``(name, reason)`` pairs (callers may ignore it).

Callers still differ in their rules (the next issue unifies them); each keeps its own by
calling the policy that names it:

=========================== ============================================================
caller                      call
=========================== ============================================================
``analyze`` / ``posterior`` :func:`weight_layers` (Linear/Conv with a >= 2-D weight,
                            state_dicts, ``include=``, regex by ``re.search``)
``Penalty(module)``         ``weight_modules(m, types=LINEAR_CONV, min_dim=None)``
``Regularizer``             :func:`pick_modules` (regex by ``re.search``)
``bayesian`` (bnn)          ``weight_modules(net, types=None, source="parameter",
                            min_dim=0, root="").modules()``, then :func:`resolve_keys`
                            and :func:`pick_union` (regex by ``re.fullmatch``)
``compare`` weight snapshot ``weight_modules(m, types=(nn.Linear,), min_dim=None, root="")``
=========================== ============================================================
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NamedTuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

__all__ = [
    "LINEAR_CONV",
    "ROOT",
    "LeftOut",
    "MatchMode",
    "Row",
    "Selection",
    "has_weight",
    "linear_conv_view",
    "modules_by_name",
    "opt_in_parameters",
    "pick_layers",
    "pick_modules",
    "pick_names",
    "pick_rows",
    "pick_union",
    "regex_matcher",
    "resolve_keys",
    "state_dict_weights",
    "weight_layers",
    "weight_modules",
]

#: the name given to the model itself (``named_modules`` calls it ``""``)
ROOT = "<root>"
#: the module types whose ``weight`` most callers count as a layer
LINEAR_CONV: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: state_dict weights by number of dims -> the kind reported for them
STATE_DICT_KINDS = {2: "Matrix", 3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}

MatchMode = Literal["fullmatch", "search"]
WeightSource = Literal["attribute", "parameter"]


class Row(NamedTuple):
    """One chosen weight: ``name`` (module, parameter or state_dict stem), ``kind`` (a
    module type name, ``"Parameter"`` or a state_dict kind), the ``weight`` as read at
    selection time and the owning ``module`` (``None`` for state_dict entries)."""

    name: str
    kind: str
    weight: Any
    module: nn.Module | None = None


class LeftOut(NamedTuple):
    """A weight-bearing module or matrix parameter that was not chosen, and why."""

    name: str
    reason: str


class Selection(NamedTuple):
    """Chosen :class:`Row` s, in model order, and what was :class:`LeftOut`."""

    rows: list[Row]
    left_out: list[LeftOut]

    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def modules(self) -> dict[str, nn.Module]:
        """``{name: module}`` of the chosen rows (module rows only)."""
        return {r.name: r.module for r in self.rows if r.module is not None}


# --- matching -----------------------------------------------------------------------------


def regex_matcher(pattern: str, mode: MatchMode) -> Callable[[str], bool]:
    """``name -> bool``: ``re.fullmatch(pattern, name)`` (``mode="fullmatch"``: the whole
    name must match) or ``re.search(pattern, name)`` (``mode="search"``: a match anywhere).

    An invalid pattern raises ``re.error`` unchanged (callers that promise a ValueError
    wrap it).
    """
    if mode not in ("fullmatch", "search"):
        raise ValueError(f"regex mode must be 'fullmatch' or 'search', got {mode!r}")
    compiled = re.compile(pattern)
    find = compiled.fullmatch if mode == "fullmatch" else compiled.search
    return lambda name: bool(find(name))


def has_weight(module: nn.Module, min_dim: int = 2) -> bool:
    """``module.weight`` (its effective value if parametrized) is a tensor with at least
    ``min_dim`` dims."""
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.dim() >= min_dim


def _bears_weight(module: nn.Module) -> bool:
    """Has a ``weight`` (parameter, parametrization or plain tensor) without computing it."""
    return (module._parameters.get("weight") is not None
            or parametrize.is_parametrized(module, "weight")
            or isinstance(module.__dict__.get("weight"), torch.Tensor))


# --- enumeration: modules -----------------------------------------------------------------


def _read_weight(module: nn.Module, source: WeightSource) -> Any:
    if source == "parameter":
        return module._parameters.get("weight")
    return getattr(module, "weight", None)


def _weight_problem(weight: Any, min_dim: int | None) -> str | None:
    """Why ``weight`` is not counted (``None``: it is); ``min_dim=None`` checks nothing."""
    if min_dim is None:
        return None
    if not isinstance(weight, torch.Tensor):
        return "has no tensor weight"
    if weight.dim() < min_dim:
        return f"weight has {weight.dim()} dims (needs >= {min_dim})"
    return None


def _other_matrices(name: str, module: nn.Module) -> list[LeftOut]:
    """Matrix parameters of ``module`` (``named_modules`` name ``name``) other than its
    ``weight`` (``in_proj_weight``, ``weight_ih_l0``, a bare ``nn.Parameter``): never rows
    of :func:`weight_modules`."""
    if isinstance(module, parametrize.ParametrizationList):
        return []
    prefix = f"{name}." if name else ""
    return [LeftOut(prefix + pname, f"a {p.dim()}-D parameter of {type(module).__name__} "
                                    "that is not its `weight`")
            for pname, p in module._parameters.items()
            if pname != "weight" and p is not None and not is_lazy(p) and p.dim() >= 2]


def _module_row(name: str, module: nn.Module, types, source: WeightSource,
                min_dim: int | None, hide: tuple[type, ...]) -> Row | LeftOut | None:
    kind = type(module).__name__
    if hide and isinstance(module, hide):
        return LeftOut(name, f"type {kind} is hidden") if _bears_weight(module) else None
    if types is not None and not isinstance(module, types):
        return LeftOut(name, f"type {kind} is not counted") if _bears_weight(module) else None
    weight = _read_weight(module, source)
    if types is None and weight is None:
        return None
    problem = _weight_problem(weight, min_dim)
    return LeftOut(name, problem) if problem else Row(name, kind, weight, module)


def weight_modules(model: nn.Module, *,
                   types: tuple[type[nn.Module], ...] | None = LINEAR_CONV,
                   source: WeightSource = "attribute", min_dim: int | None = 2,
                   hide: tuple[type[nn.Module], ...] = (), root: str = ROOT) -> Selection:
    """Every module of ``model`` whose ``weight`` counts, in ``named_modules`` order.

    ``types``: the module classes that count (``isinstance``), or ``None`` for any module
    with a weight. ``source``: ``"attribute"`` reads ``module.weight`` (the effective value
    of a parametrized weight), ``"parameter"`` only a registered ``weight`` parameter.
    ``min_dim``: the weight must be a tensor with at least that many dims; ``None`` checks
    nothing and yields the weight as read (needs ``types``). ``hide``: module types left
    out whatever else holds. ``root``: the name of ``model`` itself.
    """
    if types is None and min_dim is None:
        raise ValueError("weight_modules: types=None needs a min_dim")
    rows: list[Row] = []
    left_out: list[LeftOut] = []
    for raw_name, module in model.named_modules():
        found = _module_row(raw_name or root, module, types, source, min_dim, tuple(hide))
        if isinstance(found, Row):
            rows.append(found)
        elif found is not None:
            left_out.append(found)
        left_out += _other_matrices(raw_name, module)
    return Selection(rows, left_out)


def modules_by_name(model: nn.Module, root: str = ROOT) -> dict[str, nn.Module]:
    """``{name: module}`` of every module; the model itself is listed LAST as ``root``."""
    modules = dict(model.named_modules())
    if "" in modules:
        modules[root] = modules.pop("")
    return modules


# --- enumeration: state_dicts and opted-in parameters ---------------------------------------


def _state_dict_problem(key: str, value: torch.Tensor) -> str | None:
    """Why an entry is not a row (``None``: it is one; ``""``: not worth reporting)."""
    if not key.endswith("weight"):
        return "not a `*weight` entry" if value.dim() >= 2 else ""
    if not value.is_floating_point():
        return f"dtype {value.dtype} is not floating point"
    if value.dim() not in STATE_DICT_KINDS:
        return f"has {value.dim()} dims (needs 2 to 5)"
    return None


def state_dict_weights(state: Mapping[str, torch.Tensor]) -> Selection:
    """Rows of a state_dict: its floating ``*weight`` tensors with 2 to 5 dims, named by the
    key without ``.weight`` (kind from the number of dims, :data:`STATE_DICT_KINDS`).

    :raises TypeError: an entry that is not a tensor.
    """
    rows: list[Row] = []
    left_out: list[LeftOut] = []
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
        problem = _state_dict_problem(key, value)
        if problem is None:
            name = key[: -len(".weight")] if key.endswith(".weight") else key
            rows.append(Row(name, STATE_DICT_KINDS[value.dim()], value))
        elif problem:
            left_out.append(LeftOut(key, problem))
    return Selection(rows, left_out)


def opt_in_parameters(model: nn.Module, names: Iterable[str],
                      what: str = "include") -> list[Row]:
    """Rows ``(name, "Parameter", param)`` of the named 2-D parameters of ``model``.

    :raises ValueError: an unknown name, or a parameter that is not 2-D.
    """
    params = dict(model.named_parameters())
    rows = []
    for pname in names:
        if pname not in params:
            raise ValueError(f"{what}: model has no parameter named {pname!r}")
        if params[pname].dim() != 2:
            raise ValueError(
                f"{what}: parameter {pname!r} has shape {tuple(params[pname].shape)}, "
                "only 2-D parameters can be opted in"
            )
        rows.append(Row(pname, "Parameter", params[pname]))
    return rows


# --- policy of analyze / posterior ----------------------------------------------------------


def pick_rows(rows: list[Row], layers: str | Iterable[str] | None, *,
              mode: MatchMode = "search") -> list[Row]:
    """``layers``: ``None`` (all rows), a regular expression (``mode``; an invalid one
    raises ``re.error``) or exact row names (kept in row order).

    :raises ValueError: a pattern that matches nothing, unknown names.
    """
    if layers is None:
        return rows
    if isinstance(layers, str):
        matches = regex_matcher(layers, mode)
        found = [r for r in rows if matches(r[0])]
        if not found:
            raise ValueError(f"layer pattern {layers!r} matches no weight layer")
        return found
    wanted = list(layers)
    names = {r[0] for r in rows}
    missing = [w for w in wanted if w not in names]
    if missing:
        raise ValueError(f"unknown layer names {missing}; known: {sorted(names)}")
    return [r for r in rows if r[0] in wanted]


def linear_conv_view(model: nn.Module | Mapping[str, torch.Tensor],
                     include: Iterable[str] = (), layers: str | Iterable[str] | None = None,
                     *, mode: MatchMode = "search", what: str = "analyze()") -> Selection:
    """The view of ``analyze``: Linear/Conv1d-3d modules with a >= 2-D weight (the root
    named ``<root>``) plus the opted-in 2-D parameters ``include``, or a state_dict's
    weights (:func:`state_dict_weights`; ``include`` ignored); then :func:`pick_rows`.
    """
    if isinstance(model, Mapping):
        view = state_dict_weights(model)
    elif isinstance(model, nn.Module):
        view = weight_modules(model, types=LINEAR_CONV, min_dim=2)
        view.rows.extend(opt_in_parameters(model, include))
        opted = set(include)
        view.left_out[:] = [x for x in view.left_out if x.name not in opted]
    else:
        raise TypeError(f"{what} needs a torch.nn.Module or a state_dict, got "
                        f"{type(model).__name__}")
    rows = pick_rows(view.rows, layers, mode=mode)
    chosen = {r.name for r in rows}
    dropped = [LeftOut(r.name, "not selected by `layers`") for r in view.rows
               if r.name not in chosen]
    return Selection(rows, view.left_out + dropped)


def weight_layers(
    model: nn.Module | Mapping[str, torch.Tensor],
    include: Iterable[str] = (),
    layers: str | Iterable[str] | None = None,
) -> list[tuple[str, str, torch.Tensor]]:
    """``(name, type, weight)`` of every Linear/Conv layer plus opted-in 2-D parameters.

    ``model``: an ``nn.Module``, or a state_dict (its floating ``*weight`` tensors with
    2 to 5 dims are the layers). ``include``: names of extra 2-D parameters (e.g.
    ``"attn.in_proj_weight"``). ``layers``: a regular expression (``re.search``) or a list
    of exact names. What was left out: :func:`linear_conv_view`.
    """
    return [(r.name, r.kind, r.weight) for r in linear_conv_view(model, include, layers).rows]


# --- policy of Regularizer ------------------------------------------------------------------


def _matrix_layers(modules: Mapping[str, nn.Module]) -> list[str]:
    return [n for n, m in modules.items() if has_weight(m)]


def _filter_modules(modules: dict[str, nn.Module], types, names, pattern,
                    mode: MatchMode) -> list[str]:
    """Names kept by all given criteria (names, then types, then pattern)."""
    chosen = list(modules)
    if names is not None:
        wanted = [names] if isinstance(names, str) else list(names)
        unknown = [w for w in wanted if w not in modules]
        if unknown:
            raise ValueError(f"unknown layer names {unknown}; layers with weights: "
                             f"{_matrix_layers(modules)}")
        chosen = [n for n in chosen if n in wanted]
    if types is not None:
        tt = types if isinstance(types, tuple) else (types,)
        chosen = [n for n in chosen if isinstance(modules[n], tt)]
        if not chosen:
            raise ValueError(f"no layer of type {[t.__name__ for t in tt]} selected")
    if pattern is not None:
        matches = regex_matcher(pattern, mode)
        need_weight = names is None and types is None
        chosen = [n for n in chosen if matches(n) and (not need_weight or has_weight(modules[n]))]
        if not chosen:
            raise ValueError(f"pattern {pattern!r} matches no layer with a weight; "
                             f"layers: {_matrix_layers(modules)}")
    return chosen


def pick_modules(model: nn.Module, *, types: type | tuple[type, ...] | None = None,
                 names: str | Iterable[str] | None = None, pattern: str | None = None,
                 mode: MatchMode = "search") -> Selection:
    """The view of ``Regularizer``: modules of ``model`` (root last, as ``<root>``) kept by
    all given criteria, in :func:`modules_by_name` order; none given = every Linear/Conv.

    ``names``: exact module names; ``types``: module classes; ``pattern``: a regular
    expression (``mode``; alone it also requires a >= 2-D weight).

    :raises ValueError: unknown names, a type or pattern that selects nothing, a selected
        module without a >= 2-D ``weight``.
    """
    modules = modules_by_name(model)
    if types is None and names is None and pattern is None:
        chosen = [n for n, m in modules.items() if isinstance(m, LINEAR_CONV)]
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no Linear/Conv layer; "
                             "select layers with types=, names= or pattern=")
    else:
        chosen = _filter_modules(modules, types, names, pattern, mode)
    bad = [n for n in chosen if not has_weight(modules[n])]
    if bad:
        raise ValueError(f"selected layers without a >= 2-D weight: {bad}")
    rows = [Row(n, type(modules[n]).__name__, modules[n].weight, modules[n]) for n in chosen]
    left_out = [LeftOut(n, "not selected") for n, m in modules.items()
                if n not in chosen and _bears_weight(m)]
    return Selection(rows, left_out)


# --- policy of bayesian: keys by type / exact name / regex -----------------------------------


def pick_layers(spec: type | str, layers: Mapping[str, nn.Module], what: str, *,
                mode: MatchMode = "fullmatch") -> list[str]:
    """Names of ``layers`` chosen by one spec: a module type (``isinstance``), an exact
    name, else a regular expression (``mode``).

    :raises TypeError: a spec of another kind, a type that is not a module type.
    :raises ValueError: a spec that selects nothing, an invalid regex (naming it).
    """
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TypeError(f"{what}: {spec!r} is not a torch.nn.Module type")
        found = [n for n, m in layers.items() if isinstance(m, spec)]
        if not found:
            raise ValueError(f"{what}: no layer of type {spec.__name__}; weight layers are "
                             f"{sorted(layers)}")
        return found
    if isinstance(spec, str):
        return pick_names(spec, layers, what, mode=mode)
    raise TypeError(f"{what}: layers are chosen by type, name or regex, got {spec!r}")


def pick_names(spec: str, layers: Mapping[str, Any], what: str, *,
               mode: MatchMode = "fullmatch") -> list[str]:
    """``[spec]`` if it is a name of ``layers``, else the names matching it as a regex."""
    if spec in layers:
        return [spec]
    try:
        matches = regex_matcher(spec, mode)
    except re.error as exc:
        raise ValueError(f"{what}: {spec!r} is neither a layer name nor a valid regular "
                         f"expression ({exc}); weight layers are {sorted(layers)}") from exc
    found = [n for n in layers if matches(n)]
    if not found:
        raise ValueError(f"{what}: {spec!r} is not a layer name and matches no layer; "
                         f"weight layers are {sorted(layers)}")
    return found


def pick_union(spec, layers: Mapping[str, nn.Module], what: str, *,
               mode: MatchMode = "fullmatch") -> list[str]:
    """Names chosen by ``spec``: ``None``/``False`` none, ``True`` all, one spec or an
    iterable of specs (:func:`pick_layers`; union in order of first choice)."""
    if spec is None or spec is False:
        return []
    if spec is True:
        return list(layers)
    if isinstance(spec, (str, type)):
        spec = [spec]
    out: list[str] = []
    for s in spec:
        out += [n for n in pick_layers(s, layers, what, mode=mode) if n not in out]
    return out


def _precedence(key, layers: Mapping[str, nn.Module]) -> int:
    """2: exact name, 1: regular expression (or anything else), 0: module type."""
    if isinstance(key, type):
        return 0
    if isinstance(key, str) and key in layers:
        return 2
    return 1


def resolve_keys(keyed: Mapping[Any, Any], layers: Mapping[str, nn.Module], what: str, *,
                 mode: MatchMode = "fullmatch") -> dict[str, Any]:
    """``{layer: value}`` from ``{key: value}`` with keys as in :func:`pick_layers`.

    Precedence: exact name > regular expression > type; at equal precedence a later key
    wins only with the same value. A ``None`` value leaves the layer out.

    :raises ValueError: a layer matched by two keys of the same kind with different values.
    """
    rank: dict[str, int] = {}
    chosen: dict[str, Any] = {}
    for key, value in keyed.items():
        level = _precedence(key, layers)
        for name in pick_layers(key, layers, what, mode=mode):
            if name in chosen and rank[name] == level and chosen[name] is not value:
                raise ValueError(f"{what}: layer {name!r} is matched by two keys of the same "
                                 "kind; make the choice explicit with its exact name")
            if name not in chosen or rank[name] <= level:
                chosen[name], rank[name] = value, level
    return {k: v for k, v in chosen.items() if v is not None}
