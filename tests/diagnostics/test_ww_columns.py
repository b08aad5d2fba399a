"""``bs.analyze`` with WeightWatcher's remaining diagnostics: the same columns as
WeightWatcher 0.7.7's ``analyze(...)`` run on the same seeded models."""

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


def ww_details(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ww.WeightWatcher(model=model).analyze(**kw).set_index("name")


def analyze(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bs.analyze(model, **kw).to_dataframe()


def model_of(seed):
    """Three dense layers: Gaussian (alpha > 6: under-trained), Gaussian plus low-rank
    spikes (trained-like) and Cauchy entries (alpha < 2: over-trained)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(60, 150), nn.ReLU(), nn.Linear(150, 120), nn.ReLU(),
                          nn.Linear(120, 90))
    with torch.no_grad():
        w = torch.randn(120, 150, generator=g) / math.sqrt(150)
        for k in range(3):
            u, v = torch.randn(120, 1, generator=g), torch.randn(1, 150, generator=g)
            w += 2.0 * (k + 1) * (u / u.norm()) @ (v / v.norm())
        model[2].weight.copy_(w)
        cauchy = torch.distributions.Cauchy(0.0, 1.0).sample((90, 120))
        model[4].weight.copy_(cauchy / 120)
    return model


@pytest.mark.parametrize("seed", [0, 1])
def test_mp_fit_columns_equal_weightwatcher(seed):
    model = model_of(seed)
    ours, ref = analyze(model, mp_fit=True), ww_details(model, mp_fit=True)
    for name in ref.index:
        row, r = ours.loc[name], ref.loc[name]
        assert row["num_spikes"] == r["num_spikes"], name
        for key in ("sigma_mp", "mp_softrank", "bulk_max", "bulk_min", "W_scale"):
            # ESD by eigvalsh of the Gram matrix here, SVD in WeightWatcher
            assert row[key] == pytest.approx(r[key], rel=1e-7, abs=1e-12), (name, key)


@pytest.mark.parametrize("seed", [0, 1])
def test_warning_column_equals_weightwatcher(seed):
    """'over-trained' (alpha < 2), 'under-trained' (alpha > 6), '' otherwise."""
    model = model_of(seed)
    ours, ref = analyze(model), ww_details(model)
    assert list(ours.loc[ref.index, "warning"]) == list(ref["warning"])
    assert "over-trained" in set(ours["warning"])  # the Cauchy layer


def test_under_trained_flag_equals_weightwatcher():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 100))  # Gaussian-like init: alpha ~ 17 > 6
    ours, ref = analyze(model), ww_details(model)
    assert ours["alpha"].iloc[0] > 6
    assert list(ours["warning"]) == list(ref["warning"]) == ["under-trained"]


def test_min_and_max_evals_keep_the_layers_weightwatcher_keeps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 70), nn.Linear(70, 130),
                          nn.Linear(130, 200), nn.Linear(200, 12))
    for lo, hi in [(40, 100), (10, 70), (71, 200)]:
        ours = analyze(model, min_evals=lo, max_evals=hi)
        ref = ww_details(model, min_evals=lo, max_evals=hi)
        assert sorted(ours.index) == sorted(ref.index), (lo, hi)


def test_max_evals_lists_what_it_leaves_out():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 70))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = bs.analyze(model, max_evals=35)
    assert list(ds["layer"].values) == ["0"]
    assert "1" in ds.attrs["left_out"] and "max_evals=35" in ds.attrs["left_out"]
    with pytest.raises(ValueError, match="max_evals"):
        bs.analyze(model, min_evals=50, max_evals=40)


@pytest.mark.parametrize("seed", [0, 1])
def test_clip_xmax_columns_equal_weightwatcher(seed):
    model = model_of(seed)
    ours = analyze(model, fix_fingers="clip_xmax")
    ref = ww_details(model, fix_fingers="clip_xmax")
    for name in ref.index:
        row, r = ours.loc[name], ref.loc[name]
        assert row["num_fingers"] == r["num_fingers"]
        for key, rkey in (("alpha", "alpha"), ("raw_alpha", "raw_alpha"), ("xmin", "xmin"),
                          ("ks_distance", "D"), ("alpha_weighted", "alpha_weighted")):
            assert row[key] == pytest.approx(r[rkey], rel=1e-6), (name, key)
        assert row["num_tail"] == r["num_pl_spikes"]


@pytest.mark.slow
def test_randomize_columns_match_weightwatcher_in_distribution():
    """WeightWatcher shuffles with numpy's global RNG, we with a torch generator (seeded:
    ``randomize=seed``): over 3 seeds each, the means of ww_softrank, rand_distance,
    rand_sigma_mp, max_rand_eval and num_traps agree within 3 standard errors + 1%
    (exact equality with the same permutations: tests/spectra/test_ww_diagnostics.py)."""
    model = model_of(0)
    ours = [analyze(model, randomize=s) for s in range(3)]
    refs = []
    for s in range(3):
        np.random.seed(s)  # noqa: NPY002 (WeightWatcher's global RNG)
        refs.append(ww_details(model, randomize=True))
    for name in refs[0].index:
        for key in ("ww_softrank", "rand_distance", "rand_sigma_mp", "max_rand_eval",
                    "num_traps"):
            a = np.array([o.loc[name, key] for o in ours])
            b = np.array([r.loc[name, key] for r in refs])
            se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
            assert abs(a.mean() - b.mean()) <= 3 * se + 0.01 * abs(b.mean()), (name, key)
    again = analyze(model, randomize=1)
    assert again["ww_softrank"].tolist() == ours[1]["ww_softrank"].tolist()


@pytest.mark.slow
def test_tpl_columns():
    """fit='TPL' / 'E_TPL': alpha and Lambda columns (WeightWatcher 0.7.7 fails on them with
    powerlaw 2.0; the layer-1 tests compare with powerlaw.Fit as WeightWatcher calls it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 100))
    with torch.no_grad():
        model[0].weight.copy_(torch.distributions.StudentT(2.0).sample((100, 40)) / 10)
    for fit in ("TPL", "E_TPL"):
        ds = analyze(model, fit=fit)
        assert ds["Lambda"].iloc[0] > 0 and 0 < ds["alpha"].iloc[0] < 3
    with pytest.raises(ValueError, match="fit"):
        bs.analyze(model, fit="lognormal")
    with pytest.raises(ValueError, match="fix_fingers"):
        bs.analyze(model, fix_fingers="peak")
