"""Layer 6: the data-parallel demo behind ``python -m bayes_spectral.distributed``.

A digits MLP fitted with :func:`bayes_spectral.fit` under ``torchrun`` (or one rank under
plain ``python``); the data-parallel machinery itself is :mod:`bayes_spectral.bnn.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..bnn.distributed import DEFAULT_TIMEOUT, device, init


def main(argv: list[str] | None = None) -> int:
    """Data-parallel fit of a digits MLP (64-H-10, ``PowerLawSpectrum`` prior on every
    layer). Run it with ``torchrun --standalone --nproc_per_node=2 -m
    bayes_spectral.distributed --method map --epochs 5`` (or plain ``python -m ...``: one
    rank). Rank 0 prints the history and test accuracy."""
    import argparse

    from torch import nn

    import bayes_spectral as bs
    from bayes_spectral.distributions import PowerLawSpectrum

    p = argparse.ArgumentParser(prog="python -m bayes_spectral.distributed",
                                description=main.__doc__)
    p.add_argument("--method", choices=("map", "svi"), default="map")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64, help="global batch size")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=None, help="first n training examples")
    p.add_argument("--checkpoint-dir", default=None)
    p.add_argument("--backend", default=None, help="default: nccl with CUDA, else gloo")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rank, world = init(a.backend, a.timeout)
    try:
        digits = bs.data.load_digits()
        x, y = digits.x_train[:a.num_train], digits.y_train[:a.num_train]
        torch.manual_seed(a.seed)
        net = nn.Sequential(nn.Linear(64, a.hidden), nn.ReLU(), nn.Linear(a.hidden, 10))
        bn = bs.bayesian(net, {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)},
                         num_data=len(x))
        res = bs.fit(bn, (x, y), a.method, epochs=a.epochs, batch_size=a.batch_size,
                     lr=a.lr, seed=a.seed, device=device(), checkpoint_dir=a.checkpoint_dir,
                     progress=rank == 0)
        if rank == 0:
            acc = res.evaluate(digits.x_test, digits.y_test).accuracy
            print(f"ranks {world}, global batch {a.batch_size}: loss per epoch "
                  + " ".join(f"{v:.4f}" for v in res.history["loss"])
                  + f"; test accuracy {acc:.3f}")
        dist.barrier()  # all ranks done before any tears its Gloo pairs down
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
