"""Data-parallel ``fit`` on CPU (gloo): steps per second for 1 and 2 ranks, same global batch.

MLP 784-256-256-10, ``PowerLawSpectrum`` (penalty) prior on every layer (one ``svdvals``
per layer and step), MAP (``AutoDelta``) and SVI (``AutoNormal``), global batch ``--batch``
of random data, ``--steps`` steps per epoch; epoch 1 is warm-up, the next ``--epochs`` are
timed (callback timestamps). Every rank uses ``torch.set_num_threads(1)``, so 2 ranks use
2 cores where the reference uses one. Rows (ratio = steps/s over the 1-process row):

* ``1 process``: plain ``fit`` (``distributed=False``), the reference;
* ``1 rank DDP``: the data-parallel path with one rank (its overhead alone);
* ``2 ranks DDP``: two ranks, each holding half of every global batch, the prior work split
  by layer (what ``fit`` does);
* ``2 ranks, no split``: the same with every prior on every rank
  (``BAYES_SPECTRAL_SPLIT_PRIOR=0``).

Spectral work: in a 2-rank group, the prior's gradient (``svdvals`` of the three weights +
backward) followed by the gradient all-reduce DDP does anyway, computed (a) on every rank,
(b) on rank 0 and broadcast, (c) split by layer across the ranks (each layer's prior on one
rank, times ``R``: what ``fit`` does). Times are medians over interleaved rounds.

    python benchmarks/bench_distributed.py [--steps 10] [--epochs 3] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch
from torch import nn

N_LAYERS = ((784, 256), (256, 256), (256, 10))


def mlp() -> nn.Module:
    from bayes_spectral.apps.nets import make_mlp

    return make_mlp(784, (256, 256), 10, seed=0, named=False)


def _fit_worker(rank: int, world: int, methods: list[str], batch: int, steps: int,
                epochs: int, distributed: bool, out: str) -> None:
    import pyro

    import bayes_spectral as bs
    from bayes_spectral.distributions import PowerLawSpectrum

    torch.set_num_threads(1)
    pyro.enable_validation(False)
    g = torch.Generator().manual_seed(0)
    n = batch * steps
    x, y = torch.rand(n, 784, generator=g), torch.randint(0, 10, (n,), generator=g)
    rates = {}
    for method in methods:
        bn = bs.bayesian(mlp(), {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)},
                         num_data=n)
        stamps: list[float] = []
        bs.fit(bn, (x, y), method, epochs=1 + epochs, batch_size=batch, lr=1e-3,
               progress=False, distributed=distributed,
               callbacks=[lambda info, st=stamps: st.append(time.perf_counter())])
        rates[method] = steps * epochs / (stamps[-1] - stamps[0])
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rates, f)


def _spectral_worker(rank: int, world: int, steps: int, repeats: int, out: str) -> None:
    import torch.distributed as dist

    from bayes_spectral.distributions import PowerLawSpectrum

    torch.set_num_threads(1)
    torch.manual_seed(0)
    ws = [torch.randn(o, i).div(i ** 0.5).requires_grad_() for i, o in N_LAYERS]
    priors = [PowerLawSpectrum(2.0, 0.5, w.shape) for w in ws]

    def prior_grads(layers) -> None:
        for w in ws:
            w.grad = torch.zeros_like(w)
        if layers:
            lp = sum(-priors[i].log_prob(ws[i]) * (world if len(layers) < len(ws) else 1)
                     for i in layers)
            lp.backward()

    def ddp_allreduce() -> None:
        flat = torch.cat([w.grad.reshape(-1) for w in ws])
        dist.all_reduce(flat)

    everywhere = list(range(len(ws)))

    def replicate():
        prior_grads(everywhere)
        ddp_allreduce()

    def rank0_broadcast():
        prior_grads(everywhere if rank == 0 else [])
        flat = torch.cat([w.grad.reshape(-1) for w in ws])
        dist.broadcast(flat, src=0)
        ddp_allreduce()

    def split():
        prior_grads([i for i in everywhere if i % world == rank])
        ddp_allreduce()

    fns = {"every rank": replicate, "rank 0 + broadcast": rank0_broadcast,
           "split by layer (fit)": split}
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            dist.barrier()
            times[name].append((time.perf_counter() - t0) / steps)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(times, f)


def _run(fn, nprocs: int, *args, split_prior: bool = True) -> dict:
    from bayes_spectral.distributed import launch

    fd, out = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    old = os.environ.get("BAYES_SPECTRAL_SPLIT_PRIOR")
    os.environ["BAYES_SPECTRAL_SPLIT_PRIOR"] = "1" if split_prior else "0"
    try:
        launch(fn, nprocs, *args, out, backend="gloo", timeout=300)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)
        if old is None:
            del os.environ["BAYES_SPECTRAL_SPLIT_PRIOR"]
        else:
            os.environ["BAYES_SPECTRAL_SPLIT_PRIOR"] = old


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=256, help="global batch size")
    ap.add_argument("--steps", type=int, default=10, help="steps per epoch")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs")
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--methods", default="map,svi")
    a = ap.parse_args()
    rows = {"1 process": (1, False, True), "1 rank DDP": (1, True, True),
            "2 ranks DDP": (2, True, True), "2 ranks, no split": (2, True, False)}
    methods = a.methods.split(",")
    print(f"global batch {a.batch}, {a.steps} steps/epoch x {a.epochs} timed epochs, "
          f"1 thread per rank, median of {a.repeats} interleaved rounds")
    rates: dict[str, list[dict]] = {k: [] for k in rows}
    for _ in range(a.repeats):
        for name, (nprocs, distributed, split) in rows.items():
            rates[name].append(_run(_fit_worker, nprocs, methods, a.batch, a.steps, a.epochs,
                                    distributed, split_prior=split))
    print(f"{'method':<6} {'configuration':<18} {'steps/s':>9} {'ratio':>7}")
    for method in methods:
        ref = [r[method] for r in rates["1 process"]]
        for name in rows:
            got = [r[method] for r in rates[name]]
            ratio = statistics.median(g / b for g, b in zip(got, ref, strict=True))
            print(f"{method:<6} {name:<18} {statistics.median(got):9.2f} {ratio:7.2f}")
    times = _run(_spectral_worker, 2, 20, 5)
    ref = times["every rank"]
    print("\nspectral prior gradient + DDP all-reduce, 2 ranks, weights "
          + ", ".join(f"{o}x{i}" for i, o in N_LAYERS))
    print(f"{'strategy':<20} {'ms/step':>8} {'ratio':>7}")
    for name, ts in times.items():
        ratio = statistics.median(t / r for t, r in zip(ts, ref, strict=True))
        print(f"{name:<20} {1e3 * statistics.median(ts):8.2f} {ratio:7.2f}")


if __name__ == "__main__":
    main()
