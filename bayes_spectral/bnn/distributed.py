"""Layer 4: data-parallel MAP and SVI with ``torch.distributed`` (DistributedDataParallel).

:func:`bayes_spectral.fit` switches to this path when a process group is initialised
(``torchrun`` + :func:`init`, or :func:`launch`); nothing here is home-made communication:
the ELBO is wrapped as a module (``Trace_ELBO()(model, guide)`` is an ``nn.Module``) inside
``torch.nn.parallel.DistributedDataParallel``, which averages the gradients over ranks.

Equal-to-single-process semantics. ``R`` ranks, global batch ``b`` (the single-process
batch), rank ``r`` holds the shard ``S_r`` of ``b_r`` examples (``sum_r b_r = b``). The
single-process loss is ``L = -log p(W) + log q - (N/b) sum_{i in b} log p(y_i | x_i, W)``.
Each rank evaluates its shard's likelihood with the factor ``R * N / b`` (Pyro's data plate
gives ``N / b_r``; :class:`DataScale` multiplies it by ``c_r = R * b_r / b``, exactly 1 for
equal shards) and the prior/KL term of layer ``l`` with a weight ``w_lr`` such that
``sum_r w_lr = R`` (``w_lr = R`` on the one rank that owns the layer, 0 elsewhere; see
"Spectral work" below, or ``w_lr = 1`` on every rank)::

    L_r = sum_l w_lr [-log p(W_l) + log q(W_l)] - c_r (N / b_r) sum_{i in S_r} log p(y_i | x_i, W)
    (1/R) sum_r grad L_r = grad L    (DDP averages: the prior/KL term counts once)

``num_data=None`` (no scaling) is covered by the same rule, ``c_r = R``. The reported loss is
``(1/R) sum_r L_r = L`` (an ``all_reduce``).

Data order. Every rank draws the single-process permutation ``torch.randperm(n)`` from its
torch RNG, which all ranks seed identically and consume identically (the guide's noise has
the shape of the weights, not of the batch), so every rank holds the same global
permutation and the same guide draws as the single-process run. :class:`GlobalBatchShards`
cuts it into the single-process global batches and gives each rank its contiguous slice
(``DistributedSampler``'s interface: ``num_replicas``, ``rank``, ``set_epoch``). Plain
``DistributedSampler`` is not used: its seed-plus-epoch permutation, strided split and padding
(repeated examples) would make a 2-rank run differ from the 1-rank run.

Spectral work is split, not repeated: each prior site (one ``svdvals`` per layer for the
spectral laws) is assigned to one rank (greedy by SVD cost ``m n min(m, n)``); that rank
counts it ``R`` times, the others mask it (``MaskedDistribution(False)``: its ``log_prob`` is
not evaluated), so the DDP average still holds it once and no extra communication is needed
(the prior's gradient rides in DDP's all-reduce). Tracked (power-iteration) and enumerated
layers stay on every rank: their ``log_prob`` updates buffers or adds enumerated sites.
``BAYES_SPECTRAL_SPLIT_PRIOR=0`` evaluates every prior on every rank instead.
``benchmarks/bench_distributed.py`` compares both with computing on rank 0 and broadcasting
(README, "Distributed training").

Failures: :func:`init` sets a collective timeout; :func:`launch` turns a rank's exception
into :class:`DistributedError` naming the rank (``torch.multiprocessing.spawn`` stops the
other ranks); under ``torchrun`` the elastic agent does the same.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger
from torch.utils.data import Sampler

__all__ = ["DataScale", "DistributedError", "GlobalBatchShards", "PriorSplit", "init",
           "is_distributed", "launch", "likelihood_factor", "split_prior_sites"]

DEFAULT_TIMEOUT = 120.0


class DistributedError(RuntimeError):
    """A rank of a data-parallel run failed; ``rank`` is the failing rank."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


def is_distributed() -> bool:
    """``True`` when a ``torch.distributed`` process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init(backend: str | None = None, timeout: float = DEFAULT_TIMEOUT) -> tuple[int, int]:
    """Initialise the default process group from ``torchrun``'s environment; return
    ``(rank, world_size)``.

    ``backend=None``: ``"nccl"`` when CUDA is available, else ``"gloo"``. ``timeout``
    (seconds) bounds every collective, so a dead rank ends the run instead of hanging it.
    Without ``torchrun``'s variables (a plain ``python`` run) a one-rank group is made.
    A no-op when a group already exists.
    """
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    kwargs: dict[str, Any] = {}
    if "RANK" not in os.environ:  # not under torchrun: one rank, os.environ untouched
        kwargs = dict(init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=float(timeout)), **kwargs)
    return dist.get_rank(), dist.get_world_size()


def device() -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` with CUDA, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


class GlobalBatchShards(Sampler):
    """This rank's slice of every global batch of a global permutation of ``range(n)``.

    Iterates over ``(indices, global_size)``: ``indices`` are rank ``rank``'s contiguous part
    (``torch.tensor_split`` into ``num_replicas`` parts, sizes differing by at most one) of
    ``perm[i:i + batch_size]``, ``global_size`` that global batch's size. ``set_epoch(epoch,
    perm)`` fixes the permutation: :func:`~bayes_spectral.fit` passes the single-process one
    (``torch.randperm(n)`` from the synchronised global RNG); without ``perm`` it is
    ``randperm(n)`` of a generator seeded with ``seed + epoch`` (``DistributedSampler``'s
    rule), so a ``DataLoader(batch_sampler=...)`` gets the same order on every rank.
    """

    def __init__(self, n: int, batch_size: int, num_replicas: int | None = None,
                 rank: int | None = None, seed: int = 0):
        if num_replicas is None:
            num_replicas = dist.get_world_size() if is_distributed() else 1
        if rank is None:
            rank = dist.get_rank() if is_distributed() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must lie in [0, {num_replicas - 1}], got {rank}")
        if int(n) < 1 or int(batch_size) < 1:
            raise ValueError(f"n and batch_size must be positive, got {n} and {batch_size}")
        self.n, self.batch_size = int(n), min(int(batch_size), int(n))
        self.num_replicas, self.rank, self.seed = int(num_replicas), int(rank), int(seed)
        self.epoch = 0
        self._perm: torch.Tensor | None = None

    def set_epoch(self, epoch: int, perm: torch.Tensor | None = None) -> None:
        self.epoch = int(epoch)
        if perm is not None and perm.shape != (self.n,):
            raise ValueError(f"perm must have shape ({self.n},), got {tuple(perm.shape)}")
        self._perm = perm

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        perm = self._perm
        if perm is None:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        for i in range(0, self.n, self.batch_size):
            batch = perm[i:i + self.batch_size]
            yield torch.tensor_split(batch, self.num_replicas)[self.rank], int(batch.shape[0])


def likelihood_factor(num_data: int | None, global_size: int, local_size: int,
                      world_size: int) -> float:
    """``c_r``: the factor on a rank's data-plate scale that makes the DDP-averaged gradient
    equal to the single-process one (module docstring). Pyro's plate scales the shard by
    ``s(b_r)`` with ``s(b) = N / b`` (``b <= N``) or ``1`` (``num_data=None`` or ``b > N``);
    the target is ``R * s(b)``, so ``c_r = R * s(b) / s(b_r)``."""

    def plate_scale(b: int) -> float:
        return num_data / b if num_data is not None and num_data >= b else 1.0

    return world_size * plate_scale(global_size) / plate_scale(local_size)


class DataScale(Messenger):
    """Multiply the scale of the sample sites inside the plate named ``plate`` (the
    likelihood of :class:`~bayes_spectral.bnn.network.BayesianNetwork`) by ``factor``; other sites
    (priors, guide) are untouched. Enter it around the model: it must sit outside the
    plate so the plate's frame is already on the message."""

    def __init__(self, factor: float = 1.0, plate: str = "data"):
        super().__init__()
        self.factor, self.plate = float(factor), plate

    def _process_message(self, msg) -> None:
        if self.factor != 1.0 and msg["type"] == "sample" and any(
                f.name == self.plate for f in msg["cond_indep_stack"]):
            msg["scale"] = self.factor * msg["scale"]


def split_prior_sites(model, world_size: int) -> list[set[str]]:
    """Prior sites of ``model`` each rank evaluates alone (the others mask them), balanced
    greedily by SVD cost; tracked and enumerated layers are left out (every rank)."""
    costs = {}
    for layer, site in model.prior_sites.items():
        if layer in model.enumerated_layers or layer in getattr(model, "tracked_layers", ()):
            continue
        shape = tuple(model.initial_values()[site].shape)
        m, n = (shape[0], 1) if len(shape) == 1 else (shape[0], math.prod(shape[1:]))
        costs[site] = m * n * min(m, n)
    owned: list[set[str]] = [set() for _ in range(world_size)]
    load = [0] * world_size
    for site in sorted(costs, key=lambda k: (-costs[k], k)):
        r = min(range(world_size), key=lambda i: (load[i], i))
        owned[r].add(site)
        load[r] += costs[site]
    return owned


class PriorSplit(Messenger):
    """On this rank: multiply the scale of the prior sites in ``owned`` by ``world_size``
    and mask (no ``log_prob`` evaluation) those in ``others``; DDP's average then counts
    every prior once. The guide's site of the same name is treated alike, so its ``log q``
    is also counted once; its draw (``rsample`` of the base law) is unchanged."""

    def __init__(self, owned: set[str], others: set[str], world_size: int):
        super().__init__()
        self.owned, self.others, self.world_size = owned, others, world_size

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        if msg["name"] in self.owned:
            msg["scale"] = self.world_size * msg["scale"]
        elif msg["name"] in self.others:
            msg["fn"] = msg["fn"].mask(False)


class DataParallelELBO:
    """What :func:`~bayes_spectral.fit` uses on each rank: the ELBO module
    (``Trace_ELBO()(model, guide)``) in DDP.

    Built after the guide's warm-up batch (and a resume), so every parameter exists; the
    DDP constructor broadcasts rank 0's parameters and buffers, so all ranks start equal.
    Every parameter in Pyro's param store must belong to the model or the guide (DDP only
    averages module parameters); a stray ``pyro.param`` raises ``RuntimeError``.
    """

    def __init__(self, module: torch.nn.Module, num_data: int | None, dev: torch.device):
        import pyro
        from torch.nn.parallel import DistributedDataParallel

        if not is_distributed():
            raise RuntimeError("no torch.distributed process group: call "
                               "bayes_spectral.distributed.init() (or use launch/torchrun)")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.module = module
        owned = {id(p) for p in self.module.parameters()}
        stray = [k for k, p in pyro.get_param_store()._params.items() if id(p) not in owned]
        if stray:
            raise RuntimeError(f"parameters {stray} are not owned by the model or the guide "
                               "module, so DistributedDataParallel cannot average them")
        ids = [dev.index] if dev.type == "cuda" else None
        self.ddp = DistributedDataParallel(self.module, device_ids=ids)
        self.num_data, self.scale = num_data, DataScale()
        self.prior_split: PriorSplit | None = None
        if self.world_size > 1 and os.environ.get("BAYES_SPECTRAL_SPLIT_PRIOR", "1") != "0":
            owned = split_prior_sites(module.model, self.world_size)
            mine = owned[self.rank]
            self.prior_split = PriorSplit(mine, set().union(*owned) - mine, self.world_size)

    def loss_and_grads(self, x: torch.Tensor, y: torch.Tensor, local: torch.Tensor,
                       global_size: int) -> float:
        """Forward + backward of this rank's shard ``local``; gradients averaged by DDP;
        returns the global loss ``(1/R) sum_r L_r``. An empty shard runs one example with
        factor 0, so every rank joins the all-reduce."""
        size = int(local.shape[0])
        self.scale.factor = likelihood_factor(self.num_data, global_size, max(size, 1),
                                              self.world_size) if size else 0.0
        if not size:
            local = torch.zeros(1, dtype=torch.long, device=x.device)
        with self.scale, self.prior_split or contextlib.nullcontext():
            loss = self.ddp(x[local], y[local])
        loss.backward()
        value = loss.detach().reshape(1).clone()
        dist.all_reduce(value)
        return float(value) / self.world_size

    def any(self, flag: bool) -> bool:
        """``True`` on every rank when ``flag`` is ``True`` on some rank."""
        t = torch.tensor([int(bool(flag))], device=next(self.module.parameters()).device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())


def _run_rank(rank: int, fn: Callable, world_size: int, backend: str | None, timeout: float,
              port: int, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    init(backend, timeout)
    fn(rank, world_size, *args)
    # on an exception the group is left alone: destroying it would wait for the peers (which
    # may be blocked in a collective); spawn reports the error and stops the other ranks
    finish()


def finish() -> None:
    """Tear the process group down once every rank is done: a barrier first, so that no
    rank destroys its Gloo pairs while a peer still sends on them (a rank that exits or
    destroys early can abort with "terminate called without an active exception")."""
    dist.barrier()
    dist.destroy_process_group()


def launch(fn: Callable[..., Any], nprocs: int, *args, backend: str | None = None,
           timeout: float = DEFAULT_TIMEOUT) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``nprocs`` spawned processes, each inside an
    initialised process group (:func:`init`), on one machine.

    ``fn`` must be importable (defined at module level). If any rank raises, the others are
    stopped (``torch.multiprocessing.spawn``) and :class:`DistributedError` names the rank
    and its error (the full traceback is chained).
    """
    import torch.multiprocessing as mp

    try:
        mp.spawn(_run_rank, args=(fn, int(nprocs), backend, timeout, _free_port(), args),
                 nprocs=int(nprocs), join=True)
    except mp.ProcessRaisedException as exc:
        lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
        raise DistributedError(f"rank {exc.error_index} of {nprocs} failed: {lines[-1]}",
                               rank=exc.error_index) from exc
    except mp.ProcessExitedException as exc:
        raise DistributedError(f"rank {exc.error_index} of {nprocs} exited with code "
                               f"{exc.exit_code}", rank=exc.error_index) from exc
