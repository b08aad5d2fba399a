"""Results that belong to their model, train/eval modes, plain modules of a fit (issue 17)."""

from __future__ import annotations

import warnings

import pyro
import pytest
import torch
from resume_helpers import Interrupt, stop_after
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import PowerLawSpectrum

PRIOR = {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)}


def _data(seed=0, n=64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _mlp(seed, hidden=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 2))


def _bn_dropout(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.5),
                         nn.Linear(16, 2))


def _fit(net, method="map", data=None, **kw):
    data = _data() if data is None else data
    bn = bs.bayesian(net, PRIOR, num_data=64)
    return bs.fit(bn, data, method, epochs=3, batch_size=32, lr=0.05, progress=False, **kw)


def _seeded_predict(res, x, k=4, seed=5):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return res.predict(x, k)


@pytest.fixture(params=[False, True], ids=["global_params", "module_local_params"])
def param_mode(request):
    old = pyro.settings.get("module_local_params")
    pyro.settings.set(module_local_params=request.param)
    yield request.param
    pyro.settings.set(module_local_params=old)
    pyro.clear_param_store()


@pytest.mark.parametrize("method", ["map", "svi"])
def test_a_later_fit_leaves_an_earlier_result_unchanged(param_mode, method):
    x, _ = _data()
    a = _fit(_mlp(0), method)
    pred, params = _seeded_predict(a, x), a.params()
    assert len(params) == 4 + (method == "svi") * 2  # biases, locs (and scales)
    _fit(_mlp(1), method)  # same layer names
    assert torch.equal(_seeded_predict(a, x), pred)
    _fit(_mlp(2, hidden=12), method)  # other shapes
    assert torch.equal(_seeded_predict(a, x), pred)
    after = a.params()
    assert after.keys() == params.keys()
    assert all(torch.equal(after[k], params[k]) for k in params)
    point = bs.map_values(a)  # the result itself: its own guide values
    assert all(torch.equal(point[k], a.point_values()[k]) for k in point)


def test_module_local_params_fit_trains(param_mode):
    x, y = _data()
    bn = bs.bayesian(_mlp(0), PRIOR, num_data=64)
    before = bs.bayesian(_mlp(0), PRIOR, num_data=64)
    res = bs.fit(bn, (x, y), "map", epochs=20, batch_size=32, lr=0.05, progress=False)
    first = bs.fit(before, (x, y), "map", epochs=1, batch_size=64, lr=1e-9, progress=False)
    assert res.history["loss"][-1] < res.history["loss"][0]
    assert res.evaluate(x, y).accuracy > first.evaluate(x, y).accuracy


def test_prediction_runs_in_eval_mode_and_restores_the_users_mode():
    x, y = _data()
    res = _fit(_bn_dropout())
    net = res.model.net
    net.train()
    net[3].eval()  # a user's own mixed modes
    modes = [m.training for m in net.modules()]
    stats = [t.clone() for t in (net[1].running_mean, net[1].running_var)]
    p1, p2 = res.predict(x), res.predict(x)
    assert torch.equal(p1, p2)
    # independent of the batch (eval mode: BatchNorm's running statistics, no dropout). Not
    # bit for bit: the GEMM kernel, and so the rounding, may depend on the batch size (seen
    # under pytest-xdist); train-mode BatchNorm would be ~1e-2 off
    torch.testing.assert_close(res.predict(x[:5])[0], p1[0, :5], rtol=1e-5, atol=1e-6)
    res.evaluate(x, y)
    with pytest.warns(UserWarning, match="one draw"):
        bs.to_inference_data(res, (x, y))
    assert torch.equal(net[1].running_mean, stats[0])
    assert torch.equal(net[1].running_var, stats[1])
    assert [m.training for m in net.modules()] == modes
    mc = res.predict(x, num_samples=4, mc_dropout=True)
    assert mc.shape[0] == 4 and not torch.equal(mc[0], mc[1])


def test_svi_predictions_repeat_with_batchnorm_and_dropout():
    x, _ = _data()
    res = _fit(_bn_dropout(), "svi")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        p1 = res.predict(x, 6)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        p2 = res.predict(x, 6)
    assert torch.equal(p1, p2)


def test_training_runs_in_train_mode_and_updates_batchnorm_statistics():
    net = _bn_dropout().eval()
    res = _fit(net)
    assert not torch.equal(res.model.net[1].running_mean, torch.zeros(16))
    assert not res.model.net[1].training  # the mode the network was given is restored


def test_to_module_forward_equals_map_predict():
    x, _ = _data()
    res = _fit(_bn_dropout())
    plain = res.to_module()
    assert type(plain) is nn.Sequential and type(plain[0]) is nn.Linear
    assert not any(isinstance(m, pyro.nn.PyroModule) for m in plain.modules())
    with torch.no_grad():
        out = torch.softmax(plain(x), -1)
    assert torch.equal(out, res.predict(x)[0])
    point = res.point_values()
    assert torch.equal(plain[0].weight, point["net.0.weight"])
    assert torch.equal(plain[1].running_mean, res.model.net[1].running_mean)


def test_to_module_of_svi_is_the_guide_median_and_sample_modules_draw():
    x, _ = _data()
    res = _fit(_mlp(0), "svi")
    plain = res.to_module()
    loc = res.guide.locs if hasattr(res.guide, "locs") else None
    med = res.point_values()
    assert torch.equal(plain[2].weight, med["net.2.weight"])
    if loc is not None:
        with res.active():
            assert torch.equal(med["net.0.weight"], res.guide.median()["net.0.weight"])
    mods = res.sample_modules(3, seed=1)
    again = res.sample_modules(3, seed=1)
    assert len(mods) == 3
    assert not torch.equal(mods[0][0].weight, mods[1][0].weight)
    assert torch.equal(mods[2][0].weight, again[2][0].weight)
    with pytest.warns(UserWarning, match="one draw"):
        maps = _fit(_mlp(0)).sample_modules(2)
    assert torch.equal(maps[0][0].weight, maps[1][0].weight)


def test_bare_net_call_after_fit_warns_and_to_module_is_the_fit():
    x, y = _data()
    res = _fit(_mlp(0), data=(x, y))
    with pytest.warns(UserWarning, match="to_module"):
        res.model.net(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res.predict(x)  # inside Pyro: no warning
        acc = (res.to_module()(x).argmax(-1) == y).double().mean()
    assert float(acc) == res.evaluate(x, y).accuracy


def test_refit_of_the_same_network_restarts_whole():
    x, _ = _data()
    bn = bs.bayesian(_bn_dropout(), PRIOR, num_data=64)
    kw = dict(epochs=3, batch_size=32, lr=0.05, progress=False, seed=4)
    first = bs.fit(bn, _data(), "map", **kw)
    p1 = first.predict(x)
    second = bs.fit(bn, _data(), "map", **kw)
    assert torch.equal(second.predict(x), p1)  # the same start, the same run
    assert first.params().keys() == second.params().keys()
    assert all(torch.equal(first.params()[k], v) for k, v in second.params().items())


def test_bayesian_without_num_data_warns():
    with pytest.warns(UserWarning, match="over-weighted by N / B"):
        bs.bayesian(_mlp(0), PRIOR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bs.bayesian(_mlp(0), PRIOR, num_data=64)


@pytest.mark.parametrize("method", ["map", "svi"])
def test_resume_equals_uninterrupted_run_with_module_local_params(param_mode, tmp_path, method):
    x, y = _data()
    kw = dict(epochs=4, batch_size=16, lr=0.05, progress=False, seed=3, val_data=(x, y))

    def run(folder, callbacks=()):
        bn = bs.bayesian(_bn_dropout(), PRIOR, num_data=64)
        return bs.fit(bn, (x, y), method, checkpoint_dir=tmp_path / folder,
                      callbacks=callbacks, **kw)

    full = run("a")

    with pytest.raises(Interrupt):
        run("b", [stop_after(2)])
    resumed = run("b")
    assert resumed.history == full.history
    a, b = full.params(), resumed.params()
    assert sorted(a) == sorted(b) and len(a) >= 6
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    bn_a, bn_b = full.model.net[1], resumed.model.net[1]
    assert torch.equal(bn_a.running_mean, bn_b.running_mean)


def test_early_stopping_restores_the_best_parameters_with_module_local_params(param_mode):
    x, y = _data()
    xv, yv = _data(seed=1)
    bn = bs.bayesian(_mlp(0), PRIOR, num_data=64)
    res = bs.fit(bn, (x, y), "map", epochs=40, batch_size=16, lr=0.3, progress=False,
                 patience=2, val_data=(xv, yv), seed=1)
    assert res.stopped_early and res.best_epoch < res.epochs_run
    nll = res.evaluate(xv, yv).nll
    assert nll == pytest.approx(min(res.history["val_nll"]), rel=1e-5)


@pytest.mark.parametrize("kind", ["spectral", "tracked"])
def test_to_module_of_spectral_and_tracked_layers_equals_predict(kind):
    from bayes_spectral.distributions import FrechetTopEigenvalue

    x, y = _data()
    priors = {"0": lambda s: PowerLawSpectrum(2.0, 0.5, s),
              "2": lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)}
    bn = bs.bayesian(_mlp(0), priors, num_data=64, **{kind: ["0" if kind == "spectral" else "2"]})
    res = bs.fit(bn, (x, y), "map", epochs=2, batch_size=32, progress=False)
    plain = res.to_module()
    assert sorted(n for n, _ in plain.named_parameters()) == \
        ["0.bias", "0.weight", "2.bias", "2.weight"]
    with torch.no_grad():
        assert torch.equal(torch.softmax(plain(x), -1), res.predict(x)[0])
