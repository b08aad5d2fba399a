"""Shared, private: the rows of the parameter view, before selection.

:func:`all_rows` turns a model or a state_dict into one :class:`WeightRow` per >= 2-D
weight (several for a split tensor) and a :class:`LeftOut` for every other >= 2-D tensor or
1-D ``*weight``. The row's name and ``kind`` come from the parameter's name and shape only
(:func:`_kinds`), so a model and its state_dict give equal rows; parametrized weights
(``torch.nn.utils.parametrize``, old-style ``weight_norm`` / ``spectral_norm`` hooks) are
read by their effective value under the name the user sees; tied tensors are one row.
Selection among the rows (and the public API) is :mod:`bayes_spectral.select`.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize

__all__ = ["FUSED_QKV", "GATES", "ROOT", "LeftOut", "View", "WeightRow", "all_rows",
           "effective_value"]

#: the name given to the model itself (``named_modules`` calls it ``""``)
ROOT = "<root>"


class LeftOut(NamedTuple):
    """A weight-bearing module or matrix parameter that was not chosen, and why."""

    name: str
    reason: str


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
      (``in_proj_weight[q]`` of an ``E``-dim attention: ``slice(0, E)``); with
      ``transformer=True`` also ``(slice(None), slice)`` (GPT-2's ``c_attn``, split on
      dim 1) or a list of dim-0 rows (``query_key_value``, interleaved per head).
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


#: Hugging Face fused attention modules (``transformer=True``): GPT-2's ``c_attn``
#: (``Conv1D``, weight ``(in, 3*out)``) and GPT-NeoX / Bloom's ``query_key_value``
#: (``(3*out, in)``, rows grouped per head as ``[q_h; k_h; v_h]``)
FUSED_QKV = ("c_attn", "query_key_value")


def _fused_rows(module_name: str, shape: tuple[int, ...], split_qkv: bool,
                heads: int | None) -> list[tuple[str, str, Any, tuple]] | None:
    """Q, K, V rows of a fused transformer weight (``None``: not one). ``c_attn`` stored
    ``(in, 3*out)`` is split on dim 1 (the transposed ``Conv1D`` layout; index
    ``(slice(None), slice)``), one stored ``(3*out, in)`` on dim 0. ``query_key_value``
    needs ``heads``: part ``p`` of head ``h`` is rows ``(3h + p) d .. (3h + p + 1) d``,
    ``d = out / heads``; with ``heads`` unknown it stays one ``"AttnQKV"`` row."""
    label, leaf = module_name or ROOT, module_name.rpartition(".")[2]
    kinds = ["AttnQ", "AttnK", "AttnV"]
    if leaf not in FUSED_QKV or len(shape) != 2:
        return None
    conv1d = leaf == "c_attn" and shape[1] % 3 == 0 and shape[1] >= shape[0]
    if not split_qkv or (not conv1d and (shape[0] % 3 or (leaf != "c_attn" and not heads))):
        return [(label, "AttnQKV", None, shape)]
    if conv1d:
        n = shape[1] // 3
        return [(f"{label}[{p}]", kinds[i], (slice(None), slice(i * n, (i + 1) * n)),
                 (shape[0], n)) for i, p in enumerate("qkv")]
    n = shape[0] // 3
    if leaf == "c_attn":
        return _split(label, "", shape, "qkv", kinds)
    if n % heads:
        raise ValueError(f"{module_name}.weight: {shape[0]} rows are not 3 x heads={heads} "
                         "blocks")
    d = n // heads
    return [(f"{label}[{p}]", kinds[i],
             [(3 * h + i) * d + j for h in range(heads) for j in range(d)], (n, shape[1]))
            for i, p in enumerate("qkv")]


def _kinds(name: str, shape: tuple[int, ...], shapes: Mapping[str, tuple[int, ...]],
           split_qkv: bool, split_gates: bool, transformer: bool = False,
           heads: int | None = None) -> list[tuple[str, str, Any, tuple]]:
    """``(row name, kind, index, shape)`` of one >= 2-D tensor, from its name and shape
    (and its siblings' names: an ``out_proj`` next to ``in_proj_weight``); with
    ``transformer``, fused Hugging Face attention weights too (:func:`_fused_rows`)."""
    module_name, _, attr = name.rpartition(".")
    fused = (_fused_rows(module_name, shape, split_qkv, heads)
             if transformer and attr == "weight" else None)
    if fused:
        return fused
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


def all_rows(model: nn.Module | Mapping[str, torch.Tensor], split_qkv: bool,
             split_gates: bool, what: str, transformer: bool = False,
             heads: int | None = None) -> View:
    """Every row of a model or state_dict before selection, and what is left out
    (``transformer``, ``heads``: :func:`_fused_rows`)."""
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
                                tuple(tied.get(e.name, ())), split_qkv, split_gates,
                                transformer, heads)
    return View(rows, left_out)



def _module_type(module: nn.Module | None) -> str | None:
    """Class name of ``module`` (the user's class for a parametrized one)."""
    if module is None:
        return None
    cls = type(module)
    return cls.__bases__[0].__name__ if parametrize.is_parametrized(module) else cls.__name__


def _entry_rows(model: nn.Module | None, e: _Entry, shapes, tied: tuple[str, ...],
                split_qkv: bool, split_gates: bool, transformer: bool = False,
                heads: int | None = None) -> list[WeightRow]:
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
                                                   split_qkv, split_gates, transformer,
                                                   heads)]


def effective_value(name: str, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The effective tensor ``name`` of a state dict holding its owner's stored tensors (a
    parametrized or old-style ``weight_norm`` / ``spectral_norm`` weight computed from its
    parts, as :func:`all_rows` does); ``KeyError`` if there is none."""
    for e in _entries(state, compute=True):
        if e.name == name:
            return e.value
    raise KeyError(name)
