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

each with the optimiser in brackets (``--optims``,
:func:`~bayes_spectral.bnn.multi_optim.svi_optim`): ``[pyro]`` ``pyro.optim.Adam`` (one
torch Adam per parameter, stepped one by one), ``[multi]`` ``MultiAdam`` (one foreach Adam
over all parameters, equal to ``[pyro]`` bit for bit), ``[fused]`` ``MultiAdam(fused=True)``
(torch's fused kernel, within rounding of ``[pyro]``; ``fit``'s default);

and two floors without Pyro (hand-written torch: ``mu``, ``rho`` per weight,
``sigma = exp(rho)``, one ``torch.optim.Adam`` over all, loss ``N * CE + KL`` with the
Normal prior's KL in closed form): ``floor weight`` (``W = mu + sigma * eps``) and
``floor local`` (local reparameterisation). They are what any mean-field SVI step costs
here: twice the parameters for Adam, the noise, the KL. ``noise draw only``: drawing
``eps`` for every weight and nothing else (on CPU, torch's generator makes this a large
part of the floor; on CUDA it is nearly free). ``optimiser step only [kind]``: the update of
the mean-field parameters alone (fixed gradients). ``plain fused Adam``: the plain step with
``torch.optim.Adam(fused=True)`` (how much of ``plain`` is its own Adam); ``floor weight
fused Adam`` the same for the floor. The column ``x plain fused`` is the ratio over ``plain
fused Adam`` (every row against a plain step with the same kernel as ``[fused]``).

``--rows modes``: only ``plain`` and, for the Normal prior and the Frechet prior in each
``tracked_mode`` (``"tracked"``: 2 power iterations; ``"fast"``: the 8-column block
iteration; ``"fused"``: the rank-one closed-form step,
:func:`~bayes_spectral.penalties.rank_one.rank_one_penalty`), and the power-law prior
(``alpha = 3``, ``xmin = tau = 0.5``) in ``"fast"`` (Hutchinson x Chebyshev) and
``"subspace"`` (the warm tail block, ``PowerLawPrior(mode="subspace")``), the priors alone
(``prior only``: every weight's ``log_prob(W).backward()``, the spectral work a step adds), the MAP
step (guide ``"delta"``), ``trace_elbo`` and ``fused``, with the first of ``--optims``.

    python benchmarks/bench_svi.py [--quick] [--steps 10] [--repeats 5] [--sizes 512 1024]
        [--optims fused multi pyro] [--rows all|modes]
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
from bayes_spectral.bnn.multi_optim import OPTIMIZERS, svi_optim
from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum

N = 60000


def plain_step(width, x, y, fused: bool = False):
    net = make_mlp(784, (width, width), 10, seed=0, named=False)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3, **({"fused": True} if fused else {}))

    def step():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return step


def floor_step(width, x, y, local: bool, fused: bool = False):
    """Hand-written mean-field step with the analytic Normal(0, 0.1) KL (module doc)."""
    net = make_mlp(784, (width, width), 10, seed=0, named=False)
    lins = [m for m in net if isinstance(m, nn.Linear)]
    mus = [nn.Parameter(m.weight.detach().clone()) for m in lins]
    rhos = [nn.Parameter(torch.full_like(m.weight, -4.6)) for m in lins]  # log sigma
    biases = [nn.Parameter(m.bias.detach().clone()) for m in lins]
    opt = torch.optim.Adam(mus + rhos + biases, lr=1e-3, **({"fused": True} if fused else {}))
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


def optim_only(width, kind):
    """Only the optimiser's update of a mean-field guide's parameters (loc and scale of every
    weight and bias), with fixed gradients."""
    net = make_mlp(784, (width, width), 10, seed=0, named=False)
    params = [p.detach().clone().requires_grad_() for p in net.parameters() for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    optim, passed = svi_optim(1e-3, kind), set(params)
    return lambda: optim(passed)


def svi_step(width, x, y, law, tracked, guide_kind, optim="pyro", mode="tracked"):
    """One ``SVI.step`` (guide ``"delta"``: a MAP step) of the MLP with prior ``law`` on
    every Linear (``tracked``: through ``tracked_mode=mode``)."""
    pyro.clear_param_store()
    bn = bs.bayesian(make_mlp(784, (width, width), 10, seed=0, named=False),
                     {nn.Linear: law}, num_data=N, tracked=nn.Linear if tracked else None,
                     tracked_mode=mode if tracked else "tracked")
    guide = bs.make_guide(bn, guide_kind)
    elbo = guide.make_elbo() if hasattr(guide, "make_elbo") else pyro.infer.Trace_ELBO()
    svi = pyro.infer.SVI(bn, guide, svi_optim(1e-3, optim), elbo)
    return lambda: svi.step(x, y)


def normal_law(shape):
    return dist.Normal(torch.zeros(shape), 0.1).to_event(len(shape))


def frechet_law(shape):
    return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)


def powerlaw_law(shape):
    """Fixed ``xmin = tau = 0.5`` (``bench_penalties``' rows; ~27% of the init spectrum)."""
    return PowerLawSpectrum(3.0, 0.5, shape, xmin=0.5)


#: ``--rows modes``: MAP and SVI with the Frechet prior in each ``tracked_mode`` (and
#: the i.i.d. Normal prior: the same step without spectral work), ``(row, guide)``
MODE_ROWS = (("map", "delta"), ("trace_elbo", "normal"), ("fused", "fused_normal"))


def prior_only(width: int, law, tracked: bool, mode: str):
    """Only the site priors: ``log_prob(W).backward()`` of every Linear weight through the
    priors ``bayesian`` installs (``tracked_mode=mode``), no model, guide or optimiser."""
    bn = bs.bayesian(make_mlp(784, (width, width), 10, seed=0, named=False),
                     {nn.Linear: law}, num_data=N, tracked=nn.Linear if tracked else None,
                     tracked_mode=mode if tracked else "tracked")
    weights = {site: bn._initial[site].clone().requires_grad_(True)
               for site in bn.prior_sites.values()}
    trace = pyro.poutine.trace(pyro.poutine.condition(bn, data=weights)).get_trace(
        torch.zeros(1, 784), torch.zeros(1, dtype=torch.long))
    priors = [(trace.nodes[site]["fn"], w) for site, w in weights.items()]

    def step():
        for fn, w in priors:
            fn.log_prob(w).backward()
    return step


def mode_configs(width: int, x, y, args) -> dict:
    """``--rows modes``: plain, then per prior (Normal; Frechet ``tracked``, ``fast``,
    ``fused``; power law ``fast``, ``subspace``) the priors alone, the MAP step and the SVI
    steps of :data:`MODE_ROWS` with ``fit``'s Adam."""
    configs = {"plain": plain_step(width, x, y)}
    priors = [("Normal", normal_law, False, "tracked")] + [
        (f"Frechet {mode}", frechet_law, True, mode) for mode in ("tracked", "fast", "fused")
    ] + [(f"power law {mode}", powerlaw_law, True, mode) for mode in ("fast", "subspace")]
    for prior, law, tracked, mode in priors:
        configs[f"prior only ({prior})"] = prior_only(width, law, tracked, mode)
        for row, kind in MODE_ROWS:
            configs[f"{row} ({prior})"] = svi_step(width, x, y, law, tracked, kind,
                                                   args.optims[0], mode)
    return configs


def table(width: int, args) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 784, generator=g)
    y = torch.randint(0, 10, (128,), generator=g)
    if args.rows == "modes":
        return print_table(width, interleaved(mode_configs(width, x, y, args), args.steps,
                                              args.repeats), args, ("plain",))
    configs = {"plain": plain_step(width, x, y),
               "plain fused Adam": plain_step(width, x, y, fused=True),
               "floor weight": floor_step(width, x, y, local=False),
               "floor local": floor_step(width, x, y, local=True),
               "floor weight fused Adam": floor_step(width, x, y, local=False, fused=True),
               "noise draw only": noise_only(width),
               **{f"optimiser step only [{k}]": optim_only(width, k) for k in args.optims}}
    for prior, law, tracked in (("Normal", normal_law, False),
                                ("Frechet tracked", frechet_law, True)):
        for row, kind in (("trace_elbo", "normal"), ("fused", "fused_normal"),
                          ("local", "local_reparam")):
            for optim in args.optims:
                configs[f"{row} [{optim}] ({prior})"] = svi_step(width, x, y, law, tracked,
                                                                 kind, optim)
    print_table(width, interleaved(configs, args.steps, args.repeats), args,
                ("plain", "plain fused Adam"))


def print_table(width: int, times: dict, args, refs: tuple[str, ...]) -> None:
    """Median ms and the median per-round ratio over each of ``refs``."""
    t_plain = statistics.median(times["plain"])
    print(f"\nMLP 784-{width}-{width}-10, batch 128, threads {args.threads}: "
          f"plain {t_plain * 1e3:.1f} ms")
    heads = {"plain": "x plain", "plain fused Adam": "x plain fused"}
    print(f"{'step':38s} {'ms':>7s} " + " ".join(f"{heads[r]:>14s}" for r in refs))
    for name, ts in times.items():
        ratios = [statistics.median(a / b for a, b in zip(ts, times[ref], strict=True))
                  for ref in refs]
        print(f"{name:38s} {statistics.median(ts) * 1e3:7.1f} "
              + " ".join(f"{r:14.2f}" for r in ratios))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--optims", nargs="+", choices=OPTIMIZERS, default=list(OPTIMIZERS))
    ap.add_argument("--quick", action="store_true", help="3 steps x 3 rounds")
    ap.add_argument("--rows", choices=("all", "modes"), default="all",
                    help="modes: only MAP / SVI with the Frechet prior per tracked_mode")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 3, 3
    torch.set_num_threads(args.threads)
    pyro.enable_validation(False)
    for width in args.sizes:
        table(width, args)


if __name__ == "__main__":
    main()
