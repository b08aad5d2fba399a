"""Which SG-MCMC settings make ``compare``'s sampler rows sample the posterior?

The compare net (digits, MLP 64-128-64-10, ``CompareConfig()``'s MAP fit: 30 epochs of
Adam, lr 3e-3, batches of 64), one prior and one seed per process, SGHMC from the MAP fit
with ``compare.fit_sampler`` (4 chains, friction of the row). Each row: a
sampler batch size (``full`` = all 1438 training points: no mini-batch gradient noise),
``sampler_lr`` (step ``lr / N``), epochs per chain, burn-in epochs, thinning, and

* the share of training points with PSIS-LOO Pareto k <= 0.7 and ``p_loo`` (``mcmc_loo``
  of compare's ``InferenceData``),
* the largest split R-hat of ``lambda_max`` over the layers,
* held-out accuracy of the posterior predictive, the sampler's CPU seconds (one thread:
  robust to a shared machine, unlike wall time) and their ratio to the first row timed in
  the same process (``b64``: the batch-64 settings compare used before).

    python benchmarks/compare_sampler.py --prior gaussian --rows b64 \
        bfull-lr0.05-e1100-burn500-thin10-f0.02 bfull-lr0.025-e1100-burn500-thin10-f0.02

A row name is ``b<B|full>-lr<lr>-e<epochs>-burn<burn>-thin<thin>-f<friction>`` (missing
parts: the reference's values, friction 0.1); ``--quick`` divides epochs, burn-in and thinning by 10
(numbers meaningless).

Measured 2026-11-30 (seed 0; CPU seconds of the sampler, one thread, on a shared 2-core
machine; the ratio is to ``b64`` in the same process; R-hat: ArviZ's rank-normalised split
R-hat of ``lambda_max``, the largest over the three layers):

  prior     row                                   k<=.7   p_loo  R-hat    acc  draws  CPU s
  gaussian  b64 (old: lr 0.05, 40 ep., f 0.1)     0.006   659.0  1.713  0.989    120  24.7
  gaussian  b64-lr0.025                           0.048   311.0  1.766  0.983    120  24.8
  gaussian  bfull-lr0.05-e1100-burn500-thin10-f0.02  0.019  53.4  1.274  0.983  240  43.1 (1.74x)
  gaussian  bfull-lr0.025-e1100-burn500-thin10-f0.02 0.033  44.8  1.714  0.986  240  44.4 (1.80x)
  powerlaw  b64 (old)                             0.000  2213.2  1.731  0.983    120  26.3
  powerlaw  bfull-lr0.05-e1100-burn500-thin10-f0.02  0.896 1373.8 2.922  0.969  240  47.2 (1.79x)

The default compare took (``CompareConfig()``: 4 x 1000 full-batch steps, burn-in 500,
every 10th kept, lr 0.05, friction 0.02) was read as a window of one 3000-step run of the
gaussian prior at these settings: k<=.7 0.025, p_loo 45.7, R-hat 1.39, acc 0.992, 200
draws; one whole prior run (MAP, SVI, SGHMC and outputs) in one process took 49.3 s of CPU
against 39.5 s with the old settings (p_loo 50.7 vs 659.0, split R-hat 1.25 vs 1.75;
5 baselines 10.3 s), i.e. ``make run`` about +25-35 % (12 prior runs).

Full batches remove the mini-batch inflation (``p_loo`` 659 -> 53; halving ``lr`` halves the
batch-64 ``p_loo``, 659 -> 311, as ``r ~ lr`` predicts, and moves the full-batch one by 16 %,
53 -> 45, with the lr/2 chains less mixed). Neither reaches a mixed posterior within this
budget: R-hat 1.27 (gaussian), and under the powerlaw prior ``lambda_max`` of the first
layer grows without settling in every chain (72 -> 730 over 3000 full-batch steps at
lr 0.05, friction 0.1), so that posterior's sampler rows do not converge at any length
tried. Longer runs of the gaussian prior (3000 full-batch steps, windows of one run):
lr 0.1 makes excursions (``lambda_max`` 90 -> 161, ``p_loo`` 54 -> 540); friction 0.02
reaches ``lambda_max``'s level in about 500 steps where 0.1 needs 1500+.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import time

import arviz as az
import numpy as np
import torch

from bayes_spectral.apps.compare import (
    CompareConfig,
    _prior_model,
    _sampler_outputs,
    fit_sampler,
    load_dataset,
)
from bayes_spectral.bnn.fit import fit
from bayes_spectral.diagnostics.arviz_adapter import posterior_of
from bayes_spectral.diagnostics.loo import mcmc_loo

REFERENCE = dict(batch="64", lr=0.05, epochs=40, burn=10, thin=23, friction=0.1)
ROW = re.compile(r"b(?P<batch>\d+|full)(-lr(?P<lr>[\d.e-]+?))?(-e(?P<epochs>\d+))?"
                 r"(-burn(?P<burn>\d+))?(-thin(?P<thin>\d+))?(-f(?P<friction>[\d.]+))?$")


def parse_row(name: str) -> dict:
    m = ROW.match(name)
    if m is None:
        raise SystemExit(f"row {name!r}: expected b<B|full>[-lr<x>][-e<n>][-burn<n>][-thin<n>]"
                         "[-f<x>]")
    out = dict(REFERENCE)
    for k, v in m.groupdict().items():
        if v is not None:
            out[k] = v if k == "batch" else (float(v) if k in ("lr", "friction") else int(v))
    return out


def run_row(split, base: CompareConfig, res_map, prior: str, seed: int, row: dict) -> dict:
    cfg = dataclasses.replace(base, sampler_lr=row["lr"], sampler_epochs=row["epochs"],
                              burn_in=row["burn"], thin=row["thin"],
                              sampler_friction=row["friction"])
    cfg.sampler_batch_size = None if row["batch"] == "full" else int(row["batch"])
    t0, c0 = time.perf_counter(), time.process_time()
    res = fit_sampler(split, cfg, prior, seed, "sghmc", res_map)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    idata, _ = _sampler_outputs(res, split)
    loo = mcmc_loo(idata)
    post = posterior_of(idata)
    rhat = max(float(az.rhat(post["lambda_max"].sel(layer=layer).values))
               for layer in post.layer.values)
    acc = res.evaluate(split.x_test, split.y_test).accuracy
    return {"k_share": float(loo.frac_good), "p_loo": float(loo.p_loo),
            "rhat_lmax": rhat, "acc": float(acc), "draws": int(loo.num_samples),
            "seconds": seconds, "cpu_seconds": cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prior", default="powerlaw")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", nargs="+", default=["b64", "bfull-lr0.05-e400-burn100-thin6"])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="append JSON rows here")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = CompareConfig(priors=(args.prior,), seeds=(args.seed,))
    split = load_dataset(base.dataset)
    t0 = time.process_time()
    res_map = fit(_prior_model(split, base, args.prior, args.seed), split, "map",
                  epochs=base.epochs, lr=base.lr, batch_size=base.batch_size,
                  seed=args.seed, progress=False)
    t_map = time.process_time() - t0
    print(f"{args.prior} seed {args.seed}: MAP {t_map:.1f} s CPU, accuracy "
          f"{res_map.evaluate(split.x_test, split.y_test).accuracy:.4f}")
    ref = None
    for name in args.rows:
        row = parse_row(name)
        if args.quick:
            row["epochs"], row["burn"] = max(2, row["epochs"] // 10), row["burn"] // 10
            row["thin"] = max(1, row["thin"] // 10)
        out = run_row(split, base, res_map, args.prior, args.seed, row)
        ref = ref or out["cpu_seconds"]
        print(f"{name:34s} k<=.7 {out['k_share']:.3f}  p_loo {out['p_loo']:7.1f}  R-hat "
              f"{out['rhat_lmax']:.3f}  acc {out['acc']:.4f}  draws {out['draws']:5d}  "
              f"{out['cpu_seconds']:6.1f} s CPU ({out['cpu_seconds'] / ref:.2f} x first row; "
              f"wall {out['seconds']:.0f} s)", flush=True)
        if args.out:
            with open(args.out, "a") as fh:
                fh.write(json.dumps({"prior": args.prior, "seed": args.seed, "row": name,
                                     "map_seconds": t_map, **row, **out}) + "\n")
    np.seterr(all="ignore")


if __name__ == "__main__":
    main()
