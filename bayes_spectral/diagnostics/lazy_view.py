"""Layer 5: the parameter view of a checkpoint that is not in memory.

The view (:func:`bayes_spectral.select.parameter_view`) is built on a state dict of
``meta`` tensors (shape and dtype only, from the files' headers), so its rows, names, kinds
and left-out reasons are exactly those of the loaded model; each row then reads its tensor
from the :class:`~bayes_spectral.diagnostics.checkpoint_files.TensorSource` when asked
(one tensor at a time; the last one kept, so the Q, K, V parts of a fused tensor read it
once). Tensors holding the same values (``wte`` / ``lm_head`` stored twice) share one meta
tensor, so the view counts them once, as it does tied parameters of a model.
"""

from __future__ import annotations

import dataclasses

import torch

from .._view_rows import effective_value
from ..select import View, WeightRow, parameter_view
from .checkpoint_files import TensorSource, tie_groups

__all__ = ["HeadsMismatchError", "SEPARATE_QKV", "config_head_dim", "config_heads",
           "config_kv_heads", "per_head_rows", "source_view"]

_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")
_KV_HEAD_KEYS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
#: module leaf names of separately stored query / key / value projections (Llama, Mistral,
#: Qwen, OPT, BART: ``q_proj``; BERT: ``query``; DistilBERT: ``q_lin``; Meta's Llama: ``wq``)
SEPARATE_QKV = {**dict.fromkeys(("q_proj", "query", "q_lin", "wq"), "q"),
                **dict.fromkeys(("k_proj", "v_proj", "key", "value", "k_lin", "v_lin",
                                 "wk", "wv"), "kv")}


def config_heads(config) -> int | None:
    """Attention heads from a Hugging Face config (dict or object), if it states them."""
    return _config_int(config, _HEAD_KEYS)


def _config_int(config, keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def config_kv_heads(config) -> int | None:
    """Key/value heads (``num_key_value_heads``, grouped-query attention), if stated."""
    return _config_int(config, _KV_HEAD_KEYS)


def config_head_dim(config, heads: int | None) -> int | None:
    """The head dim: ``head_dim`` if stated, else ``hidden_size / heads`` when whole."""
    dim = _config_int(config, ("head_dim",))
    hidden = _config_int(config, ("hidden_size",))
    if dim is None and hidden and heads and hidden % heads == 0:
        dim = hidden // heads
    return dim


class _Reader:
    """Loads tensors of ``source`` by full name, keeping the last one."""

    def __init__(self, source: TensorSource):
        self.source, self.last = source, (None, None)

    def __call__(self, name: str) -> torch.Tensor:
        if self.last[0] != name:
            self.last = (None, None)  # free the previous tensor before reading the next
            self.last = (name, self._load(name))
        return self.last[1]

    def _load(self, name: str) -> torch.Tensor:
        if name in self.source.infos:
            return self.source.load(name)
        owner = name.rpartition(".")[0]
        prefix = owner + "." if owner else ""
        own = [k for k in self.source.infos if k.startswith(prefix) and (
            "." not in k[len(prefix):] or k[len(prefix):].startswith("parametrizations."))]
        return effective_value(name, {k: self.source.load(k) for k in own})


def _meta_state(source: TensorSource) -> dict[str, torch.Tensor]:
    """Meta tensors of every stored tensor; equal-valued matrices share one object."""
    matrices = [n for n, i in source.infos.items()
                if len(i.shape) >= 2 and i.dtype.is_floating_point]
    tied = tie_groups(source, matrices)
    own = {n: torch.empty(i.shape, dtype=i.dtype, device="meta")
           for n, i in source.infos.items() if n not in tied}
    # tied names last, so the view keeps the representative and lists them as tied to it
    return {**own, **{n: own[first] for n, first in tied.items()}}


def source_view(source: TensorSource, *, names=None, pattern=None, split_qkv: bool = True,
                split_gates: bool = False, heads: int | None = None,
                what: str = "analyze()") -> View:
    """The parameter view of ``source`` whose rows read their tensors lazily."""
    view = parameter_view(_meta_state(source), names=names, pattern=pattern,
                          split_qkv=split_qkv, split_gates=split_gates, what=what,
                          transformer=True, heads=heads)
    reader = _Reader(source)
    rows = [dataclasses.replace(r, value=None, _get=lambda n=r.param_name: reader(n))
            for r in view.rows]
    return View(rows, view.left_out)


def _head_index(row: WeightRow, h: int, d: int):
    """Rows (out features) ``h d .. (h+1) d`` of ``row``'s value: dim 1 for GPT-2's
    transposed ``c_attn`` parts, else dim 0."""
    part = slice(h * d, (h + 1) * d)
    return (slice(None), part) if isinstance(row.index, tuple) else part


def _separate_role(row: WeightRow) -> tuple[str, str] | None:
    """``(attention module, "q" | "kv")`` of a separately stored 2-D query / key / value
    projection's ``weight`` (module leaf named as in :data:`SEPARATE_QKV`), else ``None``."""
    module, _, attr = row.param_name.rpartition(".")
    parent, _, leaf = module.rpartition(".")
    if row.kind != "Matrix" or attr != "weight" or len(row.shape) != 2:
        return None
    role = SEPARATE_QKV.get(leaf)
    return (parent, role) if role else None


def _split_heads(row: WeightRow, n: int, d: int) -> list[WeightRow]:
    """``row`` as ``n`` rows ``name[h0]``, ... of ``d`` output features each."""
    dim = 1 if isinstance(row.index, tuple) else 0
    shape = (row.shape[0], d) if dim else (d, *row.shape[1:])
    return [dataclasses.replace(row, name=f"{row.name}[h{h}]", index=None, shape=shape,
                                _get=_slice_of(row, _head_index(row, h, d)))
            for h in range(n)]


def _slice_of(row: WeightRow, index):
    """A getter of ``row.read()[index]``."""
    return lambda: row.read()[index]


class HeadsMismatchError(ValueError):
    """The head settings (``heads``, ``kv_heads``, the config's ``head_dim``) do not fit a
    tensor: a wrong setting, which the CLI reports as a usage error (exit 2)."""


def _divide(row: WeightRow, out: int, n: int, what: str) -> int:
    """``out / n`` (the head dim), ``ValueError`` naming the tensor when not whole."""
    if out % n:
        raise HeadsMismatchError(f"per_head: {row.param_name} has {out} output features, "
                                 f"not a multiple of {what}={n}")
    return out // n


def _query_head_dims(rows: list[WeightRow], heads: int, head_dim: int | None
                     ) -> dict[str, int]:
    """The head dim ``out / heads`` of each attention module's separate query projection,
    checked against the config's ``head_dim``."""
    dims = {}
    for row in rows:
        role = _separate_role(row)
        if role and role[1] == "q":
            dims[role[0]] = d = _divide(row, row.shape[0], heads, "heads")
            if head_dim is not None and d != head_dim:
                raise HeadsMismatchError(
                    f"per_head: {row.param_name} has head dim {d} ({row.shape[0]} output "
                    f"features / heads={heads}), the config states head_dim={head_dim}")
    return dims


def _separate_heads(row: WeightRow, role: tuple[str, str], heads: int,
                    kv_heads: int | None, head_dim: int | None,
                    q_dims: dict[str, int]) -> list[WeightRow]:
    """The per-head rows of one separate projection: ``heads`` for queries, ``kv_heads``
    for keys / values (unknown: ``out / d_query``, else ``heads``); the head dim checked
    against the query's and the config's ``head_dim``."""
    parent, kind = role
    out, want = row.shape[0], q_dims.get(parent, head_dim)
    if kind == "q":
        n, what = heads, "heads"
    elif kv_heads:
        n, what = kv_heads, "kv_heads"
    else:
        n, what = (_divide(row, out, want, "the query head dim") if want else heads,
                   "kv_heads (from the query head dim)" if want else "heads")
    d = _divide(row, out, n, what)
    for ref, source in ((q_dims.get(parent), "the query projection's"),
                        (head_dim, "the config's")):
        if ref is not None and d != ref:
            raise HeadsMismatchError(
                f"per_head: {row.param_name} ({out} output features / {what}={n}) has head "
                f"dim {d}, {source} head dim is {ref}"
                + (f" (head_dim={head_dim})" if source == "the config's" else "")
                + "; give heads= and kv_heads= (num_attention_heads, num_key_value_heads)")
    return _split_heads(row, n, d)


def per_head_rows(rows: list[WeightRow], heads: int | None, kv_heads: int | None = None,
                  head_dim: int | None = None) -> list[WeightRow]:
    """Each Q, K, V row (``AttnQ/K/V``) as ``heads`` rows ``name[h0]``, ``[h1]``, ... of
    ``d = out / heads`` output features each (the head's own projection); separately stored
    projections (``q_proj`` / ``k_proj`` / ``v_proj`` and the names of
    :data:`SEPARATE_QKV`): queries in ``heads`` rows, keys and values in ``kv_heads``
    (grouped-query attention; unknown: ``out / d`` with ``d`` the query head dim). Other
    rows as they are. ``ValueError`` naming the tensor when ``heads`` is unknown, does not
    divide a row, or the head dims disagree (with each other or ``head_dim``)."""
    if not heads:
        raise HeadsMismatchError("per_head=True needs the number of heads (heads=, or a "
                                 "config that states it)")
    q_dims = _query_head_dims(rows, heads, head_dim)
    out: list[WeightRow] = []
    for row in rows:
        role = _separate_role(row)
        if role:
            out += _separate_heads(row, role, heads, kv_heads, head_dim, q_dims)
        elif row.kind in ("AttnQ", "AttnK", "AttnV"):
            dim = 1 if isinstance(row.index, tuple) else 0
            if row.shape[dim] % heads:
                raise HeadsMismatchError(f"per_head: {row.name} has {row.shape[dim]} "
                                         f"output features, not a multiple of heads={heads}")
            out += _split_heads(row, heads, row.shape[dim] // heads)
        else:
            out.append(row)
    return out
