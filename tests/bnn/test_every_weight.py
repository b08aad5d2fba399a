"""bayesian() on every weight of the parameter view: attention Q/K/V (split and fused),
out_proj, recurrent matrices, embeddings, parametrized and tied weights; spectral= and
tracked= covering exactly the prior layers, the spectral parameterisation on attention."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import FrechetTopEigenvalue, GaussianSpectrum

pytestmark = pytest.mark.filterwarnings("ignore:.*num_data not given:UserWarning")

ATTN = "encoder.layers.0.self_attn"


@pytest.fixture(autouse=True)
def _fresh_param_store():
    """Networks here are run outside ``fit``: their PyroModule parameters are read from the
    global store, which a previous test's SVI leaves filled under the same names."""
    pyro.clear_param_store()


class TokenClassifier(nn.Module):
    """Embedding + one TransformerEncoder layer (LayerNorm inside) + mean pool + head."""

    def __init__(self, vocab: int = 11, d: int = 8, classes: int = 3):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        return self.head(self.encoder(self.emb(x)).mean(1))


class TiedLM(nn.Module):
    """Embedding and output head sharing one Parameter."""

    def __init__(self, vocab: int = 7, d: int = 5):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.emb(x).mean(1))))


class Recurrent(nn.Module):
    def __init__(self, cls, d_in: int = 4, hidden: int = 6, classes: int = 3):
        super().__init__()
        self.rnn = cls(d_in, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def normal(scale):
    return lambda shape: dist.Normal(0.0, scale).expand(shape).to_event(len(shape))


def sample_sites(bn, *args):
    tr = poutine.trace(bn).get_trace(*args)
    return tr, {n: s for n, s in tr.nodes.items()
                if s["type"] == "sample" and n not in ("obs", "data")}


def read(bn, values, getter):
    """``getter(bn.net)`` with the latent sites fixed to ``values`` (inside the network's
    Pyro context, so the parametrizations read the conditioned sites)."""
    with torch.no_grad(), poutine.block(), poutine.condition(data=values), bn._pyro_context:
        return getter(bn.net)


def tokens(n=6, length=5, vocab=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, length), generator=g), torch.randint(0, 3, (n,),
                                                                           generator=g)


def map_fit(bn, x, y, steps=5, lr=1e-2):
    """A few MAP steps with Pyro's SVI directly; the point values afterwards."""
    pyro.clear_param_store()
    guide = bs.auto_delta(bn)
    svi = SVI(bn, guide, pyro.optim.Adam({"lr": lr}), Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(steps)]
    assert all(torch.isfinite(torch.tensor(losses)))
    return bs.map_values(guide)


# --- attention ----------------------------------------------------------------------------


def test_qkv_slices_are_sites_and_the_prior_is_the_sum_of_the_slice_priors():
    torch.manual_seed(0)
    model = TokenClassifier()
    priors = {f"{ATTN}.in_proj_weight[q]": normal(0.5), f"{ATTN}.in_proj_weight[k]": normal(2.0),
              f"{ATTN}.in_proj_weight[v]": lambda s: GaussianSpectrum(0.7, s, measure="penalty"),
              "emb": normal(1.0)}
    bn = bs.bayesian(model, priors)
    x, y = tokens()
    tr, sites = sample_sites(bn, x, y)
    qkv = [f"net.{ATTN}.in_proj_weight[{p}]" for p in "qkv"]
    assert sorted(sites) == sorted(qkv + ["net.emb.weight"])
    assert all(sites[s]["value"].shape == (8, 8) for s in qkv)
    # the effective fused matrix is the concatenation of the three sites, in q, k, v order
    values = {n: s["value"] for n, s in sites.items()}
    fused = read(bn, values, lambda net: net.encoder.layers[0].self_attn.in_proj_weight)
    assert torch.equal(fused, torch.cat([values[s] for s in qkv]))
    # the model's prior part = the sum of the three slice priors on the slices (+ embedding)
    tr.compute_log_prob()
    model_prior = sum(tr.nodes[s]["log_prob_sum"] for s in sites)
    hand = (dist.Normal(0.0, 0.5).log_prob(fused[:8]).sum()
            + dist.Normal(0.0, 2.0).log_prob(fused[8:16]).sum()
            + GaussianSpectrum(0.7, (8, 8), measure="penalty").log_prob(fused[16:])
            + dist.Normal(0.0, 1.0).log_prob(values["net.emb.weight"]).sum())
    assert torch.allclose(model_prior, hand, rtol=1e-6)
    # at the module's own weights the network is the module, bit for bit in the slices
    init = bn.initial_values()
    w = model.encoder.layers[0].self_attn.in_proj_weight
    assert torch.equal(init[qkv[1]], w[8:16].detach())
    assert torch.allclose(bn.deterministic_forward(x), model(x), atol=1e-6)


def test_fused_in_proj_weight_is_one_site_with_split_qkv_false():
    torch.manual_seed(0)
    model = TokenClassifier()
    bn = bs.bayesian(model, {nn.MultiheadAttention: normal(1.0)}, split_qkv=False)
    assert bn.prior_sites == {f"{ATTN}.in_proj_weight": f"net.{ATTN}.in_proj_weight"}
    x, y = tokens()
    _, sites = sample_sites(bn, x, y)
    assert list(sites) == [f"net.{ATTN}.in_proj_weight"]
    assert sites[f"net.{ATTN}.in_proj_weight"]["value"].shape == (24, 8)
    assert torch.allclose(bn.deterministic_forward(x), model(x), atol=1e-6)


def test_out_proj_prior_is_used_by_attention():
    """MHA reads ``out_proj.weight`` without calling out_proj: the site must still be used."""
    torch.manual_seed(0)
    model = TokenClassifier()
    bn = bs.bayesian(model, {f"{ATTN}.out_proj.weight": normal(1.0)})
    site = f"net.{ATTN}.out_proj.weight"
    assert bn.prior_sites == {f"{ATTN}.out_proj": site}
    x, _ = tokens()
    zero = bn.deterministic_forward(x, {site: torch.zeros(8, 8)})
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.encoder.layers[0].self_attn.out_proj.weight.zero_()
    assert torch.allclose(zero, ref(x), atol=1e-6)
    assert not torch.allclose(zero, model(x), atol=1e-3)


def test_map_fit_of_token_transformer_with_attention_priors():
    torch.manual_seed(0)
    model = TokenClassifier()
    bn = bs.bayesian(model, {nn.MultiheadAttention: normal(1.0), nn.Embedding: normal(1.0),
                             nn.Linear: normal(1.0)}, num_data=6)
    x, y = tokens()
    assert len(bn.prior_sites) == 8  # emb, q, k, v, out_proj, linear1, linear2, head
    before = {k: v.clone() for k, v in bn.initial_values().items()}
    values = map_fit(bn, x, y, steps=5)
    assert set(values) == set(bn.prior_sites.values())
    moved = [s for s in values if not torch.equal(values[s], before[s])]
    assert sorted(moved) == sorted(values)  # every site, Q/K/V included, was trained


# --- recurrent matrices -------------------------------------------------------------------


@pytest.mark.parametrize("cls, gates", [(nn.LSTM, 4), (nn.GRU, 3), (nn.RNN, 1)])
def test_recurrent_matrices_get_priors(cls, gates):
    torch.manual_seed(0)
    model = Recurrent(cls)
    bn = bs.bayesian(model, {"rnn.weight_ih_l0": normal(1.0), r"rnn\.weight_hh_l\d": normal(0.5)})
    assert bn.prior_sites == {"rnn.weight_ih_l0": "net.rnn.weight_ih_l0",
                              "rnn.weight_hh_l0": "net.rnn.weight_hh_l0"}
    x, y = torch.randn(5, 7, 4), torch.randint(0, 3, (5,))
    tr, sites = sample_sites(bn, x, y)
    assert sites["net.rnn.weight_hh_l0"]["value"].shape == (6 * gates, 6)
    tr.compute_log_prob()
    hh = sites["net.rnn.weight_hh_l0"]["value"]
    assert torch.allclose(tr.nodes["net.rnn.weight_hh_l0"]["log_prob_sum"],
                          dist.Normal(0.0, 0.5).log_prob(hh).sum())
    assert torch.allclose(bn.deterministic_forward(x), model(x), atol=1e-6)
    # the site's value is what the recurrence uses
    init = bn.initial_values()
    init["net.rnn.weight_hh_l0"] = torch.zeros_like(hh)
    ref = copy.deepcopy(model)
    with torch.no_grad():
        ref.rnn.weight_hh_l0.zero_()
    assert torch.allclose(bn.deterministic_forward(x, init), ref(x), atol=1e-6)


def test_recurrent_type_key_selects_every_matrix_of_the_module():
    bn = bs.bayesian(Recurrent(nn.GRU), {nn.GRU: normal(1.0)})
    assert sorted(bn.prior_sites) == ["rnn.weight_hh_l0", "rnn.weight_ih_l0"]


# --- tied and parametrized weights --------------------------------------------------------


def test_tied_weights_get_one_site_and_stay_tied_after_map():
    torch.manual_seed(0)
    model = TiedLM()
    bn = bs.bayesian(model, {nn.Embedding: normal(1.0)}, num_data=8)
    assert bn.prior_sites == {"emb": "net.emb.weight"}
    x, y = torch.randint(0, 7, (8, 4)), torch.randint(0, 7, (8,))
    _, sites = sample_sites(bn, x, y)
    assert list(sites) == ["net.emb.weight"]  # one site, the head reads it
    assert torch.allclose(bn.deterministic_forward(x), model(x), atol=1e-6)
    values = map_fit(bn, x, y, steps=5, lr=5e-2)
    assert not torch.equal(values["net.emb.weight"], model.emb.weight)
    emb, head = read(bn, values, lambda net: (net.emb.weight, net.head.weight))
    assert emb is head  # the same tensor
    assert torch.equal(head, values["net.emb.weight"])
    assert not any("head.weight" in k for k in pyro.get_param_store().keys())


def test_parametrized_weight_prior_is_on_the_effective_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 5)), nn.Tanh(),
                          nn.Linear(5, 3))
    bn = bs.bayesian(model, {"0.weight": normal(1.0)})
    assert bn.prior_sites == {"0": "net.0.weight"}
    assert torch.allclose(bn.initial_values()["net.0.weight"], model[0].weight.detach())
    x = torch.randn(6, 4)
    assert torch.allclose(bn.deterministic_forward(x), model(x), atol=1e-6)


# --- spectral= / tracked= cover exactly the prior layers -----------------------------------


def frechet(shape):
    return FrechetTopEigenvalue(2.0, 1.0, 0.5, shape)


@pytest.mark.parametrize("spectral", [True, nn.Linear], ids=["true", "Linear"])
def test_spectral_on_transformer_covers_the_prior_layers_and_works_on_out_proj(spectral):
    """``spectral=True`` is every prior row (no LayerNorm); attention reads ``out_proj.weight``
    without calling ``out_proj`` (a forward hook never ran there): a parametrization."""
    torch.manual_seed(0)
    model = TokenClassifier()
    bn = bs.bayesian(model, {nn.Linear: frechet}, spectral=spectral, num_data=6)
    linear = [f"{ATTN}.out_proj", "encoder.layers.0.linear1", "encoder.layers.0.linear2",
              "head"]
    assert sorted(bn.spectral_layers) == sorted(linear)  # no LayerNorm, no embedding
    assert bn.prior_sites[f"{ATTN}.out_proj"] == f"net.{ATTN}.out_proj.spectral_s"
    x, y = tokens()
    # at construction U diag(s) V^T are the module's weights: the network is the module
    assert torch.allclose(bn.deterministic_forward(x), model(x), atol=1e-5)
    values = map_fit(bn, x, y, steps=4)
    out_proj = bn.net.encoder.layers[0].self_attn.out_proj
    s = values[f"net.{ATTN}.out_proj.spectral_s"]
    f = out_proj.spectral
    hand = (f.u.weight * s) @ f.v.weight.T
    eff = read(bn, values, lambda net: net.encoder.layers[0].self_attn.out_proj.weight)
    assert torch.allclose(eff, hand, atol=1e-6)
    # and attention uses it: a plain copy with the fitted weights gives the same output
    plain = copy.deepcopy(model)
    state = dict(bn.net.named_parameters())
    with torch.no_grad():
        for name, p in plain.named_parameters():
            if name in state:
                p.copy_(state[name])
        for row in linear:
            w = read(bn, values, lambda net, _r=row: net.get_submodule(_r).weight)
            plain.get_submodule(row).weight.copy_(w)
    out = bn.deterministic_forward(x, values)
    assert torch.allclose(out, plain(x), atol=1e-5)


def test_spectral_on_split_qkv_rows():
    torch.manual_seed(0)
    model = TokenClassifier()
    bn = bs.bayesian(model, {nn.MultiheadAttention: frechet}, spectral=True)
    assert sorted(bn.prior_sites.values()) == sorted(
        f"net.{ATTN}.in_proj_weight[{p}]_spectral_s" for p in "qkv")
    x, _ = tokens()
    assert torch.allclose(bn.deterministic_forward(x), model(x), atol=1e-5)


def test_tracked_true_covers_only_prior_layers():
    torch.manual_seed(0)
    model = TokenClassifier()
    gauss = lambda s: GaussianSpectrum(1.0, s, measure="penalty")  # noqa: E731
    bn = bs.bayesian(model, {"head": gauss, f"{ATTN}.in_proj_weight[k]": gauss}, tracked=True)
    buffers = sorted(k for k, _ in bn.named_buffers() if "power_iteration" in k)
    assert buffers == [f"net.{ATTN}.in_proj_weight[k]_power_iteration.u",
                       "net.head.power_iteration.u"]
    assert sorted(bn.tracked_layers) == [f"{ATTN}.in_proj_weight[k]", "head"]
    x, y = tokens()
    _, sites = sample_sites(bn, x, y)
    assert sorted(sites) == sorted([f"net.{ATTN}.in_proj_weight[k]", "net.head.weight"])


def test_selection_errors_name_the_rows():
    with pytest.raises(ValueError, match="has no prior"):
        bs.bayesian(TokenClassifier(), {"head": frechet}, spectral=f"{ATTN}.out_proj")
    with pytest.raises(ValueError, match=r"matches no layer.*in_proj_weight\[q\]"):
        bs.bayesian(TokenClassifier(), {"attn": frechet})
    with pytest.raises(ValueError, match="rank enumeration needs the `weight`"):
        from bayes_spectral.distributions import SpikeAndSlabSpectrum
        bs.bayesian(TokenClassifier(),
                    {f"{ATTN}.in_proj_weight[q]": SpikeAndSlabSpectrum(0.3, 0.01, 1.0, (8, 8))},
                    enumerate_rank=True)


# --- back to a plain module -------------------------------------------------------------


@pytest.mark.parametrize("case", ["qkv", "spectral", "tied", "lstm"])
def test_freeze_slots_gives_plain_parameters_with_the_network_forward(case):
    """A copy of ``bn.net`` with every site and rewired weight frozen at given values runs
    outside Pyro and equals the network's forward at those values; ties stay one Parameter;
    the network it was copied from is unchanged."""
    from bayes_spectral.bnn.slots import freeze_slots

    torch.manual_seed(0)
    model, priors, kw, x = {
        "qkv": (TokenClassifier(), {nn.MultiheadAttention: normal(1.0)}, {}, tokens()[0]),
        "spectral": (TokenClassifier(), {nn.Linear: frechet, f"{ATTN}.in_proj_weight[v]": frechet},
                     {"spectral": True}, tokens()[0]),
        "tied": (TiedLM(), {"emb": normal(1.0)}, {}, torch.randint(0, 7, (5, 4))),
        "lstm": (Recurrent(nn.LSTM), {nn.LSTM: normal(1.0)}, {}, torch.randn(4, 3, 4)),
    }[case]
    bn = bs.bayesian(model, priors, **kw)
    values = {k: v * 1.1 if k.endswith("spectral_s") else v + 0.05 * torch.randn_like(v)
              for k, v in bn.initial_values().items()}
    expected = bn.deterministic_forward(x, values)
    net = copy.deepcopy(bn.net)
    freeze_slots(net, values)
    assert not any(isinstance(p, (torch.nn.utils.parametrize.ParametrizationList))
                   for p in net.modules())
    assert torch.allclose(net(x), expected, atol=1e-6)
    assert torch.allclose(bn.deterministic_forward(x, values), expected)  # source untouched
    if case == "tied":
        assert net.emb.weight is net.head.weight
    if case == "qkv":
        names = dict(net.named_parameters())
        assert f"{ATTN}.in_proj_weight" in names and f"{ATTN}.in_proj_weight[q]" not in names


def test_fit_map_on_integer_tokens_with_attention_and_embedding_priors():
    """``bs.fit`` end to end: token ids stay integer, the Q/K/V and embedding sites train."""
    torch.manual_seed(0)
    bn = bs.bayesian(TokenClassifier(), {nn.MultiheadAttention: normal(1.0),
                                         nn.Embedding: normal(1.0)}, num_data=24)
    x, y = tokens(24)
    before = {k: v.clone() for k, v in bn.initial_values().items()}
    res = bs.fit(bn, (x, y), "map", epochs=3, batch_size=8, lr=1e-2, progress=False, seed=0)
    assert res.history["loss"][-1] < res.history["loss"][0]
    values = bs.map_values(res)
    assert sorted(values) == sorted([f"net.{ATTN}.in_proj_weight[{p}]" for p in "qkv"]
                                    + ["net.emb.weight"])
    assert all(not torch.equal(values[k], before[k]) for k in values)
    assert 0.0 <= res.evaluate(x, y).accuracy <= 1.0


def test_key_precedence_row_name_over_module_name_over_regex_over_type():
    a, b, c, d = normal(1.0), normal(2.0), normal(3.0), normal(4.0)
    bn = bs.bayesian(TokenClassifier(), {nn.Linear: a, ATTN: b, f"{ATTN}.in_proj_weight[v]": c,
                                         r"encoder\.layers\.0\.linear\d": d, "head.weight": None})
    scale = {n: float(p.base_dist.scale.flatten()[0]) for n, p in bn._priors.items()}
    assert scale == {f"{ATTN}.in_proj_weight[q]": 2.0, f"{ATTN}.in_proj_weight[k]": 2.0,
                     f"{ATTN}.in_proj_weight[v]": 3.0, f"{ATTN}.out_proj": 1.0,
                     "encoder.layers.0.linear1": 4.0, "encoder.layers.0.linear2": 4.0}
