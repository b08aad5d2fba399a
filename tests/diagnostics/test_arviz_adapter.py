"""The ArviZ adapter under the installed generation (0.2x ``InferenceData`` or >= 1
``xarray.DataTree``): container type, group reads, chain concat, netCDF round trip, PSIS.
CI runs this file under ArviZ 0.23 and again under 1.x (``.ci/run``)."""

from __future__ import annotations

import arviz as az
import numpy as np
import pytest
import xarray as xr

from bayes_spectral.diagnostics import arviz_adapter as ad


def _idata(seed: int, chains: int = 2):
    rng = np.random.default_rng(seed)
    lam = rng.normal(size=(chains, 5, 2))
    post = xr.Dataset({"lambda_max": (("chain", "draw", "layer"), lam)},
                      coords={"chain": np.arange(chains), "draw": np.arange(5),
                              "layer": ["0", "2"]})
    ll = xr.Dataset({"y": (("chain", "draw", "obs_id"), rng.normal(size=(chains, 5, 3)))})
    obs = xr.Dataset({"y": ("obs_id", np.array([1, 0, 1]))})
    return ad.inference_data(posterior=post, log_likelihood=ll, observed_data=obs)


def test_container_type_matches_the_installed_arviz_generation():
    gen = int(az.__version__.split(".")[0])
    assert ad.ARVIZ_GENERATION == gen
    idata = _idata(0)
    expected = az.InferenceData if gen == 0 else xr.DataTree
    assert type(idata) is expected and ad.InferenceData is expected
    assert ad.is_inference_data(idata) and ad.has_groups(idata)
    assert set(ad.group_names(idata)) == {"posterior", "log_likelihood", "observed_data"}
    post = ad.posterior_of(idata)
    assert isinstance(post, xr.Dataset) and post["lambda_max"].shape == (2, 5, 2)
    assert ad.posterior_of(post) is post and not ad.has_groups(post)
    with pytest.raises(KeyError, match="no group 'prior'"):
        ad.group(idata, "prior")


def test_concat_chains_renumbers_and_keeps_observed_data():
    a, b = _idata(0), _idata(1, chains=1)
    both = ad.concat_chains([a, b])
    post = ad.group(both, "posterior")
    assert post["chain"].values.tolist() == [0, 1, 2]
    np.testing.assert_array_equal(post["lambda_max"].values[2],
                                  ad.group(b, "posterior")["lambda_max"].values[0])
    assert ad.group(both, "log_likelihood")["y"].shape == (3, 5, 3)
    assert ad.group(both, "observed_data")["y"].values.tolist() == [1, 0, 1]


def test_netcdf_round_trip_bit_for_bit(tmp_path):
    base = xr.Dataset({"alpha": ("method", [2.5, 3.0])}, coords={"method": ["none", "wd"]})
    idata = ad.with_groups(_idata(3), baselines=base)
    path = tmp_path / "x.nc"
    ad.write_netcdf(idata, path)
    back = ad.read_netcdf(path)
    assert type(back) is type(idata)
    assert set(ad.group_names(back)) == set(ad.group_names(idata))
    for name in ad.group_names(idata):
        xr.testing.assert_identical(ad.group(back, name), ad.group(idata, name))
    path.unlink()  # fully read into memory: the file is closed and can go


def test_psislw_agrees_across_generations():
    """Same tail length ``ceil(min(S/5, 3 sqrt S))`` in both generations: these k and the
    first smoothed weights were measured identical under ArviZ 0.23.4 and 1.3.0."""
    lw = np.random.default_rng(0).standard_t(3, size=(2, 57))
    out, k = ad.psislw(lw)
    np.testing.assert_allclose(k, [1.0540125099511373, 1.1760083562344399], rtol=1e-12)
    np.testing.assert_allclose(out[:, :2], [[-4.759333716973661, -4.755105765321471],
                                            [-0.9698427650440852, -5.328267472508809]],
                               rtol=1e-12)
    np.testing.assert_allclose(np.logaddexp.reduce(out, axis=-1), 0.0, atol=1e-12)
    _, k_short = ad.psislw(lw[:, :20])  # a 4-draw tail: no Pareto fit
    assert np.isinf(k_short).all()
