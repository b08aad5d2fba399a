"""What a checkpoint boundary of ``fit`` costs with tracked priors: renewing the trackers
(the old behaviour) vs saving their state (``bnn/tracker_state.py``).

Model: MLP ``784-H-H-10`` with a tracked power-law prior on every layer (``tracked``: tail
trackers, the top 10% as the tail; ``fast``: fixed ``xmin``, Hutchinson x Chebyshev plus
the 8-column block). Per mode, in the same run:

* ``warm``: one prior call of every layer with warm state (the reference, 1.00);
* ``renew``: the first prior call after :meth:`BayesianNetwork.renew_tracking` (a full
  decomposition / 16 block iterations): the old boundary paid ``renew - warm``;
* ``save``: ``tracker_state`` + ``torch.save`` to memory (what a boundary pays now), and
  ``load``: ``torch.load(weights_only=True)`` + check + restore (paid once per resume);
* ``fit old / new``: ``fit(epochs=E, checkpoint_every=1, checkpoint_dir=...)`` wall time with
  a callback renewing the trackers after every checkpoint (the old boundary, exactly) over
  the same fit without it.

Run: ``PYTHONPATH=. python benchmarks/bench_fit_checkpoint.py [--quick]`` (``--quick``:
H = 256, 3 repeats).
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.bnn.tracker_state import load_tracker_state, tracker_state
from bayes_spectral.distributions import PowerLawSpectrum


def model(hidden: int, mode: str, n: int):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                        nn.ReLU(), nn.Linear(hidden, 10))

    def law(shape):
        if mode == "fast":
            return PowerLawSpectrum(2.5, 0.05, shape, xmin=0.2)
        return PowerLawSpectrum(2.0, 0.5, shape, xmin_quantile=0.9)

    return bs.bayesian(net, {"0": law, "2": law, "4": law}, num_data=n, tracked=True,
                       tracked_mode=mode)


def prior_calls(bn, weights: dict) -> float:
    """Seconds of one prior call per tracked layer at ``weights``."""
    t0 = time.perf_counter()
    with torch.no_grad():
        for row, pen in bn._tail_penalties.items():
            pen(weights[row], name="weight")
    return time.perf_counter() - t0


def median(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def boundary_costs(bn, weights: dict, repeats: int) -> dict[str, float]:
    """``warm``, ``renew``, ``save``, ``load`` seconds and the state's bytes."""
    warm = median(lambda: prior_calls(bn, weights), repeats)
    state = tracker_state(bn)

    def renewed():
        bn.renew_tracking()
        return prior_calls(bn, weights)

    renew = median(renewed, repeats)
    load_tracker_state(bn, state, "bench")  # warm again
    buf = io.BytesIO()

    def save():
        buf.seek(0)
        buf.truncate()
        t0 = time.perf_counter()
        torch.save({"trackers": tracker_state(bn)}, buf)
        return time.perf_counter() - t0

    t_save = median(save, repeats)

    def load():
        buf.seek(0)
        t0 = time.perf_counter()
        saved = torch.load(buf, weights_only=True)
        load_tracker_state(bn, saved["trackers"], "bench")
        return time.perf_counter() - t0

    return {"warm": warm, "renew": renew, "save": t_save, "load": median(load, repeats),
            "bytes": buf.getbuffer().nbytes}


def fit_time(hidden: int, mode: str, x, y, epochs: int, renew: bool) -> float:
    bn = model(hidden, mode, len(x))
    cbs = [lambda info: info["model"].renew_tracking()] if renew else []
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        bs.fit(bn, (x, y), "map", epochs=epochs, batch_size=128, lr=1e-3, progress=False,
               checkpoint_dir=d, callbacks=cbs)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hidden, repeats, epochs = (256, 3, 4) if args.quick else (512, 5, 6)
    gen = torch.Generator().manual_seed(0)
    n = 512
    x, y = torch.randn(n, 784, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    print(f"MLP 784-{hidden}-{hidden}-10, tracked power law on 3 layers, threads "
          f"{args.threads}, median of {repeats}; ratios over one warm prior call of all layers")
    print(f"{'mode':8s} {'warm ms':>8s} {'renew':>7s} {'save':>7s} {'load':>7s} "
          f"{'state KiB':>9s} {'fit old/new (s)':>18s} {'ratio':>6s}")
    for mode in ("tracked", "fast"):
        bn = model(hidden, mode, n)
        res = bs.fit(bn, (x, y), "map", epochs=1, batch_size=128, lr=1e-3, progress=False)
        values = bs.map_values(res.guide)  # the MAP weights, where the trackers are warm
        weights = {row: values[bn.prior_sites[row]].detach() for row in bn._tail_penalties}
        c = boundary_costs(bn, weights, repeats)
        old = fit_time(hidden, mode, x, y, epochs, renew=True)
        new = fit_time(hidden, mode, x, y, epochs, renew=False)
        w = c["warm"]
        print(f"{mode:8s} {1e3 * w:8.2f} {c['renew'] / w:7.2f} {c['save'] / w:7.2f} "
              f"{c['load'] / w:7.2f} {c['bytes'] / 1024:9.1f} {old:8.2f} / {new:7.2f} "
              f"{old / new:6.2f}")


if __name__ == "__main__":
    main()
