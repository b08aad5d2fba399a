"""Layer 4: the training checkpoint of :func:`bayes_spectral.bnn.fit.fit` (save and resume).

One file, ``<checkpoint_dir>/checkpoint.pt``, replaced atomically
(:func:`bayes_spectral._io.atomic_path`). It is a ``torch.save`` dict with the keys
``param_store`` (``ParamStore.get_state()``), ``optim`` (the Pyro optimiser's ``get_state()``),
``rng`` (python / numpy / torch, and CUDA when present), ``history``, ``state`` (epoch, step
and the early-stopping state), ``buffers`` (the model's buffers), ``method`` and ``data``
(the states of the data's own ``torch.Generator`` objects, e.g. a ``DataLoader``'s
``generator=``; :mod:`~bayes_spectral.bnn.batches`). Restoring
all of them makes a resumed CPU run equal the uninterrupted one bit for bit. The file is a
pickle (``torch.load(..., weights_only=False)``): load only checkpoints you wrote.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pyro
import torch

from .._io import atomic_path

__all__ = ["CHECKPOINT_NAME", "Checkpointer", "rng_state", "save_checkpoint", "set_rng_state",
           "load_store_state", "sync_module_params"]

CHECKPOINT_NAME = "checkpoint.pt"


def rng_state() -> dict:
    """The python, numpy and torch (and CUDA, when available) global RNG states."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002 (legacy global RNG state)
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the global RNG states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
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


def load_store_state(state: dict) -> None:
    """``ParamStore.set_state`` that keeps the tensors already in the store: their values
    are overwritten in place and the store points back at them, so modules holding those
    tensors (module-local parameters, the guide's) see the loaded values."""
    store = pyro.get_param_store()
    live = dict(store._params)
    store.set_state(state)
    with torch.no_grad():
        for name, t in live.items():
            loaded = store._params.get(name)
            if loaded is None or loaded is t or loaded.shape != t.shape:
                continue
            t.copy_(loaded)
            store._param_to_name.pop(loaded, None)
            store._params[name] = t
            store._param_to_name[t] = name


class Checkpointer:
    """Writes and restores the checkpoint of one MAP/SVI run.

    ``checkpoint_dir=None``: no file (every method is then a no-op). Data parallel: rank 0
    writes, the other ranks wait at a barrier until the file is in place.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike | None, *, model: torch.nn.Module,
                 optim, method: str, rank: int = 0, distributed: bool = False, data=None):
        self.path = (None if checkpoint_dir is None
                     else os.path.join(os.fspath(checkpoint_dir), CHECKPOINT_NAME))
        self.model, self.optim, self.method = model, optim, method
        self.rank, self.distributed = rank, distributed
        self.data = data  # a DataSource: its generator states travel with the checkpoint

    def last_good(self) -> str | None:
        """The path of the checkpoint on disk, or ``None`` when there is none yet."""
        return self.path if self.path and os.path.exists(self.path) else None

    def restore(self, device: torch.device) -> tuple[dict, dict]:
        """Load the file into the param store, the module, the optimiser, the buffers and
        the global RNGs; returns its ``(history, state)``."""
        saved = torch.load(self.path, map_location=device, weights_only=False)
        load_store_state(saved["param_store"])
        sync_module_params(self.model)
        self.optim.set_state(saved["optim"])
        for name, buf in self.model.named_buffers():
            if name in saved["buffers"]:
                buf.copy_(saved["buffers"][name])
        set_rng_state(saved["rng"])
        if self.data is not None:
            self.data.load_state_dict(saved.get("data", []))
        return saved["history"], saved["state"]

    def save(self, history: dict, state: dict) -> None:
        """Write the current run (rank 0 only; every rank passes the same barrier)."""
        if self.path is None:
            return
        if self.rank != 0:
            torch.distributed.barrier()
            return
        save_checkpoint(self.path, {
            "param_store": pyro.get_param_store().get_state(),
            "optim": self.optim.get_state(),
            "rng": rng_state(),
            "history": history,
            "state": state,
            "buffers": {k: v.detach().clone() for k, v in self.model.named_buffers()},
            "method": self.method,
            "data": [] if self.data is None else self.data.state_dict(),
        })
        if self.distributed:
            torch.distributed.barrier()
