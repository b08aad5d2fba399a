"""Layer 4: ``fit(..., method="sgld" | "sghmc")``: SG-MCMC through the MAP loop.

A sampler step is a MAP step plus noise: the same ``AutoDelta`` guide, mini-batches, NaN
guard, lazy prior, checkpoint and fingerprint (:mod:`~bayes_spectral.bnn.training`), with
the optimiser replaced by ONE :class:`~bayes_spectral.bnn.samplers.SGLD` /
:class:`~bayes_spectral.bnn.samplers.SGHMC` over all parameters (:class:`SamplerOptim`, a
fused multi-tensor step; the noise from the global RNG) and the loss by the potential in
the unconstrained space where the guide's parameters live::

    U(theta) = -log p(theta) - (N / B) sum_batch log p(y | x, theta) - log|det J(theta)|

(:class:`JacobianLoss`: the MAP ELBO of ``AutoDelta`` plus ``-sum log|det J|`` of the
``biject_to(support)`` transform of every constrained latent site, e.g. the learned
Gaussian noise ``sigma = exp(u)``: ``-u``). The chain targets ``exp(-U / T)``.

Draws: after every kept step the constrained values of the latent sites are copied into a
buffer of ``draw_chunk`` draws on the device, which moves to the CPU when full (``draws_dir``:
written there as ``chain<c>_<i>.safetensors``, atomically, and read back at the end). A
step ``k`` (1-based, per chain) is *eligible* when its epoch is past ``burn_in`` and it is
in a sampling phase of the cyclical schedule; every ``thin``-th eligible step is kept
(draws per chain: ``floor(eligible / thin)``; ``res.draw_steps`` lists the kept steps).

Chains run in sequence; chain ``c`` is seeded ``seed + c`` and starts from the module's
initial values with multiplicative jitter ``init_jitter`` (chain 0 unjittered), the
network's other parameters and buffers restarted. ``res.samples`` is
``{site: (num_chains, num_draws, *shape)}`` like NUTS'. Parameters without a prior are not
sampled: they follow the drift without noise (``free_params="drift"``, the default; or stay
at the chain's start with ``free_params="fixed"``, as NUTS keeps them).

Free state per draw: with every kept draw the collector also records the network's *free
state* (:mod:`~bayes_spectral.bnn.free_state`): the parameters without a prior (with
``"drift"``; with ``"fixed"`` they are the start in every chain, so not recorded) and the
buffers (always: BatchNorm's running statistics move with every training-mode pass, so they
differ between chains even with ``"fixed"``). They travel with the draws (same buffer,
chunks, files as ``free:<name>`` entries, checkpoints) and become ``res.free_draws`` ``{name:
(num_chains, num_draws, *shape)}`` (``None`` when there is nothing to record); predictions and
the log-likelihood evaluate draw ``s`` of chain ``c`` with them. Memory per draw: the free
state's size (biases and BatchNorm: small; spectral ``U``, ``V``: about a weight matrix
each, i.e. more than the sampled singular values).

Checkpoints hold, besides the MAP loop's state, the sampler's state (step counters,
momenta, preconditioners: the optimiser state), the chain index, the draws so far (or the
names of the chunk files written) and the finished chains' histories; a resumed CPU run
equals the uninterrupted one bit for bit. The fingerprint records every sampler setting
(``fingerprint["sampler"]``), so resuming under another temperature, thin, ... is refused by
name.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import pyro
import torch
from pyro.distributions import constraints
from torch.distributions import biject_to

from .._io import atomic_path
from .free_state import free_tensors
from .multi_optim import load_by_name
from .samplers import SAMPLERS, in_sampling_phase

#: prefix of the free-state entries among the collector's draws (buffers, chunk files)
FREE = "free:"


__all__ = ["FREE", "DrawCollector", "JacobianLoss", "SamplerConfig", "SamplerOptim",
           "steps_per_epoch"]


# ----------------------------------------------------------------------------- settings


def _number(name: str, value, low: float, high: float, *, low_open: bool, high_open: bool,
            what: str) -> float:
    bad = isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value)
    if not bad:
        bad = value < low or value > high or (low_open and value == low) or \
            (high_open and value == high)
    if bad:
        raise ValueError(f"fit: {name} must be {what}, got {value!r}")
    return float(value)


def _int(name: str, value, low: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"fit: {name} must be {what}, got {value!r}")
    return int(value)


@dataclass
class SamplerConfig:
    """The SG-MCMC settings of :func:`~bayes_spectral.fit` (checked by :meth:`check`)."""

    method: str
    temperature: float = 1.0
    burn_in: int | None = None
    thin: int = 1
    cycles: int | None = None
    explore: float = 0.5
    friction: float = 0.1
    precondition: bool = False
    init_jitter: float = 0.1
    num_chains: int = 4
    draws_dir: str | os.PathLike | None = None
    draw_chunk: int = 64
    free_params: str = "drift"

    def check(self, epochs: int, steps: int | None) -> None:
        """Clear ``ValueError`` for bad settings; ``burn_in=None`` becomes ``epochs // 2``
        (0 with ``cycles``). ``steps``: steps per epoch (``None``: unknown)."""
        self.temperature = _number("temperature", self.temperature, 0.0, math.inf,
                                   low_open=True, high_open=True, what="a positive number")
        self.friction = _number("friction", self.friction, 0.0, 1.0, low_open=True,
                                high_open=False, what="in (0, 1]")
        self.explore = _number("explore", self.explore, 0.0, 1.0, low_open=False,
                               high_open=True, what="in [0, 1) (the exploration fraction)")
        self.init_jitter = _number("init_jitter", self.init_jitter, 0.0, math.inf,
                                   low_open=False, high_open=True, what=">= 0")
        self.thin = _int("thin", self.thin, 1, "an integer >= 1 (keep every thin-th step)")
        self.draw_chunk = _int("draw_chunk", self.draw_chunk, 1, "an integer >= 1")
        self.num_chains = _int("num_chains", self.num_chains, 1, "an integer >= 1")
        if self.free_params not in ("drift", "fixed"):
            raise ValueError(f"fit: free_params must be 'drift' (parameters without a prior "
                             f"follow the drift) or 'fixed' (kept at their start, as NUTS "
                             f"does), got {self.free_params!r}")
        if self.burn_in is None:
            self.burn_in = 0 if self.cycles is not None else int(epochs) // 2
        self.burn_in = _int("burn_in", self.burn_in, 0, "an integer >= 0 (epochs)")
        if self.burn_in >= epochs:
            raise ValueError(f"fit: burn_in ({self.burn_in} epochs) must be < epochs "
                             f"({epochs}): no draw would be kept")
        if self.cycles is not None:
            self._check_cycles(epochs, steps)

    def _check_cycles(self, epochs: int, steps: int | None) -> None:
        if steps is None:
            raise ValueError("fit: cycles needs the number of steps per epoch (a pair, a Split, "
                             "a Dataset or a DataLoader with a length)")
        total = int(epochs) * steps
        self.cycles = _int("cycles", self.cycles, 1, "an integer >= 1 or None")
        if self.cycles > total:
            raise ValueError(f"fit: cycles ({self.cycles}) must be <= the number of steps "
                             f"({total} = {epochs} epochs x {steps} batches)")

    def fingerprint(self, epochs: int) -> dict:
        """Every setting that shapes the draws (``epochs`` with ``cycles``: the schedule)."""
        out = {"temperature": self.temperature, "burn_in": self.burn_in, "thin": self.thin,
               "cycles": self.cycles, "explore": self.explore, "friction": self.friction,
               "precondition": bool(self.precondition), "init_jitter": self.init_jitter,
               "num_chains": self.num_chains, "draw_chunk": self.draw_chunk,
               "draws_dir": None if self.draws_dir is None else os.fspath(self.draws_dir),
               "free_params": self.free_params,
               "free_state": "per draw"}  # draws carry the free state (older: refused)
        if self.cycles is not None:
            out["epochs"] = int(epochs)
        return out


def steps_per_epoch(source) -> int | None:
    """Batches per epoch: ``ceil(n / batch_size)`` for rows of tensors, a loader's length,
    ``None`` when unknown."""
    n, bs = getattr(source, "n", None), getattr(source, "batch_size", None)
    if n is not None and bs:
        return math.ceil(n / bs)
    loader = getattr(source, "loader", None)
    try:
        return int(len(loader))
    except TypeError:
        return None


# ----------------------------------------------------------------------------- loss, optimiser


def _is_real(c) -> bool:
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c is constraints.real


class JacobianLoss:
    """The MAP ELBO of ``AutoDelta`` plus ``-sum log|det J|`` of the latent sites'
    unconstrained -> constrained transforms (module docstring): ``U / ...`` as SVI's loss."""

    def __init__(self, elbo, latent_names):
        self.elbo, self.latent_names = elbo, latent_names

    def log_det(self) -> torch.Tensor | None:
        """``sum log|det J(u)|`` over the constrained latent parameters (``None``: none)."""
        store, total = pyro.get_param_store(), None
        for name in self.latent_names():
            c = store._constraints.get(name, constraints.real)
            if _is_real(c):
                continue
            u = store._params[name]
            t = biject_to(c)
            term = t.log_abs_det_jacobian(u, t(u)).sum()
            total = term if total is None else total + term
        return total

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            j = self.log_det()
        out = self.elbo.loss(model, guide, *args, **kwargs)
        return out if j is None else out - float(j)

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        out = self.elbo.loss_and_grads(model, guide, *args, **kwargs)
        j = self.log_det()
        if j is None:
            return out
        (-j).backward()
        return out - float(j.detach())


class SamplerOptim(pyro.optim.PyroOptim):
    """``PyroOptim`` holding ONE SG-MCMC optimiser (``constructor``: :class:`SGLD` /
    :class:`SGHMC`) over every parameter SVI passes (two param groups: latent parameters,
    ``is_latent(name)``, with noise; the others drift only, or fixed with
    ``fixed_free=True`` in ``args``). Each step updates the passed parameters with a
    gradient in the order of their param-store names (so the noise is drawn in the same
    order in a resumed run, and as the per-parameter optimisers drew it), in a few
    multi-tensor passes (:meth:`SGMCMC.step_params`), the noise from the global torch RNG
    (``fit`` seeds it ``seed + chain``). :meth:`get_state` has
    ``pyro.optim.PyroOptim``'s format (``{param_name: state_dict of that parameter
    alone}``)."""

    def __init__(self, constructor, args: dict, is_latent):
        super().__init__(constructor, args)
        self._is_latent = is_latent
        self.torch_optim = None
        self._groups: dict[bool, dict] = {}  # latent? -> its param group
        self._seen: dict[torch.Tensor, dict] = {}  # parameter -> its param group
        self._waiting: dict[str, dict] = {}  # name -> state of a parameter not seen yet

    def _group_args(self, latent: bool) -> dict:
        args = dict(self.pt_optim_args)
        if args.pop("fixed_free", False) and not latent:
            args["lr"] = 0.0  # free_params="fixed": kept at the chain's start (as NUTS)
        return {**args, "noise": latent}

    def _add(self, p: torch.Tensor) -> None:
        name = pyro.get_param_store().param_name(p)
        latent = bool(self._is_latent(name))
        group = self._groups.get(latent)
        if group is not None:
            group["params"].append(p)
        elif self.torch_optim is None:
            self.torch_optim = self.pt_optim_constructor([p], **self._group_args(latent))
            group = self.torch_optim.param_groups[0]
        else:
            self.torch_optim.add_param_group({"params": [p], **self._group_args(latent)})
            group = self.torch_optim.param_groups[-1]
        self._groups[latent] = group
        self._seen[p] = group
        state = self._waiting.pop(name, None)
        if state is not None:
            self._load(p, state)

    def __call__(self, params, *args, **kwargs) -> None:
        store = pyro.get_param_store()
        ordered = sorted(params, key=store.param_name)
        for p in ordered:
            if p not in self._seen:
                self._add(p)
        if self.torch_optim is not None:
            self.torch_optim.step_params(ordered)

    def get_state(self) -> dict:
        store = pyro.get_param_store()
        out = {}
        for p, group in self._seen.items():
            inner = self.torch_optim.state.get(p)
            out[store.param_name(p)] = {
                "state": {0: dict(inner)} if inner else {},
                "param_groups": [{**{k: v for k, v in group.items() if k != "params"},
                                  "params": [0]}]}
        return out

    def set_state(self, state_dict: dict) -> None:
        load_by_name(self, state_dict)

    def _load(self, p: torch.Tensor, state: dict) -> None:
        inner = next(iter(state.get("state", {}).values()), None)
        if inner is None:
            self.torch_optim.state.pop(p, None)
            return
        self.torch_optim.state[p] = {
            k: v.to(p.device, p.dtype).clone() if torch.is_tensor(v) else v
            for k, v in inner.items()}


# ----------------------------------------------------------------------------- draws


class DrawCollector:
    """The per-step hooks of a sampler run (``TrainingRun.hooks``) and the draws of every
    chain; also the ``sampler`` object :func:`~bayes_spectral.bnn.training.start_run` takes
    (optimiser, loss, fingerprint)."""

    def __init__(self, model, cfg: SamplerConfig, *, epochs: int, steps: int | None,
                 device: torch.device):
        self.model, self.cfg, self.epochs, self.device = model, cfg, int(epochs), device
        self.total = int(epochs) * steps if steps is not None else 1
        self.guide_prefix = "AutoDelta"
        self.chain, self.eligible = 0, 0
        self.buffer: dict[str, torch.Tensor] | None = None  # (draw_chunk, *shape) per site
        self.held = 0  # draws in the buffer
        self.chunks: list[tuple[int, object]] = []  # (chain, {site: cpu tensor} | file name)
        self.draw_steps: list[int] = []
        self.chain_steps: list[list[int]] = []
        self.histories: list[dict] = []
        self.free_names: tuple[str, ...] | None = None  # fixed at the first kept draw

    # -- what start_run takes -----------------------------------------------------------
    def _names(self) -> dict[str, str]:
        return {s: f"{self.guide_prefix}.{s}" for s in self.model.latent_sites}

    def _is_latent(self, name: str) -> bool:
        return name in self._names().values()

    def optim(self, lr: float) -> SamplerOptim:
        cfg = self.cfg
        args = dict(lr=lr, num_data=self.model.num_data, temperature=cfg.temperature,
                    friction=cfg.friction, precondition=cfg.precondition,
                    total_steps=self.total, cycles=cfg.cycles, explore=cfg.explore,
                    fixed_free=cfg.free_params == "fixed")
        return SamplerOptim(SAMPLERS[cfg.method], args, self._is_latent)

    def loss(self, elbo, guide) -> dict:
        self.guide_prefix = getattr(guide, "_pyro_name", "AutoDelta")
        jl = JacobianLoss(elbo, lambda: list(self._names().values()))
        return {"loss": jl.loss, "loss_and_grads": jl.loss_and_grads}

    def fingerprint(self) -> dict:
        return self.cfg.fingerprint(self.epochs)

    # -- per step -------------------------------------------------------------------------
    def after_step(self, run) -> None:
        """Keep the draw of step ``run.step`` when it is eligible and the thin-th."""
        cfg = self.cfg
        if run.epoch < cfg.burn_in or not in_sampling_phase(
                run.step - 1, self.total, cfg.cycles, cfg.explore):
            return
        self.eligible += 1
        if self.eligible % cfg.thin:
            return
        with torch.no_grad():
            values = self._values()
            if self.buffer is None:  # a fresh buffer per chunk (the CPU keeps it as is)
                self.buffer = {s: v.new_empty((cfg.draw_chunk, *v.shape))
                               for s, v in values.items()}
            for s, v in values.items():
                self.buffer[s][self.held].copy_(v)
        self.held += 1
        self.draw_steps.append(run.step)
        if self.held >= cfg.draw_chunk:
            self.flush()

    def _values(self) -> dict[str, torch.Tensor]:
        """The latent sites' constrained values and the free state (``FREE`` + name); the
        free names are those of the first kept draw (param-store entries that appear later,
        e.g. another model's in a user's loop, are not this chain's state)."""
        store, names = pyro.get_param_store(), self._names()
        values = {s: store[n] for s, n in names.items()}
        free = free_tensors(self.model, names.values(), params=self.cfg.free_params == "drift")
        if self.free_names is None:
            self.free_names = tuple(free)
        missing = [n for n in self.free_names if n not in free]
        if missing:
            raise ValueError(f"sampler: the free state lost {missing[:3]} since the first "
                             "kept draw (a parameter removed from the network or the param "
                             "store during the run)")
        values.update({FREE + n: free[n] for n in self.free_names})
        return values

    def _held(self) -> dict[str, torch.Tensor]:
        """The held draws on the CPU: the buffer itself when it is full and on the CPU (no
        copy), else a copy of its filled part (a saved view would carry the whole buffer)."""
        full = self.held == self.cfg.draw_chunk
        return {s: b.cpu() if full else b[:self.held].cpu().clone()
                for s, b in self.buffer.items()}

    def flush(self) -> None:
        """Move the pending draws to the CPU (or to a file in ``draws_dir``)."""
        if not self.held:
            return
        chunk = self._held()
        self.buffer, self.held = None, 0
        if self.cfg.draws_dir is None:
            self.chunks.append((self.chain, chunk))
            return
        from safetensors.torch import save_file

        folder = os.fspath(self.cfg.draws_dir)
        os.makedirs(folder, exist_ok=True)
        index = sum(1 for c, _ in self.chunks if c == self.chain)
        name = f"chain{self.chain:03d}_{index:05d}.safetensors"
        with atomic_path(os.path.join(folder, name)) as tmp:
            save_file({s: t.contiguous() for s, t in chunk.items()}, tmp)
        self.chunks.append((self.chain, name))

    def finish_chain(self, run) -> None:
        """End of a chain: flush, keep its history and kept steps, next chain."""
        self.flush()
        self.chain_steps.append(list(self.draw_steps))
        self.histories.append(dict(run.history))
        self.chain, self.eligible, self.draw_steps = self.chain + 1, 0, []

    # -- checkpoint -----------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"chain": self.chain, "eligible": self.eligible,
                "pending": {s: v.clone() for s, v in self._held().items()} if self.held
                else {},  # clones: the buffer keeps filling after the save
                "chunks": list(self.chunks), "draw_steps": list(self.draw_steps),
                "chain_steps": [list(s) for s in self.chain_steps],
                "histories": list(self.histories),
                "noise": {}}  # the global RNG's runs: no own noise stream state

    def load_state_dict(self, state: dict) -> None:
        if state.get("noise"):
            raise ValueError("sampler: the checkpoint holds the state of an own noise stream "
                             "(sampling.NOISE_SOURCE 'stream' or 'prefetch', removed: the "
                             "noise comes from the global RNG); resume=False starts over")
        self.chain, self.eligible = int(state["chain"]), int(state["eligible"])
        pend = state["pending"]
        self.held = len(next(iter(pend.values()))) if pend else 0
        self.buffer = None
        if self.held:
            self.buffer = {s: v.new_empty((self.cfg.draw_chunk, *v.shape[1:]),
                                          device=self.device) for s, v in pend.items()}
            for s, v in pend.items():
                self.buffer[s][:self.held].copy_(v)
        self.chunks = [tuple(c) for c in state["chunks"]]
        self.draw_steps = list(state["draw_steps"])
        self.chain_steps = [list(s) for s in state["chain_steps"]]
        self.histories = list(state["histories"])

    # -- the result -----------------------------------------------------------------------
    def _read(self, chunk) -> dict[str, torch.Tensor]:
        if isinstance(chunk, dict):
            return chunk
        from safetensors.torch import load_file

        return load_file(os.path.join(os.fspath(self.cfg.draws_dir), chunk))

    def draws(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``(samples, free_draws)``: ``{site: (chains, draws, *shape)}`` and the free state
        ``{name: (chains, draws, *shape)}`` (``None``: nothing recorded), on the CPU."""
        joined = self._stacked()
        samples = {k: v for k, v in joined.items() if not k.startswith(FREE)}
        free = {k[len(FREE):]: v for k, v in joined.items() if k.startswith(FREE)}
        return samples, free or None

    def samples(self) -> dict[str, torch.Tensor]:
        """The sampled sites of :meth:`draws`."""
        return self.draws()[0]

    def _stacked(self) -> dict[str, torch.Tensor]:
        """Every recorded entry ``(chains, draws, *shape)`` on the CPU; chains cut to the
        shortest one (a callback's stop) and chains without draws left out."""
        per_chain: dict[int, list[dict]] = {}
        for c, chunk in self.chunks:
            per_chain.setdefault(c, []).append(self._read(chunk))
        if not per_chain:
            raise ValueError("fit: no draw was kept (burn_in, thin, cycles and explore leave "
                             "no sampling step)")
        joined = [{s: torch.cat([p[s] for p in parts]) for s in parts[0]}
                  for _, parts in sorted(per_chain.items())]
        n = min(next(iter(j.values())).shape[0] for j in joined)
        return {s: torch.stack([j[s][:n] for j in joined]) for s in joined[0]}

    def history(self) -> dict[str, list]:
        """The chains' histories concatenated, with ``chain`` (0-based) per epoch."""
        out: dict[str, list] = {}
        for c, h in enumerate(self.histories):
            for k, v in h.items():
                out.setdefault(k, []).extend(v)
            out.setdefault("chain", []).extend([c] * len(h.get("epoch", [])))
        return out
