"""The main job (compare): one objective for penalties and priors, resume, report, table."""

from __future__ import annotations

import base64
import re

import numpy as np
import pandas as pd
import pytest

import bayes_spectral as bs
from bayes_spectral.apps import compare as C
from bayes_spectral.apps.report import write_html_report
from bayes_spectral.data import Split


@pytest.fixture(scope="module")
def small_split():
    d = bs.data.load_digits()
    return Split(d.x_train[:256], d.y_train[:256], d.x_test[:128], d.y_test[:128])


def tiny(**kw) -> C.CompareConfig:
    base = dict(hidden=(32,), seeds=(0,), epochs=5, svi_epochs=1, batch_size=64,
                baselines=("none", "weight_decay"), priors=("powerlaw",),
                num_posterior_samples=4, lr=1e-2)
    base.update(kw)
    return C.CompareConfig(**base)


def test_gaussian_prior_map_follows_the_weight_decay_baseline(small_split):
    """MAP with GaussianSpectrum(s) (penalty measure) == weight decay c = 1/s^2, same loop
    scale N * mean CE + R, same data order: weights equal to 1e-5 after 3 epochs."""
    cfg = tiny(epochs=3, svi=False)
    s = 0.5
    assert cfg.coefs["weight_decay"] == pytest.approx(1 / s**2)
    net, _ = C.train_baseline(small_split, cfg, "weight_decay", seed=3)
    res = C.train_prior(small_split, cfg, "gaussian", seed=3)
    mapw = C._point_weights(res["map"])
    start = C.make_mlp(64, cfg.hidden, 10, seed=3)
    for name, w in C._weights_of(net).items():
        moved = (w - C._weights_of(start)[name]).abs().max()
        assert moved > 1e-2, name  # training did move the weights
        gap = (w - mapw[name]).abs().max()
        assert gap < 1e-5, (name, gap)


def test_compare_table_metrics_and_resume(tmp_path, small_split, monkeypatch):
    monkeypatch.setattr(C, "load_dataset", lambda name, seed=0: small_split)
    cfg = tiny(seeds=(0, 1))
    out = C.compare(cfg, out_dir=tmp_path, progress=None)
    table = out["table"]
    # 2 baselines x 2 seeds + (map, svi) x 1 prior x 2 seeds
    assert len(table) == 8
    assert sorted(table.kind.unique()) == ["baseline", "map", "svi"]
    assert {"alpha_fc1", "stable_rank_fc1", "alpha_fc2", "test_accuracy", "nll", "ece"} <= set(
        table.columns)
    # alpha / stable rank in the table are those of the stored weights
    row = table[(table.kind == "baseline") & (table.method == "none") & (table.seed == 1)].iloc[0]
    w = out["weights"][("baseline", "none", 1)]["fc1"].double()
    m = bs.spectral_metrics(w)
    assert row.alpha_fc1 == pytest.approx(float(m["alpha"]), rel=1e-6)
    assert row.stable_rank_fc1 == pytest.approx(float(m["stable_rank"]), rel=1e-6)
    assert table.test_accuracy.between(0.6, 1.0).all()  # 5 epochs on 256 digits; chance is 0.1
    assert len(list((tmp_path / "runs").glob("*.pt"))) == 6

    def boom(*a, **k):
        raise AssertionError("retrained a run that was saved")

    monkeypatch.setattr(C, "train_baseline", boom)
    monkeypatch.setattr(C, "train_prior", boom)
    again = C.compare(cfg, out_dir=tmp_path, progress=None)["table"]
    pd.testing.assert_frame_equal(again, table)


def test_summarize_equals_numpy():
    rng = np.random.default_rng(0)
    t = pd.DataFrame({"kind": ["baseline"] * 3 + ["map"] * 3, "method": ["a"] * 3 + ["b"] * 3,
                      "seed": [0, 1, 2] * 2, "test_accuracy": rng.uniform(size=6),
                      "nll": rng.uniform(size=6), "ece": rng.uniform(size=6),
                      "alpha_fc1": rng.uniform(2, 4, size=6), "seconds": 1.0})
    s = C.summarize(t)
    acc = t.test_accuracy.to_numpy()
    assert s.loc[("map", "b"), "test_accuracy"] == pytest.approx(acc[3:].mean())
    assert s.loc[("baseline", "a"), "test_accuracy_sd"] == pytest.approx(acc[:3].std(ddof=1))
    assert s.loc[("map", "b"), "alpha_fc1"] == pytest.approx(t.alpha_fc1[3:].mean())
    assert int(s.loc[("map", "b"), "seeds"]) == 3
    text = C.format_summary(t)
    assert f"{acc[3:].mean():.3f} +- {acc[3:].std(ddof=1):.3f}" in text


def test_write_outputs_and_html_report(tmp_path, small_split, monkeypatch):
    import xarray as xr

    monkeypatch.setattr(C, "load_dataset", lambda name, seed=0: small_split)
    cfg = tiny(seeds=(0, 1), baselines=("none",))
    res = C.compare(cfg, out_dir=tmp_path, progress=None)
    paths = C.write_outputs(res, tmp_path)
    table = pd.read_csv(paths["results"])
    assert table.shape[0] == 6  # none x 2 seeds + (map, svi) x 2 seeds
    svi = table[table.kind == "svi"]
    assert np.isfinite(svi[["elpd_loo", "elpd_se"]].to_numpy()).all()
    # q of a 2000-weight MLP is a poor proposal: k-hat flags it (> 0.7), and is finite since
    # the ELPD uses at least ELPD_DRAWS draws (with <= 20 PSIS gives inf)
    assert (svi.khat_max > 0.7).all() and np.isfinite(svi.khat_max).all()
    assert (svi.elpd_loo < 0).all() and (svi.elpd_se > 0).all()
    # point fits in one Dataset with a method dim; SVI posterior with the seeds as chains
    base = xr.load_dataset(paths["baselines"], engine="h5netcdf")
    assert list(base.method.values) == ["baseline:none", "map:powerlaw"]
    assert list(base.seed.values) == [0, 1] and list(base.layer.values) == ["fc1", "fc2"]
    w = res["weights"][("map", "powerlaw", 1)]["fc1"].double()
    stored = float(base.alpha.sel({"method": "map:powerlaw", "seed": 1, "layer": "fc1"}))
    assert stored == pytest.approx(float(bs.spectral_metrics(w)["alpha"]), rel=1e-6)
    post = bs.load_netcdf(paths["posterior_powerlaw"])
    assert post.posterior.sizes["chain"] == 2 and post.posterior.sizes["draw"] == 4
    assert post.log_likelihood.y.shape == (2, 4, len(small_split.y_train))
    html = paths["report"].read_text()
    imgs = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", html)
    pngs = [paths[k] for k in ("esd", "alpha_vs_accuracy", "forest", "posterior_spectra_powerlaw")]
    assert [base64.b64decode(i) for i in imgs] == [p.read_bytes() for p in pngs]
    acc = res["table"].test_accuracy.iloc[0]
    assert f"{acc:.4g}" in html
    assert '&quot;epochs&quot;: 5,' in html  # the configuration is echoed


def test_report_rejects_non_png(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match="not a PNG"):
        write_html_report(tmp_path / "r.html", "t", {}, {}, {"x": bad})


@pytest.mark.parametrize("change, words", [
    (dict(baselines=("nope",)), "unknown baselines"),
    (dict(priors=("nope",)), "unknown priors"),
    (dict(seeds=()), "seeds is empty"),
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(hidden=(0,)), "hidden must be positive"),
    (dict(lr=-1.0), "lr must be positive"),
    (dict(dataset="cifar"), "dataset must be one of"),
    (dict(coefs={"weight_decay": float("nan")}), "coefficient of 'weight_decay'"),
])
def test_bad_config_is_named(change, words):
    with pytest.raises(ValueError, match=words):
        C.compare(tiny(**change), progress=None)
