"""Layer 4: the training checkpoint of :func:`bayes_spectral.bnn.fit.fit` (save and resume).

One file, ``<checkpoint_dir>/checkpoint.pt``, replaced atomically
(:func:`bayes_spectral._io.atomic_path`). It is a ``torch.save`` dict with the keys
``param_store`` (``ParamStore.get_state()``), ``optim`` (the Pyro optimiser's ``get_state()``),
``rng`` (python / numpy / torch, and CUDA when present), ``history``, ``state`` (epoch, step
and the early-stopping state), ``buffers`` (the model's buffers), ``method`` and ``data``
(the states of the data's own ``torch.Generator`` objects, e.g. a ``DataLoader``'s
``generator=``; :mod:`~bayes_spectral.bnn.batches`) and ``trackers`` (the tracked priors'
tail trackers, fast-mode blocks and probe generators:
:mod:`~bayes_spectral.bnn.tracker_state`). Restoring
all of them makes a resumed CPU run equal the uninterrupted one bit for bit; nothing is
renewed at a checkpoint boundary, so a fit with checkpoints is the fit without them.
A checkpoint without ``trackers`` (written before the key existed) resumes a model that
tracks nothing; for a model with tracked priors it is refused, naming the missing key.

The file holds tensors and plain data only (the param store as unconstrained tensors with its
constraints by name, numpy's RNG state as a tensor) and is read with
:func:`bayes_spectral._io.load_tensors` (``weights_only=True``): unpickling never runs code,
and a missing, corrupt or unsafe file is an :class:`~bayes_spectral._io.UnreadableFileError`
naming it. ``fingerprint`` (:mod:`bayes_spectral.bnn.fingerprint`) records the settings that
shape the result; resuming with other settings is refused by name before anything is loaded.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pyro
import torch
from pyro.distributions import constraints

from .._io import UnreadableFileError, atomic_path, load_tensors
from .fingerprint import check_fingerprint
from .tracker_state import check_tracker_state, load_tracker_state, tracker_state

__all__ = ["CHECKPOINT_NAME", "Checkpointer", "rng_state", "save_checkpoint", "set_rng_state",
           "load_store_state", "store_state", "sync_module_params"]

CHECKPOINT_NAME = "checkpoint.pt"


#: the keys every checkpoint holds
KEYS = ("param_store", "optim", "rng", "history", "state", "buffers", "method")


def rng_state() -> dict:
    """The python, numpy and torch (and CUDA, when available) global RNG states, as plain
    data and tensors (numpy's ``(name, key array, pos, has_gauss, gauss)`` with the key as a
    tensor)."""
    name, key, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (legacy global RNG)
    state = {"python": random.getstate(),
             "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                       float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the global RNG states saved by :func:`rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, *rest = state["numpy"]
    key = key.cpu().numpy().astype(np.uint32) if torch.is_tensor(key) else np.asarray(key)
    np.random.set_state((name, key, *rest))  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state)`` atomically (:func:`bayes_spectral._io.atomic_path`: temporary
    file in the same folder, fsync, ``os.replace``, fsync of the folder)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def sync_module_params(model: torch.nn.Module) -> None:
    """After ``ParamStore.set_state``: copy the loaded values into the model's own
    ``nn.Parameter`` objects and point the store back at them (``PyroModule`` keeps using
    its own parameter objects for plain ``nn.Parameter`` attributes)."""
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in store._params and store._params[name] is not p:
                p.copy_(store._params[name])
                store._param_to_name.pop(store._params[name], None)
                store._params[name] = p
                store._param_to_name[p] = name


def store_state() -> dict:
    """The param store as plain data: ``params`` (unconstrained tensors, detached) and
    ``constraints`` (their ``repr``, to check on load)."""
    store = pyro.get_param_store()
    return {"params": {k: v.detach().clone() for k, v in store._params.items()},
            "constraints": {k: repr(c) for k, c in store._constraints.items()}}


def load_store_state(state: dict) -> None:
    """Load :func:`store_state` into the param store, keeping the tensors already there:
    their values are overwritten in place, so modules holding those tensors (module-local
    parameters, the guide's) see the loaded values. A parameter the store does not have yet
    is added (unconstrained only); a shape or constraint that differs is a ``ValueError``."""
    store = pyro.get_param_store()
    saved_constraints = state.get("constraints", {})
    with torch.no_grad():
        for name, value in state["params"].items():
            live = store._params.get(name)
            want = saved_constraints.get(name, repr(constraints.real))
            if live is None:
                if want != repr(constraints.real):
                    raise ValueError(f"checkpoint parameter {name!r} (constraint {want}) is "
                                     "not in this run's model or guide")
                t = value.detach().clone().requires_grad_(value.is_floating_point())
                store._params[name] = t
                store._param_to_name[t] = name
                store._constraints[name] = constraints.real
                continue
            if live.shape != value.shape:
                raise ValueError(f"checkpoint parameter {name!r} has shape "
                                 f"{tuple(value.shape)}, this run's has {tuple(live.shape)}")
            have = repr(store._constraints.get(name, constraints.real))
            if have != want:
                raise ValueError(f"checkpoint parameter {name!r} has constraint {want}, this "
                                 f"run's has {have}")
            live.copy_(value)


def _check_keys(path: str, saved) -> None:
    """The file holds a dict with every key of :data:`KEYS`, else UnreadableFileError."""
    if not isinstance(saved, dict):
        raise UnreadableFileError(f"{path}: not a bayes-spectral checkpoint (holds a "
                                  f"{type(saved).__name__}, not a dict)")
    missing = [k for k in KEYS if k not in saved]
    if missing:
        raise UnreadableFileError(f"{path}: not a complete bayes-spectral checkpoint (missing "
                                  f"{', '.join(missing)})")


class Checkpointer:
    """Writes and restores the checkpoint of one MAP/SVI run.

    ``checkpoint_dir=None``: no file (every method is then a no-op). Data parallel: rank 0
    writes, the other ranks wait at a barrier until the file is in place.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike | None, *, model: torch.nn.Module,
                 optim, method: str, rank: int = 0, distributed: bool = False, data=None,
                 fingerprint: dict | None = None):
        self.path = (None if checkpoint_dir is None
                     else os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME))
        self.model, self.optim, self.method = model, optim, method
        self.rank, self.distributed = rank, distributed
        self.data = data  # a DataSource: its generator states travel with the checkpoint
        self.fingerprint = fingerprint  # the settings that shape the result (checked on resume)

    def last_good(self) -> str | None:
        """The path of the checkpoint on disk, or ``None`` when there is none yet."""
        return self.path if self.path and os.path.exists(self.path) else None

    def restore(self, device: torch.device) -> tuple[dict, dict]:
        """Load the file into the param store, the module, the optimiser, the buffers and
        the global RNGs and the tracked priors' state; returns its ``(history, state)``. The
        file is read safely, its fingerprint and tracker state checked (``ValueError`` naming
        the differing settings or layers) before anything is changed."""
        saved = load_tensors(self.path, map_location=device)
        _check_keys(self.path, saved)
        if self.fingerprint is not None:
            check_fingerprint(saved.get("fingerprint"), self.fingerprint, self.path)
        check_tracker_state(self.model, saved.get("trackers"), self.path)
        load_store_state(saved["param_store"])
        sync_module_params(self.model)
        self.optim.set_state(saved["optim"])
        for name, buf in self.model.named_buffers():
            if name in saved["buffers"]:
                buf.copy_(saved["buffers"][name])
        set_rng_state(saved["rng"])
        if self.data is not None:
            self.data.load_state_dict(saved.get("data", []))
        load_tracker_state(self.model, saved.get("trackers"), self.path)
        return saved["history"], saved["state"]

    def save(self, history: dict, state: dict) -> None:
        """Write the current run (rank 0 only; every rank passes the same barrier)."""
        if self.path is None:
            return
        if self.rank != 0:
            torch.distributed.barrier()
            return
        save_checkpoint(self.path, {
            "param_store": store_state(),
            "optim": self.optim.get_state(),
            "rng": rng_state(),
            "history": history,
            "state": state,
            "buffers": {k: v.detach().clone() for k, v in self.model.named_buffers()},
            "method": self.method,
            "data": [] if self.data is None else self.data.state_dict(),
            "fingerprint": self.fingerprint,
            "trackers": tracker_state(self.model),
        })
        if self.distributed:
            torch.distributed.barrier()
