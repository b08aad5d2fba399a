"""``bayesian(..., tracked=..., tracked_mode="fused")``: the rank-one closed-form step of the
fused Frechet penalty inside Pyro's site priors (issue 20 follow-up).

No hooks: the sampled / MAP weight's prior is one autograd function
(:func:`bayes_spectral.penalties.rank_one.rank_one_penalty`) that advances a 2-column
block one step, takes the top Ritz pair in closed form and has the backward
``c(lambda) r v^T + d W``. Checked:

* at fixed weights after warm calls, value and gradient equal the exact (full-SVD)
  prior's (float64: 1e-6 relative, cosine >= 0.9999);
* along a MAP fit on digits, the MAP loss within 1e-3 relative and cosine >= 0.99; a
  MAP fit's test accuracy within 0.02 of the exact prior's;
* a fit with checkpoints == without == interrupted and resumed, bit for bit (MAP, MAP
  with a lazy prior, SVI with AutoNormal and with the fused guide, SGHMC);
* the fingerprint refuses a checkpoint of another mode, naming ``tracked_mode``;
* a second fit of the same model repeats the first; bad modes name the choices;
* no host sync in the prior's call and backward, nor in the model's whole log joint and
  its backward (the fast mode's finiteness check fails this);
* a transformer and a CNN build and fit.
"""

from __future__ import annotations

import copy

import pyro
import pytest
import torch
from resume_helpers import Interrupt, stop_after
from test_checkpoint_trackers import _same, _snapshot  # sibling test modules (same folder)
from test_fast_priors import _accuracy
from test_own_models import ResCNN, TokenTransformer, _digits, _tokens
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import (
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
)

COS = nn.functional.cosine_similarity
N = 128


def frechet(shape):
    return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)


def mlp(seed: int = 0, hidden: int = 24, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(dtype)


@pytest.fixture(scope="module")
def digits():
    return bs.data.load_digits()


@pytest.fixture(scope="module")
def data(digits):
    return digits.x_train[:N], digits.y_train[:N]


@pytest.fixture(scope="module")
def trained(digits):
    """A 64-32-10 MLP after 80 plain Adam steps on digits, in float64 (a top outlier)."""
    net = mlp(hidden=32, dtype=torch.float64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    x, y = digits.x_train.double(), digits.y_train
    for _ in range(80):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def _value_and_grad(log_prob, w):
    w = w.detach().clone().requires_grad_(True)
    value = log_prob(w)
    (g,) = torch.autograd.grad(value, w)
    return value.detach(), g


def _fused_prior(bn, row):
    law = bn._priors[row]
    return bs.TrackedSpectralPrior(law, bn._tail_penalties[row], mode="fused")


# ----------------------------------------------------------------------------- accuracy


@pytest.mark.parametrize("row", ["0", "2"])
def test_fused_equals_the_exact_prior_at_fixed_weights(trained, row):
    bn = bs.bayesian(trained, {nn.Linear: frechet}, num_data=10, tracked=True,
                     tracked_mode="fused")
    w = trained[int(row)].weight.detach()
    prior = _fused_prior(bn, row)
    for _ in range(30):  # warm calls: the block converges at fixed weights
        prior.log_prob(w)
    v_f, g_f = _value_and_grad(prior.log_prob, w)
    v_e, g_e = _value_and_grad(bn._priors[row].log_prob, w)  # full SVD
    assert abs(float(v_f - v_e)) <= 1e-6 * abs(float(v_e)), (float(v_f), float(v_e))
    assert float(COS(g_f.flatten(), g_e.flatten(), dim=0)) >= 0.9999
    torch.testing.assert_close(g_f, g_e, rtol=1e-5, atol=1e-6 * float(g_e.abs().max()))


def test_fused_gradient_is_c_r_vT_plus_d_W_through_a_sampled_weight(trained):
    """SVI's weight ``W = mu + sigma * eps``: the gradient reaches ``mu`` and ``sigma``
    through the fused function exactly as through the exact prior (after warm calls)."""
    bn = bs.bayesian(trained, {nn.Linear: frechet}, num_data=10, tracked=True,
                     tracked_mode="fused")
    w0 = trained[0].weight.detach()
    eps = torch.randn(w0.shape, generator=torch.Generator().manual_seed(3), dtype=w0.dtype)
    prior = _fused_prior(bn, "0")
    grads = []
    for log_prob, warm in ((prior.log_prob, 30), (bn._priors["0"].log_prob, 0)):
        mu, rho = w0.clone().requires_grad_(True), torch.full_like(w0, -5.0).requires_grad_(True)
        for _ in range(warm):
            log_prob((mu + rho.exp() * eps).detach())
        log_prob(mu + rho.exp() * eps).backward()
        grads.append(torch.cat([mu.grad.flatten(), rho.grad.flatten()]))
    assert float(COS(grads[0], grads[1], dim=0)) >= 0.9999


def test_fused_prior_follows_a_map_fit_on_digits(digits):
    """At the end of every epoch (4 steps each) of a MAP fit (Adam, lr 1e-2), the prior the
    next step evaluates (a copy of the fused state at the current weights) against the
    exact prior: the MAP loss ``-log p(y | W) - log p(W)`` within 1e-3 relative (the prior
    itself crosses zero along the fit), the prior's absolute error below 0.05 and gradient
    cosine >= 0.99, on both layers. Measured: loss <= 8.7e-5, prior <= 0.022 (in the first
    epoch, 2.8e-3 of the prior; a one-step lag while ``lambda_max`` grows ~10% a step),
    cosine >= 0.998."""
    x, y = digits.x_train[:256], digits.y_train[:256]
    bn = bs.bayesian(mlp(hidden=32), {nn.Linear: frechet}, num_data=256, tracked=True,
                     tracked_mode="fused")
    worst = {"loss": 0.0, "prior": 0.0, "cos": 1.0}

    def check(info):
        model, values = info["model"], info["guide"].median()
        with torch.no_grad():
            nll = nn.functional.cross_entropy(model.deterministic_forward(x, values), y,
                                              reduction="sum")
        for row in ("0", "2"):
            w = values[f"net.{row}.weight"].detach()
            pen = copy.deepcopy(model._tail_penalties[row])  # the run is untouched
            law = model._priors[row]
            v_f, g_f = _value_and_grad(bs.TrackedSpectralPrior(law, pen, "fused").log_prob, w)
            v_e, g_e = _value_and_grad(law.log_prob, w)
            err = abs(float(v_f - v_e))
            worst["loss"] = max(worst["loss"], err / abs(float(nll - v_e)))
            worst["prior"] = max(worst["prior"], err)
            worst["cos"] = min(worst["cos"], float(COS(g_f.flatten(), g_e.flatten(), dim=0)))

    bs.fit(bn, (x, y), "map", epochs=12, batch_size=64, lr=1e-2, progress=False, seed=0,
           callbacks=[check])
    assert worst["loss"] <= 1e-3 and worst["prior"] <= 0.05, worst
    assert worst["cos"] >= 0.99, worst


def test_fused_map_fit_reaches_the_exact_accuracy(digits):
    """6 epochs of MAP on digits (``test_fast_priors``' fit): the fused prior's test
    accuracy within 0.02 of the exact (full-SVD) prior's."""
    exact, fused = _accuracy(digits), _accuracy(digits, tracked=True, tracked_mode="fused")
    assert exact >= 0.9, exact
    assert abs(fused - exact) <= 0.02, (fused, exact)


# ----------------------------------------------------------------------------- fit state


def _model(mode="fused"):
    return bs.bayesian(mlp(), {nn.Linear: frechet}, num_data=N, tracked=True,
                       tracked_mode=mode)


CASES = {  # name -> (method, fit keywords)
    "map": ("map", {}),
    "map lazy prior": ("map", {"prior_every": 3}),
    "svi autonormal": ("svi", {}),
    "svi fused guide": ("svi", {"guide": "fused_normal"}),
    "sghmc": ("sghmc", {"burn_in": 1}),
}


def _fit(case, data, model=None, **extra):
    method, kw = CASES[case]
    lr = 1e-3 if method == "sghmc" else 5e-3
    return bs.fit(model if model is not None else _model(), data, method, epochs=4,
                  batch_size=32, lr=lr, seed=1, progress=False, **kw, **extra)


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoints_change_nothing_and_resume_is_exact(case, data, tmp_path):
    plain = _snapshot(_fit(case, data, checkpoint_every=100))
    with_dir = _snapshot(_fit(case, data, checkpoint_dir=tmp_path / "a"))
    _same(with_dir, plain, f"{case}: with checkpoint_dir vs without")
    with pytest.raises(Interrupt):
        _fit(case, data, checkpoint_dir=tmp_path / "b", callbacks=[stop_after(2)])
    _same(_snapshot(_fit(case, data, checkpoint_dir=tmp_path / "b")), with_dir,
          f"{case}: interrupted after 2 epochs and resumed")


def test_the_fused_state_is_in_the_checkpoint(data, tmp_path):
    from bayes_spectral._io import load_tensors
    from bayes_spectral.bnn.checkpoint import CHECKPOINT_NAME

    _fit("map", data, checkpoint_dir=tmp_path)
    layers = load_tensors(tmp_path / CHECKPOINT_NAME)["trackers"]["layers"]
    assert sorted(layers) == ["0", "2"]
    assert layers["2"]["mode"] == "fused" and layers["2"]["penalty"] == "FrechetPrior"
    assert layers["2"]["state"]["layers"]["weight"]["v"].shape == (2, 24)
    assert layers["0"]["state"]["layers"]["weight"]["v"].shape == (2, 64)


def test_a_fused_block_that_does_not_fit_is_refused(data, tmp_path):
    from bayes_spectral._io import load_tensors
    from bayes_spectral.bnn.checkpoint import CHECKPOINT_NAME, save_checkpoint

    with pytest.raises(Interrupt):
        _fit("map", data, checkpoint_dir=tmp_path, callbacks=[stop_after(2)])
    path = tmp_path / CHECKPOINT_NAME
    saved = load_tensors(path)
    saved["trackers"]["layers"]["2"]["state"]["layers"]["weight"]["v"] = torch.zeros(2, 23)
    save_checkpoint(path, saved)
    with pytest.raises(ValueError, match=r"layer '2'.*fused block v.*\(2, 23\).*\(2, 24\)"):
        _fit("map", data, checkpoint_dir=tmp_path)


@pytest.mark.parametrize("case", ["map", "svi autonormal"])
def test_a_second_fit_of_the_same_model_repeats_the_first(case, data):
    model = _model()
    runs = [_snapshot(_fit(case, data, model=model)) for _ in range(2)]
    _same(runs[1], runs[0], f"{case}: second fit of the same model")


@pytest.mark.parametrize("first, second", [("fast", "fused"), ("fused", "fast"),
                                           ("tracked", "fused")])
def test_a_checkpoint_of_another_mode_is_refused_naming_tracked_mode(data, tmp_path, first,
                                                                     second):
    kw = dict(batch_size=64, progress=False, seed=0, checkpoint_dir=tmp_path)
    bs.fit(_model(first), data, "map", epochs=1, **kw)
    with pytest.raises(ValueError, match=r"other settings.*tracked_mode"):
        bs.fit(_model(second), data, "map", epochs=2, **kw)


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize("kw, match", [
    ({"tracked": True, "tracked_mode": "quick"},
     r"tracked_mode must be 'tracked', 'fast', 'fused' or 'subspace', got 'quick'"),
    ({"tracked_mode": "fused"}, r"tracked_mode='fused' needs tracked="),
])
def test_bad_tracked_modes_name_the_choices(kw, match):
    with pytest.raises(ValueError, match=match):
        bs.bayesian(mlp(), {nn.Linear: frechet}, num_data=10, **kw)


def test_a_law_without_a_fused_form_is_refused_naming_the_layer():
    law = {"0": PowerLawSpectrum(3.0, 0.5, (24, 64), xmin=0.5)}
    with pytest.raises(ValueError, match=r"layer '0'.*PowerLawSpectrum.*'fast'"):
        bs.bayesian(mlp(), law, num_data=10, tracked=True, tracked_mode="fused")


def test_fused_gaussian_spectrum_is_the_exact_formula(trained):
    law = GaussianSpectrum(0.3, (32, 64), "penalty")
    bn = bs.bayesian(trained, {"0": law}, num_data=10, tracked=True, tracked_mode="fused")
    assert not bn._tail_penalties
    prior = bs.TrackedSpectralPrior(law, None, mode="fused")
    w = trained[0].weight.detach()
    torch.testing.assert_close(prior.log_prob(w), law.penalty_log_prob(w))


# ----------------------------------------------------------------------------- no host sync


def test_the_fused_prior_reads_nothing_back_from_the_device(monkeypatch, trained):
    """Creation (16 warm block steps), calls and backward run with every tensor-to-Python
    read (item, float, bool, int, tolist) refused."""
    bn = bs.bayesian(trained, {nn.Linear: frechet}, num_data=10, tracked=True,
                     tracked_mode="fused")
    prior = _fused_prior(bn, "0")
    w = trained[0].weight.detach().clone().requires_grad_(True)

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(3):
        prior.log_prob(w).backward()
    monkeypatch.undo()
    assert torch.isfinite(w.grad).all()


def test_the_model_log_joint_reads_nothing_back_from_the_device(monkeypatch, data):
    """The whole step's model side: the model traced at given weights (what ``Trace_ELBO``
    replays; Pyro's validation off), ``-log p(W, y | x)`` and its backward, from the first
    call on, with every tensor-to-Python read refused (Pyro's ELBO then reads the loss:
    its own sync, once per site, outside the prior)."""
    bn = _model()
    weights = {s: bn._initial[s].clone().requires_grad_(True) for s in bn.prior_sites.values()}

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    with pyro.validation_enabled(False):
        for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        for _ in range(3):
            trace = pyro.poutine.trace(pyro.poutine.condition(bn, data=weights)).get_trace(
                *data)
            (-trace.log_prob_sum()).backward()
        monkeypatch.undo()
    assert all(torch.isfinite(w.grad).all() for w in weights.values())
    assert all(p._fused["weight"].v.shape[0] == 2 for p in bn._tail_penalties.values())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_fused_prior_on_cuda_equals_cpu_without_sync(trained):
    """Device check (``-m cuda``): 5 calls (value and gradient) on CUDA equal the CPU ones
    (float64, 1e-10); calls 2-5 run under ``torch.cuda.set_sync_debug_mode("error")``."""
    out = []
    for dev in ("cpu", "cuda"):
        bn = bs.bayesian(trained, {nn.Linear: frechet}, num_data=10, tracked=True,
                         tracked_mode="fused")
        prior = _fused_prior(bn, "0")
        w = trained[0].weight.detach().to(dev).clone().requires_grad_(True)
        for step in range(5):
            if dev == "cuda" and step == 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                w.grad = None
                value = prior.log_prob(w)
                value.backward()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out.append((value.detach().cpu(), w.grad.cpu()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- user models


@pytest.mark.parametrize("make, data_fn, priors", [
    (TokenTransformer, _tokens,
     {r".*in_proj_weight\[[qkv]\]": frechet, nn.Linear: frechet}),
    (ResCNN, lambda: _digits((1, 8, 8)), {nn.Linear: frechet}),
], ids=["transformer", "cnn"])
@pytest.mark.parametrize("method", ["map", "svi"])
def test_user_models_build_and_fit(make, data_fn, priors, method):
    torch.manual_seed(0)
    (x, y), _ = data_fn()
    x, y = x[:128], y[:128]
    bn = bs.bayesian(make(), priors, num_data=128, tracked=True, tracked_mode="fused")
    assert bn._tail_penalties and all(p.mode == "fused" for p in bn._tail_penalties.values())
    pyro.set_rng_seed(0)
    res = bs.fit(bn, (x, y), method, epochs=2, batch_size=32, lr=1e-2, progress=False,
                 seed=0)
    assert all(torch.isfinite(torch.tensor(v)).all() for v in res.history["loss"])
    states = {n: p._fused["weight"].v for n, p in bn._tail_penalties.items()}
    assert all(torch.isfinite(v).all() and v.shape[0] == 2 for v in states.values())
