"""Worker for tests/bnn/test_distributed.py: ``python tests/bnn/_dist_worker.py CONFIG.json``.

The config holds ``nprocs``, ``timeout`` (of the collectives), ``out`` (a folder) and
``jobs``: keyword sets for :func:`run_fit` plus ``name`` (rank 0 saves the fitted params to
``out/<name>.pt``) and optionally ``fail_rank`` (that rank raises after its first epoch) or
``corrupt`` (a param store site set to NaN on every rank after epoch 1; the
``NonFiniteError`` is caught and its message saved instead of the params). Every rank runs
the jobs in order inside one process group (``torchrun``, or
:func:`bayes_spectral.distributed.launch` when started by plain ``python``); rank 0 writes
``out/<name>.start`` (the time) first.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from torch import nn

N, HIDDEN = 256, 16


def setup():
    """256 digits, float64, MLP 64-16-10 with a PowerLawSpectrum prior on layer 0."""
    import bayes_spectral as bs
    from bayes_spectral.distributions import PowerLawSpectrum

    digits = bs.data.load_digits(dtype=torch.float64)
    x, y = digits.x_train[:N], digits.y_train[:N]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10)).double()
    bn = bs.bayesian(net, {"0": PowerLawSpectrum(2.0, 0.5, (HIDDEN, 64))}, num_data=N)
    return bn, (x, y)


def run_fit(method: str, epochs: int, checkpoint_dir: str | None = None, callbacks=(),
            distributed: bool | None = None, batch_size: int = 64, num_particles: int = 1):
    """One fit of the fixed setup; returns the param store snapshot and the history."""
    import bayes_spectral as bs

    bn, data = setup()
    res = bs.fit(bn, data, method, epochs=epochs, batch_size=batch_size, lr=1e-2, seed=7,
                 dtype=torch.float64, num_particles=num_particles, progress=False,
                 checkpoint_dir=checkpoint_dir, callbacks=callbacks, distributed=distributed)
    return res.params(), res.history


def _worker(rank: int, world_size: int, jobs: list[dict], out: str) -> None:
    import pyro

    import bayes_spectral as bs

    torch.set_num_threads(1)
    for job in jobs:
        job = dict(job)
        name, fail_rank = job.pop("name"), job.pop("fail_rank", None)
        corrupt = job.pop("corrupt", None)
        if rank == 0:
            with open(os.path.join(out, name + ".start"), "w") as f:
                f.write(repr(time.time()))

        def callback(info, fail_rank=fail_rank, corrupt=corrupt):
            if rank == fail_rank:
                raise RuntimeError(f"deliberate failure on rank {rank}")
            if corrupt is not None and info["epoch"] == 1:
                with torch.no_grad():
                    pyro.get_param_store()[corrupt].view(-1)[0] = float("nan")

        try:
            params, history = run_fit(callbacks=[callback], **job)
            result = {"params": params, "history": history}
        except bs.NonFiniteError as exc:
            if corrupt is None:
                raise
            result = {"error": str(exc), "layer": exc.layer, "epoch": exc.epoch}
        if rank == 0:
            torch.save(result, os.path.join(out, name + ".pt"))


def main(path: str) -> None:
    """Under ``torchrun`` (``LOCAL_RANK`` set): this process is one rank; otherwise spawn
    ``nprocs`` ranks with :func:`bayes_spectral.distributed.launch`."""
    from bayes_spectral.bnn.distributed import finish
    from bayes_spectral.distributed import init, launch

    with open(path) as f:
        cfg = json.load(f)
    if "LOCAL_RANK" in os.environ:
        rank, world = init("gloo", cfg.get("timeout", 60))
        _worker(rank, world, cfg["jobs"], cfg["out"])
        finish()
    else:
        launch(_worker, cfg["nprocs"], cfg["jobs"], cfg["out"], backend="gloo",
               timeout=cfg.get("timeout", 60))


if __name__ == "__main__":
    main(sys.argv[1])
