"""Cost of one Pyro training step over the equivalent plain PyTorch step (same run).

MLP 784-512-512-10, batch 128 of random data, N = 60000 nominal training examples,
``torch.set_num_threads(2)`` (``--threads``). Every configuration is warmed up, then timed
in ``--repeats`` rounds of ``--steps`` steps, the configurations interleaved within each
round; a ratio is the median over rounds of the per-round ratio.
Rows (ratio = time / reference time):

* ``svi/auto_normal`` : ``SVI.step`` with ``AutoNormal`` over all weights and a
  ``PowerLawSpectrum`` (penalty measure) prior on every layer, over the plain step
  (Adam, mean cross-entropy) — target <= 2x;
* ``svi/spectral_guide`` : the same prior on ``s`` of the spectral parameterisation
  ``U diag(s) V^T`` (no SVD per step; ``orthogonal`` maps instead), LogNormal guide on ``s``;
* ``(Frechet, tracked)`` rows: a ``FrechetTopEigenvalue`` penalty prior evaluated by
  :class:`bayes_spectral.bnn.network.TrackedSpectralPrior` (2 warm-started power iterations and the
  Frobenius norm, no SVD); the MAP reference loop adds the same tracked penalty;
* ``(power law, tracked)``: the ``PowerLawSpectrum`` prior through a tail tracker
  (``bayesian(tracked=...)``); at random init its KS tail holds a third of the spectrum, so
  the tracker decomposes at every call (``TailTracker(wide=...)``);
* ``(i.i.d. Normal prior)``: SVI with no spectral work at all, the floor of Pyro's own
  per-step cost (sampling, the ELBO's log-densities, the guide's parameters) for this net;
  the ``over SVI, Normal prior`` rows give what a spectral prior adds on top of that floor;
* ``sgld`` / ``sghmc (Frechet, tracked)``: one SG-MCMC step as ``fit(method=...)`` runs it
  (``AutoDelta``, the sampler optimiser :class:`bayes_spectral.bnn.samplers.SGLD` /
  ``SGHMC`` through :class:`~bayes_spectral.bnn.sampling.SamplerOptim`, the potential with
  its Jacobian term, and a draw of every weight kept at every step: ``thin=1``, the worst
  case; ``no draw kept``: a step of ``thin > 1`` or of an exploration phase) over the MAP
  step of the same model and over the plain step — targets <= 1.05x the MAP step and
  <= 1.3x the plain step (where the MAP step is). The floor on the CPU: drawing the
  Gaussian noise (``torch.randn`` of 670k numbers, about 3 ms single-threaded; the sampler
  draws it from the global RNG, one ``normal_`` per latent tensor), timed by the ``MAP step
  + randn of the weights`` row;
* the MAP/SVI rows use ``fit``'s Adam (``--optimizer``, default ``fused``: one fused Adam
  over all parameters, :class:`~bayes_spectral.bnn.multi_optim.MultiAdam`);
* ``map/auto_delta`` : ``SVI.step`` with ``AutoDelta`` (MAP) over the penalty loop: the
  plain step plus ``-sum_l prior_l.penalty_log_prob(W_l) / N`` (the same spectral
  log-density, one ``svdvals`` per layer) — target <= 1.2x. When
  ``bayes_spectral.penalties`` is importable, its ``Regularizer(PowerLawPrior)`` loop is a
  second reference.

Five small models of the kinds users bring (``--models``, on by default; the models of
``tests/test_own_models.py``): a CNN with BatchNorm and a residual block, an Embedding +
TransformerEncoder on token ids, an LSTM and a GRU classifier, a regression MLP with a
learned (latent) Gaussian noise, an MLP with Dropout; batch 128 of random data, N = 1000.
Every row of the parameter view gets an i.i.d. ``Normal(0, 1)`` prior (attention Q/K/V,
recurrent matrices and embeddings included). Per model, its own configurations interleaved:

* ``map (auto_delta)`` over the plain PyTorch step of the same model (Adam, cross-entropy;
  MSE for the regression MLP), and their difference: Pyro's fixed per-step cost (tracing,
  the guide, one ``pyro.optim`` update per parameter), which dominates at these sizes;
* ``sghmc`` over ``map``: the SG-MCMC step (draw kept every step) over the MAP step;
* ``svi (auto_normal)`` over Pyro's own i.i.d.-Normal SVI step: a hand-written Pyro model
  that samples every >= 2-D parameter from ``Normal(0, 1)``, keeps the others as
  ``pyro.module`` parameters and calls the net with ``torch.func.functional_call``
  (``PyroSample`` cannot reach an LSTM's flat weights), ``AutoNormal``, ``Trace_ELBO``.

    python benchmarks/bench_infer.py [--steps 10] [--repeats 5] [--quick] [--no-models]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from types import SimpleNamespace

import pyro
import pyro.distributions as dist
import torch
from own_models import own_models as _own_models  # benchmarks/own_models.py
from torch import nn

import bayes_spectral as bs
from bayes_spectral.apps.nets import make_mlp
from bayes_spectral.bnn.multi_optim import svi_optim
from bayes_spectral.bnn.network import TrackedSpectralPrior
from bayes_spectral.bnn.sampling import DrawCollector, SamplerConfig
from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum
from bayes_spectral.spectra.spectrum import PowerIteration

N = 60000
ALPHA, TAU = 2.0, 0.5
DEVICE = torch.device("cpu")  # --device (the MLP table; the five models stay on the CPU)
OPTIM = "fused"  # --optimizer: the MAP/SVI rows' Adam, as fit(optimizer=...) builds it


def mlp() -> nn.Module:
    return make_mlp(784, (512, 512), 10, seed=0, named=False).to(DEVICE)


def _sync() -> None:
    """Wait for queued GPU work, so a wall-clock interval holds the steps it times."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _warm(steps_by_name: dict) -> dict:
    """Three warm-up calls of each configuration; one that raises is reported and dropped
    (on a device, a configuration that cannot run there is a finding, not a crash)."""
    kept = {}
    for name, fn in steps_by_name.items():
        try:
            for _ in range(3):
                fn()
            kept[name] = fn
        except Exception as err:  # noqa: BLE001 - reported, the other rows still run
            print(f"{name}: failed on {DEVICE}: {type(err).__name__}: {err}", flush=True)
    return kept


def interleaved(steps_by_name: dict, steps: int, repeats: int) -> dict[str, list[float]]:
    """Per-step times, the configurations interleaved round by round (drift hits all)."""
    steps_by_name = _warm(steps_by_name)
    out: dict[str, list[float]] = {k: [] for k in steps_by_name}
    for _ in range(repeats):
        for name, fn in steps_by_name.items():
            _sync()
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync()
            out[name].append((time.perf_counter() - t0) / steps)
    return out


def ratio_of(times: dict, num: str, den: str) -> float:
    """Median over rounds of the per-round ratio."""
    return statistics.median(a / b for a, b in zip(times[num], times[den], strict=True))


def sampler_step(bn, method: str, x, y, lr: float = 1e-3, keep: bool = True):
    """One SG-MCMC step of ``bn`` as ``fit`` runs it (sampler optimiser, potential with the
    Jacobian term), keeping a draw of every latent site at every step (held chunks dropped
    now and then: memory)."""
    cfg = SamplerConfig(method, burn_in=0, draw_chunk=8, num_chains=1)
    cfg.check(epochs=10**9, steps=1)
    col = DrawCollector(bn, cfg, epochs=10**9, steps=1, device=DEVICE)
    guide = bs.make_guide(bn, "delta")
    guide._pyro_name = f"AutoDelta_{method}_{keep}"  # its own param-store names
    svi = pyro.infer.SVI(bn, guide, col.optim(lr), **col.loss(pyro.infer.Trace_ELBO(), guide))
    run = SimpleNamespace(epoch=0, step=0)

    def step():
        svi.step(x, y)
        run.step += 1
        if keep:  # keep=False: a step whose draw is not kept (thin > 1, exploration)
            col.after_step(run)
        if len(col.chunks) > 1:
            col.chunks.clear()
    return step


def map_plus_noise(map_step, net: nn.Module):
    """The floor of any sampler step, timed in the same run: the MAP step plus one
    ``torch.randn`` of every weight matrix's shape (the Gaussian noise SGLD/SGHMC draw for
    the latent weights, nothing else)."""
    shapes = [m.weight.shape for m in net.modules() if isinstance(m, nn.Linear)]

    def step():
        map_step()
        for shape in shapes:
            torch.randn(shape, device=DEVICE)
    return step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu",
                    help="device of the MLP table (cuda: times synchronise the GPU)")
    ap.add_argument("--quick", action="store_true",
                    help="3 steps x 3 rounds (about a minute on 2 cores)")
    ap.add_argument("--no-models", dest="models", action="store_false",
                    help="skip the five small models")
    ap.add_argument("--optimizer", default="fused", choices=("fused", "multi", "pyro"),
                    help="the MAP/SVI rows' Adam (fit's optimizer=; default fused, as fit)")
    ap.add_argument("--samplers-only", dest="samplers_only", action="store_true",
                    help="MLP table: only the configurations of the SG-MCMC rows (plain, "
                         "tracked loop, MAP, sgld, sghmc with the tracked Frechet prior)")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.repeats = 3, 3
    torch.set_num_threads(args.threads)
    global DEVICE, OPTIM
    DEVICE, OPTIM = torch.device(args.device), args.optimizer
    mlp_table(args)
    if args.models:
        models_table(args)


def mlp_table(args) -> None:
    """The MLP 784-512-512-10 rows (module docstring)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(128, 784, generator=g).to(DEVICE)
    y = torch.randint(0, 10, (128,), generator=g).to(DEVICE)
    pyro.enable_validation(False)

    def prior(shape):
        return PowerLawSpectrum(ALPHA, TAU, shape)

    # plain PyTorch step
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)

    def plain():
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()

    # plain step + the same spectral log-density as a penalty (weight 1/N)
    net_p = mlp()
    opt_p = torch.optim.Adam(net_p.parameters(), lr=1e-3)
    priors_p = [prior(m.weight.shape) for m in net_p if isinstance(m, nn.Linear)]
    layers_p = [m for m in net_p if isinstance(m, nn.Linear)]

    def penalty_loop():
        opt_p.zero_grad()
        pen = sum(-p.penalty_log_prob(m.weight) for p, m in zip(priors_p, layers_p, strict=True))
        (nn.functional.cross_entropy(net_p(x), y) + pen / N).backward()
        opt_p.step()

    def frechet(shape):
        return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)

    # plain step + the tracked Frechet penalty (power iteration, no SVD), weight 1/N
    net_t = mlp()
    opt_t = torch.optim.Adam(net_t.parameters(), lr=1e-3)
    layers_t = [m for m in net_t if isinstance(m, nn.Linear)]
    priors_t = [TrackedSpectralPrior(frechet(m.weight.shape), PowerIteration(m.weight.shape, 2))
                for m in layers_t]

    def tracked_loop():
        opt_t.zero_grad()
        pen = sum(-p.log_prob(m.weight) for p, m in zip(priors_t, layers_t, strict=True))
        (nn.functional.cross_entropy(net_t(x), y) + pen / N).backward()
        opt_t.step()

    def gaussian(shape):  # i.i.d. Normal(0, 0.1) weights: SVI with no spectral work at all
        return dist.Normal(torch.zeros(shape, device=DEVICE), 0.1).to_event(len(shape))

    def svi_step(guide_kind, spectral=False, tracked=False, law=None):
        pyro.clear_param_store()
        p = law or (frechet if tracked else prior)
        bn = bs.bayesian(mlp(), {nn.Linear: p}, num_data=N, spectral=spectral, tracked=tracked)
        guide = bs.make_guide(bn, guide_kind)
        svi = pyro.infer.SVI(bn, guide, svi_optim(1e-3, OPTIM), pyro.infer.Trace_ELBO())
        return lambda: svi.step(x, y)

    configs = {"plain": plain, "penalty": penalty_loop, "svi": svi_step("normal"),
               "svi_spectral": svi_step("spectral", spectral=True), "map": svi_step("delta"),
               "tracked_loop": tracked_loop, "svi_tracked": svi_step("normal", tracked=True),
               "map_tracked": svi_step("delta", tracked=True),
               "svi_tracked_pl": svi_step("normal", tracked=True, law=prior),
               "svi_gauss": svi_step("normal", law=gaussian)}
    for method in ("sgld", "sghmc"):
        pyro.clear_param_store()
        configs[f"{method}_tracked"] = sampler_step(
            bs.bayesian(mlp(), {nn.Linear: frechet}, num_data=N, tracked=True), method, x, y)
    configs["sghmc_nodraw"] = sampler_step(
        bs.bayesian(mlp(), {nn.Linear: frechet}, num_data=N, tracked=True), "sghmc", x, y,
        keep=False)
    configs["map_noise"] = map_plus_noise(svi_step("delta", tracked=True), mlp())
    try:
        from bayes_spectral import penalties
    except ImportError:
        penalties = None
    if penalties is not None:
        net_r = mlp()
        opt_r = torch.optim.Adam(net_r.parameters(), lr=1e-3)
        reg = penalties.Regularizer(net_r, penalties.PowerLawPrior(ALPHA, TAU, xmin=TAU,
                                                                     coef=1.0 / N), log=False)

        def reg_loop():
            opt_r.zero_grad()
            reg.loss(nn.functional.cross_entropy(net_r(x), y)).backward()
            opt_r.step()

        configs["regularizer"] = reg_loop
    if args.samplers_only:
        keep = ("plain", "tracked_loop", "map_tracked", "sgld_tracked", "sghmc_tracked",
                "sghmc_nodraw", "map_noise")
        configs = {k: v for k, v in configs.items() if k in keep}
    times = interleaved(configs, args.steps, args.repeats)
    t_plain = statistics.median(times["plain"])
    t_pen = statistics.median(times["penalty"]) if "penalty" in times else math.nan
    # (row, reference label, numerator config, denominator config, target)
    spec = [
        ("svi/auto_normal (spectral prior)", "plain step", "svi", "plain", "<= 2"),
        ("svi/spectral_guide (U diag(s) V^T)", "plain step", "svi_spectral", "plain", "-"),
        ("map/auto_delta (spectral prior)", "penalty loop", "map", "penalty", "<= 1.2"),
        ("map/auto_delta (spectral prior)", "plain step", "map", "plain", "-"),
        ("penalty loop (svdvals prior)", "plain step", "penalty", "plain", "-"),
        ("svi/auto_normal (Frechet, tracked)", "plain step", "svi_tracked", "plain", "<= 2"),
        ("map/auto_delta (Frechet, tracked)", "tracked loop", "map_tracked", "tracked_loop",
         "<= 1.2"),
        ("map/auto_delta (Frechet, tracked)", "plain step", "map_tracked", "plain", "-"),
        ("sgld (Frechet, tracked)", "MAP step", "sgld_tracked", "map_tracked", "<= 1.05"),
        ("sgld (Frechet, tracked)", "plain step", "sgld_tracked", "plain", "<= 1.3*"),
        ("sghmc (Frechet, tracked)", "MAP step", "sghmc_tracked", "map_tracked", "<= 1.05"),
        ("sghmc (Frechet, tracked)", "plain step", "sghmc_tracked", "plain", "<= 1.3*"),
        ("sghmc, no draw kept (thin > 1)", "MAP step", "sghmc_nodraw", "map_tracked",
         "<= 1.05"),
        ("MAP step + randn of the weights", "MAP step", "map_noise", "map_tracked", "floor"),
        ("sghmc, no draw kept (thin > 1)", "MAP + randn floor", "sghmc_nodraw", "map_noise",
         "-"),
        ("svi/auto_normal (power law, tracked)", "plain step", "svi_tracked_pl", "plain",
         "<= 2"),
        ("svi/auto_normal (i.i.d. Normal prior)", "plain step", "svi_gauss", "plain", "floor"),
        ("svi/auto_normal (spectral prior)", "SVI, Normal prior", "svi", "svi_gauss", "-"),
        ("svi/auto_normal (Frechet, tracked)", "SVI, Normal prior", "svi_tracked", "svi_gauss",
         "-"),
        ("map/auto_delta (spectral prior)", "Regularizer loop", "map", "regularizer", "<= 1.2"),
    ]
    rows = [(name, ref, ratio_of(times, num, den), target)
            for name, ref, num, den, target in spec if den in times and num in times]
    print(f"device {DEVICE}, threads {args.threads}, MAP/SVI Adam {OPTIM!r}; per-step "
          f"reference times (this run): "
          f"plain {t_plain * 1e3:.1f} ms, "
          f"penalty loop {t_pen * 1e3:.1f} ms")
    print(f"{'step':38s} {'over':18s} {'ratio':>7s} {'target':>7s}")
    for name, ref, ratio, target in rows:
        print(f"{name:38s} {ref:18s} {ratio:7.2f} {target:>7s}")
    print("* where the MAP step is <= 1.3x the plain step")


# ----------------------------------------------------------------------------- five models

N_SMALL = 1000


def _normal(shape):
    return dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape))


def _plain_step(net: nn.Module, x, y, likelihood: str):
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss = (nn.functional.cross_entropy if likelihood == "categorical"
            else lambda out, t: nn.functional.mse_loss(out.squeeze(-1), t))

    def step():
        opt.zero_grad()
        loss(net(x), y).backward()
        opt.step()
    return step


def _bayesian(net: nn.Module, likelihood: str):
    return bs.bayesian(net, {r".*": _normal}, likelihood=likelihood, num_data=N_SMALL,
                       noise="learned" if likelihood == "gaussian" else 1.0)


def _bs_step(net: nn.Module, x, y, likelihood: str, kind: str):
    bn = _bayesian(net, likelihood)
    svi = pyro.infer.SVI(bn, bs.make_guide(bn, kind), svi_optim(1e-3, OPTIM),
                         pyro.infer.Trace_ELBO())
    return lambda: svi.step(x, y)


def _pyro_reference_step(net: nn.Module, x, y, likelihood: str, tag: str):
    """Pyro's i.i.d.-Normal SVI: every >= 2-D parameter ~ Normal(0, 1), AutoNormal."""
    weights = {n: p.shape for n, p in net.named_parameters() if p.dim() >= 2}

    def model(x, y):
        pyro.module(tag, net)
        w = {n: pyro.sample(f"{tag}.{n}", _normal(s)) for n, s in weights.items()}
        out = torch.func.functional_call(net, w, (x,))
        with pyro.plate("data", N_SMALL, subsample=torch.arange(x.shape[0])):
            if likelihood == "categorical":
                pyro.sample("obs", dist.Categorical(logits=out), obs=y)
            else:
                noise = pyro.sample("noise", dist.LogNormal(0.0, 1.0))
                pyro.sample("obs", dist.Normal(out.squeeze(-1), noise), obs=y)

    guide = pyro.infer.autoguide.AutoNormal(model)
    svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    return lambda: svi.step(x, y)


def models_table(args) -> None:
    """Per model: MAP over the plain step, SVI over Pyro's i.i.d.-Normal SVI (same run)."""
    pyro.enable_validation(False)
    print(f"\nfive models (batch 128, N = {N_SMALL}, Normal(0, 1) prior on every row); "
          f"threads {args.threads}")
    print(f"{'model':32s} {'plain ms':>9s} {'map/plain':>10s} {'map - plain ms':>15s} "
          f"{'pyro svi ms':>12s} {'svi/pyro svi':>13s} {'sghmc/map':>10s}")
    for name, (make, x, y, likelihood) in _own_models().items():
        pyro.clear_param_store()  # each model alone: its names never meet another's
        torch.manual_seed(0)
        configs = {"plain": _plain_step(make(), x, y, likelihood),
                   "map": _bs_step(make(), x, y, likelihood, "delta"),
                   "svi": _bs_step(make(), x, y, likelihood, "normal"),
                   "pyro_svi": _pyro_reference_step(make(), x, y, likelihood, "ref"),
                   "sghmc": sampler_step(_bayesian(make(), likelihood), "sghmc", x, y)}
        times = interleaved(configs, args.steps, args.repeats)
        t_plain = statistics.median(times["plain"]) * 1e3
        t_ref = statistics.median(times["pyro_svi"]) * 1e3
        t_map = statistics.median(times["map"]) * 1e3
        r_map, r_svi = ratio_of(times, "map", "plain"), ratio_of(times, "svi", "pyro_svi")
        r_mc = ratio_of(times, "sghmc", "map")
        assert math.isfinite(r_map) and math.isfinite(r_svi) and math.isfinite(r_mc)
        print(f"{name:32s} {t_plain:9.2f} {r_map:10.2f} {t_map - t_plain:15.2f} "
              f"{t_ref:12.2f} {r_svi:13.2f} {r_mc:10.2f}")


if __name__ == "__main__":
    main()
