"""Layer 4: ``fit()`` a :class:`bayes_spectral.bnn.network.BayesianNetwork` by MAP, SVI or NUTS.

MAP and SVI share one loop: ``pyro.infer.SVI`` with ``pyro.optim.Adam`` over shuffled
mini-batches (``Trace_ELBO``, or ``TraceEnum_ELBO(max_plate_nesting=1)`` when the model has
enumerated spike-and-slab indicators). The reported loss is the ELBO estimate divided by
``N`` (per training example). NUTS runs ``pyro.infer.MCMC(NUTS(...))`` once per chain,
sequentially, each chain started from the module's weights with a small multiplicative
jitter (seed ``seed + chain``).

Checkpoints (``checkpoint_dir``): every ``checkpoint_every`` epochs (and at the end), the file
``checkpoint.pt`` is replaced atomically (temporary file in the same folder, ``fsync``,
``os.replace``). It holds the param store state, the optimiser state (``get_state``), the
python / numpy / torch RNG states, epoch, step, history, the early-stopping state and the
model's buffers. ``resume=True`` continues from it; on CPU an interrupted-and-resumed run
equals the uninterrupted one bit for bit. The file is a pickle (``torch.load(...,
weights_only=False)``): load only checkpoints you wrote.

Data parallel (``distributed=True``, or a ``torch.distributed`` group initialised): MAP and
SVI over the ranks with ``DistributedDataParallel``, equal to the single-process run with
the same global ``batch_size`` (:mod:`bayes_spectral.distributed` has the scaling rule);
rank 0 writes the checkpoints, every rank resumes from them, with any number of ranks.

NaN/Inf guard: at every step the loss, the parameters and their gradients are checked
*before* the optimiser update; on the first non-finite value :class:`NonFiniteError` names
the parameter or sample site (and its layer), the update is not applied and training stops,
leaving the last good checkpoint in place.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuide, init_to_value

from .._io import atomic_path
from . import distributed as bsd
from .guides import make_guide
from .network import BayesianNetwork
from .predict import PredictiveMetrics, evaluate, predictive_probs

__all__ = ["CHECKPOINT_NAME", "FitResult", "NonFiniteError", "fit"]

CHECKPOINT_NAME = "checkpoint.pt"
METHODS = ("map", "svi", "nuts")


class NonFiniteError(FloatingPointError):
    """A loss or parameter became NaN/Inf. Attributes: ``site``, ``layer``, ``epoch``,
    ``step``, ``checkpoint`` (path of the last good checkpoint or ``None``)."""

    def __init__(self, message, site=None, layer=None, epoch=None, step=None, checkpoint=None):
        super().__init__(message)
        self.site, self.layer, self.epoch, self.step = site, layer, epoch, step
        self.checkpoint = checkpoint


@dataclass
class FitResult:
    """What :func:`fit` returns. ``samples``: NUTS draws ``{site: (chains, draws, ...)}``."""

    model: BayesianNetwork
    method: str
    guide: AutoGuide | None = None
    history: dict[str, list] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] | None = None
    epochs_run: int = 0
    stopped_early: bool = False
    best_epoch: int | None = None
    checkpoint: str | None = None

    def params(self) -> dict[str, torch.Tensor]:
        """Snapshot of the param store (unconstrained values), detached clones."""
        return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    def predict(self, x: torch.Tensor, num_samples: int | None = None) -> torch.Tensor:
        """Posterior-predictive class probabilities ``(S, n, C)`` (or outputs, gaussian)."""
        dev = next(iter(self.model.parameters()), torch.zeros(()))
        x = x.to(device=dev.device, dtype=dev.dtype)
        if self.samples is not None:
            return predictive_probs(self.model, x, samples=self.samples)
        if num_samples is None:
            num_samples = 1 if self.method == "map" else 32
        return predictive_probs(self.model, x, guide=self.guide, num_samples=num_samples)

    def evaluate(self, x, y, num_samples: int | None = None) -> PredictiveMetrics:
        """Accuracy, NLL, ECE, entropy, mutual information (categorical models)."""
        return evaluate(self.predict(x, num_samples).cpu(), y.cpu())


def _layer_of(model: BayesianNetwork, param_name: str) -> str | None:
    base = param_name.split("$$$")[0]
    for layer, site in model.prior_sites.items():
        if site in base or base.endswith(site):
            return layer
    if base.startswith("net."):
        parts = base[4:].split(".")
        return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]
    return None


def _nonfinite_sites(model, guide, elbo_args) -> list[str]:
    """Sample sites whose log-density is not finite (guide draw replayed in the model)."""
    from pyro import poutine

    bad = []
    try:
        with torch.no_grad():
            gtr = poutine.trace(guide).get_trace(*elbo_args)
            mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*elbo_args)
            for tr in (gtr, mtr):
                for name, site in tr.nodes.items():
                    if site["type"] != "sample" or name in bad:
                        continue
                    if site["infer"].get("enumerate"):
                        continue
                    lp = site["fn"].log_prob(site["value"])
                    if not bool(torch.isfinite(lp).all()):
                        bad.append(name)
    except Exception:  # pragma: no cover - diagnosis only
        pass
    return bad


def _guarded_step(svi: SVI, model, guide, args, epoch: int, step: int, ckpt: str | None,
                  loss_and_grads: Callable[[], float] | None = None):
    """``SVI.step`` that refuses to apply a non-finite loss or gradient.

    Same operations as ``SVI.step`` (loss_and_grads, optimiser, zero grads), with the loss,
    parameter values and gradients checked before the update, so a failure leaves the
    parameters at their last finite values. ``loss_and_grads``: replaces
    ``svi.loss_and_grads`` (the data-parallel step: its loss and gradients are the same on
    every rank, so every rank takes the same decision).
    """
    where = f"epoch {epoch + 1}, step {step}"
    keep = f"; the last good checkpoint is {ckpt}" if ckpt else ""
    store = pyro.get_param_store()
    for name, p in store.named_parameters():
        if not bool(torch.isfinite(p).all()):
            layer = _layer_of(model, name)
            raise NonFiniteError(
                f"non-finite value of parameter {name!r} (layer {layer!r}) before {where}{keep}",
                site=name, layer=layer, epoch=epoch, step=step, checkpoint=ckpt)
    try:
        with poutine.trace(param_only=True) as capture:
            if loss_and_grads is None:
                loss = float(svi.loss_and_grads(svi.model, svi.guide, *args))
            else:
                loss = float(loss_and_grads())
    except ValueError as exc:  # a distribution got NaN/Inf parameters (validation)
        if "nan" not in str(exc).lower() and "inf" not in str(exc).lower():
            raise
        for p in store._params.values():
            p.grad = None
        first = str(exc).splitlines()[0]
        raise NonFiniteError(
            f"non-finite values in the model at {where} (parameters overflowed: lower the "
            f"learning rate){keep}: {first}", site=None, layer=None, epoch=epoch, step=step,
            checkpoint=ckpt) from exc
    named = {name: site["value"].unconstrained() for name, site in capture.trace.nodes.items()}
    problem = None
    for name, p in named.items():
        if not bool(torch.isfinite(p).all()):
            problem = (name, "value")
            break
    if problem is None and not np.isfinite(loss):
        sites = _nonfinite_sites(model, guide, args)
        if sites:
            layer = _layer_of(model, sites[0])
            pyro.infer.util.zero_grads(set(named.values()))
            raise NonFiniteError(
                f"non-finite loss {loss} at {where}: the log-density of site {sites[0]!r} "
                f"(layer {layer!r}) is not finite{keep}. Lower the learning rate or check the "
                "prior's hyperparameters.",
                site=sites[0], layer=layer, epoch=epoch, step=step, checkpoint=ckpt)
    if problem is None:
        for name, p in named.items():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                problem = (name, "gradient")
                break
    if problem is None and not np.isfinite(loss):
        problem = ("loss", "value")
    if problem is not None:
        pyro.infer.util.zero_grads(set(named.values()))
        name, what = problem
        layer = _layer_of(model, name) if name != "loss" else None
        raise NonFiniteError(
            f"non-finite {what} of parameter {name!r} (layer {layer!r}) at {where} "
            f"(loss {loss}){keep}. Lower the learning rate or check the prior's scale.",
            site=name, layer=layer, epoch=epoch, step=step, checkpoint=ckpt)
    svi.optim(set(named.values()))
    pyro.infer.util.zero_grads(set(named.values()))
    return loss


def _sync_module_params(model: BayesianNetwork) -> None:
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


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002 (legacy global RNG state)
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
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


def _as_xy(data, what: str):
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data.x_train, data.y_train
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise TypeError(f"{what} must be a pair (x, y) or a bayes_spectral.data.Split, got "
                    f"{type(data).__name__}")


def fit(
    model: BayesianNetwork,
    data,
    method: str = "map",
    guide: AutoGuide | str | None = None,
    *,
    epochs: int = 10,
    batch_size: int = 128,
    lr: float = 1e-2,
    num_particles: int = 1,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    val_data=None,
    val_samples: int | None = None,
    monitor: str = "val_nll",
    patience: int | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1,
    resume: bool = True,
    progress: bool = True,
    callbacks: Iterable[Callable[[dict], Any]] = (),
    num_samples: int = 200,
    warmup_steps: int = 200,
    num_chains: int = 2,
    max_tree_depth: int = 8,
    init_jitter: float = 0.1,
    distributed: bool | None = None,
) -> FitResult:
    """Fit ``model`` to ``data = (x, y)`` (or a ``Split``: its training part).

    :param method: ``"map"`` (default guide ``auto_delta``), ``"svi"`` (default
        ``auto_normal``) or ``"nuts"`` (full batch; layers without a prior stay fixed).
    :param guide: an ``AutoGuide`` or a kind of :func:`bayes_spectral.bnn.guides.make_guide`.
    :param val_data: ``(x, y)`` evaluated after every epoch (posterior predictive with
        ``val_samples`` draws: 1 for MAP, 8 for SVI by default); ``history`` gains
        ``val_accuracy`` (categorical) and ``val_nll``.
    :param monitor, patience: early stopping on ``"val_nll"`` (lower is better) or
        ``"val_accuracy"``; after ``patience`` epochs without improvement training stops and
        the best parameters are restored.
    :param checkpoint_dir, checkpoint_every, resume: atomic checkpoints and exact resume
        (module docstring).
    :param callbacks: ``cb(info)`` after each epoch (``info``: epoch, step, history); a
        return value of ``True`` stops training (the checkpoint is written before).
    :param num_samples, warmup_steps, num_chains, max_tree_depth, init_jitter: NUTS.
    :param distributed: data-parallel MAP/SVI over the ranks of the initialised
        ``torch.distributed`` group (:mod:`bayes_spectral.distributed`: the same parameters
        as the single-process run with the global ``batch_size``); ``None``: when a group is
        initialised. Run under ``torchrun`` (README, "Distributed training"); every rank
        calls ``fit`` with the same arguments and gets the same result; only rank 0 writes
        checkpoints, all ranks resume from ``checkpoint_dir`` (a shared folder), with any
        number of ranks; ``callbacks`` run on every rank and a stop on any rank stops all.
    :raises ValueError/TypeError: bad data (shapes, labels out of range) before training.
    :raises NonFiniteError: a NaN/Inf loss or parameter (names the parameter and layer).
    """
    if not isinstance(model, BayesianNetwork):
        raise TypeError(f"fit() needs a model built by bayes_spectral.bayesian(), got "
                        f"{type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for key, val in (("epochs", epochs), ("batch_size", batch_size),
                     ("checkpoint_every", checkpoint_every), ("num_chains", num_chains)):
        if int(val) != val or val < 1:
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if monitor not in ("val_nll", "val_accuracy"):
        raise ValueError(f"monitor must be 'val_nll' or 'val_accuracy', got {monitor!r}")
    if patience is not None and val_data is None:
        raise ValueError("patience (early stopping) needs val_data")
    if distributed is None:
        distributed = bsd.is_distributed()
    if distributed and not bsd.is_distributed():
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(bayes_spectral.distributed.init(), under torchrun)")
    if distributed and method == "nuts":
        raise ValueError("method 'nuts' is not data-parallel: run it in one process "
                         "(distributed=False)")
    rank = torch.distributed.get_rank() if distributed else 0
    x, y = _as_xy(data, "data")
    model.check_data(x, y, "data")
    xv = yv = None
    if val_data is not None:
        xv, yv = _as_xy(val_data, "val_data")
        model.check_data(xv, yv, "val_data")

    device = torch.device(device)
    model.to(device=device, dtype=dtype)
    x = x.to(device=device, dtype=dtype)
    y = y.to(device=device, dtype=dtype if model.likelihood == "gaussian" else y.dtype)
    if xv is not None:
        xv = xv.to(device=device, dtype=dtype)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)

    if method == "nuts":
        return _fit_nuts(model, x, y, seed=seed, num_samples=num_samples,
                         warmup_steps=warmup_steps, num_chains=num_chains,
                         max_tree_depth=max_tree_depth, init_jitter=init_jitter,
                         progress=progress)

    if guide is None:
        guide = make_guide(model, "delta" if method == "map" else "normal")
    elif isinstance(guide, str):
        guide = make_guide(model, guide)
    if model.enumerated_layers:
        elbo = TraceEnum_ELBO(max_plate_nesting=1, num_particles=num_particles)
    else:
        elbo = Trace_ELBO(num_particles=num_particles)
    optim = pyro.optim.Adam({"lr": lr})
    svi = SVI(model, guide, optim, loss=elbo)
    n = x.shape[0]
    bs = min(int(batch_size), n)
    if val_samples is None:
        val_samples = 1 if method == "map" else 8
    with torch.no_grad():  # set up the guide and register every parameter
        guide(x[:bs], y[:bs])

    ckpt = None if checkpoint_dir is None else os.path.join(os.fspath(checkpoint_dir),
                                                            CHECKPOINT_NAME)
    history: dict[str, list] = {"epoch": [], "loss": []}
    if xv is not None:
        history["val_nll"] = []
        if model.likelihood == "categorical":
            history["val_accuracy"] = []
    state = {"epoch": 0, "step": 0, "best_value": None, "best_epoch": None,
             "best_params": None, "bad_epochs": 0, "stopped": False}
    if ckpt is not None and resume and os.path.exists(ckpt):
        saved = torch.load(ckpt, map_location=device, weights_only=False)
        pyro.get_param_store().set_state(saved["param_store"])
        _sync_module_params(model)
        optim.set_state(saved["optim"])
        for name, buf in model.named_buffers():
            if name in saved["buffers"]:
                buf.copy_(saved["buffers"][name])
        history = saved["history"]
        state = saved["state"]
        _set_rng_state(saved["rng"])
    dp = shards = None
    if distributed:
        # point every module at the param store's tensors (PyroParams update lazily), off the
        # RNG stream so that the draws stay those of the single-process run
        elbo_module = elbo(model, guide)
        with torch.no_grad(), torch.random.fork_rng(
                devices=[device] if device.type == "cuda" else []):
            elbo_module(x[:1], y[:1])
        dp = bsd.DataParallelELBO(elbo_module, model.num_data, device)
        shards = bsd.GlobalBatchShards(n, bs)

    def snapshot() -> dict:
        return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    def write_checkpoint() -> None:
        if ckpt is None:
            return
        if rank != 0:  # rank 0 writes; the others wait until the file is in place
            torch.distributed.barrier()
            return
        save_checkpoint(ckpt, {
            "param_store": pyro.get_param_store().get_state(),
            "optim": optim.get_state(),
            "rng": _rng_state(),
            "history": history,
            "state": state,
            "buffers": {k: v.detach().clone() for k, v in model.named_buffers()},
            "method": method,
        })
        if distributed:
            torch.distributed.barrier()

    from tqdm.auto import tqdm

    bar = tqdm(total=int(epochs), initial=min(state["epoch"], int(epochs)),
               disable=not progress or rank != 0, desc=f"fit[{method}]", unit="epoch")
    try:
        while state["epoch"] < epochs and not state["stopped"]:
            epoch = state["epoch"]
            perm = torch.randperm(n).to(device)
            total = 0.0
            if shards is None:
                batches = ((perm[i:i + bs], min(bs, n - i)) for i in range(0, n, bs))
            else:
                shards.set_epoch(epoch, perm)
                batches = iter(shards)
            for idx, size in batches:
                state["step"] += 1
                step_fn = None if dp is None else (
                    lambda idx=idx, size=size: dp.loss_and_grads(x, y, idx, size))
                loss = _guarded_step(svi, model, guide, (x[idx], y[idx]), epoch, state["step"],
                                     ckpt if ckpt and os.path.exists(ckpt) else None, step_fn)
                total += loss * size
            history["epoch"].append(epoch + 1)
            history["loss"].append(total / n / n)
            postfix = {"loss": f"{history['loss'][-1]:.4f}"}
            if xv is not None:
                probs = predictive_probs(model, xv, guide=guide, num_samples=val_samples)
                if model.likelihood == "categorical":
                    m = evaluate(probs.cpu(), yv.cpu())
                    history["val_accuracy"].append(m.accuracy)
                    history["val_nll"].append(m.nll)
                    postfix["val_acc"] = f"{m.accuracy:.3f}"
                else:
                    mse = float((probs.mean(0).reshape(yv.shape) - yv.to(probs)).square().mean())
                    history["val_nll"].append(mse)
                    postfix["val_mse"] = f"{mse:.4f}"
                value = history[monitor][-1]
                better = state["best_value"] is None or (
                    value < state["best_value"] if monitor == "val_nll"
                    else value > state["best_value"])
                if better:
                    state.update(best_value=value, best_epoch=epoch + 1,
                                 best_params=snapshot(), bad_epochs=0)
                else:
                    state["bad_epochs"] += 1
                    if patience is not None and state["bad_epochs"] >= patience:
                        state["stopped"] = True
            bar.set_postfix(postfix)
            bar.update(1)
            state["epoch"] = epoch + 1
            info = {"epoch": epoch + 1, "step": state["step"], "history": history,
                    "model": model, "guide": guide}
            if (epoch + 1) % checkpoint_every == 0 or epoch + 1 == epochs or state["stopped"]:
                write_checkpoint()
                model.renew_tracking()  # tracker state is not saved: renew it in both runs
            stop = False
            for cb in callbacks:
                stop = bool(cb(info)) or stop
            if dp is not None:
                stop = dp.any(stop)
            if stop:
                write_checkpoint()
                break
    finally:
        bar.close()
    if state["stopped"] and state["best_params"] is not None:
        store = pyro.get_param_store()
        with torch.no_grad():
            for k, v in state["best_params"].items():
                store._params[k].copy_(v)
    return FitResult(model=model, method=method, guide=guide, history=history,
                     epochs_run=state["epoch"], stopped_early=state["stopped"],
                     best_epoch=state["best_epoch"], checkpoint=ckpt)


def _fit_nuts(model, x, y, *, seed, num_samples, warmup_steps, num_chains, max_tree_depth,
              init_jitter, progress) -> FitResult:
    chains = []
    base = model.initial_values()
    for c in range(int(num_chains)):
        pyro.set_rng_seed(seed + c)
        init = {k: v * (1 + init_jitter * torch.randn_like(v)) if c else v
                for k, v in base.items()}
        if model.spectral_layers:
            init = {k: v.abs() if k.endswith("spectral_s") else v for k, v in init.items()}
        kernel = NUTS(model, init_strategy=init_to_value(values=init),
                      max_tree_depth=max_tree_depth, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    num_chains=1, disable_progbar=not progress)
        mcmc.run(x, y)
        chains.append({k: v.detach() for k, v in mcmc.get_samples().items()})
    samples = {k: torch.stack([ch[k] for ch in chains]) for k in chains[0]}
    return FitResult(model=model, method="nuts", samples=samples, epochs_run=0)
