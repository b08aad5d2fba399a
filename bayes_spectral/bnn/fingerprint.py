"""Layer 4: the fingerprint of a MAP/SVI run, stored with each checkpoint.

A fingerprint is plain data (strings, numbers, lists, dicts) describing everything that
shapes a run's result: the method, the guide, the prior of every layer (class and
parameters), the likelihood and its noise, ``num_data``, the optimiser's ``lr``,
``batch_size``, ``shuffle``, ``num_particles``, ``seed``, the dtype, ``prior_every`` (lazy
priors, when not 1), and the names and
shapes of the parameters; SG-MCMC runs add ``sampler`` (temperature, burn_in, thin, cycles,
explore, friction, precondition, init_jitter, num_chains, draw_chunk, draws_dir, and epochs
with cycles: :meth:`~bayes_spectral.bnn.sampling.SamplerConfig.fingerprint`), compared
setting by setting (``sampler[temperature]: 1.0 (checkpoint) vs 0.5 (now)``). Resuming a
checkpoint whose fingerprint differs is refused with a ``ValueError`` naming every differing
setting (old vs new), before anything is loaded.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pyro
import torch
from torch.distributions.utils import lazy_property

__all__ = ["check_fingerprint", "describe", "run_fingerprint"]

_SMALL = 32  # tensors up to this many elements are listed; larger ones hashed


def _describe_tensor(t: torch.Tensor) -> Any:
    """A small tensor as its values, a large one as shape and a hash of its float64 bytes."""
    t = t.detach().cpu()
    if t.numel() <= _SMALL:
        return {"shape": list(t.shape), "values": t.double().flatten().tolist()}
    digest = hashlib.sha1(t.double().contiguous().numpy().tobytes()).hexdigest()[:16]
    return {"shape": list(t.shape), "sha1": digest}


def describe(obj: Any, depth: int = 0) -> Any:
    """Plain data describing ``obj``: numbers and strings as they are, tensors by value (or
    hash), containers element-wise, any other object as its class name and its public
    attributes (lazily computed ones left out), four levels deep."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, torch.Tensor):
        return _describe_tensor(obj)
    if isinstance(obj, (torch.Size, list, tuple)):
        return [describe(v, depth + 1) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1) for k, v in obj.items()}
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if depth >= 4 or callable(obj) and not hasattr(obj, "__dict__"):
        return name
    attrs = {k: v for k, v in vars(obj).items() if not k.startswith("_")
             and not isinstance(getattr(type(obj), k, None), lazy_property)
             and not isinstance(v, torch.nn.Module)}
    return {"class": name, **{k: describe(v, depth + 1) for k, v in sorted(attrs.items())}}


def _guide_kind(guide, method: str) -> str:
    """The guide's kind: its name for a string, its class for an object, the default."""
    if guide is None:
        return "delta" if method == "map" else "normal"
    if isinstance(guide, str):
        return guide
    return f"{type(guide).__module__}.{type(guide).__qualname__}"


def run_fingerprint(model, method: str, guide, *, lr: float, batch_size: int, shuffle: bool,
                    num_particles: int, seed: int, dtype: torch.dtype,
                    prior_every: int = 1) -> dict:
    """The fingerprint of a run (call it after the guide's set-up pass, so that every
    parameter is in the param store). ``prior_every`` is recorded when it is not 1 (so
    checkpoints written before the option existed still resume)."""
    noise = model.noise_value if model.noise_prior is None else describe(model.noise_prior)
    store = pyro.get_param_store()
    out = {
        "method": method, "guide": _guide_kind(guide, method),
        "priors": {layer: describe(prior) for layer, prior in sorted(model._priors.items())},
        "likelihood": model.likelihood, "noise": noise, "num_data": model.num_data,
        "lr": float(lr), "batch_size": int(batch_size), "shuffle": bool(shuffle),
        "num_particles": int(num_particles), "seed": int(seed), "dtype": str(dtype),
        "parameters": {k: list(v.shape) for k, v in sorted(store._params.items())},
    }
    if prior_every != 1:
        out["prior_every"] = int(prior_every)
    modes = {n: p.mode for n, p in sorted(getattr(model, "_tail_penalties", {}).items())
             if getattr(p, "mode", None) in ("fast", "fused", "subspace")}
    if modes:  # recorded only when used, so older checkpoints still resume (the penalty's
        # mode: a Frechet row under tracked_mode="subspace" records "fast", the same state)
        out["tracked_mode"] = modes
    return out


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``"key: old -> new"`` for every differing key (dicts compared key by key)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and key in ("priors", "parameters",
                                                                       "sampler"):
            out += _differences(a, b, f"{prefix}{key}[")
            continue
        label = f"{prefix}{key}]" if prefix else key
        out.append(f"{label}: {_short(a)} (checkpoint) vs {_short(b)} (now)")
    return out


def check_fingerprint(saved: dict | None, current: dict, path: str | os.PathLike) -> None:
    """``ValueError`` naming every setting in which the checkpoint at ``path`` differs from
    the current run (a checkpoint without a fingerprint is refused too)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: the checkpoint has no fingerprint of its settings (written "
                         "by an older version?); resume=False starts over")
    diff = _differences(saved, current)
    if len(diff) > 8:
        diff = diff[:8] + [f"... and {len(diff) - 8} more"]
    if diff:
        raise ValueError(f"{path}: the checkpoint was written with other settings; resume "
                         "with the same settings or pass resume=False (or another "
                         "checkpoint_dir) to start over. Differences: " + "; ".join(diff))
