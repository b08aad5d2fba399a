"""Worker for tests/test_distributed.py: ``python tests/_dist_worker.py CONFIG.json``.

The config holds ``nprocs``, ``out`` (a folder) and ``jobs``: a list of keyword sets for
:func:`run_fit` plus ``name`` (rank 0 saves the fitted params to ``out/<name>.pt``) and
optionally ``fail_rank`` (that rank raises after its first epoch). Every rank runs the jobs
in order inside one process group made by :func:`bayes_spectral.distributed.launch`.
"""

from __future__ import annotations

import json
import os
import sys

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
    torch.set_num_threads(1)
    for job in jobs:
        job = dict(job)
        name, fail_rank = job.pop("name"), job.pop("fail_rank", None)

        def fail(info, fail_rank=fail_rank):
            if rank == fail_rank:
                raise RuntimeError(f"deliberate failure on rank {rank}")

        params, history = run_fit(callbacks=[fail], **job)
        if rank == 0:
            torch.save({"params": params, "history": history}, os.path.join(out, name + ".pt"))


def main(path: str) -> None:
    from bayes_spectral.distributed import launch

    with open(path) as f:
        cfg = json.load(f)
    launch(_worker, cfg["nprocs"], cfg["jobs"], cfg["out"], backend="gloo",
           timeout=cfg.get("timeout", 60))


if __name__ == "__main__":
    main(sys.argv[1])
