"""diagnostics (draws, inference_data, baselines, loo, netcdf, arviz_adapter): spectral
draws vs direct SVDs, InferenceData dims, az.summary vs NumPy,
az.compare of a 100x wrong prior, importance-weighted ELPD vs NUTS PSIS-LOO, baselines,
netCDF round trip and bad input."""

from __future__ import annotations

import math
import os

import arviz as az
import numpy as np
import pytest
import torch
import xarray as xr
from scipy import stats
from torch import nn

import bayes_spectral as bs
from bayes_spectral.diagnostics.arviz_adapter import (
    ARVIZ_GENERATION,
    group_names,
    inference_data,
    psislw,
    with_groups,
)
from bayes_spectral.diagnostics.arviz_adapter import group as read_group
from bayes_spectral.distributions import GaussianSpectrum, PowerLawSpectrum

# --- a tiny logistic model, small enough for NUTS --------------------------------------


def _tiny_data(seed=0, n=100):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = (x @ torch.tensor([1.5, -1.0, 0.5, 0.0]) + torch.randn(n, generator=g) > 0).long()
    return x, y


def _tiny_model(scale):
    torch.manual_seed(0)
    return bs.bayesian(nn.Sequential(nn.Linear(4, 2, bias=False)),
                       {"0": GaussianSpectrum(scale, (2, 4))})


def _nuts(scale, data, num_samples=100, warmup_steps=60, max_tree_depth=4):
    torch.set_num_threads(1)
    return bs.fit(_tiny_model(scale), data, "nuts", num_samples=num_samples,
                  warmup_steps=warmup_steps, num_chains=2, max_tree_depth=max_tree_depth,
                  progress=False, seed=0)


@pytest.fixture(scope="module")
def tiny():
    return _tiny_data()


@pytest.fixture(scope="module")
def nuts_fit(tiny):
    """2 chains x 100 draws: for LOO and compare (slow tests)."""
    res = _nuts(1.0, tiny)
    return res, bs.to_inference_data(res, tiny)


@pytest.fixture(scope="module")
def nuts_small(tiny):
    """2 chains x 30 draws: enough for dims, values and the netCDF round trip."""
    res = _nuts(1.0, tiny, num_samples=30, warmup_steps=20, max_tree_depth=3)
    return res, bs.to_inference_data(res, tiny)


@pytest.fixture(scope="module")
def svi_fit(tiny):
    bn = _tiny_model(1.0)
    guide = bs.auto_lowrank(bn, rank=8)
    return bs.fit(bn, tiny, "svi", guide=guide, epochs=500, batch_size=100, lr=0.02,
                  num_particles=4, progress=False, seed=0)


# --- spectral_draws: the array core --------------------------------------------------


def test_spectral_draws_equal_direct_metrics_and_svdvals():
    torch.manual_seed(0)
    weights = {"fc": torch.randn(2, 3, 12, 7, dtype=torch.float64),
               "conv": torch.randn(2, 3, 4, 3, 2, 2, dtype=torch.float64)}
    ds = bs.spectral_draws(weights)
    assert dict(ds.sizes) == {"chain": 2, "draw": 3, "layer": 2, "sv_index": 12}
    assert ds["layer"].values.tolist() == ["fc", "conv"]
    for var in bs.SPECTRAL_VARS:
        assert ds[var].dims == ("chain", "draw", "layer")
    assert ds["singular_values"].dims == ("chain", "draw", "layer", "sv_index")
    for c in range(2):
        for d in range(3):
            for name, w in weights.items():
                direct = bs.spectral_metrics(w[c, d])
                for var in bs.SPECTRAL_VARS:
                    got = float(ds[var].sel(chain=c, draw=d, layer=name))
                    assert got == pytest.approx(float(direct[var]), rel=1e-6, abs=1e-9), var
            sv_fc = torch.linalg.svdvals(weights["fc"][c, d]).numpy()
            row = ds["singular_values"].sel(chain=c, draw=d, layer="fc").values
            np.testing.assert_allclose(row[:7], sv_fc, rtol=1e-6)
            assert np.isnan(row[7:]).all()  # 7 values, padded to the conv layer's 4 x 3 = 12
            pooled = torch.linalg.svdvals(weights["conv"][c, d].permute(2, 3, 0, 1))
            expect = np.sort(pooled.reshape(-1).numpy())[::-1]
            got = ds["singular_values"].sel(chain=c, draw=d, layer="conv").values
            np.testing.assert_allclose(got, expect, rtol=1e-6)
            assert np.all(np.diff(got) <= 0)


@pytest.mark.parametrize("weights, err, match", [
    ({"fc": torch.full((1, 2, 3, 3), float("nan"))}, ValueError, r"layer 'fc'.*18 NaN"),
    ({"fc": torch.randn(2, 3, 3)}, ValueError, r"layer 'fc'.*\(chain, draw, out, in"),
    ({"a": torch.randn(1, 2, 3, 3), "b": torch.randn(1, 3, 3, 3)}, ValueError, "layer 'b'"),
    ({"fc": torch.ones(1, 1, 3, 3, dtype=torch.long)}, TypeError, "floating"),
    ({}, TypeError, "non-empty mapping"),
])
def test_spectral_draws_bad_input(weights, err, match):
    with pytest.raises(err, match=match):
        bs.spectral_draws(weights)


# --- az.summary against NumPy ------------------------------------------------------------


def _split_rhat(x: np.ndarray) -> float:
    """Rank-normalised split R-hat (Vehtari et al. 2021), max of bulk and folded."""

    def split(a):
        half = a.shape[1] // 2
        return np.concatenate([a[:, :half], a[:, a.shape[1] - half:]], axis=0)

    def z(a):
        r = stats.rankdata(a, method="average").reshape(a.shape)
        return stats.norm.ppf((r - 0.375) / (a.size + 0.25))

    def rhat(a):
        n = a.shape[1]
        w = a.var(axis=1, ddof=1).mean()
        b = n * a.mean(axis=1).var(ddof=1)
        return math.sqrt(((n - 1) / n * w + b / n) / w)

    bulk = rhat(z(split(x)))
    tail = rhat(z(split(np.abs(x - np.median(x)))))
    return max(bulk, tail)


def _hdi(x: np.ndarray, prob: float) -> tuple[float, float]:
    s = np.sort(x)
    k = int(np.floor(prob * s.size))
    i = int(np.argmin(s[k:] - s[: s.size - k]))
    return s[i], s[i + k]


def test_summary_equals_numpy_on_the_same_draws():
    # autocorrelated chains (a random walk around a mean) so R-hat and ESS are not trivial
    torch.manual_seed(1)
    steps = 0.05 * torch.randn(4, 200, 10, 6, dtype=torch.float64)
    weights = {"fc": torch.randn(1, 1, 10, 6, dtype=torch.float64) + steps.cumsum(1)}
    idata = inference_data(posterior=bs.spectral_draws(weights))
    summ = az.summary(idata, var_names=["stable_rank", "lambda_max"], round_to="none")
    # ArviZ 0.2x: 94% HDI; >= 1: 89% equal-tailed interval (arviz_stats' default)
    lo_col, hi_col = ("hdi_3%", "hdi_97%") if ARVIZ_GENERATION == 0 else ("eti89_lb", "eti89_ub")
    for var in ("stable_rank", "lambda_max"):
        x = idata.posterior[var].sel(layer="fc").values  # (chain, draw)
        row = summ.loc[f"{var}[fc]"]
        assert row["mean"] == pytest.approx(x.mean(), rel=1e-12)
        assert row["sd"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        lo, hi = (_hdi(x.ravel(), 0.94) if ARVIZ_GENERATION == 0
                  else np.quantile(x.ravel(), [0.055, 0.945]))
        assert row[lo_col] == pytest.approx(lo, rel=1e-12)
        assert row[hi_col] == pytest.approx(hi, rel=1e-12)
        assert row["r_hat"] == pytest.approx(_split_rhat(x), rel=1e-9)
        assert row["r_hat"] > 1.01  # the random walk is visibly non-stationary
        assert row["ess_bulk"] == pytest.approx(float(az.ess(x, method="bulk")), rel=1e-9)
    median = {"stat_focus": "median"} if ARVIZ_GENERATION == 0 else {"kind": "stats_median"}
    q = az.summary(idata, var_names=["alpha"], round_to="none", **median)
    a = idata.posterior["alpha"].sel(layer="fc").values
    assert q.loc["alpha[fc]", "median"] == pytest.approx(np.median(a), rel=1e-12)


# --- InferenceData of NUTS / SVI / MAP fits ----------------------------------------------


def test_nuts_inference_data_groups_dims_and_values(nuts_small, tiny):
    res, idata = nuts_small
    x, y = tiny
    assert set(group_names(idata)) == {"posterior", "log_likelihood", "observed_data"}
    post = idata.posterior
    assert dict(post.sizes) == {"chain": 2, "draw": 30, "layer": 1, "sv_index": 2}
    assert post["layer"].values.tolist() == ["0"]
    w = res.samples["net.0.weight"].to(torch.float64)  # (2, 30, 2, 4)
    np.testing.assert_allclose(post["singular_values"].sel(layer="0").values,
                               torch.linalg.svdvals(w).numpy(), rtol=1e-6)
    ll = idata.log_likelihood["y"]
    assert ll.dims == ("chain", "draw", "obs_id") and ll.shape == (2, 30, 100)
    direct = torch.log_softmax(x.double() @ w.transpose(-1, -2), -1)  # (2, 30, n, 2)
    direct = direct.gather(-1, y.expand(2, 30, -1)[..., None]).squeeze(-1)
    np.testing.assert_allclose(ll.values, direct.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(idata.observed_data["y"].values, y.numpy())
    assert idata.observed_data["y"].dims == ("obs_id",)
    assert float(az.rhat(idata, var_names=["stable_rank"])["stable_rank"].max()) < 1.1


@pytest.fixture(scope="module")
def svi_quick(tiny):
    bn = _tiny_model(1.0)
    return bs.fit(bn, tiny, "svi", guide=bs.auto_lowrank(bn, rank=2), epochs=20,
                  batch_size=100, lr=0.02, progress=False)


def test_svi_map_draw_shapes_and_latent(svi_quick, tiny):
    svi_fit = svi_quick
    idata = bs.to_inference_data(svi_fit, tiny, num_samples=30, seed=2, include_latent=True)
    assert dict(idata.posterior.sizes)["chain"] == 1 and idata.posterior.sizes["draw"] == 30
    assert idata.log_likelihood["y"].shape == (1, 30, 100)
    lat = idata.posterior["net.0.weight"]
    assert lat.dims == ("chain", "draw", "net.0.weight_dim_0", "net.0.weight_dim_1")
    np.testing.assert_allclose(idata.posterior["singular_values"].sel(layer="0").values,
                               torch.linalg.svdvals(torch.as_tensor(lat.values)).numpy(),
                               rtol=1e-6)
    again = bs.weight_draws(svi_fit, num_samples=30, seed=2)["0"]
    np.testing.assert_allclose(again.double().numpy(), lat.values, rtol=1e-6)  # same seed
    other = bs.weight_draws(svi_fit, num_samples=30, seed=3)["0"]
    assert not torch.equal(other, again)
    res_map = bs.fit(_tiny_model(1.0), tiny, "map", epochs=5, batch_size=100, progress=False)
    idm = bs.to_inference_data(res_map, tiny)
    assert (idm.posterior.sizes["chain"], idm.posterior.sizes["draw"]) == (1, 1)
    point = bs.map_values(res_map.guide)["net.0.weight"].double()
    np.testing.assert_allclose(idm.posterior["lambda_max"].values.ravel(),
                               [float(torch.linalg.matrix_norm(point, 2) ** 2)], rtol=1e-6)


def test_weight_draws_of_a_spectral_layer_have_the_sampled_singular_values(digits_small):
    x, y = digits_small
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 10))
    bn = bs.bayesian(net, {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)}, spectral=["0"],
                     num_data=len(x))
    res = bs.fit(bn, (x, y), "svi", guide=bs.spectral_guide(bn), epochs=2, batch_size=100,
                 progress=False)
    w = bs.weight_draws(res, num_samples=5, seed=0)
    assert w["0"].shape == (1, 5, 12, 64) and w["2"].shape == (1, 5, 10, 12)
    s = bs.to_inference_data(res, (x, y), num_samples=5, seed=0, include_latent=True)
    draws = s.posterior["net.0.spectral_s"].values  # (1, 5, 12)
    np.testing.assert_allclose(s.posterior["singular_values"].sel(layer="0").values[..., :12],
                               -np.sort(-np.abs(draws), axis=-1), rtol=1e-4)


@pytest.fixture(scope="module")
def digits_small():
    d = bs.data.load_digits()
    return d.x_train[:200], d.y_train[:200]


# --- model comparison -------------------------------------------------------------------


@pytest.mark.slow
def test_compare_prefers_the_right_prior_scale(nuts_fit, tiny):
    _, right = nuts_fit
    wrong = bs.to_inference_data(_nuts(0.01, tiny), tiny)  # prior scale 100x too small
    cmp = az.compare({"scale_1": right, "scale_0.01": wrong})
    assert cmp.index[0] == "scale_1"
    gap = abs(cmp.loc["scale_0.01", "elpd_diff"])  # ArviZ >= 1 reports it negative
    # measured: elpd_loo -39.4 vs -69.1, gap 29.7 with dse 5.1; demand 3 standard errors
    assert gap > 3 * cmp.loc["scale_0.01", "dse"], cmp
    assert gap > 10


@pytest.mark.slow
def test_importance_elpd_agrees_with_nuts_loo(nuts_fit, svi_fit, tiny):
    _, idata = nuts_fit
    loo = az.loo(idata)
    loo_elpd = loo.elpd_loo if ARVIZ_GENERATION == 0 else loo.elpd
    iw = bs.importance_elpd(svi_fit, tiny, num_samples=200, seed=0)
    assert iw.pareto_k.shape == (100,) and iw.elpd_i.shape == (100,)
    assert iw.elpd == pytest.approx(iw.elpd_i.sum())
    assert iw.khat_max == pytest.approx(iw.pareto_k.max())
    combined = math.sqrt(iw.se**2 + loo.se**2)
    assert abs(iw.elpd - loo_elpd) < combined, (iw.elpd, iw.se, loo_elpd, loo.se)
    # measured: IW -39.43 (se 5.14) vs LOO -39.37 (se 5.16), khat_max 0.53, khat_q 0.005
    assert abs(iw.elpd - loo_elpd) < 1.0  # nats, far tighter than the combined se 7.3
    assert iw.khat_max < 0.7 and iw.khat_q < 0.7
    assert 0 < iw.p_loo < 8  # at most the 8 weights


def test_importance_log_weights_equal_a_direct_computation(svi_quick, tiny):
    """log w_s = log N(W_s; 0, 1) + sum_i log softmax(x_i W_s^T)[y_i] - log q(W_s), with q the
    guide's own LowRankMultivariateNormal, on the same draws (same seed)."""
    x, y = tiny
    S = 30  # a 6-draw Pareto tail: the smallest ArviZ >= 1 fits (5 gives k = nan there)
    iw = bs.importance_elpd(svi_quick, tiny, num_samples=S, seed=5)
    w = bs.weight_draws(svi_quick, num_samples=S, seed=5)["0"][0].double()  # (S, 2, 4)
    prior = torch.distributions.Normal(0.0, 1.0).log_prob(w).sum((-2, -1))
    loglik = torch.log_softmax(x.double() @ w.transpose(-1, -2), -1)
    loglik = loglik.gather(-1, y.expand(S, -1)[..., None]).squeeze(-1)
    q = svi_quick.guide.get_posterior()
    log_q = q.log_prob(w.reshape(S, -1).to(q.loc.dtype)).detach().double()
    np.testing.assert_allclose(iw.log_weights, (prior + loglik.sum(-1) - log_q).numpy(),
                               rtol=1e-5)
    # PSIS-LOO formula on these weights (the model computes log p(y_i | W) in float32)
    lw, k = psislw(iw.log_weights[None, :] - loglik.T.numpy())
    elpd_i = np.log(np.exp(lw + loglik.T.numpy()).sum(-1))
    np.testing.assert_allclose(iw.elpd_i, elpd_i, rtol=1e-5)
    assert np.isfinite(k).all()
    np.testing.assert_allclose(iw.pareto_k, k, rtol=1e-3, atol=1e-3)
    assert iw.se == pytest.approx(math.sqrt(100 * elpd_i.var()), rel=1e-5)


def test_importance_elpd_rejects_non_svi_fits(tiny):
    res_map = bs.fit(_tiny_model(1.0), tiny, "map", epochs=1, batch_size=100, progress=False)
    with pytest.raises(ValueError, match="needs an SVI fit"):
        bs.importance_elpd(res_map, tiny)


def test_importance_elpd_rejects_too_few_draws_for_psis(svi_quick, tiny):
    """Below MIN_PSIS_DRAWS (21 under ArviZ 0.2x, 26 under 1.x) PSIS returns k = inf, so
    importance_elpd refuses up front; at MIN_PSIS_DRAWS the k is finite."""
    from bayes_spectral.diagnostics.arviz_adapter import MIN_PSIS_DRAWS

    rng = np.random.default_rng(0)
    assert np.isinf(psislw(rng.normal(size=(1, MIN_PSIS_DRAWS - 1)))[1]).all()
    assert np.isfinite(psislw(rng.normal(size=(1, MIN_PSIS_DRAWS)))[1]).all()
    with pytest.raises(ValueError, match="PSIS"):
        bs.importance_elpd(svi_quick, tiny, num_samples=MIN_PSIS_DRAWS - 1)


# --- baselines ---------------------------------------------------------------------------


def _mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))


def test_baseline_dataset_dims_values_and_alignment(digits_small):
    models = {("none", 0): _mlp(0), ("none", 1): _mlp(1),
              ("weight_decay", 1): _mlp(2).state_dict(),
              ("spectral_norm", 0): {"0": _mlp(3)[0].weight, "2": _mlp(3)[2].weight}}
    base = bs.baseline_dataset(models)
    assert dict(base.sizes) == {"method": 3, "seed": 2, "layer": 2, "sv_index": 16}
    assert base["method"].values.tolist() == ["none", "weight_decay", "spectral_norm"]
    assert base["seed"].values.tolist() == [0, 1]
    assert base["layer"].values.tolist() == ["0", "2"]
    assert base["alpha"].dims == ("method", "seed", "layer")
    assert base["singular_values"].dims == ("method", "seed", "layer", "sv_index")
    direct = bs.spectral_metrics(_mlp(2)[2].weight.detach().double())
    for var in bs.SPECTRAL_VARS:
        got = float(base[var].sel({"method": "weight_decay", "seed": 1, "layer": "2"}))
        assert got == pytest.approx(float(direct[var]), rel=1e-6)
    assert np.isnan(base["alpha"].sel({"method": "weight_decay", "seed": 0})).all()
    # one selection lines a posterior up with the baselines
    bn = bs.bayesian(_mlp(0), {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)})
    res = bs.fit(bn, digits_small, "map", epochs=1, batch_size=100, progress=False)
    post = bs.to_inference_data(res, digits_small).posterior
    diff = post["alpha"].sel(layer="2") - base["alpha"].sel({"layer": "2", "method": "none"})
    assert diff.dims == ("chain", "draw", "seed") and diff.shape == (1, 1, 2)
    both = xr.concat([post["stable_rank"].isel(chain=0, draw=0),
                      base["stable_rank"].sel({"method": "none", "seed": 0})], dim="source")
    assert both["layer"].values.tolist() == ["0", "2"]


@pytest.mark.parametrize("models, err, match", [
    ({"none": nn.Linear(3, 4)}, TypeError, r"\(method: str, seed: int\)"),
    ({("none", "0"): nn.Linear(3, 4)}, TypeError, r"\(method: str, seed: int\)"),
    ({("a", 0): nn.Linear(3, 4), ("a", 1): nn.Sequential(nn.Linear(3, 4))}, ValueError,
     r"baseline \('a', 1\) has layers \['0'\]"),
    ({("a", 0): nn.Linear(3, 4), ("a", 1): nn.Linear(3, 5)}, ValueError, "has shape"),
    ({("a", 0): {"fc": torch.full((3, 3), float("nan"))}}, ValueError, "layer 'fc'.*NaN"),
    ({("a", 0): [1, 2]}, TypeError, "expected an nn.Module"),
    ({}, ValueError, "non-empty"),
])
def test_baseline_dataset_bad_input(models, err, match):
    with pytest.raises(err, match=match):
        bs.baseline_dataset(models)


def test_baseline_dataset_rejects_bayesian_networks():
    bn = bs.bayesian(nn.Linear(3, 4), {"": GaussianSpectrum(1.0, (4, 3))})
    with pytest.raises(TypeError, match="BayesianNetwork"):
        bs.baseline_dataset({("bnn", 0): bn})


# --- bad fits and data -------------------------------------------------------------------


def test_bad_results_and_data(tiny):
    bn = bs.bayesian(nn.Sequential(nn.Linear(4, 2)), {})
    with pytest.raises(ValueError, match="no prior layers"):
        bs.to_inference_data(bs.FitResult(model=bn, method="map"), tiny)
    with pytest.raises(ValueError, match="no prior layers"):
        bs.weight_draws(bs.FitResult(model=bn, method="map"))
    with pytest.raises(TypeError, match="FitResult"):
        bs.to_inference_data(bn, tiny)
    res = bs.fit(_tiny_model(1.0), tiny, "map", epochs=1, batch_size=100, progress=False)
    x, y = tiny
    with pytest.raises(ValueError, match="same number of rows"):
        bs.to_inference_data(res, (x, y[:-1]))
    with pytest.raises(ValueError, match="does not fit the network"):
        bs.to_inference_data(res, (x[:, :3], y))
    with pytest.raises(TypeError, match="pair"):
        bs.to_inference_data(res, x)


# --- netCDF -----------------------------------------------------------------------------


def test_netcdf_round_trip_keeps_every_group_dim_and_coord(nuts_small, tmp_path):
    _, idata = nuts_small
    base = bs.baseline_dataset({("none", 0): _mlp(0), ("weight_decay", 3): _mlp(1)})
    idata = with_groups(idata, baselines=base)
    path = bs.save_netcdf(idata, tmp_path / "post.nc")
    assert os.listdir(tmp_path) == ["post.nc"]  # no temporary file left behind
    loaded = bs.load_netcdf(path)
    assert set(group_names(loaded)) == set(group_names(idata))
    for group in group_names(idata):
        a, b = read_group(idata, group), read_group(loaded, group)
        assert dict(a.sizes) == dict(b.sizes), group
        assert set(a.coords) == set(b.coords), group
        for name in a.coords:
            assert a[name].values.tolist() == b[name].values.tolist(), (group, name)
        assert set(a.data_vars) == set(b.data_vars), group
        for name in a.data_vars:
            assert a[name].dims == b[name].dims
            np.testing.assert_array_equal(a[name].values, b[name].values)
    assert loaded.posterior["layer"].values.tolist() == ["0"]
    assert isinstance(loaded.posterior["layer"].values[0], str)
    assert loaded.baselines["method"].values.tolist() == ["none", "weight_decay"]
    bs.save_netcdf(loaded, path)  # overwriting a file that was read works
    with pytest.raises(TypeError, match="InferenceData"):
        bs.save_netcdf(base, tmp_path / "x.nc")


def test_arviz_adapter_reads_groups_and_joins_chains():
    from bayes_spectral.diagnostics import arviz_adapter as ad

    g = torch.Generator().manual_seed(0)
    ds = bs.spectral_draws({"a": torch.randn(2, 3, 4, 5, generator=g)})
    idata = ad.inference_data(posterior=ds)
    assert ad.is_inference_data(idata) and not ad.is_inference_data(ds)
    assert ad.has_groups(idata) and not ad.has_groups(ds)
    assert ad.posterior_of(ds) is ds
    xr.testing.assert_identical(ad.posterior_of(idata), ds)
    assert ad.concat_chains([idata]) is idata
    both = ad.posterior_of(ad.concat_chains([idata, idata]))
    assert both["chain"].values.tolist() == [0, 1, 2, 3]
    np.testing.assert_array_equal(both["alpha"].values[2:], ds["alpha"].values)


def test_map_result_in_posterior_draw_apis_warns_it_holds_one_draw(tiny):
    """Issue 17: a MAP fit given num_samples=200 says that it holds one draw."""
    res_map = bs.fit(_tiny_model(1.0), tiny, "map", epochs=3, batch_size=100, progress=False)
    with pytest.warns(UserWarning, match="MAP result holds one draw"):
        idata = bs.to_inference_data(res_map, tiny, num_samples=200)
    assert (idata.posterior.sizes["chain"], idata.posterior.sizes["draw"]) == (1, 1)
    with pytest.warns(UserWarning, match="one draw"):
        draws = bs.weight_draws(res_map, num_samples=200)
    assert draws["0"].shape[:2] == (1, 1)
    assert res_map.num_draws == 1


def test_nuts_to_module_is_the_draw_mean_and_sample_modules_are_draws(nuts_small, tiny):
    res = nuts_small[0]
    draws = res.samples["net.0.weight"].reshape(-1, 2, 4)
    mean = res.to_module()
    assert type(mean) is nn.Sequential and type(mean[0]) is nn.Linear
    assert torch.equal(mean[0].weight, draws.mean(0))
    mods = res.sample_modules(3)
    picks = torch.linspace(0, draws.shape[0] - 1, 3).round().long()
    for m, i in zip(mods, picks.tolist(), strict=True):
        assert torch.equal(m[0].weight, draws[i])
    x = tiny[0]
    with torch.no_grad():  # the average of the draws' predictions is predict's
        probs = torch.stack([torch.softmax(x @ w.T, -1) for w in draws])
    torch.testing.assert_close(res.predict(x).mean(0), probs.mean(0), rtol=1e-5, atol=1e-6)
