"""Shared: the one place that chooses weight layers and parameters of a model.

**The parameter view** (:func:`parameter_view`, issue 17) yields every >= 2-D weight of
any architecture as a :class:`WeightRow` (Linear, Conv, ConvTranspose, Embedding,
attention ``in_proj_weight[q|k|v]`` / ``q/k/v_proj_weight`` / ``out_proj``, recurrent
``weight_ih/hh/hr_l*``, parametrized weights by their effective value, tied weights once,
any other >= 2-D parameter by its full name) and lists everything it left out with the
reason; a model and its state_dict give equal rows. Selection has ONE rule for every
caller: module types, exact names, or a regular expression matched with ``re.fullmatch``
against the module name, the full parameter name and the row name (:func:`matches`);
``hide=`` leaves module types out.

=========================== ============================================================
caller                      call
=========================== ============================================================
``analyze``                 :func:`parameter_view`
``Penalty(module)``,        :func:`parameter_view` via ``penalties.base.penalty_rows``
``Regularizer``             (rows with too few eigenvalues for the penalty skipped)
``bayesian`` (bnn)          ``weight_modules(net, types=None, source="parameter",
                            min_dim=0, root="").modules()``, then :func:`resolve_keys`
                            and :func:`pick_union` (regex by ``re.fullmatch``)
``posterior``, baselines    :func:`weight_layers` (Linear/Conv with a >= 2-D weight,
                            state_dicts, ``include=``, regex by ``re.search``)
``compare`` weight snapshot ``weight_modules(m, types=(nn.Linear,), min_dim=None, root="")``
=========================== ============================================================

The older enumerators below (:func:`weight_modules`, :func:`state_dict_weights`,
:func:`opt_in_parameters`, :func:`pick_modules`) return :class:`Row` ``(name, kind,
weight, module)`` in a :class:`Selection` with ``left_out``; the regex mode is an explicit
argument there (:data:`MatchMode`).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
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
    "View",
    "WeightRow",
    "matches",
    "parameter_view",
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


# --- the parameter view: every >= 2-D weight of any architecture ------------------------------
#
# PUBLIC API (stable; bnn/ codes against it):
#   parameter_view(model_or_state_dict, *, types=None, names=None, pattern=None, hide=(),
#                  split_qkv=True, split_gates=False, what="parameter_view()") -> View
#   View.rows: list[WeightRow]; View.left_out: list[LeftOut]; View.names(); View.by_name()
#   WeightRow fields: name, kind, param_name, module_name, attr, index, module, module_type,
#                     shape, tied, value; methods read(), leaves(), is_leaf(), num_evals(conv)
#   matches(pattern)(row) -> bool : the ONE regex rule

#: LSTM / GRU gate names in PyTorch's order, by number of gates
GATES = {4: "ifgo", 3: "rzn"}
_RECURRENT = re.compile(r"weight_(ih|hh|hr)_l(\d+)(_reverse)?")
_PARAMETRIZED = re.compile(r"(?P<owner>(?:.*\.)?)parametrizations\.(?P<attr>[^.]+)\.(?P<rest>.+)")
_QKV = {"q_proj_weight": "AttnQ", "k_proj_weight": "AttnK", "v_proj_weight": "AttnV"}


def _num_evals(shape: tuple[int, ...], conv: str = "pool") -> int:
    """``min(out, prod(in, *k))`` for a matrix or a flattened conv, ``min(out, in) *
    prod(k)`` for pooled conv slices."""
    if conv == "flatten" or len(shape) == 2:
        return min(shape[0], math.prod(shape[1:]))
    return min(shape[:2]) * math.prod(shape[2:])


@dataclass(frozen=True)
class WeightRow:
    """One weight matrix (or stack of kernel slices) of the parameter view.

    * ``name``: the row's name. A module's ``weight`` is named by its module
      (``"fc"``, ``"0"``, the model itself ``"<root>"``); any other parameter by its full
      name (``"attn.q_proj_weight"``, ``"lstm.weight_hh_l0"``, ``"pos_emb"``); a split row
      adds its part in brackets: ``"attn.in_proj_weight[q]"``, ``[k]``, ``[v]``;
      ``"lstm.weight_ih_l0[i]"`` (LSTM gates ``i f g o``, GRU ``r z n``: PyTorch's order).
    * ``kind``: from the parameter's name and shape only, so a model and its state_dict
      agree: ``"Matrix"`` (2-D ``weight``: Linear, Embedding, ...), ``"Conv1d"`` /
      ``"Conv2d"`` / ``"Conv3d"`` (3-5-D ``weight``: Conv, ConvTranspose, any other N-D
      ``weight`` such as Bilinear's; the kernel-slice rule applies to them),
      ``"AttnQ"`` / ``"AttnK"`` / ``"AttnV"`` (split ``in_proj_weight`` or separate
      ``q/k/v_proj_weight``), ``"AttnQKV"`` (fused, ``split_qkv=False``), ``"AttnOut"``
      (the ``out_proj`` of an attention module), ``"RecurrentIH"`` / ``"RecurrentHH"`` /
      ``"RecurrentHR"`` (``weight_ih_l*``, ``weight_hh_l*``, ``weight_hr_l*``),
      ``"Param2d"`` (any other 2-D parameter), ``"ParamNd"`` (any other >= 3-D one).
    * ``param_name``: the full parameter name as the user sees it (``"fc.weight"``; a
      parametrized weight ``"0.weight"``, not ``"0.parametrizations.weight.original"``).
    * ``module_name``: the owning module's name (``""`` for the model itself, as in
      ``named_modules``); ``attr``: its attribute holding the (effective) tensor
      (``"weight"``, ``"in_proj_weight"``, ``"weight_ih_l0"``).
    * ``index``: ``None``, or the ``slice`` of dim 0 of that tensor that is this row
      (``in_proj_weight[q]`` of an ``E``-dim attention: ``slice(0, E)``).
    * ``module``: the owning ``nn.Module`` and ``module_type`` its class name (both
      ``None`` for state_dict rows). ``shape``: the row's shape (after ``index``).
    * ``tied``: full names of other parameters that are the same tensor (counted once).
    * ``value``: state_dict rows only, the (effective) tensor; model rows read live values.

    Rows compare equal on everything but ``module``, ``module_type`` and ``value``.
    Write back / parametrize: ``torch.nn.utils.parametrize.register_parametrization(
    row.module, row.attr, P)`` parametrizes the whole tensor; a split row is the
    ``row.index`` slice of dim 0 of it.
    """

    name: str
    kind: str
    param_name: str
    module_name: str
    attr: str
    index: slice | None = None
    module: nn.Module | None = field(default=None, compare=False, repr=False)
    module_type: str | None = field(default=None, compare=False)
    shape: tuple[int, ...] = ()
    tied: tuple[str, ...] = ()
    value: torch.Tensor | None = field(default=None, compare=False, repr=False)
    _leaves: tuple[torch.Tensor, ...] = field(default=(), compare=False, repr=False)
    _get: Callable[[], torch.Tensor] | None = field(default=None, compare=False, repr=False)

    def __hash__(self) -> int:  # a slice is unhashable before Python 3.12
        return hash((self.name, self.param_name, self.kind, self.shape))

    def full(self) -> torch.Tensor:
        """The whole (effective) tensor this row is part of, with graph."""
        if self._get is not None:
            return self._get()
        return self.value if self.module is None else getattr(self.module, self.attr)

    def read(self) -> torch.Tensor:
        """The row's current value, with autograd graph to the underlying parameter(s)
        (a slice of ``in_proj_weight``, a parametrization's originals)."""
        full = self.full()
        return full if self.index is None else full[self.index]

    def leaves(self) -> list[torch.Tensor]:
        """The parameters the value is computed from (the parameter itself, the
        originals of a parametrization, old-style ``weight_g`` / ``weight_v``)."""
        return list(self._leaves)

    def is_leaf(self) -> bool:
        """The value is a whole parameter itself (no slice, no parametrization)."""
        return (self.index is None and len(self._leaves) == 1
                and self.module is not None
                and self.module._parameters.get(self.attr) is self._leaves[0])

    def num_evals(self, conv: str = "pool") -> int:
        """Eigenvalues of the row's ESD (:func:`_num_evals` on ``shape``)."""
        return _num_evals(self.shape, conv)


class View(NamedTuple):
    """:class:`WeightRow` s in state_dict order, and what was :class:`LeftOut` (and why)."""

    rows: list[WeightRow]
    left_out: list[LeftOut]

    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def by_name(self) -> dict[str, WeightRow]:
        return {r.name: r for r in self.rows}


def matches(pattern: str) -> Callable[[WeightRow], bool]:
    """The one regex rule of every caller: a row is selected when ``re.fullmatch(pattern,
    s)`` holds for ``s`` its module name (``<root>`` for the model), its full parameter
    name or its row name. An invalid pattern raises ``re.error``."""
    compiled = re.compile(pattern)
    return lambda r: any(compiled.fullmatch(s) for s in (r.module_name or ROOT,
                                                         r.param_name, r.name))


# entries: one (effective) tensor per full parameter name, from a model or a state_dict


class _Entry(NamedTuple):
    name: str  # effective full name ("0.weight")
    value: torch.Tensor | None  # state_dict: the effective tensor
    raw: tuple[torch.Tensor, ...]  # the stored tensors it is computed from
    how: str  # "plain", "parametrize", "weight_norm", "spectral_norm"


def _sn_weight(orig: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Spectral norm in eval mode: ``W / (u^T W_mat v)``, ``W_mat`` = W as (out, -1)."""
    sigma = torch.dot(u, orig.reshape(orig.shape[0], -1) @ v)
    return orig / sigma


def _parametrized_value(name: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """Effective value of a parametrization stored in a state_dict: weight_norm
    (``original0`` = g, ``original1`` = v: ``g v / ||v||``), spectral_norm (``original``
    and ``0._u``, ``0._v``), else the ``original`` unchanged, with a warning."""
    if set(parts) == {"original0", "original1"}:
        return torch._weight_norm(parts["original1"], parts["original0"], 0)
    if "original" in parts and "0._u" in parts and "0._v" in parts:
        return _sn_weight(parts["original"], parts["0._u"], parts["0._v"])
    if "original" in parts:
        warnings.warn(f"state_dict: the parametrization of {name!r} is not known; its "
                      "stored original is used", stacklevel=4)
        return parts["original"]
    raise ValueError(f"state_dict: cannot read the parametrization of {name!r} from "
                     f"{sorted(parts)}")


def _group_parametrized(state: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """``{effective name: {rest: tensor}}`` of ``*.parametrizations.<attr>.<rest>`` keys."""
    groups: dict[str, dict[str, Any]] = {}
    for key, value in state.items():
        m = _PARAMETRIZED.fullmatch(key)
        if m:
            groups.setdefault(m["owner"] + m["attr"], {})[m["rest"]] = value
    return groups


def _old_hook(key: str, state: Mapping[str, torch.Tensor]) -> tuple[str, str] | None:
    """``(effective name, how)`` when ``key`` is the first stored part of an old-style
    ``weight_norm`` (``X_g``, ``X_v``) or ``spectral_norm`` (``X_orig``, ``X_u``, ``X_v``)."""
    if key.endswith("_g") and key[:-2] + "_v" in state:
        return key[:-2], "weight_norm"
    if key.endswith("_orig") and {key[:-5] + "_u", key[:-5] + "_v"} <= set(state):
        return key[:-5], "spectral_norm"
    return None


def _hook_parts(base: str, how: str) -> tuple[str, ...]:
    return (base + "_g", base + "_v") if how == "weight_norm" else (
        base + "_orig", base + "_u", base + "_v")


def _entries(state: Mapping[str, torch.Tensor], compute: bool) -> list[_Entry]:
    """One entry per effective tensor, in state_dict order; a parametrized tensor where it
    stood before (first among its owner's own keys). ``compute``: also compute the
    effective value (state_dicts)."""
    groups = _group_parametrized(state)
    done: set[str] = set()
    out: list[tuple[tuple[int, int, int], _Entry]] = []
    keys_in_order = list(state)
    for idx, (key, value) in enumerate(state.items()):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state_dict entry {key!r} is a {type(value).__name__}, "
                            "not a tensor")
        if key in done:
            continue
        m = _PARAMETRIZED.fullmatch(key)
        hook = None if m else _old_hook(key, state)
        if m:
            name = m["owner"] + m["attr"]
            keys = [f"{m['owner']}parametrizations.{m['attr']}.{rest}" for rest in groups[name]]
            raw = tuple(v for r, v in groups[name].items() if r.startswith("original"))
            val = _parametrized_value(name, groups[name]) if compute else None
            # where the tensor stood before it was parametrized: first among its owner's keys
            first = next(i for i, k in enumerate(keys_in_order) if k.startswith(m["owner"]))
            out.append(((first, 0, idx), _Entry(name, val, raw, "parametrize")))
        elif hook:
            name, how = hook
            keys = list(_hook_parts(name, how))
            parts = [state[k] for k in keys]
            raw = tuple(parts[:2] if how == "weight_norm" else parts[:1])
            val = None
            if compute:
                val = (torch._weight_norm(parts[1], parts[0], 0) if how == "weight_norm"
                       else _sn_weight(*parts))
            out.append(((idx, 1, idx), _Entry(name, val, raw, how)))
        else:
            keys = [key]
            out.append(((idx, 1, idx), _Entry(key, value, (value,), "plain")))
        done.update(keys)
    return [e for _, e in sorted(out, key=lambda t: t[0])]


def _same_key(t: torch.Tensor) -> tuple:
    """Identity of a stored tensor: tied weights share it (meta and sparse tensors have no
    data pointer: their identity is the object's)."""
    if t.device.type == "meta" or t.layout != torch.strided:
        return ("id", id(t))
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def _parent(module_name: str) -> str:
    return module_name.rpartition(".")[0]


def _full(module_name: str, attr: str) -> str:
    return f"{module_name}.{attr}" if module_name else attr


def _gate_count(module_name: str, attr: str, shape: tuple[int, ...],
                shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Gates stacked in a recurrent ``weight_ih/hh_l*``: rows over the hidden size (read
    from ``weight_hr_l*`` when projected, else from ``weight_hh_l*``)."""
    m = _RECURRENT.fullmatch(attr)
    suffix = f"_l{m[2]}{m[3] or ''}"
    hr = shapes.get(_full(module_name, "weight_hr" + suffix))
    hh = shapes.get(_full(module_name, "weight_hh" + suffix))
    hidden = hr[1] if hr is not None else (hh[1] if hh is not None else 0)
    return shape[0] // hidden if hidden and shape[0] % hidden == 0 else 1


def _split(prefix: str, kind: str, shape: tuple[int, ...], parts: str | list[str],
           kinds: list[str] | None = None) -> list[tuple[str, str, slice, tuple[int, ...]]]:
    """Equal row blocks of dim 0, named ``prefix[part]``."""
    n = shape[0] // len(parts)
    return [(f"{prefix}[{p}]", kinds[i] if kinds else kind, slice(i * n, (i + 1) * n),
             (n, *shape[1:])) for i, p in enumerate(parts)]


def _kinds(name: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]],
           split_qkv: bool, split_gates: bool) -> list[tuple[str, str, slice | None, tuple]]:
    """``(row name, kind, index, shape)`` of one >= 2-D tensor, from its name and shape
    (and its siblings' names: an ``out_proj`` next to ``in_proj_weight``)."""
    module_name, _, attr = name.rpartition(".")
    if attr == "in_proj_weight" and len(shape) == 2 and shape[0] % 3 == 0:
        if split_qkv:
            return _split(name, "", shape, "qkv", ["AttnQ", "AttnK", "AttnV"])
        return [(name, "AttnQKV", None, shape)]
    if attr in _QKV:
        return [(name, _QKV[attr], None, shape)]
    rec = _RECURRENT.fullmatch(attr)
    if rec and len(shape) == 2:
        kind = "Recurrent" + rec[1].upper()
        gates = _gate_count(module_name, attr, shape, shapes) if rec[1] != "hr" else 1
        if split_gates and gates in GATES:
            return _split(name, kind, shape, GATES[gates])
        return [(name, kind, None, shape)]
    if attr == "weight":
        label = module_name or ROOT
        sib = _parent(module_name)
        if module_name.rpartition(".")[2] == "out_proj" and len(shape) == 2 and (
                _full(sib, "in_proj_weight") in shapes or _full(sib, "q_proj_weight") in shapes):
            return [(label, "AttnOut", None, shape)]
        kind = {2: "Matrix", 3: "Conv1d", 4: "Conv2d", 5: "Conv3d"}.get(len(shape), "ParamNd")
        return [(label, kind, None, shape)]
    return [(name, "Param2d" if len(shape) == 2 else "ParamNd", None, shape)]


def _entry_problem(entry: _Entry, shape: tuple[int, ...], dtype: torch.dtype,
                   buffers: set[str]) -> str | None:
    """Why an entry is not a row (``None``: it is one; ``""``: not worth reporting)."""
    attr = entry.name.rpartition(".")[2]
    if entry.raw and is_lazy(entry.raw[0]):
        return "an uninitialized (lazy) parameter"
    if len(shape) < 2:
        return f"a {len(shape)}-D weight, not a matrix" if attr.endswith("weight") else ""
    if entry.name in buffers:
        return "a buffer, not a parameter"
    if not dtype.is_floating_point:
        return f"dtype {dtype} is not floating point"
    return None


def _entry_shape(entry: _Entry, model: nn.Module | None) -> tuple[int, ...]:
    """Shape of the effective tensor. A model's parametrization is computed (no grad)
    unless it is torch's spectral_norm (reading that one in train mode would run a power
    iteration) or weight_norm, whose value has the shape of its largest original."""
    if entry.value is not None:
        return tuple(entry.value.shape)
    if is_lazy(entry.raw[0]):
        return ()
    if entry.how == "parametrize" and model is not None:
        owner, _, attr = entry.name.rpartition(".")
        module = model.get_submodule(owner)
        known = all(type(p).__name__ in ("_SpectralNorm", "_WeightNorm")
                    for p in module.parametrizations[attr])
        if not known:
            with torch.no_grad():
                return tuple(getattr(module, attr).shape)
    return tuple(max(entry.raw, key=lambda t: t.numel()).shape)


def _hook_getter(module: nn.Module, attr: str, how: str) -> Callable[[], torch.Tensor] | None:
    """A fresh read of an old-style ``weight_norm`` / ``spectral_norm`` weight (the hook
    only refreshes ``module.weight`` at forward time)."""
    for hook in module._forward_pre_hooks.values():
        if getattr(hook, "name", None) == attr and hasattr(hook, "compute_weight"):
            if how == "spectral_norm":
                return lambda: hook.compute_weight(module, do_power_iteration=False)
            return lambda: hook.compute_weight(module)
    return None


def _ties(entries: list[_Entry], rows_ok: set[str]) -> tuple[dict[str, str], dict[str, list]]:
    """``{name: first name}`` of tied entries, and ``{first: [tied names]}``."""
    first: dict[tuple, str] = {}
    tied_to: dict[str, str] = {}
    tied: dict[str, list[str]] = {}
    for e in entries:
        if e.name not in rows_ok:
            continue
        key = _same_key(e.raw[0])
        if key in first:
            tied_to[e.name] = first[key]
            tied.setdefault(first[key], []).append(e.name)
        else:
            first[key] = e.name
    return tied_to, tied


def _all_rows(model: nn.Module | Mapping[str, torch.Tensor], split_qkv: bool,
              split_gates: bool, what: str) -> View:
    """Every row of a model or state_dict before selection, and what is left out."""
    is_model = isinstance(model, nn.Module)
    if not is_model and not isinstance(model, Mapping):
        raise TypeError(f"{what} needs a torch.nn.Module or a state_dict, got "
                        f"{type(model).__name__}")
    state = model.state_dict(keep_vars=True) if is_model else model
    entries = _entries(state, compute=not is_model)
    buffers = ({n for n, _ in model.named_buffers(remove_duplicate=False)}
               if is_model else set())
    shapes = {e.name: _entry_shape(e, model if is_model else None) for e in entries}
    rows: list[WeightRow] = []
    left_out: list[LeftOut] = []
    ok: set[str] = set()
    for e in entries:
        dtype = (e.value if e.value is not None else e.raw[0]).dtype
        problem = _entry_problem(e, shapes[e.name], dtype, buffers)
        if problem:
            left_out.append(LeftOut(e.name, problem))
        elif problem is None:
            ok.add(e.name)
    tied_to, tied = _ties(entries, ok)
    for e in entries:
        if e.name in tied_to:
            left_out.append(LeftOut(e.name, f"tied to {tied_to[e.name]}"))
        elif e.name in ok:
            rows += _entry_rows(model if is_model else None, e, shapes,
                                tuple(tied.get(e.name, ())), split_qkv, split_gates)
    return View(rows, left_out)


def _warn_grouped(rows: list[WeightRow], what: str) -> None:
    """The stated rule for grouped convolutions, once per call naming them."""
    grouped = [r.name for r in rows if isinstance(r.module, nn.modules.conv._ConvNd)
               and r.module.groups > 1 and r.attr == "weight"]
    if grouped:
        warnings.warn(f"{what}: grouped convolutions {grouped} are taken as stored, "
                      "(out, in/groups, *k): each kernel slice stacks the groups' output "
                      "rows (WeightWatcher's rule), not per-group matrices", stacklevel=3)


def _module_type(module: nn.Module | None) -> str | None:
    """Class name of ``module`` (the user's class for a parametrized one)."""
    if module is None:
        return None
    cls = type(module)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _entry_rows(model: nn.Module | None, e: _Entry, shapes, tied: tuple[str, ...],
                split_qkv: bool, split_gates: bool) -> list[WeightRow]:
    """The rows of one entry (several for a split tensor)."""
    module_name, _, attr = e.name.rpartition(".")
    module = model.get_submodule(module_name) if model is not None else None
    getter = None
    if module is not None and e.how in ("weight_norm", "spectral_norm"):
        getter = _hook_getter(module, attr, e.how)
    leaves = e.raw if module is not None else ()
    return [WeightRow(name, kind, e.name, module_name, attr, index, module,
                      _module_type(module), shape, tied,
                      e.value, leaves, getter)
            for name, kind, index, shape in _kinds(e.name, shapes[e.name], shapes,
                                                   split_qkv, split_gates)]


# selection: module types, exact names, the one regex rule, hidden types


def _owners(row: WeightRow, model: nn.Module) -> list[nn.Module]:
    """The owning module, and for an attention's ``out_proj`` the attention module too."""
    owners = [row.module]
    if row.kind == "AttnOut":
        owners.append(model.get_submodule(_parent(row.module_name)))
    return owners


def _keep(row: WeightRow, model, types, wanted, find) -> str | None:
    """Why a row is not selected (``None``: it is)."""
    if wanted is not None and not wanted & {row.name, row.module_name or ROOT, row.param_name}:
        return "not selected by names="
    if types is not None and not any(isinstance(o, types) for o in _owners(row, model)):
        return "not selected by types="
    if find is not None and not find(row):
        return "not selected by pattern="
    return None


def _as_types(spec, what: str, arg: str) -> tuple[type, ...]:
    tt = spec if isinstance(spec, tuple) else (spec,)
    bad = [t for t in tt if not (isinstance(t, type) and issubclass(t, nn.Module))]
    if bad:
        raise TypeError(f"{what}: {arg}= takes torch.nn.Module types, got {bad}")
    return tt


def _check_names(view: View, model, wanted: set[str], what: str) -> None:
    """Names that are no row: modules or tensors without a weight row, or unknown."""
    known = {s for r in view.rows for s in (r.name, r.module_name or ROOT, r.param_name)}
    missing = sorted(wanted - known)
    if not missing:
        return
    modules = set(modules_by_name(model)) if isinstance(model, nn.Module) else set()
    reasons = dict(view.left_out)
    bare = [n for n in missing if n in modules or n in reasons]
    if bare:
        why = {n: reasons[n] for n in bare if n in reasons}
        raise ValueError(f"{what}: selected layers without a >= 2-D weight: {bare} {why or ''}"
                         .rstrip())
    raise ValueError(f"{what}: unknown layer names {missing}; weight rows are {view.names()}")


def _nothing_selected(view: View, types, names, pattern, what: str) -> ValueError:
    rows = f"weight rows are {view.names()}"
    if names is None and pattern is None:
        return ValueError(f"{what}: no layer of type {[t.__name__ for t in types]} has a "
                          f"weight row; {rows}")
    if names is None and types is None:
        return ValueError(f"{what}: pattern {pattern!r} matches no layer: it matches no "
                          "weight layer's module, parameter or row name (re.fullmatch); "
                          + rows)
    given = {"types": types, "names": names, "pattern": pattern}
    spec = ", ".join(f"{k}={v!r}" for k, v in given.items() if v is not None)
    return ValueError(f"{what}: {spec} together select no weight; {rows}")


def _select(view: View, model, types, names, pattern, hide, what: str) -> View:
    """Apply ``hide``, then ``names`` / ``types`` / ``pattern`` (all must hold)."""
    if not isinstance(model, nn.Module) and (types is not None or hide):
        raise TypeError(f"{what}: types= and hide= need an nn.Module (a state_dict has no "
                        "module types); select state_dict rows by names= or pattern=")
    hide = _as_types(hide, what, "hide") if hide else ()
    types = _as_types(types, what, "types") if types is not None else None
    wanted = None
    if names is not None:
        wanted = {names} if isinstance(names, str) else set(names)
        _check_names(view, model, wanted, what)
    try:
        find = matches(pattern) if pattern is not None else None
    except re.error as exc:
        raise ValueError(f"{what}: {pattern!r} is not a valid regular expression ({exc}); "
                         f"weight rows are {view.names()}") from exc
    rows: list[WeightRow] = []
    left_out = list(view.left_out)
    for r in view.rows:
        hidden = hide and any(isinstance(o, hide) for o in _owners(r, model))
        why = (f"type {r.module_type} is hidden" if hidden
               else _keep(r, model, types, wanted, find))
        if why:
            left_out.append(LeftOut(r.name, why))
        else:
            rows.append(r)
    if not rows and (names is not None or types is not None or pattern is not None):
        raise _nothing_selected(view, types, names, pattern, what)
    return View(rows, left_out)


def parameter_view(model: nn.Module | Mapping[str, torch.Tensor], *,
                   types: type | tuple[type, ...] | None = None,
                   names: str | Iterable[str] | None = None,
                   pattern: str | None = None,
                   hide: type | tuple[type, ...] = (),
                   split_qkv: bool = True, split_gates: bool = False,
                   what: str = "parameter_view()") -> View:
    """Every >= 2-D weight of ``model`` (an ``nn.Module`` or a state_dict) as
    :class:`WeightRow` s, in state_dict order; every other >= 2-D tensor, 1-D ``*weight``
    and every row not selected in ``left_out`` with its reason. A model and its
    state_dict give equal rows (a state_dict cannot tell a persistent buffer from a
    parameter: its >= 2-D floating buffers are rows; a model lists them as left out).

    Rows: Linear, Conv1d-3d and ConvTranspose, Embedding and any ``weight``; attention
    ``in_proj_weight`` split into ``[q]``, ``[k]``, ``[v]`` (``split_qkv``), separate
    ``q/k/v_proj_weight``, ``out_proj``; recurrent ``weight_ih/hh/hr_l*`` (per gate with
    ``split_gates``); parametrized weights (``torch.nn.utils.parametrize``, old-style
    ``weight_norm`` / ``spectral_norm`` hooks) by their effective value under the name the
    user sees (``"0.weight"``); tied tensors once (the first name; the others left out as
    ``"tied to <first>"``); any other >= 2-D parameter by its full name. Grouped
    convolutions (``groups > 1``) are one row holding the stored ``(out, in/groups, *k)``
    tensor (WeightWatcher's rule), with a warning.

    Selection (all given criteria must hold): ``types`` module classes (``isinstance`` of
    the owning module, or of the attention module for its ``out_proj``; models only),
    ``names`` exact row, module or full parameter names, ``pattern`` the one regex rule
    (:func:`matches`: ``re.fullmatch`` on the module name, the full parameter name or the
    row name); ``hide`` module types left out (models only).

    :raises ValueError: unknown names, an invalid pattern, a selection that selects nothing.
    :raises TypeError: a model of another kind, ``types`` / ``hide`` with a state_dict.
    """
    view = _select(_all_rows(model, split_qkv, split_gates, what), model, types, names,
                   pattern, hide, what)
    _warn_grouped(view.rows, what)
    return view
