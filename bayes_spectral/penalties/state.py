"""A nested penalty / regulariser state as safetensors' flat tensors plus JSON metadata.

:meth:`~bayes_spectral.penalties.Regularizer.state_dict` is a tree of dicts and lists whose
leaves are tensors and plain data (ints, floats, strings, bools). ``torch.save`` stores it
as it is (read back with ``torch.load(weights_only=True)``); safetensors stores only
``{name: tensor}`` and string metadata, so :func:`flatten_state` splits the tree into the
tensors (named by their path, ``penalties/0/state/layers/fc1/u``) and one JSON skeleton in
which every tensor is ``{"__tensor__": name}`` (plus its ``"stride"`` when the layout is
not row-major: the column-major blocks of ``torch.linalg.qr`` give other BLAS rounding than
a row-major copy, so a resumed run is bit for bit only with the same layout, which
``torch.save`` keeps too); :func:`unflatten_state` puts it back::

    tensors, meta = flatten_state(reg.state_dict())
    safetensors.torch.save_file(tensors, path, metadata=meta)
    ...
    with safetensors.safe_open(path, "pt") as fh:
        meta = fh.metadata()
    reg.load_state_dict(unflatten_state(safetensors.torch.load_file(path), meta))
"""

from __future__ import annotations

import json

import torch

__all__ = ["META_KEY", "flatten_state", "unflatten_state"]

#: the metadata entry holding the JSON skeleton
META_KEY = "bayes_spectral.state"
_TENSOR = "__tensor__"


def flatten_state(state: dict) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)``: contiguous copies of the tensors of ``state`` by path, and
    ``{META_KEY: json}`` (the tree with each tensor replaced by ``{"__tensor__": path}``).
    A leaf that is neither a tensor nor JSON data (str, int, float, bool, None) is a
    TypeError naming its path."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(x, path):
        if isinstance(x, torch.Tensor):
            name = path or "."
            while name in tensors:  # a key holding "/" could repeat a path
                name += "~"
            tensors[name] = x.detach().contiguous().clone()
            if x.is_contiguous() or not _dense(x):
                return {_TENSOR: name}
            return {_TENSOR: name, "stride": list(x.stride())}
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError(f"state at {path or '.'!r}: dict keys must be strings")
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [walk(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
        if x is None or isinstance(x, (str, int, float, bool)):
            return x
        raise TypeError(f"state at {path or '.'!r}: a {type(x).__name__} is neither a tensor "
                        "nor plain data")

    skeleton = walk(state, "")
    return tensors, {META_KEY: json.dumps(skeleton)}


def _dense(x: torch.Tensor) -> bool:
    """Whether ``x`` covers its memory densely, without overlap (a permuted layout, e.g.
    the column-major ``Q`` of ``torch.linalg.qr``), so its strides can be rebuilt."""
    expected = 1
    for d in sorted(range(x.dim()), key=x.stride):
        if x.shape[d] != 1 and x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


def unflatten_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """The state of :func:`flatten_state` from its tensors and metadata (ValueError naming
    what is missing)."""
    if not metadata or META_KEY not in metadata:
        raise ValueError(f"unflatten_state: the metadata has no {META_KEY!r} entry (not written "
                         "by flatten_state)")

    def walk(x):
        if isinstance(x, dict):
            if _TENSOR in x and set(x) <= {_TENSOR, "stride"}:
                name = x[_TENSOR]
                if name not in tensors:
                    raise ValueError(f"unflatten_state: tensor {name!r} is not in the file")
                t = tensors[name]
                if "stride" not in x:
                    return t
                out = torch.empty_strided(t.shape, x["stride"], dtype=t.dtype, device=t.device)
                return out.copy_(t)
            return {k: walk(v) for k, v in x.items()}
        if isinstance(x, list):
            return [walk(v) for v in x]
        return x

    return walk(json.loads(metadata[META_KEY]))
