"""Issue 22 item 2: SGHMC posterior per prior in the heavy-tailed model (small config)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from bayes_spectral.models import heavy_tailed as ht
from bayes_spectral.models import heavy_tailed_posterior as hp

from bayes_spectral import penalties as P


def test_priors_match_the_map_penalties_by_hand():
    # -log p(W) / N of each posterior prior = the MAP run's penalty, up to a constant:
    # compare differences between two weights.
    cfg, n = hp.PosteriorConfig(), 500
    g = torch.Generator().manual_seed(0)
    w0, w1, w2 = (torch.randn(30, 20, generator=g, dtype=torch.float64) * s
                  for s in (0.2, 0.25, 0.3))

    def diff(f):
        return float(f(w1) - f(w2))

    gauss = hp._prior("gaussian", w0, cfg, n)
    want = -(cfg.weight_decay / 2) * float(w1.square().sum() - w2.square().sum())
    assert diff(gauss.log_prob) / n == pytest.approx(want, rel=1e-9)
    ht_cfg = ht.Config()
    for prior, method in (("powerlaw", "powerlaw_prior_map"), ("frechet", "frechet_prior_map")):
        dist = hp._prior(prior, w0, cfg, n)
        pen = ht.make_penalty(method, ht_cfg, n)
        pen(w0, name="w")  # builds the per-layer prior from w0, as in training
        assert isinstance(pen, P.Penalty)
        want = float(pen(w1, name="w") - pen(w2, name="w"))
        assert -diff(dist.log_prob) / n == pytest.approx(want, rel=1e-6)


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    return tmp_path_factory.mktemp("posterior")


@pytest.fixture(scope="module")
def small(out):
    cfg = hp.PosteriorConfig.small()
    return cfg, hp.run(cfg, out_dir=out)


@pytest.mark.slow
def test_posterior_draws_and_lpd(small):
    cfg, df = small
    runs = hp.runs(df)
    assert len(runs) == 3 * 2 and set(runs.prior) == set(hp.PRIORS)
    # draws: chains * floor((epochs - burn_in) * steps_per_epoch / thin) = 2 * (6 * 8 / 4)
    assert (runs.num_draws_total == cfg.num_chains * ((12 - 6) * (200 // 25) // 4)).all()
    # every posterior predicts far better than uniform (log 0.1 = -2.30; measured -0.72 to
    # -0.85), with a standard error between 0.005 and 0.1
    assert (runs.lpd > math.log(0.1) + 1.0).all(), runs
    assert runs.lpd_se.between(0.005, 0.1).all(), runs
    assert (runs.test_accuracy > 0.7).all(), runs


@pytest.mark.slow
def test_posterior_spectra_vs_prior_draws(small):
    _, df = small
    post = df[df.kind == "posterior"].set_index(["prior", "seed", "layer"])
    prior = df[df.kind == "prior"].set_index(["prior", "seed", "layer"])
    assert set(post.num_draws) == {6} and set(prior.num_draws) == {4}
    # the Gaussian prior (weight decay 5e-4 at N=200: scale 3.2) puts lambda_max near
    # 10^2.6-10^3.1; its posterior sits near 10^1.5-10^1.9: the likelihood, not the prior,
    # sets the top eigenvalue (measured gap 1.14-1.25 decades; asserted > 0.8 everywhere)
    gap = (prior.loc["gaussian"].log10_lambda_max_mean
           - post.loc["gaussian"].log10_lambda_max_mean)
    assert (gap > 0.8).all(), gap
    # the power-law posterior's hidden-layer alpha sits where the prior puts it (means over
    # seeds, measured 2.25 vs 2.31 (fc1), 1.89 vs 2.00 (fc2); asserted within 0.4) and is
    # heavier-tailed than the Gaussian posterior's (4.32, 2.88; asserted by > 0.5)
    mean_post = post.alpha_mean.groupby(["prior", "layer"]).mean()
    mean_prior = prior.alpha_mean.groupby(["prior", "layer"]).mean()
    for layer in ("fc1", "fc2"):
        pl = mean_post[("powerlaw", layer)]
        assert abs(pl - mean_prior[("powerlaw", layer)]) < 0.4, (layer, mean_post, mean_prior)
        assert pl < mean_post[("gaussian", layer)] - 0.5, (layer, mean_post)


@pytest.mark.slow
def test_paired_vs_gaussian_recomputed(small):
    _, df = small
    paired = hp.paired_vs_gaussian(df)
    assert len(paired) == 2 * 2 and set(paired.num_seeds) == {2}
    runs = hp.runs(df)
    wide = runs.pivot(index="seed", columns="prior", values="lpd")
    row = paired[(paired.comparison == "powerlaw posterior") & (paired.metric == "lpd")].iloc[0]
    d = wide["powerlaw"] - wide["gaussian"]
    assert row.mean_diff == pytest.approx(d.mean()) and row.sd_diff == pytest.approx(d.std())
    assert np.isfinite(row.ci_low) and row.ci_low <= row.mean_diff <= row.ci_high


def test_bad_posterior_config():
    with pytest.raises(ValueError, match="priors must be"):
        hp.PosteriorConfig(priors=("horseshoe",))
    with pytest.raises(ValueError, match="thin"):
        hp.PosteriorConfig(thin=0)


@pytest.mark.slow
def test_reproduce_summary_pairs_the_seeds_against_the_gaussian(small, out):
    import json

    from bayes_spectral.models import REFERENCE_MODELS
    from bayes_spectral.models._model_claims import summary_from_csv

    from bayes_spectral.apps.claims import load_summaries

    assert hp.Config is hp.PosteriorConfig and "heavy_tailed_posterior" in REFERENCE_MODELS
    _, df = small
    assert {p.name for p in out.iterdir()} == {
        "heavy_tailed_posterior.csv", "heavy_tailed_posterior.png",
        "heavy_tailed_posterior_summary.json"}
    (summary,) = load_summaries(out)
    assert summary["paper"] == "Xiao et al. 2023" and "SGHMC posterior, fc3" in summary["setting"]
    rows = {(r["comparison"], r["metric"]): r for r in summary["rows"]}
    assert len(rows) == 3 * 2  # powerlaw, frechet x (lpd, accuracy, mean alpha)
    runs = hp.runs(df).pivot(index="seed", columns="prior", values="lpd")
    d = runs["powerlaw"] - runs["gaussian"]  # by hand: paired over the two seeds
    r = rows[("powerlaw posterior", "lpd")]
    assert r["mean_diff"] == pytest.approx(float(d.mean()), rel=1e-12)
    assert r["num_seeds"] == 2 and r["sign"] == 1
    post = df[df.kind == "posterior"]
    alpha = post.groupby(["prior", "seed"])["alpha_mean"].mean().unstack("prior")
    r = rows[("frechet posterior", "mean_alpha")]
    assert r["sign"] == -1
    assert r["mean_diff"] == pytest.approx(float((alpha.frechet - alpha.gaussian).mean()))
    # the saved CSV rebuilds the same summary
    rebuilt = summary_from_csv("heavy_tailed_posterior", out / "heavy_tailed_posterior.csv")
    saved = json.loads((out / "heavy_tailed_posterior_summary.json").read_text())
    assert rebuilt["measurement"] == saved["measurement"]
