"""Layer 4: the state of a network's tracked priors, for :func:`~bayes_spectral.fit`'s
checkpoints (key ``"trackers"``, :mod:`~bayes_spectral.bnn.checkpoint`).

The tracked power-law priors (tail trackers), the ``tracked_mode="fast"`` priors (the
warm-started block of :class:`~bayes_spectral.spectra.subspace.TopEigen`, the probe
generators), the ``tracked_mode="fused"`` priors (the 2-column block ``v``) and the
``tracked_mode="subspace"`` power-law priors (the tail block ``V``, its call count,
``need`` and weight-stack shape) keep their
state in the penalty behind each row (``BayesianNetwork._tail_penalties``, not a buffer).
Their state is saved as::

    {"format": 1, "layers": {row: {"law": "PowerLawSpectrum", "penalty": "PowerLawPrior",
                                   "mode": "tracked", "shape": [m, n],
                                   "state": penalty.state_dict()}}}

tensors and plain data only (``torch.load(weights_only=True)``; column-major blocks keep
their strides, so a resumed run is bit for bit). Restoring checks first, changing nothing:
the rows, each row's law, penalty class, mode and weight shape, the shapes of the saved
blocks (a tracker's ``(1, min(m, n), k)``, a fast block's ``(1, n, k)``, a fused block's
``(2, n)``, a subspace block's ``(1, min(m, n), k)`` with the stack shape ``[1, m, n]``)
and the penalty's own check (:meth:`~bayes_spectral.penalties.Penalty.check_state`);
a ``ValueError`` names the file, the layer and what differs. Tracked Frechet / Gaussian
priors on a power iteration keep theirs in a buffer of the layer (saved with the buffers),
not here.
"""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = ["TRACKER_FORMAT", "check_tracker_state", "load_tracker_state", "tracker_state"]

#: the version of the saved layout
TRACKER_FORMAT = 1


def _penalties(model) -> dict[str, Any]:
    return dict(getattr(model, "_tail_penalties", {}))


def _describe(model, row: str, penalty) -> dict:
    """What must agree between the checkpoint and the model for row ``row``."""
    prior = model._priors[row]
    return {"law": type(prior).__name__, "penalty": type(penalty).__name__,
            "mode": penalty.mode, "shape": [int(d) for d in prior.event_shape]}


def tracker_state(model) -> dict:
    """The state of every tracked prior of ``model`` (module docstring), as copies."""
    layers = {}
    for row, pen in _penalties(model).items():
        layers[row] = {**_describe(model, row, pen), "state": pen.state_dict()}
    return {"format": TRACKER_FORMAT, "layers": layers}


def _block_problems(state: dict, shape: list[int]) -> list[str]:
    """The saved blocks whose shape does not fit an ``m x n`` weight."""
    m, n = shape
    expected = {"tracker": (1, min(m, n)), "top": (1, n), "subspace": (1, min(m, n))}
    out = []
    for key, parts in state.get("layers", {}).items() if isinstance(state, dict) else ():
        for part, lead in expected.items():
            sub = parts.get(part) if isinstance(parts, dict) else None
            for name, t in (sub or {}).items() if isinstance(sub, dict) else ():
                if isinstance(t, torch.Tensor) and t.dim() >= 2 and (
                        t.dim() != 3 or tuple(t.shape[:2]) != lead):
                    out.append(f"{part} {name} of {key!r} has shape {tuple(t.shape)}, "
                               f"expected (1, {lead[1]}, k)")
        out += _subspace_shape_problem(parts, key, [1, m, n])
        v = parts.get("v") if isinstance(parts, dict) else None
        if isinstance(v, torch.Tensor) and tuple(v.shape) != (2, n):
            out.append(f"fused block v of {key!r} has shape {tuple(v.shape)}, expected (2, {n})")
    return out


def _subspace_shape_problem(parts: Any, key: str, stack: list[int]) -> list[str]:
    """A subspace part whose saved weight-stack ``shape`` is not ``stack`` (``[1, m, n]``)."""
    sub = parts.get("subspace") if isinstance(parts, dict) else None
    got = sub.get("shape") if isinstance(sub, dict) else None
    if got is None:
        return []
    try:
        got = [int(d) for d in got]
    except (TypeError, ValueError):
        pass
    return [] if got == stack else [f"subspace shape of {key!r} is {got!r}, expected {stack}"]


def _row_problems(model, row: str, pen, saved: Any) -> list[str]:
    """What differs for one row (empty: it fits)."""
    if not isinstance(saved, dict) or "state" not in saved:
        return ["not a tracker state (a dict with 'state')"]
    want = _describe(model, row, pen)
    out = [f"{k} {saved.get(k)!r} (checkpoint) vs {v!r} (now)" if k == "mode" else
           f"{'weight shape' if k == 'shape' else k} {saved.get(k)} (checkpoint) vs {v} (now)"
           for k, v in want.items() if saved.get(k) != v]
    if out:
        return out
    out = _block_problems(saved["state"], want["shape"])
    if not out:
        try:
            pen.check_state(saved["state"])
        except (ValueError, TypeError, KeyError) as err:
            out.append(str(err))
    return out


def check_tracker_state(model, state: dict | None, where: str | os.PathLike) -> None:
    """Raise a ``ValueError`` naming ``where``, the layers and what differs when ``state``
    (a checkpoint's ``"trackers"``, ``None`` when it has none) cannot be ``model``'s
    :func:`tracker_state`; changes nothing. A checkpoint without the key is accepted for a
    model that tracks nothing (nothing to restore)."""
    pens = _penalties(model)
    if state is None:
        if pens:
            raise ValueError(
                f"{where}: no tracker state ('trackers'): the checkpoint was written before "
                f"fit saved the tracked priors' state, and this model tracks layers "
                f"{sorted(pens)}; without it the resumed run would not repeat the "
                "interrupted one. Pass resume=False (or another checkpoint_dir) to start over")
        return
    layers = state.get("layers") if isinstance(state, dict) else None
    if not isinstance(layers, dict) or state.get("format") != TRACKER_FORMAT:
        raise ValueError(f"{where}: the tracker state ('trackers') is not format "
                         f"{TRACKER_FORMAT} with a dict of layers")
    problems = [f"layer {r!r}: tracked now, its state is not in the checkpoint"
                for r in sorted(set(pens) - set(layers))]
    problems += [f"layer {r!r}: in the checkpoint, not tracked now"
                 for r in sorted(set(layers) - set(pens))]
    for row in sorted(set(pens) & set(layers)):
        problems += [f"layer {row!r}: {p}" for p in _row_problems(model, row, pens[row],
                                                                   layers[row])]
    if problems:
        raise ValueError(f"{where}: the tracker state does not fit this model: "
                         + "; ".join(problems))


def load_tracker_state(model, state: dict | None, where: str | os.PathLike) -> None:
    """Check ``state`` in full (:func:`check_tracker_state`), then put each row's state
    into its penalty."""
    check_tracker_state(model, state, where)
    for row, pen in _penalties(model).items():
        pen.load_state_dict(state["layers"][row]["state"])
