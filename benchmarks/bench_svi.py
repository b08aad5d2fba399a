"""Cost of one SVI step (mean-field Normal guide) over the plain PyTorch step, same run.

MLPs 784-512-512-10 and 784-1024-1024-10 (``--sizes``), batch 128 of random data,
N = 60000 nominal examples, ``torch.set_num_threads(--threads)``. Every configuration is
warmed up, then timed in ``--repeats`` rounds of ``--steps`` steps, the configurations of
one MLP interleaved within each round; a ratio is the median over rounds of the per-round
ratio over ``plain`` (Adam, mean cross-entropy). Rows, for each prior (an i.i.d.
``Normal(0, 0.1)`` and the tracked ``FrechetTopEigenvalue(2, 1, 0.5)`` spectral prior):

* ``trace_elbo``: ``SVI`` + ``Trace_ELBO`` + ``AutoNormal`` (guide ``"normal"``): Pyro's path;
* ``fused``: ``SVI`` + :class:`~bayes_spectral.bnn.fused_elbo.FusedELBO` + guide
  ``"fused_normal"`` (one model pass, analytic entropy / Normal KL);
* ``local``: the same with guide ``"local_reparam"`` (pre-activations of the Linear layers
  drawn by local reparameterisation);

and two floors without Pyro (hand-written torch: ``mu``, ``rho`` per weight,
``sigma = exp(rho)``, one ``torch.optim.Adam`` over all, loss ``N * CE + KL`` with the
Normal prior's KL in closed form): ``floor weight`` (``W = mu + sigma * eps``) and
``floor local`` (local reparameterisation). They are what any mean-field SVI step costs
here: twice the parameters for Adam, the noise, the KL. ``noise draw only``: drawing
``eps`` for every weight and nothing else (on CPU, torch's generator makes this a large
part of the floor; on CUDA it is nearly free).

    python benchmarks/bench_svi.py [--quick] [--steps 10] [--repeats 5] [--sizes 512 1024]
"""

from __future__ import annotations

import argparse
import statistics

import pyro
import pyro.distributions as dist
import torch
from bench_infer import interleaved  # a sibling script (its folder is on sys.path)
from torch import nn

import bayes_spectral as bs
from bayes_spectral.apps.nets import make_mlp
from bayes_spectral.distributions import FrechetTopEigenvalue

N = 60000


def plain_step(width, x, y):
    net = make_mlp(784, (width, width), 10, seed=0, named=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def floor_step(width, x, y, local: bool):
    """Hand-written mean-field step with the analytic Normal(0, 0.1) KL (module doc)."""
    net = make_mlp(784, (width, width), 10, seed=0, named=False)
    lins = [m for m in net if isinstance(m, nn.Linear)]
    mus = [nn.Parameter(m.weight.detach().clone()) for m in lins]
    rhos = [nn.Parameter(torch.full_like(m.weight, -4.6)) for m in lins]  # log sigma
    biases = [nn.Parameter(m.bias.detach().clone()) for m in lins]
    opt = torch.optim.Adam(mus + rhos + biases, lr=1e-3)
    s0 = 0.1

    def step():
        opt.zero_grad()
        h, kl = x, 0.0
        for i, (mu, rho, b) in enumerate(zip(mus, rhos, biases, strict=True)):
            sigma = rho.exp()
            if local:
                mean = nn.functional.linear(h, mu, b)
                std = nn.functional.linear(h.square(), sigma.square()).sqrt()
                h = mean + std * torch.randn_like(std)
            else:
                h = nn.functional.linear(h, mu + sigma * torch.randn_like(mu), b)
            if i < len(mus) - 1:
                h = torch.relu(h)
            kl = kl + ((sigma.square() + mu.square()) / (2 * s0**2) - rho).sum()
        (N * nn.functional.cross_entropy(h, y) + kl).backward()
        opt.step()
    return step


def noise_only(width):
    """Only the weight noise ``eps ~ N(0, 1)`` of one mean-field draw (every weight)."""
    net = make_mlp(784, (width, width), 10, seed=0, named=False)
    weights = [m.weight.detach() for m in net if isinstance(m, nn.Linear)]
    return lambda: [torch.empty_like(w).normal_() for w in weights]


def svi_step(width, x, y, law, tracked, guide_kind):
    pyro.clear_param_store()
    bn = bs.bayesian(make_mlp(784, (width, width), 10, seed=0, named=False),
                     {nn.Linear: law}, num_data=N, tracked=nn.Linear if tracked else None)
    guide = bs.make_guide(bn, guide_kind)
    elbo = guide.make_elbo() if hasattr(guide, "make_elbo") else pyro.infer.Trace_ELBO()
    svi = pyro.infer.SVI(bn, guide, pyro.optim.Adam({"lr": 1e-3}), elbo)
    return lambda: svi.step(x, y)


def normal_law(shape):
    return dist.Normal(torch.zeros(shape), 0.1).to_event(len(shape))


def frechet_law(shape):
    return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)


def table(width: int, args) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 784, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    configs = {"plain": plain_step(width, x, y),
               "floor weight": floor_step(width, x, y, local=False),
               "floor local": floor_step(width, x, y, local=True),
               "noise draw only": noise_only(width)}
    for prior, law, tracked in (("Normal", normal_law, False),
                                ("Frechet tracked", frechet_law, True)):
        for row, kind in (("trace_elbo", "normal"), ("fused", "fused_normal"),
                          ("local", "local_reparam")):
            configs[f"{row} ({prior})"] = svi_step(width, x, y, law, tracked, kind)
    times = interleaved(configs, args.steps, args.repeats)
    t_plain = statistics.median(times["plain"])
    print(f"\nMLP 784-{width}-{width}-10, batch 128, threads {args.threads}: "
          f"plain {t_plain * 1e3:.1f} ms")
    print(f"{'step':30s} {'ms':>7s} {'x plain':>8s}")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, times["plain"], strict=True))
        print(f"{name:30s} {statistics.median(ts) * 1e3:7.1f} {ratio:8.2f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--quick", action="store_true", help="3 steps x 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 3, 3
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    for width in args.sizes:
        table(width, args)


if __name__ == "__main__":
    main()
