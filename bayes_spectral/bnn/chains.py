"""Layer 4: the chains of a sampler fit (SG-MCMC, :mod:`~bayes_spectral.bnn.sampling`), run
in sequence through the MAP loop, and the starting points shared with NUTS.

Chain ``c`` is seeded ``seed + c`` and starts at :func:`chain_init` of the module's initial
values; for ``c > 0`` the network's parameters and buffers are restarted (the state
:func:`~bayes_spectral.bayesian` left) and the param store cleared; every chain starts
with fresh trackers (:meth:`~BayesianNetwork.renew_tracking`), and a resumed chain gets
the checkpoint's (:mod:`~bayes_spectral.bnn.tracker_state`), so each chain's tracker state
is its own. On ``resume`` the first
run set up restores the checkpoint, whichever chain it belongs to (the checkpoint's chain
index is in the sampler's state), and the loop continues from that chain.
"""

from __future__ import annotations

import pyro
import torch

from .free_state import drop_constant
from .guides import auto_delta
from .modes import eval_mode, train_mode
from .network import BayesianNetwork
from .param_state import restart_modules
from .result import FitResult
from .sampling import DrawCollector, SamplerConfig, steps_per_epoch
from .training import start_run, train

__all__ = ["chain_init", "run_chains"]


def chain_init(model: BayesianNetwork, base: dict, chain: int, jitter: float) -> dict:
    """Chain 0 starts at ``base``; chain c > 0 at ``base * (1 + jitter * N(0, 1))``
    (spectral singular values and other positive sites, e.g. the noise, kept positive)."""
    init = {k: v * (1 + jitter * torch.randn_like(v)) if chain else v for k, v in base.items()}
    positive = {s for s in model.noise_sites}
    if model.spectral_layers:
        positive |= {k for k in init if k.endswith("spectral_s")}
    return {k: v.abs() if k in positive else v for k, v in init.items()}


def _set_up_chain(model, source, cfg: SamplerConfig, collector, c: int, *, first: bool,
                  base: dict, device, dtype, seed: int, run_kw: dict):
    """Restart the network (``c > 0`` or a new chain after the first), seed, guide at the
    jittered start, then the MAP loop's run (restored from the checkpoint when ``first``)."""
    if not first:
        restart_modules(model)
        model.to(device=device, dtype=dtype)
        pyro.clear_param_store()
    pyro.set_rng_seed(seed + c)
    model.renew_tracking()
    guide = auto_delta(model, init_values=chain_init(model, base, c, cfg.init_jitter))
    with eval_mode(model):  # the guide's set-up pass leaves BatchNorm statistics alone
        return start_run(model, source, cfg.method, guide, sampler=collector,
                         resume=run_kw.pop("resume") and first, **run_kw)


def run_chains(model: BayesianNetwork, source, cfg: SamplerConfig, *, lr: float, epochs: int,
               device: torch.device, dtype: torch.dtype, seed: int, checkpoint_dir,
               resume: bool, checkpoint_every: int, callbacks, val, val_samples,
               monitor: str, settings: dict, prior_every: int, progress: bool) -> FitResult:
    """``cfg.num_chains`` chains of ``epochs`` epochs each (module docstring)."""
    steps = steps_per_epoch(source)
    cfg.check(epochs, steps)  # before anything changes
    if model.num_data is None:  # the likelihood must be scaled by N / B: N = the rows
        model.num_data = int(source.n)
    collector = DrawCollector(model, cfg, epochs=epochs, steps=steps, device=device)
    base = {k: v.detach().clone() for k, v in model.initial_values().items()}
    first, run = True, None
    while collector.chain < cfg.num_chains:
        run_kw = dict(num_particles=1, lr=lr, device=device, checkpoint_dir=checkpoint_dir,
                      resume=resume, rank=0, distributed=False, monitor=monitor,
                      patience=None, with_validation=val is not None, settings=settings,
                      prior_every=prior_every)
        run = _set_up_chain(model, source, cfg, collector, collector.chain, first=first,
                            base=base, device=device, dtype=dtype, seed=seed, run_kw=run_kw)
        first = False
        with train_mode(model):
            train(run, f"{cfg.method} chain {collector.chain + 1}/{cfg.num_chains}",
                  epochs=epochs, checkpoint_every=checkpoint_every, callbacks=callbacks,
                  val=val, val_samples=1 if val_samples is None else val_samples,
                  monitor=monitor, show=progress)
        stopped = run.epoch < epochs
        collector.finish_chain(run)
        if stopped:
            break
    samples, free = collector.draws()
    free = drop_constant(model, free)  # what never moved: the result's snapshot holds it
    return FitResult(model=model, method=cfg.method, guide=run.guide,
                     history=collector.history(), samples=samples, free_draws=free,
                     epochs_run=run.epoch, checkpoint=run.checkpointer.path,
                     draw_steps=collector.chain_steps[0])
