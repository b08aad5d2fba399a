"""Layer 4: the MAP/SVI training loop behind :func:`bayes_spectral.bnn.fit.fit`.

:func:`start_run` builds the guide, the ELBO (``Trace_ELBO``, or
``TraceEnum_ELBO(max_plate_nesting=1)`` with enumerated spike-and-slab indicators),
Adam (:class:`~bayes_spectral.bnn.multi_optim.MultiAdam`) and ``SVI``, restores a checkpoint
(:mod:`bayes_spectral.bnn.checkpoint`) and sets up the data-parallel loss. :func:`train` runs
the epochs: shuffled mini-batches through :func:`bayes_spectral.bnn.guard.guarded_step`, the
loss per epoch ``sum_b loss_b * |b| / N^2`` (the ELBO estimate per training example),
validation, :class:`EarlyStopping`, checkpoints and callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro.infer import ELBO, SVI, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuide

from . import distributed as bsd
from .batches import DataSource, TensorSource
from .checkpoint import Checkpointer
from .fingerprint import run_fingerprint
from .guard import NonFiniteError, guarded_step
from .guides import OWNER_STATE, make_guide
from .lazy import LazyPriorModel, check_every
from .modes import eval_mode
from .multi_optim import svi_optim
from .network import BayesianNetwork
from .param_state import register_local_params
from .predict import evaluate, predictive_probs

__all__ = ["EarlyStopping", "TrainingRun", "param_snapshot", "start_run", "train"]


def param_snapshot() -> dict[str, torch.Tensor]:
    """Detached clones of the param store's (unconstrained) values."""
    return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}


# ----------------------------------------------------------------------------- SVI set-up


def _make_guide(model: BayesianNetwork, guide: AutoGuide | str | None, method: str):
    """The given guide, or :func:`make_guide` of its kind (default: delta for MAP, normal)."""
    if guide is None:
        return make_guide(model, "delta" if method == "map" else "normal")
    if isinstance(guide, str):
        return make_guide(model, guide)
    guide.__dict__.pop(OWNER_STATE, None)  # a result's guide trained again: no longer its
    return guide


def _make_elbo(model: BayesianNetwork, num_particles: int, guide=None) -> ELBO:
    """The guide's own ``make_elbo`` (e.g. ``FusedNormal``), else ``TraceEnum_ELBO`` when
    spike-and-slab indicators are enumerated, else ``Trace_ELBO``."""
    if hasattr(guide, "make_elbo"):
        return guide.make_elbo(num_particles)
    if model.enumerated_layers:
        return TraceEnum_ELBO(max_plate_nesting=1, num_particles=num_particles)
    return Trace_ELBO(num_particles=num_particles)


def _data_parallel(model, guide, elbo, x, y, batch_size: int, device: torch.device):
    """The data-parallel loss and the per-rank batch shards of the global batches."""
    # point every module at the param store's tensors (PyroParams update lazily), off the
    # RNG stream so that the draws stay those of the single-process run
    elbo_module = elbo(model, guide)
    with torch.no_grad(), torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []):
        elbo_module(x[:1], y[:1])
    dp = bsd.DataParallelELBO(elbo_module, model.num_data, device)
    return dp, bsd.GlobalBatchShards(x.shape[0], batch_size)


def _new_history(model: BayesianNetwork, with_validation: bool) -> dict[str, list]:
    """``epoch`` and ``loss``; ``val_nll`` (and ``val_accuracy``, classification) with
    val_data."""
    history: dict[str, list] = {"epoch": [], "loss": []}
    if with_validation:
        history["val_nll"] = []
        if model.observation.task == "classification":
            history["val_accuracy"] = []
    return history


# ----------------------------------------------------------------------------- early stopping


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without improvement of ``monitor`` (``val_nll``: lower
    is better; ``val_accuracy``: higher); the best parameters are kept to be restored."""

    monitor: str
    patience: int | None
    best_value: float | None = None
    best_epoch: int | None = None
    best_params: dict[str, torch.Tensor] | None = None
    bad_epochs: int = 0
    stopped: bool = False

    def state_dict(self) -> dict:
        """The fields saved in the checkpoint's ``state`` (with epoch and step)."""
        return {"best_value": self.best_value, "best_epoch": self.best_epoch,
                "best_params": self.best_params, "bad_epochs": self.bad_epochs,
                "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        """Take the fields of :meth:`state_dict` from a checkpoint's ``state``."""
        for key in ("best_value", "best_epoch", "best_params", "bad_epochs", "stopped"):
            setattr(self, key, state[key])

    def update(self, value: float, epoch: int) -> None:
        """Record the monitored ``value`` after 0-based ``epoch``."""
        better = self.best_value is None or (
            value < self.best_value if self.monitor == "val_nll" else value > self.best_value)
        if better:
            self.best_value, self.best_epoch = value, epoch + 1
            self.best_params, self.bad_epochs = param_snapshot(), 0
        else:
            self.bad_epochs += 1
            if self.patience is not None and self.bad_epochs >= self.patience:
                self.stopped = True

    def restore_best(self) -> None:
        """After an early stop: copy the best parameters back into the param store."""
        if self.stopped and self.best_params is not None:
            store = pyro.get_param_store()
            with torch.no_grad():
                for k, v in self.best_params.items():
                    store._params[k].copy_(v)


# ----------------------------------------------------------------------------- the run


@dataclass
class TrainingRun:
    """One MAP/SVI run: what its epochs share, its position and its history."""

    model: BayesianNetwork
    guide: AutoGuide
    svi: SVI
    elbo: ELBO
    source: DataSource
    batch_size: int
    device: torch.device
    checkpointer: Checkpointer
    history: dict[str, list]
    stopper: EarlyStopping
    epoch: int = 0
    step: int = 0
    dp: bsd.DataParallelELBO | None = None
    shards: bsd.GlobalBatchShards | None = None
    lazy: LazyPriorModel | None = None  # prior_every > 1: the model SVI runs (lazy.py)
    hooks: Any = None  # samplers: after_step(run), state_dict(), load_state_dict(state)

    @property
    def x(self) -> torch.Tensor:
        """The inputs of a tensor source (the data-parallel path indexes them)."""
        return self.source.x  # type: ignore[attr-defined]

    @property
    def y(self) -> torch.Tensor:
        return self.source.y  # type: ignore[attr-defined]

    def state_dict(self) -> dict:
        """The checkpoint's ``state``: epoch, step and the early-stopping state."""
        state = {"epoch": self.epoch, "step": self.step, **self.stopper.state_dict()}
        if self.hooks is not None:
            state["sampler"] = self.hooks.state_dict()
        return state

    def resume(self) -> None:
        """Continue from the checkpoint file (param store, optimiser, RNGs, history)."""
        self.history, state = self.checkpointer.restore(self.device)
        self.epoch, self.step = state["epoch"], state["step"]
        self.stopper.load_state_dict(state)
        if self.hooks is not None:
            self.hooks.load_state_dict(state["sampler"])

    def save(self) -> None:
        """Write the checkpoint (history and :meth:`state_dict`)."""
        self.checkpointer.save(self.history, self.state_dict())


def _setup_guide(guide, source: DataSource) -> None:
    """Set up the guide on the source's first batch (registering every parameter); a
    distribution refusing the network's output there (NaN/Inf with the initial parameters
    finite) is a :class:`NonFiniteError` naming the forward pass."""
    try:
        with torch.no_grad():
            guide(*source.setup_batch())
    except ValueError as exc:
        if "Expected parameter" not in str(exc):
            raise
        first = str(exc).splitlines()[0]
        raise NonFiniteError(
            "non-finite output of the forward pass before training (the guide's set-up pass "
            "on the first batch) with every parameter finite: the network's output is NaN/Inf "
            "for some inputs (check the model's forward, e.g. a division by zero, and the "
            f"inputs): {first}", site="obs", epoch=0, step=0) from exc


def start_run(model: BayesianNetwork, source: DataSource, method: str, guide, *,
              num_particles: int, lr: float, device: torch.device, checkpoint_dir,
              resume: bool, rank: int, distributed: bool, monitor: str, patience: int | None,
              with_validation: bool, settings: dict | None = None,
              prior_every: int = 1, sampler=None, optimizer: str = "fused") -> TrainingRun:
    """Guide, ELBO, Adam and SVI (the guide's parameters registered on the source's first
    batch, drawing nothing from the RNGs), then the checkpoint restored (``resume``: with the
    source's generator states, after its fingerprint is checked against this run's:
    :mod:`~bayes_spectral.bnn.fingerprint`; ``settings``: ``batch_size``, ``shuffle``,
    ``seed``, ``dtype`` for it) and the data-parallel pieces (``distributed``: tensor inputs
    only). ``prior_every=k > 1``: SVI runs the model under
    :class:`~bayes_spectral.bnn.lazy.LazyPriorModel` (the prior every k-th step, times k).
    ``sampler`` (SG-MCMC, :mod:`~bayes_spectral.bnn.sampling`): gives the optimiser
    (``sampler.optim(lr)``), the loss (``sampler.loss(elbo)``: the ELBO plus the Jacobian
    term), the fingerprint's extra settings (``sampler.fingerprint()``) and the per-step
    hooks (``run.hooks``: draws, checkpointed in the run's state). ``optimizer``: the MAP/SVI
    optimiser's kind (:func:`~bayes_spectral.bnn.multi_optim.svi_optim`: ``"fused"``, one
    fused Adam over all parameters, within rounding of ``pyro.optim.Adam``; ``"multi"``, one
    foreach Adam, equal to it bit for bit; ``"pyro"``); a ``"fused"`` run records it in the
    fingerprint (a checkpoint of the other two, or of before, is not resumed by it)."""
    guide_arg = guide
    guide = _make_guide(model, guide, method)
    elbo = _make_elbo(model, num_particles, guide)
    optim = svi_optim(lr, optimizer) if sampler is None else sampler.optim(lr)
    prior_every = check_every(prior_every)
    lazy = LazyPriorModel(model, prior_every) if prior_every > 1 else None
    loss = {"loss": elbo} if sampler is None else sampler.loss(elbo, guide)
    svi = SVI(model if lazy is None else lazy, guide, optim, **loss)
    _setup_guide(guide, source)
    register_local_params(model, guide)  # module_local_params: store names for the run
    settings = {"batch_size": 0, "shuffle": True, "seed": 0, "dtype": torch.float32,
                **(settings or {})}
    fingerprint = run_fingerprint(model, method, guide_arg, lr=lr, num_particles=num_particles,
                                  prior_every=prior_every, **settings)
    if sampler is not None:
        fingerprint["sampler"] = sampler.fingerprint()
    if sampler is None and optimizer == "fused":  # "multi", "pyro": the numbers of before
        fingerprint["optimizer"] = optimizer
    checkpointer = Checkpointer(checkpoint_dir, model=model, optim=optim, method=method,
                                rank=rank, distributed=distributed, data=source,
                                fingerprint=fingerprint)
    bs = getattr(source, "batch_size", 0)
    run = TrainingRun(model=model, guide=guide, svi=svi, elbo=elbo, source=source, batch_size=bs,
                      device=device, checkpointer=checkpointer,
                      history=_new_history(model, with_validation),
                      stopper=EarlyStopping(monitor, patience), lazy=lazy, hooks=sampler)
    if resume and checkpointer.last_good() is not None:
        run.resume()
    if distributed:
        if not isinstance(source, TensorSource) or not isinstance(source.x, torch.Tensor):
            raise ValueError("distributed fit needs the data as tensors (a pair (x, y) with a "
                             "tensor x, a Split or a TensorDataset of two tensors), got "
                             f"{type(source).__name__}")
        run.dp, run.shards = _data_parallel(svi.model, guide, elbo, source.x, source.y, bs,
                                            device)
    return run


# ----------------------------------------------------------------------------- the epochs

def _batches(run: TrainingRun, epoch: int):
    """``(x, y, size, step_fn)`` of this epoch's mini-batches: the source's epoch
    (:mod:`~bayes_spectral.bnn.batches`), or this rank's shard of the shuffled global
    batches (data parallel: ``step_fn`` computes the loss and DDP-averaged gradients)."""
    if run.shards is None:
        return ((x, y, size, None) for x, y, size in run.source.epoch())
    run.shards.set_epoch(epoch, run.source.order())

    def shard(idx, size):
        return (run.x[idx], run.y[idx], size,
                lambda: run.dp.loss_and_grads(run.x, run.y, idx, size))

    return (shard(idx, size) for idx, size in run.shards)


def _train_epoch(run: TrainingRun, epoch: int) -> float:
    """One pass over the data; returns the mean loss per example divided by ``N`` (the rows
    of the epoch; for a data-parallel run this rank's share of every global batch counts the
    global batch's size)."""
    n = 0
    total = 0.0
    for x, y, size, step_fn in _batches(run, epoch):
        run.step += 1
        if run.lazy is not None:  # the counter is run.step (checkpointed): exact resume
            run.lazy.set_step(run.step)
        loss = guarded_step(run.svi, run.model, run.guide, (x, y), epoch,
                            run.step, run.checkpointer.last_good(), step_fn)
        if run.hooks is not None:  # samplers: keep the draw of this step (sampling.py)
            run.hooks.after_step(run)
        total += loss * size
        n += size
    if n == 0:
        raise ValueError(f"data: epoch {epoch + 1} gave no batch (an exhausted iterator? pass "
                         "a DataLoader or a re-iterable of (x, y) batches)")
    return total / n / n


def _validate(run: TrainingRun, xv, yv, num_samples: int) -> dict[str, str]:
    """Posterior-predictive metrics of the likelihood on the validation data (``val_nll``:
    its predictive NLL, e.g. the Gaussian mixture's; ``val_accuracy`` for classification),
    appended to the history; returns the progress-bar fields."""
    with eval_mode(run.model):
        pred = predictive_probs(run.model, xv, guide=run.guide, num_samples=num_samples)
    m = evaluate(pred.cpu(), yv.cpu(), run.model.observation)
    run.history["val_nll"].append(m.nll)
    if "val_accuracy" in run.history:
        run.history["val_accuracy"].append(m.accuracy)
        return {"val_acc": f"{m.accuracy:.3f}"}
    return {"val_nll": f"{m.nll:.4f}"}


def _end_epoch(run: TrainingRun, epochs: int, checkpoint_every: int,
               callbacks: Iterable[Callable[[dict], Any]]) -> bool:
    """Checkpoint when due, then the callbacks; returns whether one of them (on any rank)
    asked to stop (the checkpoint is then written)."""
    done = run.epoch
    info = {"epoch": done, "step": run.step, "history": run.history,
            "model": run.model, "guide": run.guide}
    if done % checkpoint_every == 0 or done == epochs or run.stopper.stopped:
        run.save()  # with the tracked priors' state (tracker_state.py): nothing renewed
    stop = False
    for cb in callbacks:
        stop = bool(cb(info)) or stop
    if run.dp is not None:
        stop = run.dp.any(stop)
    if stop:
        run.save()
    return stop


def train(run: TrainingRun, method: str, *, epochs: int, checkpoint_every: int, callbacks, val,
          val_samples: int | None, monitor: str, show: bool) -> None:
    """Epochs until ``epochs``, an early stop or a callback's stop, with a progress bar."""
    from tqdm.auto import tqdm

    if val_samples is None:
        val_samples = 1 if method == "map" else 8
    with tqdm(total=int(epochs), initial=min(run.epoch, int(epochs)), disable=not show,
              desc=f"fit[{method}]", unit="epoch") as bar:
        _train_epochs(run, epochs, checkpoint_every, callbacks, val, val_samples, monitor, bar)


def _train_epochs(run: TrainingRun, epochs: int, checkpoint_every: int, callbacks, val,
                  val_samples: int, monitor: str, bar) -> None:
    """The epoch loop: train, validate (early stopping), checkpoint and callbacks."""
    while run.epoch < epochs and not run.stopper.stopped:
        epoch = run.epoch
        loss = _train_epoch(run, epoch)
        run.history["epoch"].append(epoch + 1)
        run.history["loss"].append(loss)
        postfix = {"loss": f"{run.history['loss'][-1]:.4f}"}
        if val is not None:
            postfix.update(_validate(run, *val, val_samples))
            run.stopper.update(run.history[monitor][-1], epoch)
        bar.set_postfix(postfix)
        bar.update(1)
        run.epoch = epoch + 1
        if _end_epoch(run, epochs, checkpoint_every, callbacks):
            break

