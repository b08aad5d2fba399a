"""Xiao et al. (2023): heavy-tailed regularisers and spectral priors (small configuration)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from bayes_spectral.models import heavy_tailed as ht
from scipy import stats


@pytest.fixture(scope="module")
def results():
    return ht.run(ht.Config.small())


@pytest.mark.slow
def test_table_is_tidy(results):
    # 10 methods x 3 seeds x 3 layers (fc1, fc2, out) of the MLP
    assert len(results) == 10 * 3 * 3
    assert set(results.method) == set(ht.METHODS)
    assert set(results.layer) == {"fc1", "fc2", "out"}
    assert results[["alpha", "test_accuracy", "train_accuracy"]].notna().all().all()


@pytest.mark.slow
def test_every_method_learns(results):
    # Small config (500 images, 20 epochs): every method and seed reaches 85% test accuracy
    # (measured: 0.91-0.95).
    runs = ht.per_run(results)
    assert (runs.test_accuracy > 0.85).all(), runs


@pytest.mark.slow
def test_powerlaw_and_frechet_priors_give_heavier_tails(results):
    # Hidden layer fc2 (64 x 64): MAP under the power-law prior lowers alpha by more than
    # 0.3 on every seed (measured: 1.90 -> 1.37 on average), the Frechet prior by more than
    # 0.1 (-> 1.64); stable rank also lowers it (-> 1.78), margin 0.03.
    fc2 = results[results.layer == "fc2"].pivot(index="seed", columns="method", values="alpha")
    assert (fc2["powerlaw_prior_map"] < fc2["none"] - 0.3).all(), fc2
    assert (fc2["frechet_prior_map"] < fc2["none"] - 0.1).all(), fc2
    assert (fc2["stable_rank"] < fc2["none"] - 0.03).all(), fc2
    assert (fc2["powerlaw_prior_map"] < fc2["weight_decay"] - 0.3).all(), fc2


@pytest.mark.slow
def test_paired_table_recomputed_from_rows(results):
    paired = ht.paired_vs_weight_decay(results)
    assert len(paired) == 9 and "weight_decay" not in set(paired.method)
    runs = ht.per_run(results)
    wide = runs.pivot(index="seed", columns="method", values="test_accuracy")
    for method in ("powerlaw_prior_map", "spectral_norm"):
        row = paired.set_index("method").loc[method]
        d = wide[method] - wide["weight_decay"]
        assert row.mean_diff == pytest.approx(d.mean())
        assert row.sd_diff == pytest.approx(d.std(ddof=1))
        assert row.better == int((d > 0).sum()) and row.worse == int((d < 0).sum())
        assert row.better + row.worse + row.ties == 3
        p = stats.ttest_rel(wide[method], wide["weight_decay"]).pvalue
        assert np.isnan(row.p_value) if d.std() == 0 else row.p_value == pytest.approx(p)


@pytest.mark.slow
def test_summary_has_alpha_per_layer(results):
    s = ht.summary(results)
    assert ("alpha", "fc2") in s.columns and ("test_accuracy", "mean") in s.columns
    assert len(s) == 10


def test_cnn_and_outputs(tmp_path):
    cfg = ht.Config(archs=("cnn",), methods=("weight_decay", "weighted_alpha_decayed",
                                             "spike_and_slab"),
                    seeds=(0,), channels=(4, 8), cnn_hidden=16, epochs=1, num_train=128)
    df = ht.run(cfg, out_dir=tmp_path)
    assert set(df.layer) == {"conv1", "conv2", "fc1", "out"}
    # conv kernels (out, in, 3, 3): 9 pooled slices of min(out, in) eigenvalues
    assert df.set_index(["method", "layer"]).num_evals.loc[("weight_decay", "conv2")] == 9 * 4
    assert (tmp_path / "heavy_tailed.csv").exists()
    assert (tmp_path / "heavy_tailed.png").stat().st_size > 0
    paired = ht.paired_vs_weight_decay(df)
    assert paired.p_value.isna().all()  # one seed: no test


def test_bad_config():
    with pytest.raises(ValueError, match="unknown method"):
        ht.Config(methods=("dropout",))
    with pytest.raises(ValueError, match="unknown arch"):
        ht.Config(archs=("resnet",))
    with pytest.raises(ValueError, match="seeds"):
        ht.Config(seeds=())
    with pytest.raises(ValueError, match="prior_alpha"):
        ht.Config(prior_alpha=1.0)
    with pytest.raises(ValueError, match="weight_decay"):
        ht.Config(weight_decay=0.0)
    with pytest.raises(ValueError, match="num_train"):
        ht.Config(num_train=0)
    no_wd = pd.DataFrame({"arch": ["mlp"], "method": ["none"], "seed": [0], "layer": ["fc1"],
                          "alpha": [2.0], "train_accuracy": [1.0], "test_accuracy": [0.9]})
    with pytest.raises(ValueError, match="needs the 'weight_decay' method"):
        ht.paired_vs_weight_decay(no_wd)
