"""When does tracking the top of a spectrum stop paying off? Block width vs a full decomposition.

One :class:`~bayes_spectral.spectra.tracking.TailTracker` call (one Rayleigh-Ritz step from the
previous block, no extra iteration: ``max_iter=0``) on a weight that moved by a small
random step, over the tracker's full decomposition of the same weight (float64 ``eigh`` of
the small-side Gram ``W^T W``; ``torch.linalg.svd`` is printed too), in the same run, for block
widths ``k`` from 16 to 352. float32, ``torch.set_num_threads(2)``; the perturbed weights
are drawn before timing. A tracked call during training takes the first step plus 0.2-2
extra ones (``bench_penalties.py``), a failing one 8 extra steps and then the
decomposition. Measured (2 cores): the float64 Gram decomposition takes 34-60 ms (a float32
``svd`` 40-85 ms); one step costs 0.03-0.08 of it at k <= 64, 0.15 at k = min(m, n) / 4,
0.26-0.31 at k = 0.38 min(m, n) and 0.38-0.48 at half, where a call with its usual extra
step costs over half a decomposition; this is the measurement behind
``TailTracker(wide=0.4)``.

Run: ``PYTHONPATH=. python benchmarks/bench_tracking.py [--repeats 10]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bayes_spectral.spectra.tracking import TailTracker

SHAPES = [(512, 784), (512, 512)]
WIDTHS = [16, 32, 64, 128, 192, 256, 352]


def median_time(fn, inputs: list) -> float:
    """Median over ``inputs`` of the time of ``fn(x)``."""
    times = []
    for x in inputs:
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print(f"threads {args.threads}, float32, median of {args.repeats} calls")
    print(f"{'matrix':9s} {'k':>4s} {'k/min(m,n)':>10s} {'svd ms':>7s} {'full ms':>7s} "
          f"{'step ms':>8s} {'step/full':>9s}")
    for m, n in SHAPES:
        W = torch.randn(1, m, n, generator=gen) / n ** 0.5
        steps = [W + 1e-4 * torch.randn(W.shape, generator=gen) for _ in range(args.repeats)]
        t_svd = median_time(lambda x: torch.linalg.svd(x, full_matrices=False), steps)
        t_full = median_time(lambda x, tall=m >= n: torch.linalg.eigh(
            x.double().mT @ x.double() if tall else x.double() @ x.double().mT), steps)
        for k in WIDTHS:
            tracker = TailTracker(max_iter=0, tol=1e9, wide=1.0)  # always one Ritz step
            tracker(W, k, k // 2)
            t_step = median_time(lambda x, tr=tracker, k=k: tr(x, k, k // 2), steps)
            print(f"{m}x{n:<5d} {k:4d} {k / min(m, n):10.2f} {1e3 * t_svd:7.1f} "
                  f"{1e3 * t_full:7.1f} {1e3 * t_step:8.2f} {t_step / t_full:9.3f}")


if __name__ == "__main__":
    main()
