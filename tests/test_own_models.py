"""The whole workflow on six small models of the kinds users bring (issue 17).

Each case goes ``analyze -> Regularizer (weighted alpha, spectral norm, tracked Frechet
prior) -> bayesian (priors on attention Q/K/V, recurrent matrices, embeddings) -> fit MAP
and SVI from a DataLoader -> evaluate -> to_module -> to_inference_data -> one plot`` and
asserts numbers that could fail: accuracy above chance (RMSE below the targets' std) after
MAP, ``to_module`` forward == ``predict``, the posterior's layers and draws, the penalties'
gradients on every selected row. Plus: results unchanged by a later fit (bit for bit), the
BatchNorm CNN's predictions repeatable and independent of their batch, ``analyze(model) ==
analyze(model.state_dict())``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayes_spectral as bs
from bayes_spectral import penalties
from bayes_spectral.diagnostics import plots
from bayes_spectral.diagnostics.arviz_adapter import posterior_of

QKV = [f"enc.layers.0.self_attn.in_proj_weight[{c}]" for c in "qkv"]


# ----------------------------------------------------------------------------- models


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class ResCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = Block(8)
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        h = self.block(torch.relu(self.bn(self.stem(x))))
        return self.head(nn.functional.avg_pool2d(h, 2).flatten(1))


class TokenTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 16)
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        return self.head(self.enc(self.emb(x)).mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: type):
        super().__init__()
        self.rnn = cell(8, 16, batch_first=True)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def regression_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                         nn.Linear(16, 1))


def dropout_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 10))


# ----------------------------------------------------------------------------- data


def _digits(shape):
    split = bs.data.load_digits(seed=0)
    g = torch.Generator().manual_seed(0)
    tr = torch.randperm(split.x_train.shape[0], generator=g)[:600]
    return ((split.x_train[tr].reshape(-1, *shape), split.y_train[tr]),
            (split.x_test[:300].reshape(-1, *shape), split.y_test[:300]))


def _tokens():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 10, (900, 6), generator=g)
    y = (x == 3).any(1).long()
    return (x[:600], y[:600]), (x[600:], y[600:])


def _regression():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(900, 1, generator=g) * 4 - 2
    y = torch.sin(2 * x[:, 0]) + 0.3 * torch.randn(900, generator=g)
    return (x[:600], y[:600]), (x[600:], y[600:])


def normal(shape):
    return dist.Normal(torch.zeros(shape), 1.0).to_event(len(shape))


@dataclass
class Case:
    name: str
    make: object
    data: object
    priors: dict
    prior_rows: list  # the rows that must get a prior (and appear in the posterior)
    likelihood: str = "categorical"
    noise: object = 1.0
    chance: float = 0.1  # accuracy of the majority class; regression: None
    kinds: list = field(default_factory=list)  # rows analyze must list


CASES = [
    Case("cnn_bn_residual", ResCNN, lambda: _digits((1, 8, 8)),
         {nn.Conv2d: normal, nn.Linear: normal}, ["stem", "block.conv", "head"],
         kinds=["stem", "block.conv", "head"]),
    Case("transformer_tokens", TokenTransformer, _tokens,
         {nn.Embedding: normal, r".*in_proj_weight\[[qkv]\]": normal, nn.Linear: normal},
         ["emb", *QKV, "enc.layers.0.self_attn.out_proj", "enc.layers.0.linear1",
          "enc.layers.0.linear2", "head"], chance=0.53,
         kinds=["emb", *QKV, "enc.layers.0.self_attn.out_proj"]),
    Case("lstm", lambda: Recurrent(nn.LSTM), lambda: _digits((8, 8)),
         {"rnn": normal, "head": normal}, ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head"],
         kinds=["rnn.weight_ih_l0", "rnn.weight_hh_l0"]),
    Case("gru", lambda: Recurrent(nn.GRU), lambda: _digits((8, 8)),
         {r"rnn\.weight_.*": normal, nn.Linear: normal},
         ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "head"],
         kinds=["rnn.weight_ih_l0", "rnn.weight_hh_l0"]),
    Case("regression_learned_noise", regression_mlp, _regression, {nn.Linear: normal},
         ["0", "2", "4"], likelihood="gaussian",
         noise=dist.LogNormal(torch.tensor(math.log(0.3)), torch.tensor(1.0)), chance=None,
         kinds=["2"]),
    Case("mlp_dropout", dropout_mlp, lambda: _digits((64,)), {nn.Linear: normal},
         ["0", "3"], kinds=["0", "3"]),
]
IDS = [c.name for c in CASES]


def _model(case: Case) -> nn.Module:
    torch.manual_seed(0)
    return case.make()


def _loader(train, seed: int = 0) -> DataLoader:
    return DataLoader(TensorDataset(*train), batch_size=64, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def _fit(case: Case, train, method: str, epochs: int, model=None):
    pyro.set_rng_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # num_data from the loader's dataset
        bn = bs.bayesian(model if model is not None else _model(case), case.priors,
                         likelihood=case.likelihood, noise=case.noise)
    return bs.fit(bn, _loader(train), method, epochs=epochs, lr=1e-2, progress=False), bn


# ----------------------------------------------------------------------------- workflow


@pytest.fixture(scope="module")
def fitted():
    """``{case: (train, test, map_result, svi_result)}``, built once per case on demand."""
    cache: dict[str, tuple] = {}

    def get(case: Case):
        if case.name not in cache:
            train, test = case.data()
            res_map, _ = _fit(case, train, "map", epochs=12)
            res_svi, _ = _fit(case, train, "svi", epochs=2)
            cache[case.name] = (train, test, res_map, res_svi)
        return cache[case.name]

    return get


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_analyze_lists_every_kind_and_equals_state_dict(case):
    model = _model(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small heads left out, with a warning
        a, b = bs.analyze(model), bs.analyze(model.state_dict())
    names = [str(n) for n in a["layer"].values]
    assert set(case.kinds) <= set(names), names
    assert names == [str(n) for n in b["layer"].values]
    for var in a.data_vars:
        np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_regularizer_reaches_every_row(case):
    model = _model(case)
    train, _ = case.data()
    x, y = train[0][:64], train[1][:64]
    loss_fn = (nn.functional.cross_entropy if case.likelihood == "categorical"
               else lambda out, t: nn.functional.mse_loss(out.squeeze(-1), t))
    for pen in (penalties.WeightedAlpha(coef=1e-2), penalties.SpectralNorm(coef=1e-2),
                penalties.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3, tracked=True)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # rows with too few eigenvalues left out
            reg = penalties.Regularizer(model, pen)
        picked = set(reg.layers)
        assert set(case.kinds) & picked, (type(pen).__name__, picked)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        values = []
        for _ in range(3):
            opt.zero_grad()
            r = reg()
            values.append(float(r.detach()))
            (loss_fn(model(x), y) + r).backward()
            opt.step()
        assert all(math.isfinite(v) for v in values)
        opt.zero_grad()
        last = reg()
        last.backward()  # the penalty alone reaches every selected row's parameter
        for n, p in _params_of(model, reg).items():
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, (type(pen), n)
        if isinstance(pen, penalties.SpectralNorm):  # power iteration: from below to sigma_max
            exact = sum(0.5e-2 * float(torch.linalg.matrix_norm(
                row.read().detach().reshape(row.shape[0], -1), 2)) ** 2
                for row in reg.layers.values())
            assert values[0] <= float(last.detach()) <= exact * (1 + 1e-5), (values, exact)
        else:  # the penalty decreases along the training steps
            assert float(last.detach()) < values[0], (type(pen).__name__, values, float(last))
        assert all(len(h) == 4 for h in reg.history.values())


STATEFUL = {"frechet_tracked": lambda: penalties.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3,
                                                                tracked=True),
            "spectral_norm": lambda: penalties.SpectralNorm(coef=1e-2),
            # hooks on the Linear rows (3-D inputs in the transformer), the rest through
            # accumulate_grad's fallback: conv kernels, recurrent and attention rows
            "spectral_norm_fused": lambda: penalties.SpectralNorm(coef=1e-2, mode="fused",
                                                                  fuse_min=0),
            "frechet_fused": lambda: penalties.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3,
                                                            mode="fused", fuse_min=0)}


def _penalised_steps(case: Case, make_pen, steps: int, state=None):
    """``steps`` Adam steps of the case's model with a stateful penalty through
    ``Regularizer.loss``, from fresh objects (restored from ``state`` when given); returns
    the losses and a checkpoint (model, optimiser, regulariser, RNG: dropout draws)."""
    model = _model(case)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows with too few eigenvalues left out
        reg = penalties.Regularizer(model, make_pen(), log=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        reg.load_state_dict(state["reg"])
        torch.set_rng_state(state["rng"])
    train, _ = case.data()
    x, y = train[0][:64], train[1][:64]
    loss_fn = (nn.functional.cross_entropy if case.likelihood == "categorical"
               else lambda out, t: nn.functional.mse_loss(out.squeeze(-1), t))
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = reg.loss(loss_fn(model(x), y))
        loss.backward()
        opt.step()
        losses.append(loss.detach().clone())
    return losses, {"model": model.state_dict(), "optim": opt.state_dict(),
                    "reg": reg.state_dict(), "rng": torch.get_rng_state()}


@pytest.mark.parametrize("pen", sorted(STATEFUL))
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_regularizer_checkpoint_resumes_bit_for_bit(case, pen, tmp_path):
    """3 steps, a checkpoint through a real file (``torch.load(weights_only=True)``), 3 more
    in fresh objects: the uninterrupted 6 steps bit for bit, BatchNorm statistics, attention
    and recurrent rows included (the trackers' and power iterations' state comes back)."""
    torch.manual_seed(0)
    full, end = _penalised_steps(case, STATEFUL[pen], 6)
    torch.manual_seed(0)
    first, saved = _penalised_steps(case, STATEFUL[pen], 3)
    torch.save(saved, tmp_path / "ckpt.pt")
    rest, resumed = _penalised_steps(case, STATEFUL[pen], 3,
                                     torch.load(tmp_path / "ckpt.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(full, first + rest, strict=True)), \
        (full, first + rest)
    for k, v in end["model"].items():
        assert torch.equal(v, resumed["model"][k]), k


def _params_of(model: nn.Module, reg) -> dict[str, torch.Tensor]:
    """The parameter behind each selected row (``row.param_name``)."""
    params = dict(model.named_parameters())
    return {n: params[row.param_name] for n, row in reg.layers.items()}


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_workflow(case, fitted, tmp_path):
    train, test, res_map, res_svi = fitted(case)
    bn = res_map.model
    assert set(case.prior_rows) <= set(bn.prior_sites), sorted(bn.prior_sites)
    x, y = test
    m = res_map.evaluate(x, y)
    if case.chance is None:  # y = sin(2x) + 0.3 eps: RMSE near 0.3, std(y) 0.73
        assert isinstance(m, bs.RegressionMetrics)
        assert m.rmse < 0.6 * float(y.std()), m
        assert 0.8 <= m.coverage_90 <= 1.0 and 0.35 <= m.coverage_50 <= 0.75, m
        noise = float(res_map.point_values()["noise"])  # the latent noise's MAP point
        assert 0.2 < noise < 0.45, noise
    else:
        assert isinstance(m, bs.ClassificationMetrics)
        assert m.accuracy > case.chance + 0.4, m
        assert m.brier < 0.5, m
    # to_module: a plain module whose forward is predict's (MAP)
    plain = res_map.to_module()
    with torch.no_grad():
        out = plain(x)
    pred = res_map.predict(x)
    if case.chance is None:
        torch.testing.assert_close(out.reshape(pred.loc[0].shape), pred.loc[0], rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(out.softmax(-1), pred[0], rtol=0, atol=1e-6)
    assert not any(isinstance(v, pyro.nn.PyroModule) for v in plain.modules())
    # SVI: posterior draws as plain modules (an LSTM's flat weights are the drawn ones)
    draws = res_svi.sample_modules(2, seed=0)
    with torch.no_grad():
        assert not torch.allclose(draws[0](x[:20]), draws[1](x[:20]))
    for rnn in (mod for mod in draws[0].modules() if isinstance(mod, nn.RNNBase)):
        assert all(a is getattr(rnn, n) for a, n in
                   zip(rnn._flat_weights, rnn._flat_weights_names, strict=True))
    # SVI evaluates too, and the posterior names every prior row
    assert math.isfinite(res_svi.evaluate(x, y, num_samples=4).nll)
    one_sv = [r.name for r in res_svi.model.weight_rows
              if r.name in res_svi.model.prior_sites and r.num_evals() == 1]
    with warnings.catch_warnings(record=True) as caught:  # Linear(1, h), Linear(h, 1): NaN alpha
        warnings.simplefilter("always")
        idata = bs.to_inference_data(res_svi, (x[:50], y[:50]), num_samples=3)
    said = " ".join(str(w.message) for w in caught)
    assert all(f"layer {n!r} has a single singular value" in said for n in one_sv), said
    post = posterior_of(idata)
    assert [str(n) for n in post["layer"].values] == list(res_svi.model.prior_sites)
    assert post["alpha"].shape == (1, 3, len(res_svi.model.prior_sites))
    assert idata["log_likelihood"]["y"].shape == (1, 3, 50)
    assert np.isfinite(idata["log_likelihood"]["y"].values).all()
    path = tmp_path / "spectra.png"
    plots.plot_posterior_spectra(idata, layers=case.prior_rows[:3], path=path)
    assert path.stat().st_size > 1000


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("case", [CASES[0], CASES[1]], ids=IDS[:2])
def test_second_fit_leaves_first_result_unchanged(case, fitted):
    train, test, res_map, _ = fitted(case)
    x = test[0]
    before = res_map.predict(x).clone()
    params = {k: v.clone() for k, v in res_map.params().items()}
    torch.manual_seed(5)  # another model with the same layer names, fitted afterwards
    other, _ = _fit(case, train, "map", epochs=1, model=case.make())
    assert not torch.equal(other.predict(x), before)
    assert torch.equal(res_map.predict(x), before)
    after = res_map.params()
    assert after.keys() == params.keys()
    assert all(torch.equal(after[k], params[k]) for k in params)


def test_cnn_predictions_repeat_and_do_not_depend_on_batch(fitted):
    _, test, res_map, _ = fitted(CASES[0])
    x = test[0]
    bn_stats = res_map.model.net.bn.running_mean.clone()
    first = res_map.predict(x)
    assert torch.equal(res_map.predict(x), first)
    # eval mode: a point's prediction does not depend on its batch (train-mode BatchNorm
    # would normalise by the batch's statistics: differences of order 1e-1)
    torch.testing.assert_close(res_map.predict(x[:7]), first[:, :7], rtol=0, atol=1e-6)
    torch.testing.assert_close(res_map.predict(x[7:19]), first[:, 7:19], rtol=0, atol=1e-6)
    assert torch.equal(res_map.model.net.bn.running_mean, bn_stats)
    assert res_map.model.training  # the user's mode restored
    with torch.no_grad():  # the plain module too: eval mode, same outputs for any batch
        plain = res_map.to_module()
        torch.testing.assert_close(plain(x[:7]), plain(x)[:7], rtol=0, atol=1e-6)


def test_bayesian_takes_a_noise_prior():
    """``noise=<Distribution>`` (what ``BayesianNetwork.set_noise`` takes) is accepted."""
    prior = dist.LogNormal(torch.tensor(0.0), torch.tensor(0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bn = bs.bayesian(regression_mlp(), {nn.Linear: normal}, likelihood="gaussian",
                         noise=prior)
    assert bn.noise_prior is prior and bn.noise_sites == ["noise"]
    with pytest.raises(ValueError, match="noise"):
        bs.bayesian(regression_mlp(), likelihood="gaussian", noise=-1.0, num_data=10)


def test_token_model_inference_data_and_loo_keep_integer_inputs(fitted):
    """Token ids stay integer through to_inference_data and importance_elpd."""
    _, test, _, res_svi = fitted(CASES[1])
    x, y = test[0][:40], test[1][:40]
    assert x.dtype == torch.long
    idata = bs.to_inference_data(res_svi, (x, y), num_samples=2)
    assert idata["log_likelihood"]["y"].shape == (1, 2, 40)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)  # any form fit takes, read whole
    same = bs.to_inference_data(res_svi, loader, num_samples=2)
    np.testing.assert_array_equal(same["log_likelihood"]["y"].values,
                                  idata["log_likelihood"]["y"].values)
    np.testing.assert_array_equal(same["observed_data"]["y"].values, y.numpy())
    loo = bs.importance_elpd(res_svi, (x, y), num_samples=30)
    assert math.isfinite(loo.elpd)


def test_predict_takes_tuple_and_dict_inputs():
    """``res.predict`` / ``evaluate`` take the inputs the fit took: a tuple or a dict."""

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Embedding(5, 3)

        def forward(self, x, tok):
            return self.a(x) + self.b(tok)

    g = torch.Generator().manual_seed(0)
    x, tok = torch.randn(32, 4, generator=g), torch.randint(0, 5, (32,), generator=g)
    y = torch.randint(0, 3, (32,), generator=g)
    torch.manual_seed(0)
    bn = bs.bayesian(TwoInputs(), {nn.Linear: normal, nn.Embedding: normal}, num_data=32)
    res = bs.fit(bn, ((x, tok), y), "map", epochs=2, batch_size=16, progress=False)
    p = res.predict((x.double(), tok))
    assert p.shape == (1, 32, 3) and p.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(res.to_module()(x, tok).softmax(-1), p[0], rtol=0,
                                   atol=1e-6)
    assert math.isfinite(res.evaluate((x, tok), y).nll)


@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=[IDS[1], IDS[2]])
def test_baselines_line_up_with_the_posterior(case, fitted):
    """Baselines of a plain model (and of its state_dict) have the posterior's layers:
    the embedding, Q/K/V and recurrent rows included, with the same singular values."""
    _, _, res_map, _ = fitted(case)
    plain = res_map.to_module()
    base = bs.baseline_dataset({("map", 0): plain})
    names = [str(n) for n in base["layer"].values]
    assert set(case.prior_rows) <= set(names), names
    same = bs.baseline_dataset({("map", 0): plain.state_dict()})
    np.testing.assert_array_equal(base["singular_values"].values, same["singular_values"].values)
    post = bs.spectral_draws({n: _row_weight(plain, n)[None, None] for n in case.prior_rows})
    for n in case.prior_rows:
        np.testing.assert_allclose(base["singular_values"].sel(layer=n).values[0, 0],
                                   post["singular_values"].sel(layer=n).values[0, 0],
                                   rtol=1e-6, equal_nan=True)


def _row_weight(model: nn.Module, row: str) -> torch.Tensor:
    """The weight of a row name by hand: ``<module>`` -> ``.weight``, ``[q|k|v]`` slices of
    ``in_proj_weight``, a full parameter name as is."""
    params = dict(model.named_parameters())
    if row.endswith("]"):
        base, part = row[:-3], "qkv".index(row[-2])
        w = params[base]
        d = w.shape[0] // 3
        return w[part * d:(part + 1) * d].detach()
    return (params.get(row) if row in params else params[row + ".weight"]).detach()


def test_spectral_attention_and_embedding_posterior_spectra():
    """``spectral=`` on Q/K/V and the embedding (a parametrization): the posterior's singular
    values of each such row are its latent ``s`` draws (``W = U diag(s) V^T``), sorted."""
    from bayes_spectral.distributions import PowerLawSpectrum

    train, test = _tokens()
    rows = r".*in_proj_weight\[[qkv]\]|emb"
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    bn = bs.bayesian(TokenTransformer(), {rows: lambda s: PowerLawSpectrum(2.0, 0.5, s),
                                          nn.Linear: normal}, spectral=rows, num_data=600)
    assert sorted(bn.spectral_layers) == sorted(["emb", *QKV])
    res = bs.fit(bn, _loader(train), "svi", epochs=1, progress=False)
    assert res.evaluate(*test, num_samples=2).accuracy > 0.53 + 0.2
    idata = bs.to_inference_data(res, (test[0][:20], test[1][:20]), num_samples=2,
                                 include_latent=True)
    post = posterior_of(idata)
    for row in ["emb", *QKV]:
        s = post[bn.prior_sites[row]].values  # (chain, draw, r)
        sv = post["singular_values"].sel(layer=row).values[..., : s.shape[-1]]
        np.testing.assert_allclose(sv, -np.sort(-s, axis=-1), rtol=1e-4)


def test_predict_and_evaluate_take_numpy(fitted):
    """``fit`` converts numpy arrays; ``predict`` / ``evaluate`` do the same."""
    _, test, res_map, _ = fitted(CASES[5])
    x, y = test
    torch.testing.assert_close(res_map.predict(x.numpy()), res_map.predict(x), rtol=0, atol=0)
    assert res_map.evaluate(x.numpy(), y.numpy()) == res_map.evaluate(x, y)
