"""Same numbers as WeightWatcher's ``analyze()`` (default settings) on seeded models.

Differences by design, each stated and checked below:

* Conv2d: WeightWatcher multiplies every kernel slice by ``sqrt(1/2)`` (its ``conv2d_norm``
  default), so its eigenvalues are ``0.5 x`` ours; alpha is scale invariant and equal,
  xmin/lambda_max are halved, log norms shift by ``log10(0.5)``.
* Conv1d: WeightWatcher leaves PyTorch Conv1d layers out; we analyse them (pooled slices).
* Layers with fewer than 20 eigenvalues: WeightWatcher switches to a bias-corrected
  "small N" rule; we keep the KS rule of DESIGN.md for every N.
* WeightWatcher drops ``lambda <= 1e-5`` (absolute) before fitting; we drop eigenvalues
  below the numerical-rank cut (relative), so scaling W never changes our alpha.

WeightWatcher imported where CUDA is available reads every weight as float16 and takes a
float32 GPU SVD (3e-5 to 5e-4 relative on these columns); every test here pins its CPU
branch (float64 SVD, the same spectrum as ours to ~1e-14 relative: the tolerances below
have 1e6x room and still fail for alpha with n - 1, another KS step or xmin one position
off), see tests/weightwatcher_numerics.py; its CUDA numbers are checked in
test_weightwatcher_cuda_branch.py.
"""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from weightwatcher_numerics import pin_cpu_numerics

import bayes_spectral as bs

ww = pytest.importorskip("weightwatcher")
logging.getLogger("weightwatcher").setLevel(logging.ERROR)


@pytest.fixture(autouse=True)
def _weightwatcher_cpu_numerics(monkeypatch):
    """WeightWatcher with CUDA reads weights as float16 (tests/weightwatcher_numerics.py)."""
    pin_cpu_numerics(monkeypatch)

METRICS = ["alpha", "alpha_weighted", "stable_rank", "log_norm", "log_spectral_norm",
           "log_alpha_norm"]


def ww_details(model):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        details = ww.WeightWatcher(model=model).analyze()
    return details.set_index("name")


def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(),
                         nn.Linear(96, 40))


def student_t_mlp(seed):
    model = mlp(seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            t = torch.distributions.StudentT(2.0).sample(layer.weight.shape)
            layer.weight.copy_(0.05 * t + 0.0 * torch.randn(layer.weight.shape, generator=g))
    return model


@pytest.mark.parametrize("make", [mlp, student_t_mlp], ids=["mlp", "student_t"])
@pytest.mark.parametrize("seed", [0, 1])
def test_dense_layers_equal_weightwatcher(make, seed):
    torch.manual_seed(seed + 100)
    model = make(seed)
    ours = bs.analyze(model).to_dataframe()
    theirs = ww_details(model)
    assert set(theirs.index) == set(ours.index)
    for name in theirs.index:
        row, ref = ours.loc[name], theirs.loc[name]
        assert row["xmin"] == pytest.approx(ref["xmin"], rel=1e-6), name
        assert row["num_tail"] == ref["num_pl_spikes"]
        assert row["ks_distance"] == pytest.approx(ref["D"], rel=1e-6)
        assert row["sigma"] == pytest.approx(ref["sigma"], rel=1e-6)
        for metric in METRICS:
            assert row[metric] == pytest.approx(ref[metric], rel=1e-6), (name, metric)


def conv_net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
        nn.Conv1d(8, 24, 5), nn.Flatten(), nn.Linear(32 * 4, 30),
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_conv_net_equal_weightwatcher_up_to_its_conv2d_scaling(seed):
    model = conv_net(seed)
    ours = bs.analyze(model).to_dataframe()
    theirs = ww_details(model)
    # Conv1d ("4") is ours only
    assert set(ours.index) - set(theirs.index) == {"4"}
    assert ours.loc["4", "layer_type"] == "Conv1d"
    half = math.log10(0.5)
    for name in ["0", "2"]:
        row, ref = ours.loc[name], theirs.loc[name]
        assert row["num_evals"] == ref["num_evals"]
        assert row["alpha"] == pytest.approx(ref["alpha"], rel=1e-6)
        assert 0.5 * row["xmin"] == pytest.approx(ref["xmin"], rel=1e-6)
        assert 0.5 * row["lambda_max"] == pytest.approx(ref["lambda_max"], rel=1e-6)
        assert row["log_norm"] + half == pytest.approx(ref["log_norm"], rel=1e-6)
        assert row["log_spectral_norm"] + half == pytest.approx(ref["log_spectral_norm"], rel=1e-6)
        assert row["stable_rank"] == pytest.approx(ref["stable_rank"], rel=1e-6)
        assert row["alpha"] * (row["log_spectral_norm"] + half) == pytest.approx(
            ref["alpha_weighted"], rel=1e-6
        )
    # the pooled ESD itself: WW's get_ESD() does not apply the analyze() scaling, so its
    # eigenvalues equal ours exactly
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ww_esd = ww.WeightWatcher(model=model).get_ESD(layer=3)  # WW numbers modules from 1
    ours_esd = bs.esd(model[2].weight.detach().double()).numpy()
    np.testing.assert_allclose(np.sort(ww_esd), ours_esd, rtol=1e-9)
    # the dense head is compared as is
    row, ref = ours.loc["6"], theirs.loc["6"]
    for metric in METRICS:
        assert row[metric] == pytest.approx(ref[metric], rel=1e-6)


def test_small_layers_use_a_different_rule_in_weightwatcher():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(50, 12))  # 12 eigenvalues < 20
    ours = bs.analyze(model).to_dataframe().loc["0"]
    ref = ww_details(model).loc["0"]
    # same spectrum-only metrics ...
    for metric in ["stable_rank", "log_norm", "log_spectral_norm"]:
        assert ours[metric] == pytest.approx(ref[metric], rel=1e-9)
    # ... while WW's alpha is its bias-corrected small-N estimate 1 + (n-1)/sum log(x/xmin)
    ev = bs.esd(model[0].weight.detach().double()).numpy()
    tail = ev[ev >= ref["xmin"]]
    assert ref["alpha"] == pytest.approx(1 + (len(tail) - 1) / np.log(tail / tail[0]).sum(),
                                         rel=1e-9)
    assert ours["alpha"] != pytest.approx(ref["alpha"], rel=1e-3)


def test_absolute_eigenvalue_cut_of_weightwatcher_vs_our_relative_cut():
    # a layer scaled down so that part of its spectrum falls under WW's 1e-5 cut
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(80, 60))
    with torch.no_grad():
        model[0].weight.mul_(5e-3)
    ev = bs.esd(model[0].weight.detach().double()).numpy()
    assert (ev <= 1e-5).any() and (ev > 1e-5).any()
    ref = ww_details(model).loc["0"]
    ours = bs.analyze(model).to_dataframe().loc["0"]
    kept = ev[ev > 1e-5]
    fit_on_kept = bs.fit_powerlaw(torch.tensor(kept))
    assert ref["alpha"] == pytest.approx(float(fit_on_kept.alpha), rel=1e-6)
    # ours is the fit on the whole spectrum, identical to the unscaled layer's
    scaled_back = bs.fit_powerlaw(torch.tensor(ev * 1e6))
    assert ours["alpha"] == pytest.approx(float(scaled_back.alpha), rel=1e-9)


class TokenModel(nn.Module):
    """Embedding + attention + LSTM: WeightWatcher analyses the Embedding and the
    attention's out_proj (named by its last component), not in_proj or the LSTM."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(200, 64)
        self.attn = nn.MultiheadAttention(64, 4)
        self.lstm = nn.LSTM(64, 32)
        self.fc = nn.Linear(32, 50)


@pytest.mark.parametrize("seed", [0, 1])
def test_embedding_and_attention_output_equal_weightwatcher(seed):
    torch.manual_seed(seed)
    model = TokenModel()
    ours = bs.analyze(model).to_dataframe()
    theirs = ww_details(model)
    assert set(theirs.index) == {"emb", "out_proj", "fc"}
    assert theirs.loc["emb", "layer_type"].lower().endswith("embedding")
    assert ours.loc["emb", "num_evals"] == theirs.loc["emb", "num_evals"] == 64
    for ours_name, name in [("emb", "emb"), ("attn.out_proj", "out_proj"), ("fc", "fc")]:
        row, ref = ours.loc[ours_name], theirs.loc[name]
        assert row["xmin"] == pytest.approx(ref["xmin"], rel=1e-6), name
        assert row["num_tail"] == ref["num_pl_spikes"]
        for metric in METRICS:
            assert row[metric] == pytest.approx(ref[metric], rel=1e-6), (name, metric)
    # ours also has the layers WeightWatcher leaves out
    assert {"attn.in_proj_weight[q]", "lstm.weight_hh_l0"} <= set(ours.index)
