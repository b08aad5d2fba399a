"""Layer 4: the *free state* of a network: what its forward pass reads besides the latent
(sampled) sites, recorded per draw by the samplers and installed per draw by predictions.

The free state is

* the parameters without a prior (biases when the prior is on the weights only, BatchNorm's
  affine parameters, the spectral factors ``U``, ``V``, ...): the network's
  ``named_parameters()`` plus the param-store entries of no module tensor that are not
  latent (``PyroParam`` values, unconstrained), by their store / module names;
* the buffers (BatchNorm's running statistics, ``num_batches_tracked``, ...): the network's
  ``named_buffers()``, by module path.

A sampler's free parameters follow the drift along each chain and its buffers move with every
training-mode forward pass, so draw ``s`` of chain ``c`` is only evaluated correctly with the
free state of chain ``c`` at that kept step (:func:`installed_free`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import pyro
import torch
from torch import nn

__all__ = ["drop_constant", "free_tensors", "installed_free"]


def free_tensors(model: nn.Module, exclude: Iterable[str] = (), *, params: bool = True,
                 ) -> dict[str, torch.Tensor]:
    """The live tensors of the free state (module docstring), ``{name: tensor}``; ``exclude``:
    param-store names that are latent (the guide's); ``params=False``: buffers only."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    if params:
        for name, t in model.named_parameters():
            out[name] = t
            seen.add(id(t))
    for name, t in model.named_buffers():
        if id(t) not in seen:
            out[name] = t
            seen.add(id(t))
    if params:
        skip = set(exclude)
        for name, t in pyro.get_param_store()._params.items():
            if name not in skip and name not in out and id(t) not in seen:
                out[name] = t
    return {n: t for n, t in out.items() if t.numel()}  # empty placeholders: nothing to keep


def _live(model: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The tensors named ``names`` now (module parameters, buffers, then the param store)."""
    table = dict(model.named_parameters())
    table.update(model.named_buffers())
    store = pyro.get_param_store()._params
    out = {}
    for n in names:
        t = table.get(n, store.get(n))
        if t is None:
            raise ValueError(f"free state: the network has no parameter or buffer {n!r} "
                             f"(a result of another network?)")
        out[n] = t
    return out


def drop_constant(model: nn.Module, free: dict[str, torch.Tensor] | None,
                  ) -> dict[str, torch.Tensor] | None:
    """``free`` ``{name: (chains, draws, *shape)}`` without the entries whose every draw
    equals the network's current value (e.g. an orthogonal parametrisation's ``base``): the
    result's snapshot supplies those bit for bit. ``None`` when nothing is left."""
    if not free:
        return None
    live = _live(model, free)
    keep = {n: v for n, v in free.items()
            if not torch.equal(v, live[n].detach().to("cpu", v.dtype).expand_as(v))}
    return keep or None


@contextmanager
def installed_free(model: nn.Module, values: Mapping[str, torch.Tensor] | None,
                   ) -> Iterator[None]:
    """Context: the free-state tensors of ``model`` hold ``values`` (one draw, ``{name:
    tensor}``; copied in place into the tensors installed now), their previous values put
    back on exit. ``None`` or ``{}``: nothing changes."""
    if not values:
        yield
        return
    live = _live(model, values)
    saved = {n: t.detach().clone() for n, t in live.items()}
    _copy_into(live, values)
    try:
        yield
    finally:
        _copy_into(live, saved)


def _copy_into(live: Mapping[str, torch.Tensor], values: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, t in live.items():
            t.copy_(values[n])
