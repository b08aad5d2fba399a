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

__all__ = ["config_heads", "per_head_rows", "source_view"]

_HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads")


def config_heads(config) -> int | None:
    """Attention heads from a Hugging Face config (dict or object), if it states them."""
    for key in _HEAD_KEYS:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


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


def per_head_rows(rows: list[WeightRow], heads: int | None) -> list[WeightRow]:
    """Each Q, K, V row (``AttnQ/K/V``) as ``heads`` rows ``name[h0]``, ``[h1]``, ... of
    ``d = out / heads`` output features each (the head's own projection); other rows as
    they are. ``ValueError`` when ``heads`` is unknown or does not divide a row."""
    if not heads:
        raise ValueError("per_head=True needs the number of heads (heads=, or a config "
                         "that states it)")
    out: list[WeightRow] = []
    for row in rows:
        if row.kind not in ("AttnQ", "AttnK", "AttnV"):
            out.append(row)
            continue
        dim = 1 if isinstance(row.index, tuple) else 0
        if row.shape[dim] % heads:
            raise ValueError(f"per_head: {row.name} has {row.shape[dim]} output features, "
                             f"not a multiple of heads={heads}")
        d = row.shape[dim] // heads
        shape = (row.shape[0], d) if dim else (d, *row.shape[1:])
        for h in range(heads):
            index = _head_index(row, h, d)
            out.append(dataclasses.replace(
                row, name=f"{row.name}[h{h}]", index=None, shape=shape,
                _get=lambda r=row, i=index: r.read()[i]))
    return out
