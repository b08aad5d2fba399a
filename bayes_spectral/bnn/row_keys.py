"""Layer 4: the keys of :func:`~bayes_spectral.bayesian` (``priors``, ``spectral=``,
``tracked=``, ``enumerate_rank=``) and of the guides' ``layers=``, resolved against the rows
of the parameter view (:func:`bayes_spectral.select.parameter_view`).

A key is

* a module type: every row whose owning module is an instance (``nn.MultiheadAttention``:
  its ``in_proj_weight[q]``, ``[k]``, ``[v]`` rows; ``nn.Linear``: Linear weights,
  ``out_proj`` of attention included);
* an exact name: a row name (``"fc1"``, ``"attn.in_proj_weight[q]"``), a full parameter
  name (``"fc1.weight"``, ``"lstm.weight_hh_l0"``) or a module name (``"lstm"``: every row
  of that module; ``""`` or ``"<root>"``: the model itself);
* otherwise a regular expression, with the one rule of :func:`bayes_spectral.select.matches`
  (``re.fullmatch`` against the module name, the full parameter name or the row name).

Precedence when several keys give a row a value: exact row or parameter name > exact module
name > regular expression > type.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from ..select import ROOT, WeightRow, matches

__all__ = ["pick_row_union", "resolve_row_keys", "rows_for_key"]


def _module_name(row: WeightRow) -> str:
    return row.module_name or ROOT


def _exact(key: str, rows: Iterable[WeightRow]) -> tuple[list[str], int]:
    """Rows named exactly by ``key`` and the precedence: 3 (row or parameter name),
    2 (module name), 0 (none)."""
    found = [r.name for r in rows if key in (r.name, r.param_name)]
    if found:
        return found, 3
    found = [r.name for r in rows if key == _module_name(r) or (key == "" and not r.module_name)]
    return found, (2 if found else 0)


def rows_for_key(key: Any, rows: list[WeightRow], what: str) -> tuple[list[str], int]:
    """Names of the rows ``key`` chooses, and its precedence (3, 2: exact, 1: regex, 0: type).

    :raises TypeError: a key that is neither a module type nor a string.
    :raises ValueError: a key that chooses nothing, an invalid regex (naming it).
    """
    names = sorted({r.name for r in rows})
    if isinstance(key, type):
        if not issubclass(key, nn.Module):
            raise TypeError(f"{what}: {key!r} is not a torch.nn.Module type")
        found = [r.name for r in rows if isinstance(r.module, key)]
        if not found:
            raise ValueError(f"{what}: no layer of type {key.__name__}; weight rows are {names}")
        return found, 0
    if not isinstance(key, str):
        raise TypeError(f"{what}: layers are chosen by type, name or regex, got {key!r}")
    found, level = _exact(key, rows)
    if found:
        return found, level
    try:
        rule = matches(key)
    except re.error as exc:
        raise ValueError(f"{what}: {key!r} is neither a layer name nor a valid regular "
                         f"expression ({exc}); weight rows are {names}") from exc
    found = [r.name for r in rows if rule(r)]
    if not found:
        raise ValueError(f"{what}: {key!r} is not a layer name and matches no layer; "
                         f"weight rows are {names}")
    return found, 1


def pick_row_union(spec: Any, rows: list[WeightRow], what: str,
                   among: Iterable[str] | None = None) -> list[str]:
    """Row names chosen by ``spec``: ``None``/``False`` none, ``True`` all of ``among``
    (default: all rows), one key or an iterable of keys (union in order of first choice)."""
    if spec is None or spec is False:
        return []
    if spec is True:
        return list(among) if among is not None else [r.name for r in rows]
    if isinstance(spec, (str, type)):
        spec = [spec]
    out: list[str] = []
    for key in spec:
        out += [n for n in rows_for_key(key, rows, what)[0] if n not in out]
    return out


def resolve_row_keys(keyed: Mapping[Any, Any], rows: list[WeightRow],
                     what: str) -> dict[str, Any]:
    """``{row name: value}`` from ``{key: value}`` (precedence in the module docstring; at
    equal precedence a later key wins only with the same value; ``None`` leaves a row out).

    :raises ValueError: a row matched by two keys of the same kind with different values.
    """
    rank: dict[str, int] = {}
    chosen: dict[str, Any] = {}
    for key, value in keyed.items():
        found, level = rows_for_key(key, rows, what)
        for name in found:
            if name in chosen and rank[name] == level and chosen[name] is not value:
                raise ValueError(f"{what}: layer {name!r} is matched by two keys of the same "
                                 "kind; make the choice explicit with its exact name")
            if name not in chosen or rank[name] <= level:
                chosen[name], rank[name] = value, level
    order = [r.name for r in rows]
    return {n: chosen[n] for n in order if n in chosen and chosen[n] is not None}
