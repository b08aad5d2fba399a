"""Layer 4: ``fit()`` a :class:`bayes_spectral.bnn.network.BayesianNetwork` by MAP, SVI, NUTS
or SG-MCMC (SGLD, SGHMC).

MAP and SVI share one loop: ``pyro.infer.SVI`` with one Adam over all parameters
(:class:`~bayes_spectral.bnn.multi_optim.MultiAdam`, fused kernel; ``optimizer=``) over shuffled
mini-batches (``Trace_ELBO``, or ``TraceEnum_ELBO(max_plate_nesting=1)`` when the model has
enumerated spike-and-slab indicators). The reported loss is the ELBO estimate divided by
``N`` (per training example). NUTS runs ``pyro.infer.MCMC(NUTS(...))`` once per chain,
sequentially, each chain started from the module's weights with a small multiplicative
jitter (seed ``seed + chain``).

SG-MCMC (``method="sgld" | "sghmc"``, :mod:`~bayes_spectral.bnn.sampling`,
:mod:`~bayes_spectral.bnn.samplers`, :mod:`~bayes_spectral.bnn.chains`): the MAP loop with
the optimiser replaced by the sampler and the loss by the potential
``U = -log p(theta) - (N/B) sum_batch log p(y|x, theta) - log|det J|`` (unconstrained
space), step ``eta = lr / N``, target ``exp(-U / T)``; ``num_chains`` chains in sequence
(seed ``seed + c``), draws ``{site: (chains, draws, *shape)}`` of constrained values as
for NUTS; checkpoints and exact resume as for MAP, with the chain index and the draws.

Checkpoints (``checkpoint_dir``, :mod:`bayes_spectral.bnn.checkpoint`): every
``checkpoint_every`` epochs (and at the end), the file ``checkpoint.pt`` is replaced
atomically (temporary file in the same folder, ``fsync``, ``os.replace``). It holds the param
store state, the optimiser state (``get_state``), the python / numpy / torch RNG states,
epoch, step, history, the early-stopping state, the model's buffers and the tracked priors'
state (``trackers``: tail trackers, fast-mode blocks, probe generators; a fit starts with
fresh ones). ``resume=True``
continues from it; on CPU an interrupted-and-resumed run equals the uninterrupted one bit for
bit. The file holds tensors and plain data only and is read with ``weights_only=True``
(unpickling never runs code; a corrupt file is an ``UnreadableFileError`` naming it). It
carries a fingerprint of the settings that shape the result
(:mod:`~bayes_spectral.bnn.fingerprint`): resuming with another method, guide, prior, lr,
batch size, likelihood, width, ... is a ``ValueError`` naming the differing settings.

Data parallel (``distributed=True``, or a ``torch.distributed`` group initialised): MAP and
SVI over the ranks with ``DistributedDataParallel``, equal to the single-process run with
the same global ``batch_size`` (:mod:`bayes_spectral.distributed` has the scaling rule);
rank 0 writes the checkpoints, every rank resumes from them, with any number of ranks.

State and modes (:mod:`bayes_spectral.bnn.result`): the returned :class:`FitResult` owns a
snapshot of its parameters, so later fits never change it. Training runs in train mode;
validation, the guide's set-up pass and NUTS in eval mode; the user's modes are restored.
Refitting the same network is a restart: every ``fit`` starts from the parameters and
buffers the network had before its first fit (and a new guide at the module's weights),
never half from a previous fit; to continue, pass ``guide=`` with ``init_values`` from
``map_values(res.guide)``. After a fit, ``bn.net(x)`` still draws the prior layers from the
prior (it warns): the fitted network is ``res.to_module()``.

NaN/Inf guard (:mod:`bayes_spectral.bnn.guard`): at every step the loss, the parameters and
their gradients are checked *before* the optimiser update; on the first non-finite value
:class:`NonFiniteError` names the parameter or sample site (and its layer), the update is not
applied and training stops, leaving the last good checkpoint in place.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Callable, Iterable
from typing import Any

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoGuide, init_to_value

from . import distributed as bsd
from .batches import DataSource, as_source, inputs_to, map_inputs
from .chains import chain_init, run_chains
from .checkpoint import CHECKPOINT_NAME
from .checkpoint import save_checkpoint as save_checkpoint  # re-exported (apps.compare)
from .guard import NonFiniteError
from .lazy import check_every
from .modes import eval_mode, train_mode
from .multi_optim import OPTIMIZERS
from .network import BayesianNetwork
from .param_state import restart_modules
from .result import FitResult, warn_on_bare_calls
from .sampling import SamplerConfig
from .training import start_run, train

__all__ = ["CHECKPOINT_NAME", "FitResult", "NonFiniteError", "fit"]

METHODS = ("map", "svi", "nuts", "sgld", "sghmc")
SAMPLERS = ("sgld", "sghmc")
MONITORS = ("val_nll", "val_accuracy")


# ----------------------------------------------------------------------------- arguments


def _check_arguments(model, method: str, *, epochs, batch_size, lr, checkpoint_every,
                     num_chains, num_particles, monitor: str, patience, val_data) -> None:
    """Refuse a model that is not a BayesianNetwork and bad settings, before any work."""
    if not isinstance(model, BayesianNetwork):
        raise TypeError(f"fit() needs a model built by bayes_spectral.bayesian(), got "
                        f"{type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    for key, val in (("epochs", epochs), ("batch_size", batch_size),
                     ("checkpoint_every", checkpoint_every), ("num_chains", num_chains),
                     ("num_particles", num_particles)):
        if isinstance(val, bool) or not isinstance(val, numbers.Real) or int(val) != val \
                or val < 1:
            raise ValueError(f"{key} must be a positive integer, got {val!r}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not 0 < lr < math.inf:
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if monitor not in MONITORS:
        raise ValueError(f"monitor must be 'val_nll' or 'val_accuracy', got {monitor!r}")
    if monitor == "val_accuracy" and model.observation.task != "classification":
        raise ValueError(f"monitor='val_accuracy' needs a classification likelihood, got "
                         f"likelihood {model.likelihood!r} (use monitor='val_nll')")
    if patience is not None and val_data is None:
        raise ValueError("patience (early stopping) needs val_data")


def _check_sampler_arguments(guide, patience) -> None:
    """SG-MCMC runs the ``AutoDelta`` guide (its parameters are the chain's state) and has
    no early stopping."""
    if guide not in (None, "delta"):
        raise ValueError(f"the samplers ('sgld', 'sghmc') move the MAP guide's point: guide "
                         f"must be None or 'delta', got {guide!r}")
    if patience is not None:
        raise ValueError("patience (early stopping) does not apply to the samplers ('sgld', "
                         "'sghmc'): every chain runs its epochs")


def _check_device(device: str | torch.device) -> torch.device:
    """``torch.device(device)``, refusing an unknown name or a device this torch cannot use
    (``ValueError`` naming it) before any work."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device ('cpu', 'cuda', "
                         f"'cuda:0', 'mps', ...): {err}") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: CUDA is not available in this torch build or "
                         "machine (use device='cpu')")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r}: MPS is not available (use device='cpu')")
    return dev


def _check_dtype(model: BayesianNetwork, dtype: torch.dtype | None) -> torch.dtype:
    """``dtype``, or (``None``) the model's own: the dtype of its first floating-point
    parameter or buffer (``torch.get_default_dtype()`` if it has none), so a float64
    network is fitted in float64, never silently cast to float32."""
    if dtype is None:
        floats = (t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point())
        first = next(floats, None)
        return torch.get_default_dtype() if first is None else first.dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (torch.float32, "
                         f"torch.float64, ...) or None (the model's), got {dtype!r}")
    return dtype


def _use_distributed(distributed: bool | None, method: str) -> bool:
    """``distributed=None`` means "when a process group is initialised"; checks the rest."""
    if distributed is None:
        distributed = bsd.is_distributed()
    if distributed and not bsd.is_distributed():
        raise ValueError("distributed=True needs an initialised torch.distributed process group "
                         "(bayes_spectral.distributed.init(), under torchrun)")
    if distributed and method in ("nuts", *SAMPLERS):
        raise ValueError(f"method {method!r} is not data-parallel: run it in one process "
                         "(distributed=False)")
    return distributed


# ----------------------------------------------------------------------------- data


def _set_num_data(model: BayesianNetwork, source: DataSource) -> None:
    """``num_data=None`` on the model: a dataset's or loader's length becomes its
    ``num_data``; an iterable of unknown length is refused (a pair or Split: as given)."""
    if model.num_data is not None or not source.needs_num_data:
        return
    if source.num_data is None:
        raise ValueError("data: the number of training examples is unknown (the batches come "
                         "from an iterable without a dataset length); give it as "
                         "bayesian(..., num_data=N) so the likelihood is scaled by N / batch")
    model.num_data = int(source.num_data)


def _in_model_dtype(model: BayesianNetwork, x, y):
    """``(x, y)`` with floating-point tensors in the model's current dtype (the checks run
    the network as it is, before ``fit`` moves it to ``dtype``); others kept."""
    ref = _check_dtype(model, None)
    return (map_inputs(x, lambda t: t.to(ref) if t.is_floating_point() else t),
            y.to(ref) if y.is_floating_point() else y)


def _prepare_data(model: BayesianNetwork, data, val_data, device: torch.device,
                  dtype: torch.dtype, *, batch_size: int, shuffle: bool):
    """The :class:`~bayes_spectral.bnn.batches.DataSource` of ``data`` (checked: all rows of
    tensors, the first batch of a dataset or loader) and the validation ``(xv, yv)`` (all
    rows); the model and the source moved to ``device``/``dtype`` (floating-point tensors
    cast, token ids kept; validation targets stay where they are). Returns
    ``(source, xv, yv)`` (``xv = yv = None`` without validation data)."""
    source = as_source(data, "data", batch_size=batch_size, shuffle=shuffle)
    model.check_data(*_in_model_dtype(model, *source.rows_to_check()), "data")
    _set_num_data(model, source)
    xv = yv = None
    if val_data is not None:
        xv, yv = as_source(val_data, "val_data").materialize()
        model.check_data(*_in_model_dtype(model, xv, yv), "val_data")
    model.to(device=device, dtype=dtype)
    source.to(device, dtype)
    if xv is not None:
        xv = inputs_to(xv, device, dtype)
    return source, xv, yv


# ----------------------------------------------------------------------------- NUTS


_chain_init = chain_init  # NUTS and the SG-MCMC chains start alike (chains.py)


def _fit_nuts(model, x, y, *, seed, num_samples, warmup_steps, num_chains, max_tree_depth,
              init_jitter, progress) -> FitResult:
    """``num_chains`` single-chain NUTS runs in sequence, chain c seeded ``seed + c``."""
    chains = []
    base = model.initial_values()
    for c in range(int(num_chains)):
        pyro.set_rng_seed(seed + c)
        init = _chain_init(model, base, c, init_jitter)
        kernel = NUTS(model, init_strategy=init_to_value(values=init),
                      max_tree_depth=max_tree_depth, jit_compile=False)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                    num_chains=1, disable_progbar=not progress)
        mcmc.run(x, y)
        chains.append({k: v.detach() for k, v in mcmc.get_samples().items()})
    samples = {k: torch.stack([ch[k] for ch in chains]) for k in chains[0]}
    return FitResult(model=model, method="nuts", samples=samples, epochs_run=0)


# ----------------------------------------------------------------------------- fit


def fit(
    model: BayesianNetwork, data, method: str = "map", guide: AutoGuide | str | None = None, *,
    epochs: int = 10, batch_size: int = 128, shuffle: bool = True, lr: float = 1e-2,
    num_particles: int = 1,
    device: str | torch.device = "cpu", dtype: torch.dtype | None = None, seed: int = 0,
    val_data=None, val_samples: int | None = None, monitor: str = "val_nll",
    patience: int | None = None, checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 1, resume: bool = True, progress: bool = True,
    callbacks: Iterable[Callable[[dict], Any]] = (), num_samples: int = 200,
    warmup_steps: int = 200, num_chains: int | None = None, max_tree_depth: int = 8,
    init_jitter: float = 0.1, distributed: bool | None = None, prior_every: int = 1,
    temperature: float = 1.0, burn_in: int | None = None, thin: int = 1,
    cycles: int | None = None, explore: float = 0.5, friction: float = 0.1,
    precondition: bool = False, draws_dir: str | os.PathLike | None = None,
    draw_chunk: int = 64, free_params: str = "drift", optimizer: str = "fused",
) -> FitResult:
    """Fit ``model`` to ``data``: a pair ``(x, y)``, a ``Split`` (its training part), a
    ``torch.utils.data.Dataset``, a ``DataLoader`` or any re-iterable of ``(x, y)`` batches
    (:mod:`~bayes_spectral.bnn.batches`); ``x`` a tensor of any dtype (token ids stay
    integer), a tuple (``net(*x)``) or a dict (``net(**x)``) of tensors; numpy arrays are
    converted. A dataset's or loader's length becomes the model's ``num_data`` when
    :func:`~bayes_spectral.bayesian` had none (an iterable of unknown length then needs it).

    :param batch_size, shuffle: batches of a pair, Split or dataset: ``batch_size`` rows in
        the order ``torch.randperm(n)`` drawn each epoch (``shuffle=False``: in order). A
        loader keeps its own batches and order.

    :param device, dtype: where and in which floating dtype the model and the data are put;
        ``dtype=None`` (default): the model's own (a ``net.double()`` stays float64, a
        float32 network float32); integer inputs (token ids) stay integer.

    :param method: ``"map"`` (default guide ``auto_delta``), ``"svi"`` (default
        ``auto_normal``), ``"nuts"`` (full batch; layers without a prior stay fixed), or the
        SG-MCMC samplers ``"sgld"`` / ``"sghmc"`` (mini-batches through the MAP loop:
        :mod:`~bayes_spectral.bnn.sampling`, :mod:`~bayes_spectral.bnn.samplers`);
        NUTS and the samplers give ``res.samples`` ``{site: (chains, draws, *shape)}`` of
        constrained values.
    :param guide: an ``AutoGuide`` or a kind of :func:`bayes_spectral.bnn.guides.make_guide`.
    :param val_data: ``(x, y)`` (or any form of ``data``, read whole) evaluated after every
        epoch (posterior predictive with ``val_samples`` draws: 1 for MAP, 8 for SVI by
        default); ``history`` gains
        ``val_accuracy`` (categorical) and ``val_nll``.
    :param monitor, patience: early stopping on ``"val_nll"`` (lower is better) or
        ``"val_accuracy"``; after ``patience`` epochs without improvement training stops and
        the best parameters are restored.
    :param checkpoint_dir, checkpoint_every, resume: atomic checkpoints and exact resume
        (module docstring).
    :param callbacks: ``cb(info)`` after each epoch (``info``: epoch, step, history); a
        return value of ``True`` stops training (the checkpoint is written before).
    :param num_samples, warmup_steps, num_chains, max_tree_depth, init_jitter: NUTS
        (``num_chains`` default 2; samplers: 4, and ``init_jitter`` too).
    :param lr, temperature, burn_in, thin, cycles, explore, friction, precondition: SG-MCMC
        (``"sgld"``, ``"sghmc"``): step ``eta = lr / N``; the chain targets ``exp(-U / T)``
        (``T = temperature``; 1 = the Bayes posterior, < 1 cold); draws are kept from the
        steps after ``burn_in`` epochs (default ``epochs // 2``; 0 with ``cycles``), every
        ``thin``-th one; ``cycles=M``: the cyclical schedule (``M`` cycles over all steps of
        a chain, the first ``explore`` fraction of each without noise or draws);
        ``friction`` (SGHMC, in (0, 1]); ``precondition``: pSGLD's diagonal RMSprop ``G``.
        ``res.draw_steps``: the kept steps (1-based, per chain).
    :param draws_dir, draw_chunk: samplers: the draws leave the device every ``draw_chunk``
        draws (to the CPU, or to ``draws_dir`` as safetensors files read back at the end).
    :param free_params: samplers: parameters without a prior (biases, BatchNorm's affine
        parameters, spectral ``U``/``V``) are not sampled: ``"drift"`` (default) moves them
        by the drift without noise (a point estimate along the chain), ``"fixed"`` keeps them
        at the chain's start (as NUTS does).
    :param prior_every: lazy priors (MAP/SVI): the weight priors' log-density enters the
        loss on steps ``1, 1 + k, 1 + 2k, ...`` times ``k`` and is masked (not evaluated:
        no spectral work) on the others (:mod:`~bayes_spectral.bnn.lazy`; bias and the
        effect of Adam: :class:`~bayes_spectral.penalties.Regularizer`, ``every``). The
        counter is the step (in checkpoints: exact resume); ``1`` (default) is the exact
        loss. Recorded in the fingerprint.
    :param distributed: data-parallel MAP/SVI over the ranks of the initialised
        ``torch.distributed`` group (:mod:`bayes_spectral.distributed`: the same parameters
        as the single-process run with the global ``batch_size``); ``None``: when a group is
        initialised. Run under ``torchrun`` (README, "Distributed training"); every rank
        calls ``fit`` with the same arguments and gets the same result; only rank 0 writes
        checkpoints, all ranks resume from ``checkpoint_dir`` (a shared folder), with any
        number of ranks; ``callbacks`` run on every rank and a stop on any rank stops all.
    :param optimizer: MAP/SVI's Adam (:func:`~bayes_spectral.bnn.multi_optim.svi_optim`):
        ``"fused"`` (default: one fused Adam over all parameters, within rounding of
        ``pyro.optim.Adam``, the fastest on CPU), ``"multi"`` (one foreach Adam, equal to
        ``pyro.optim.Adam`` bit for bit) or ``"pyro"`` (``pyro.optim.Adam``). Recorded in the
        fingerprint when ``"fused"``.
    :raises ValueError/TypeError: bad data (shapes, labels out of range) or settings (``lr``
        not positive and finite, ``num_particles < 1``, an unusable ``device``; samplers:
        ``temperature <= 0``, ``friction`` not in (0, 1], ``thin < 1``,
        ``burn_in >= epochs``, ``cycles`` above the number of steps, ``explore`` not in
        [0, 1), a guide other than ``"delta"``, ``patience``, ``distributed``;
        ``monitor="val_accuracy"`` without a classification likelihood) before training; a
        checkpoint written with other settings (named, old vs new) before anything is loaded.
    :raises UnreadableFileError: a corrupt, truncated or unsafe checkpoint (names the file).
    :raises NonFiniteError: a NaN/Inf loss or parameter (names the parameter and layer), a
        distribution refusing an overflowed parameter (names it), or a non-finite forward
        pass with finite parameters (says so).
    """
    if num_chains is None:
        num_chains = 4 if method in SAMPLERS else 2
    _check_arguments(model, method, epochs=epochs, batch_size=batch_size, lr=lr,
                     checkpoint_every=checkpoint_every, num_chains=num_chains,
                     num_particles=num_particles, monitor=monitor, patience=patience,
                     val_data=val_data)
    device = _check_device(device)
    dtype = _check_dtype(model, dtype)
    prior_every = check_every(prior_every)
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"fit(): optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if method == "nuts" and prior_every != 1:
        raise ValueError("prior_every applies to MAP/SVI steps; NUTS needs the exact density "
                         f"(prior_every=1), got {prior_every}")
    distributed = _use_distributed(distributed, method)
    if method in SAMPLERS:
        _check_sampler_arguments(guide, patience)
    rank = torch.distributed.get_rank() if distributed else 0
    restart_modules(model)  # a refit restarts from the state bayesian() left (docstring)
    warn_on_bare_calls(model)
    source, xv, yv = _prepare_data(model, data, val_data, device, dtype,
                                   batch_size=batch_size, shuffle=shuffle)
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    if method == "nuts":  # a deterministic potential: eval mode (no dropout, BN stats)
        with eval_mode(model):
            return _fit_nuts(model, *source.materialize(), seed=seed, num_samples=num_samples,
                             warmup_steps=warmup_steps, num_chains=num_chains,
                             max_tree_depth=max_tree_depth, init_jitter=init_jitter,
                             progress=progress)
    if method in SAMPLERS:
        cfg = SamplerConfig(method, temperature=temperature, burn_in=burn_in, thin=thin,
                            cycles=cycles, explore=explore, friction=friction,
                            precondition=precondition, init_jitter=init_jitter,
                            num_chains=num_chains, draws_dir=draws_dir, draw_chunk=draw_chunk,
                            free_params=free_params)
        return run_chains(model, source, cfg, lr=lr, epochs=epochs, device=device, dtype=dtype,
                          seed=seed, checkpoint_dir=checkpoint_dir, resume=resume,
                          checkpoint_every=checkpoint_every, callbacks=callbacks,
                          val=None if xv is None else (xv, yv), val_samples=val_samples,
                          monitor=monitor, settings={"batch_size": batch_size,
                                                     "shuffle": shuffle, "seed": seed,
                                                     "dtype": dtype},
                          prior_every=prior_every, progress=progress)
    model.renew_tracking()  # every fit starts with fresh trackers (a resume restores its own)
    with eval_mode(model):  # the guide's set-up pass leaves BatchNorm statistics alone
        run = start_run(model, source, method, guide, num_particles=num_particles, lr=lr,
                        device=device, checkpoint_dir=checkpoint_dir,
                        resume=resume, rank=rank, distributed=distributed, monitor=monitor,
                        patience=patience, with_validation=xv is not None,
                        settings={"batch_size": batch_size, "shuffle": shuffle, "seed": seed,
                                  "dtype": dtype}, prior_every=prior_every,
                        optimizer=optimizer)
    with train_mode(model):
        train(run, method, epochs=epochs, checkpoint_every=checkpoint_every,
              callbacks=callbacks, val=None if xv is None else (xv, yv),
              val_samples=val_samples, monitor=monitor, show=progress and rank == 0)
    run.stopper.restore_best()
    return FitResult(model=model, method=method, guide=run.guide, history=run.history,
                     epochs_run=run.epoch, stopped_early=run.stopper.stopped,
                     best_epoch=run.stopper.best_epoch, checkpoint=run.checkpointer.path)

