"""Sampler fits keep, for every kept draw, the values of the parameters without a prior and
the buffers (``res.free_draws``), and predictions / the log-likelihood evaluate draw ``s`` of
chain ``c`` with chain ``c``'s values at that step, not the last chain's final ones.

Every reference below is a forward pass written out by hand (``F.linear``, ``F.conv2d``,
``F.batch_norm``) from the draw's latent values and its recorded free values; float32,
tolerance 1e-6.
"""

from __future__ import annotations

import os
import warnings

import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_spectral as bs

TOL = 1e-6


def _normal(s):
    return dist.Normal(torch.zeros(s), 1.0).to_event(len(s))


def _mlp_data(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 4, generator=g)
    y = (x[:, 0] + x[:, 1] > 0).long() + (x[:, 2] > 0.5).long()
    return x, y


def _mlp():
    """Biases have no prior (the prior is on the Linear weights only)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    return bs.bayesian(net, {nn.Linear: _normal}, likelihood="categorical", num_data=40)


def _mlp_logits(x, d):
    h = torch.tanh(F.linear(x, d["net.0.weight"], d["net.0.bias"]))
    return F.linear(h, d["net.2.weight"], d["net.2.bias"])


def _cnn_data(n=24):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 6, 6, generator=g)
    y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0).long()
    return x, y


def _cnn():
    """Conv (prior) -> BatchNorm (affine params and running statistics: free) -> Linear."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                        nn.Linear(3 * 4 * 4, 3))
    return bs.bayesian(net, {nn.Conv2d: _normal, nn.Linear: _normal},
                       likelihood="categorical", num_data=24)


def _cnn_logits(x, d):
    h = F.conv2d(x, d["net.0.weight"], d["net.0.bias"])
    h = F.batch_norm(h, d["net.1.running_mean"], d["net.1.running_var"], d["net.1.weight"],
                     d["net.1.bias"], training=False, eps=1e-5)
    return F.linear(F.relu(h).flatten(1), d["net.4.weight"], d["net.4.bias"])


CASES = {
    "mlp": (_mlp, _mlp_data, _mlp_logits, {"net.0.bias", "net.2.bias"}),
    # the conv bias before BatchNorm has zero gradient: it never moves, so it is not kept
    # per draw (the result's own snapshot holds it)
    "cnn": (_cnn, _cnn_data, _cnn_logits,
            {"net.1.weight", "net.1.bias", "net.4.bias", "net.1.running_mean",
             "net.1.running_var", "net.1.num_batches_tracked"}),
}
KW = dict(lr=1e-2, epochs=4, batch_size=8, burn_in=1, num_chains=2, seed=0, progress=False)


def _fit(case, **kw):
    make, data_fn, _, _ = CASES[case]
    data = data_fn()
    return bs.fit(make(), data, "sghmc", **{**KW, **kw}), data


def _draw(res, c, s):
    """Everything the forward pass of draw ``s`` of chain ``c`` reads: the result's own
    parameters and buffers, overridden by the draw's latent values and free state."""
    with res.active():
        out = {k: v.detach().clone() for k, v in [*res.model.net.named_parameters(),
                                                   *res.model.net.named_buffers()]}
    out = {f"net.{k}": v for k, v in out.items()}
    out.update({k: v[c, s] for k, v in res.samples.items()})
    out.update({k: v[c, s] for k, v in (res.free_draws or {}).items()})
    return out


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_free_values_are_recorded_per_draw_and_used_by_predict(case):
    res, (x, _) = _fit(case, free_params="drift")
    _, _, logits, free_names = CASES[case]
    assert set(res.free_draws) == free_names
    assert set(res.samples) == set(res.model.latent_sites)  # sampled sites only
    draws = res.samples["net.0.weight"].shape[1]
    for name, v in res.free_draws.items():
        assert v.shape[:2] == (2, draws), name
    # the chains' free values differ (drift from different starts): the last chain's final
    # values are wrong for chain 0's draws
    # (a conv bias followed by BatchNorm has zero gradient: the BN affine params move)
    moving = ("net.1.bias", "net.1.weight", "net.4.bias") if case == "cnn" else \
        ("net.0.bias", "net.2.bias")
    for name in moving:
        assert not torch.equal(res.free_draws[name][0, 0], res.free_draws[name][1, -1]), name
    if case == "cnn":
        rm = res.free_draws["net.1.running_mean"]
        assert not torch.allclose(rm[0, 0], rm[1, -1]) and not torch.allclose(rm[0, 0], rm[0, -1])
    probs = res.predict(x[:10])
    assert probs.shape == (2 * draws, 10, 3)
    for c, s in [(0, 0), (0, draws - 1), (1, 0), (1, draws - 1)]:
        want = torch.softmax(logits(x[:10], _draw(res, c, s)), -1)
        torch.testing.assert_close(probs[c * draws + s], want, atol=TOL, rtol=0)
    # sample_modules(2): the first and the last draw, each with its own free state
    first, last = res.sample_modules(2)
    with torch.no_grad():
        for mod, (c, s) in [(first, (0, 0)), (last, (1, draws - 1))]:
            want = logits(x[:10], _draw(res, c, s))
            torch.testing.assert_close(mod(x[:10]), want, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", ["mlp", "cnn"])
def test_pointwise_log_likelihood_uses_the_draws_own_free_values(case):
    res, (x, y) = _fit(case, free_params="drift")
    _, _, logits, _ = CASES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        idata = bs.to_inference_data(res, (x, y))
    from bayes_spectral.diagnostics.arviz_adapter import group

    ll = torch.as_tensor(group(idata, "log_likelihood")["y"].values)
    draws = res.samples["net.0.weight"].shape[1]
    assert tuple(ll.shape) == (2, draws, len(y))
    for c, s in [(0, 1), (1, draws - 1)]:
        lp = torch.log_softmax(logits(x, _draw(res, c, s)), -1)
        want = lp.gather(1, y[:, None]).squeeze(1).double()
        torch.testing.assert_close(ll[c, s], want, atol=TOL, rtol=0)
    metrics = res.evaluate(x, y)  # the per-draw predictive, averaged
    probs = torch.stack([torch.softmax(logits(x, _draw(res, c, s)), -1)
                         for c in range(2) for s in range(draws)])
    acc = float((probs.mean(0).argmax(-1) == y).double().mean())
    assert abs(metrics.accuracy - acc) < 1e-12


def test_draws_dir_gives_the_same_free_draws(tmp_path):
    mem, _ = _fit("cnn", draw_chunk=5)
    disk, _ = _fit("cnn", draw_chunk=5, draws_dir=tmp_path / "draws")
    files = [f for f in os.listdir(tmp_path / "draws") if f.endswith(".safetensors")]
    assert len(files) == 2 * 2, files  # 3 steps x 3 epochs = 9 draws per chain, chunks of 5
    assert set(disk.free_draws) == set(mem.free_draws)
    for k, v in mem.free_draws.items():
        assert torch.equal(disk.free_draws[k], v), k
    for k, v in mem.samples.items():
        assert torch.equal(disk.samples[k], v), k


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("draws_dir", [False, True])
def test_resume_mid_chain_1_is_bit_exact_with_free_draws(tmp_path, draws_dir):
    kw = dict(draw_chunk=4, checkpoint_every=1)
    full, _ = _fit("cnn", checkpoint_dir=tmp_path / "a",
                   draws_dir=tmp_path / "da" if draws_dir else None, **kw)
    count = {"n": 0}

    def cb(info):
        count["n"] += 1
        if count["n"] == 6:  # epoch 2 of chain 1 (4 epochs per chain)
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _fit("cnn", checkpoint_dir=tmp_path / "b", callbacks=[cb],
             draws_dir=tmp_path / "db" if draws_dir else None, **kw)
    resumed, _ = _fit("cnn", checkpoint_dir=tmp_path / "b",
                      draws_dir=tmp_path / "db" if draws_dir else None, **kw)
    assert resumed.draw_steps == full.draw_steps
    for k, v in full.samples.items():
        assert torch.equal(resumed.samples[k], v), k
    assert set(resumed.free_draws) == set(full.free_draws)
    for k, v in full.free_draws.items():
        assert torch.equal(resumed.free_draws[k], v), k


def test_fixed_free_params_keep_the_start_and_predict_as_before():
    """free_params="fixed": the biases stay at the module's start in every chain (nothing is
    recorded for a net without buffers) and the predictive is the hand forward with them."""
    res, (x, _) = _fit("mlp", free_params="fixed")
    start = _mlp().net
    assert res.free_draws is None
    draws = res.samples["net.0.weight"].shape[1]
    probs = res.predict(x[:10])
    for c, s in [(0, 0), (1, draws - 1)]:
        d = {k: v[c, s] for k, v in res.samples.items()}
        d.update({"net.0.bias": start[0].bias.detach(), "net.2.bias": start[2].bias.detach()})
        want = torch.softmax(_mlp_logits(x[:10], d), -1)
        torch.testing.assert_close(probs[c * draws + s], want, atol=TOL, rtol=0)


def test_fixed_free_params_still_record_buffers():
    """BatchNorm running statistics move in training mode even with free_params="fixed":
    they differ between chains, so they are recorded per draw (the affine params are not:
    they stay at their start)."""
    res, (x, _) = _fit("cnn", free_params="fixed")
    assert set(res.free_draws) == {"net.1.running_mean", "net.1.running_var",
                                   "net.1.num_batches_tracked"}
    rm = res.free_draws["net.1.running_mean"]
    assert not torch.allclose(rm[0, -1], rm[1, -1])
    start = _cnn().net
    draws = res.samples["net.0.weight"].shape[1]
    probs = res.predict(x[:6])
    for c, s in [(0, 0), (1, draws - 1)]:
        d = _draw(res, c, s)
        d.update({f"net.{i}.{n}": getattr(start[i], n).detach()
                  for i, n in [(0, "bias"), (1, "weight"), (1, "bias"), (4, "bias")]})
        want = torch.softmax(_cnn_logits(x[:6], d), -1)
        torch.testing.assert_close(probs[c * draws + s], want, atol=TOL, rtol=0)


def test_nuts_results_have_no_free_draws():
    x, y = _mlp_data(n=12)
    torch.manual_seed(0)
    bn = bs.bayesian(nn.Sequential(nn.Linear(4, 3)), {nn.Linear: _normal},
                     likelihood="categorical", num_data=12)
    res = bs.fit(bn, (x, y), "nuts", num_samples=5, warmup_steps=5, num_chains=1, progress=False)
    assert res.free_draws is None


def test_spectral_factors_are_per_draw_in_weights_and_predict():
    """Spectral parameterisation: ``W = U diag(s) V^T`` with ``s`` sampled and ``U``, ``V``
    free (drift). A draw's weight and predictive use that draw's ``U``, ``V``: checked against
    ``torch.func.functional_call`` of the factor module with the recorded tensors."""
    from bayes_spectral.distributions import PowerLawSpectrum

    x, y = _mlp_data()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    bn = bs.bayesian(net, {"0": lambda s: PowerLawSpectrum(2.0, 0.5, s)}, num_data=40,
                     spectral=True)
    res = bs.fit(bn, (x, y), "sghmc", **KW)
    factors = bn.spectral_factors["0"]
    prefix = "net.0.spectral."
    assert any(k.startswith(prefix) for k in res.free_draws)
    weights = bs.weight_draws(res)
    draws = res.samples["net.0.spectral_s"].shape[1]
    probs = res.predict(x[:8])
    for c, s in [(0, 0), (1, draws - 1)]:
        d = _draw(res, c, s)
        tensors = {k[len(prefix):]: v for k, v in d.items() if k.startswith(prefix)}
        w = torch.func.functional_call(factors, tensors, (d["net.0.spectral_s"],))
        torch.testing.assert_close(weights["0"][c, s], w, atol=TOL, rtol=0)
        h = torch.tanh(F.linear(x[:8], w, d["net.0.bias"]))
        want = torch.softmax(F.linear(h, d["net.2.weight"], d["net.2.bias"]), -1)
        torch.testing.assert_close(probs[c * draws + s], want, atol=TOL, rtol=0)


def test_a_param_store_entry_added_during_the_run_is_not_free_state():
    """The free names are fixed at the first kept draw: an unrelated param-store entry that
    appears later (another model's, from a callback here) is neither recorded nor a crash
    (it raised KeyError when the next chunk's keys differed from the buffer's)."""
    import pyro

    def foreign(info):
        if info["epoch"] == 2:
            pyro.param("someone_elses.weight", torch.zeros(3))

    res, _ = _fit("mlp", callbacks=[foreign], draw_chunk=2)
    assert res.free_draws is not None and "someone_elses.weight" not in res.free_draws
    want = {k: v[0, 0] for k, v in _fit("mlp", draw_chunk=2)[0].free_draws.items()}
    for k, v in want.items():
        torch.testing.assert_close(res.free_draws[k][0, 0], v, rtol=0, atol=0)
