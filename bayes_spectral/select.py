"""Shared: the one place that chooses the weights of a model (issue 17).

**The parameter view** (:func:`parameter_view`) yields every >= 2-D weight of any
architecture as a :class:`WeightRow` (Linear, Conv, ConvTranspose, Embedding, attention
``in_proj_weight[q|k|v]`` / ``q/k/v_proj_weight`` / ``out_proj``, recurrent
``weight_ih/hh/hr_l*``, parametrized weights by their effective value, tied weights once,
any other >= 2-D parameter by its full name) and lists everything it left out with the
reason; a model and its state_dict give equal rows (row construction:
:mod:`bayes_spectral._view_rows`). Selection has ONE rule for every caller: module types,
exact names, or a regular expression matched with ``re.fullmatch`` against the module
name, the full parameter name and the row name (:func:`matches`); ``hide=`` leaves module
types out.

=========================== ============================================================
caller                      call
=========================== ============================================================
``analyze``, baselines      :func:`parameter_view`
``weight_layers``           :func:`parameter_view` (``layers``: a pattern or names)
``Penalty(module)``,        :func:`parameter_view` via ``penalties.base.penalty_rows``
``Regularizer``             (rows with too few eigenvalues for the penalty skipped)
``bayesian`` (bnn)          :func:`parameter_view`, keys resolved by ``bnn.row_keys``
                            (exact name > module name > :func:`matches` > type)
``compare`` weight snapshot ``parameter_view(m, types=(nn.Linear,))``
=========================== ============================================================

PUBLIC API (stable; bnn/ codes against it)::

    parameter_view(model_or_state_dict, *, types=None, names=None, pattern=None, hide=(),
                   split_qkv=True, split_gates=False, what="parameter_view()",
                   transformer=False, heads=None) -> View
    View.rows: list[WeightRow]; View.left_out: list[LeftOut]; View.names(); View.by_name()
    WeightRow fields: name, kind, param_name, module_name, attr, index, module,
        module_type, shape, tied, value; methods read(), leaves(), is_leaf(), num_evals(conv)
    matches(pattern)(row) -> bool : the ONE regex rule
    weight_layers(model_or_state_dict, layers=None) -> [(name, kind, weight)]
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from ._view_rows import ROOT, LeftOut, View, WeightRow, all_rows

__all__ = [
    "ROOT",
    "LeftOut",
    "View",
    "WeightRow",
    "matches",
    "parameter_view",
    "weight_layers",
]


def matches(pattern: str) -> Callable[[WeightRow], bool]:
    """The one regex rule of every caller: a row is selected when ``re.fullmatch(pattern,
    s)`` holds for ``s`` its module name (``<root>`` for the model), its full parameter
    name or its row name. An invalid pattern raises ``re.error``."""
    compiled = re.compile(pattern)
    return lambda r: any(compiled.fullmatch(s) for s in (r.module_name or ROOT,
                                                         r.param_name, r.name))


def _warn_grouped(rows: list[WeightRow], what: str) -> None:
    """The stated rule for grouped convolutions, once per call naming them."""
    grouped = [r.name for r in rows if isinstance(r.module, nn.modules.conv._ConvNd)
               and r.module.groups > 1 and r.attr == "weight"]
    if grouped:
        warnings.warn(f"{what}: grouped convolutions {grouped} are taken as stored, "
                      "(out, in/groups, *k): each kernel slice stacks the groups' output "
                      "rows (WeightWatcher's rule), not per-group matrices", stacklevel=3)



# selection: module types, exact names, the one regex rule, hidden types


def _owners(row: WeightRow, model: nn.Module) -> list[nn.Module]:
    """The owning module, and for an attention's ``out_proj`` the attention module too."""
    owners = [row.module]
    if row.kind == "AttnOut":
        owners.append(model.get_submodule(row.module_name.rpartition(".")[0]))
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
    modules = ({n or ROOT for n, _ in model.named_modules()}
               if isinstance(model, nn.Module) else set())
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
                   what: str = "parameter_view()", transformer: bool = False,
                   heads: int | None = None) -> View:
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

    ``transformer=True`` (``analyze``'s choice) also splits Hugging Face fused attention
    weights into ``[q]``, ``[k]``, ``[v]`` rows: GPT-2's ``c_attn`` (``Conv1D`` layout
    ``(in, 3*out)``, split on dim 1) and, given ``heads``, GPT-NeoX / Bloom's
    ``query_key_value`` (rows interleaved per head); off by default because ``bayesian``
    splits fused tensors on dim 0 only.

    :raises ValueError: unknown names, an invalid pattern, a selection that selects nothing.
    :raises TypeError: a model of another kind, ``types`` / ``hide`` with a state_dict.
    """
    view = _select(all_rows(model, split_qkv, split_gates, what, transformer, heads), model,
                   types, names, pattern, hide, what)
    _warn_grouped(view.rows, what)
    return view


def weight_layers(
    model: nn.Module | Mapping[str, torch.Tensor],
    layers: str | Iterable[str] | None = None,
) -> list[tuple[str, str, torch.Tensor]]:
    """``(name, kind, weight)`` of every row of :func:`parameter_view` (``weight`` read
    now, detached: the effective value of a parametrized weight, a slice of a fused one).

    ``model``: an ``nn.Module`` or a state_dict (equal rows). ``layers``: ``None`` (all
    rows), a regular expression (the one rule, :func:`matches`: ``re.fullmatch``) or
    exact row, module or parameter names. What was left out: :func:`parameter_view`.

    :raises ValueError: unknown names, an invalid pattern, a pattern matching nothing.
    """
    if isinstance(layers, str):
        view = parameter_view(model, pattern=layers, what="weight_layers()")
    else:
        names = None if layers is None else list(layers)
        view = parameter_view(model, names=names, what="weight_layers()")
    return [(r.name, r.kind, r.read().detach()) for r in view.rows]
