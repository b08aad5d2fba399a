"""Speed of the spectral core against WeightWatcher and the powerlaw package (same run).

Prints ratios (reference time / our time), never absolute claims: the machines are noisy.

    python benchmarks/bench_spectrum.py [--quick] [--only core|checkpoint|floor] [--layers N]

``floor`` rows (``bench_floor.py``): analyze per matrix over a bare float64 ``eigvalsh`` of
the smaller Gram matrix, batched and one at a time, and what each per-matrix step costs.

``checkpoint`` rows: a synthetic LLaMA-shaped checkpoint (float32, sharded safetensors with
an index) analysed from its folder by ``bs.analyze`` and by WeightWatcher, each in a fresh
process: wall time and peak RSS (``VmHWM``) next to the largest tensor (target: peak <=
1 GB + 4x the largest matrix), then the same with one busy process per core running
(the loaded machine), ours under torch's default threads and under ``default_threads()``.
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings

import numpy as np
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.apps.nets import make_mlp


def best_time(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def mlp() -> nn.Module:
    return make_mlp(784, (1024, 1024, 512), 10, named=False)  # seeded in main()


def conv_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(),
                         nn.Conv2d(64, 128, 3), nn.Flatten(), nn.Linear(128 * 4, 256),
                         nn.Linear(256, 10))


def heavy_evals(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    W = rng.standard_t(3, size=(n + n // 2, n)) / np.sqrt(n)
    return np.sort(np.linalg.svd(W, compute_uv=False) ** 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="smaller sizes")
    parser.add_argument("--only", choices=["core", "checkpoint", "floor"], default=None)
    parser.add_argument("--device", default="cpu", help="floor rows: also analyze on cuda")
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers of the synthetic checkpoint")
    parser.add_argument("--skip-ww", action="store_true",
                        help="checkpoint rows without WeightWatcher (it is slow on big ones)")
    parser.add_argument("--no-load", action="store_true",
                        help="checkpoint rows on the idle machine only")
    parser.add_argument("--child", nargs=3, metavar=("WHO", "PATH", "THREADS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        from bench_checkpoint import child

        child(*args.child)
        return
    if args.only in (None, "floor"):
        from bench_floor import floor_rows

        floor_rows(args.quick, args.device)
    if args.only == "floor":
        return
    if args.only != "core":
        from bench_checkpoint import checkpoint_rows

        checkpoint_rows(args.quick, args.layers, args.skip_ww, args.no_load)
    if args.only == "checkpoint":
        return
    torch.set_num_threads(2)
    torch.manual_seed(0)
    import weightwatcher as ww
    from weightwatcher.WW_powerlaw import WWFit

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    print("== analyze(): bayes_spectral vs WeightWatcher analyze() (default settings)")
    print(f"{'model':<28}{'ours [s]':>10}{'ww [s]':>10}{'ww/ours':>10}")
    for name, model in [("MLP 784-1024-1024-512-10", mlp()), ("conv net (3 conv + 2 fc)",
                                                               conv_net())]:
        ours = best_time(lambda m=model: bs.analyze(m))
        theirs = best_time(lambda m=model: ww.WeightWatcher(model=m).analyze(), repeat=2)
        print(f"{name:<28}{ours:>10.3f}{theirs:>10.3f}{theirs / ours:>10.1f}")

    import powerlaw

    sizes = [256, 512, 1024] if args.quick else [256, 512, 1024, 2048, 4096]
    print("\n== fit_powerlaw (KS over all candidates) vs WeightWatcher's fit, powerlaw.Fit, "
          "and eigvalsh")
    print(f"{'N':>6}{'ours [s]':>10}{'ww/ours':>10}{'powerlaw/ours':>15}"
          f"{'eigvalsh [s]':>14}{'ours/eigvalsh':>15}")
    for n in sizes:
        ev = heavy_evals(n, seed=n)
        ev_t = torch.tensor(ev)
        ours = best_time(lambda e=ev_t: bs.fit_powerlaw(e))
        theirs = best_time(lambda e=ev: WWFit(e), repeat=1)
        if n <= 1024:
            pl = best_time(lambda e=ev: powerlaw.Fit(e, verbose=False,
                                                    parameter_ranges={"alpha": [1, 100]}),
                           repeat=1)
            pl_ratio = f"{pl / ours:>15.1f}"
        else:
            pl_ratio = f"{'(skipped)':>15}"
        # the floor: eigendecomposition of an N x N Gram matrix W^T W
        g = torch.randn(n + n // 2, n, dtype=torch.float64)
        gram = g.T @ g
        eig = best_time(lambda a=gram: torch.linalg.eigvalsh(a), repeat=2)
        print(f"{n:>6}{ours:>10.4f}{theirs / ours:>10.1f}{pl_ratio}{eig:>14.3f}"
              f"{ours / eig:>15.3f}")


if __name__ == "__main__":
    main()
