"""Chen et al. (2024): weight decay is needed for the low-rank (about rank 2) first layer."""

from __future__ import annotations

import pytest
from bayes_spectral.models import low_rank_weight_decay as lrwd


@pytest.fixture(scope="module")
def results():
    return lrwd.run(lrwd.Config.small())


def test_weight_decay_gives_low_rank_first_layer(results):
    # Margin: with wd = 0.1, sigma_3/sigma_1 is below half its value without weight decay,
    # for each seed (0, 1, 2) and each data set (diabetes regression, digits parity).
    piv = results.pivot_table(index=["dataset", "seed"], columns="weight_decay",
                              values="sigma3_over_sigma1")
    assert len(piv) == 6
    assert (piv[0.1] < 0.5 * piv[0.0]).all(), piv
    # Without weight decay the random initialisation keeps the layer far from rank 2.
    assert (piv[0.0] > 0.5).all(), piv


def test_close_to_rank_two_with_weight_decay(results):
    wd = results[results.weight_decay == 0.1]
    assert (wd.sigma3_over_sigma1 < 0.15).all(), wd
    # ... but not rank 1: the second direction survives.
    assert (wd.sigma2_over_sigma1 > 0.2).all(), wd
    assert (wd.effective_rank < 3.0).all(), wd
    nowd = results[results.weight_decay == 0.0]
    assert (nowd.effective_rank > 5.0).all(), nowd


def test_outputs_written(tmp_path):
    cfg = lrwd.Config(datasets=("teacher",), weight_decays=(0.0, 0.1), width=8, steps=20,
                      seeds=(0,), teacher_samples=40, teacher_dim=5)
    df = lrwd.run(cfg, out_dir=tmp_path)
    assert set(df.columns) >= {"dataset", "weight_decay", "seed", "sigma3_over_sigma1",
                               "effective_rank"}
    assert (tmp_path / "low_rank_weight_decay.csv").exists()
    assert (tmp_path / "low_rank_weight_decay.png").stat().st_size > 0


def test_bad_config():
    with pytest.raises(ValueError, match="unknown dataset"):
        lrwd.Config(datasets=("mnist",))
    with pytest.raises(ValueError, match="weight decays"):
        lrwd.Config(weight_decays=(-1.0,))
