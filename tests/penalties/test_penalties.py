"""Penalties: gradients by finite differences, analytic values, schedules, bad input, MAP."""

import math

import pyro
import pyro.distributions as dist
import pytest
import scipy.stats
import torch
from pyro.infer import Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from torch import nn

from bayes_spectral import penalties as P
from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum
from bayes_spectral.spectra.laws import spliced_powerlaw_log_pdf
from bayes_spectral.spectra.powerlaw import fit_powerlaw
from bayes_spectral.spectra.spectrum import esd


@pytest.fixture(autouse=True)
def _float64():
    """Every test here runs in float64 (restored afterwards for the other test modules)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


GEN = torch.Generator().manual_seed(0)
W_MAT = torch.randn(7, 5, generator=GEN, dtype=torch.float64)
W_CONV = torch.randn(4, 3, 2, 2, generator=GEN, dtype=torch.float64)

PENALTIES = {
    "weight_decay": lambda: P.WeightDecay(0.3),
    "l1": lambda: P.L1(0.3),
    "nuclear": lambda: P.NuclearNorm(),
    "schatten3": lambda: P.SchattenNorm(3.0),
    "schatten3_power": lambda: P.SchattenNorm(3.0, power=True),
    "stable_rank": lambda: P.StableRank(),
    "weighted_alpha": lambda: P.WeightedAlpha(),
    "powerlaw_prior": lambda: P.PowerLawPrior(alpha=2.5, tau=0.5, xmin=3.0),
    "frechet_prior": lambda: P.FrechetPrior(concentration=2.0, scale=4.0, tau=0.5),
}


@pytest.mark.parametrize("weight", [W_MAT, W_CONV], ids=["matrix", "conv"])
@pytest.mark.parametrize("key", sorted(PENALTIES))
def test_gradcheck(key, weight):
    pen = PENALTIES[key]()
    w = weight.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pen(x, name="w"), (w,), eps=1e-6, atol=1e-5)


def test_gradcheck_spectral_norm_at_converged_state():
    pen = P.SpectralNorm(coef=0.7)
    for _ in range(300):
        pen(W_MAT, name="w")
    w = W_MAT.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: pen(x, name="w"), (w,), eps=1e-6, atol=1e-5)


def test_analytic_values():
    D = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    torch.testing.assert_close(P.StableRank()(D), torch.tensor(14.0 / 9.0))
    torch.testing.assert_close(P.NuclearNorm(2.0)(W_MAT),
                               2.0 * torch.linalg.matrix_norm(W_MAT, "nuc"))
    torch.testing.assert_close(P.SchattenNorm(2.0)(W_MAT), W_MAT.norm())
    torch.testing.assert_close(P.WeightDecay(0.2)(W_MAT), 0.1 * W_MAT.square().sum())
    torch.testing.assert_close(P.L1(0.2)(W_MAT), 0.2 * W_MAT.abs().sum())
    # conv: pooled over kernel slices by default
    sv = torch.linalg.svdvals(W_CONV.permute(2, 3, 0, 1)).reshape(-1)
    torch.testing.assert_close(P.NuclearNorm()(W_CONV), sv.sum())
    ev = esd(W_MAT)
    fit = fit_powerlaw(ev)
    torch.testing.assert_close(P.WeightedAlpha(3.0)(W_MAT), 3 * fit.alpha * torch.log10(ev[-1]))


def test_spectral_norm_converges_to_svd():
    for W, mat in [(W_MAT, W_MAT), (W_CONV, W_CONV.reshape(4, -1))]:
        pen = P.SpectralNorm(coef=0.5)
        for _ in range(500):
            val = pen(W, name="w")
        smax = torch.linalg.svdvals(mat)[0]
        torch.testing.assert_close(val, 0.25 * smax**2, rtol=1e-8, atol=0)


def test_prior_penalties_are_negative_log_densities():
    ev = esd(W_MAT)
    got = P.PowerLawPrior(alpha=2.5, tau=0.5, xmin=3.0)(W_MAT)
    torch.testing.assert_close(got, -spliced_powerlaw_log_pdf(ev, 2.5, 3.0, 0.5).sum())
    # Frechet against scipy: invweibull on lambda_max, expon(scale=tau) on the rest
    got = P.FrechetPrior(concentration=2.0, scale=4.0, tau=0.5, loc=0.5)(W_MAT)
    e = ev.numpy()
    ref = scipy.stats.invweibull(c=2.0, loc=0.5, scale=4.0).logpdf(e[-1])
    ref += scipy.stats.expon(scale=0.5).logpdf(e[:-1]).sum()
    assert math.isclose(float(got), -ref, rel_tol=1e-12)


@pytest.mark.parametrize("pen", [
    P.PowerLawPrior(alpha=2.5, tau=0.5, xmin=3.0, tracked=True),
    P.PowerLawPrior(alpha=2.5, tau=0.5, xmin_quantile=0.5, tracked=True),
    P.FrechetPrior(concentration=2.0, scale=4.0, tau=0.5, tracked=True),
    P.WeightedAlpha(tracked=True),
], ids=["powerlaw", "powerlaw_q", "frechet", "walpha"])
def test_tracked_equals_exact_on_fixed_weight(pen):
    W = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    exact = type(pen).__new__(type(pen))
    exact.__dict__.update(pen.__dict__)
    exact.tracked = False
    for _ in range(5):
        v = pen(W, name="w")
    torch.testing.assert_close(v, exact(W, name="w"), rtol=1e-9, atol=0)


# ---------------------------------------------------------------- Hessian trace

def _tiny_net_loss(flat, x, y):
    W1, b1, W2 = flat[:12].reshape(4, 3), flat[12:16], flat[16:24].reshape(2, 4)
    out = torch.tanh(x @ W1.T + b1) @ W2.T
    return 0.5 * (out - y).square().sum(-1).mean()


def test_hutchinson_matches_exact_hessian_trace():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)
    flat = torch.randn(24, generator=g).requires_grad_(True)
    H = torch.autograd.functional.hessian(lambda f: _tiny_net_loss(f, x, y), flat)
    exact = torch.trace(H)
    K = 400
    est, samples = P.hutchinson_trace(lambda: _tiny_net_loss(flat, x, y), [flat], num_probes=K,
                                      generator=g, return_samples=True)
    # Var[z^T H z] = 2 (||H||_F^2 - sum_i H_ii^2) for Rademacher z: allow 4 standard errors
    sd = math.sqrt(2 * (H.square().sum() - H.diagonal().square().sum()) / K)
    assert abs(float(est - exact)) < 4 * sd
    assert abs(float(samples.std()) / math.sqrt(K) - sd) < 0.25 * sd


def test_hutchinson_is_differentiable_with_create_graph():
    flat = torch.randn(24, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    x, y = torch.randn(6, 3), torch.randn(6, 2)
    est = P.hutchinson_trace(lambda: _tiny_net_loss(flat, x, y), [flat], num_probes=2,
                             create_graph=True)
    (g,) = torch.autograd.grad(est, flat)
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_deep_linear_closed_form_matches_exact():
    g = torch.Generator().manual_seed(0)
    dims = [3, 4, 5, 2]
    Ws = [torch.randn(dims[i + 1], dims[i], generator=g) for i in range(3)]
    x, y = torch.randn(7, 3, generator=g), torch.randn(7, 2, generator=g)
    sizes = [W.numel() for W in Ws]

    def loss(flat):
        parts = torch.split(flat, sizes)
        out = x
        for p, W in zip(parts, Ws, strict=True):
            out = out @ p.reshape(W.shape).T
        return 0.5 * (out - y).square().sum() / x.shape[0]

    flat = torch.cat([W.reshape(-1) for W in Ws])
    exact = torch.trace(torch.autograd.functional.hessian(loss, flat))
    torch.testing.assert_close(P.deep_linear_hessian_trace(Ws, x), exact)
    # nn.MSELoss() scaling: c = 1/(N d_L)
    torch.testing.assert_close(P.deep_linear_hessian_trace(Ws, x, loss_scale=1 / 14),
                               exact * 7 / 14 * 2)


# ---------------------------------------------------------------- schedules

def test_decayed_exponential_and_floor():
    d = P.Decayed(P.WeightDecay(2.0), every=2, rate=0.5, floor=0.2)
    assert [d.factor(e) for e in (0, 1, 2, 3, 4, 5, 6)] == [1, 1, 0.5, 0.5, 0.25, 0.25, 0.0]
    d.set_epoch(4)
    torch.testing.assert_close(d(W_MAT), 0.25 * W_MAT.square().sum())
    d.set_epoch(6)
    assert float(d(W_MAT)) == 0.0


def test_decayed_polynomial():
    d = P.Decayed(P.L1(), every=3, kind="polynomial", power=2.0)
    assert [d.factor(e) for e in (0, 2, 3, 7)] == [1.0, 1.0, 0.25, 1 / 9]


def test_thresholded_and_composition():
    base = P.WeightDecay(1.0)
    val = float(base(W_MAT))
    assert float(P.Thresholded(base, val - 1)(W_MAT)) == val
    w = W_MAT.clone().requires_grad_(True)
    off = P.Thresholded(base, val + 1)(w)
    assert float(off) == 0.0 and not off.requires_grad  # no gradient while off
    comp = P.Decayed(P.Thresholded(base, val - 1), every=1, rate=0.5)
    net = nn.Sequential(nn.Linear(5, 7))
    net[0].weight.data = W_MAT.T.clone()
    reg = P.Regularizer(net, comp)
    reg.set_epoch(2)
    torch.testing.assert_close(reg(), torch.tensor(val / 4))


# ---------------------------------------------------------------- Regularizer

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act = nn.ReLU()
        self.fc1 = nn.Linear(16, 8)
        self.fc2 = nn.Linear(8, 3)


def test_regularizer_selection_and_log():
    net = _Net().double()
    assert list(P.Regularizer(net, P.WeightDecay()).layers) == ["conv", "fc1", "fc2"]
    assert list(P.Regularizer(net, P.WeightDecay(), types=nn.Linear).layers) == ["fc1", "fc2"]
    assert list(P.Regularizer(net, P.WeightDecay(), names=["fc2"]).layers) == ["fc2"]
    reg = P.Regularizer(net, P.WeightDecay(0.5), pattern=r"^fc\d")
    task = torch.tensor(1.5)
    loss = reg.loss(task)
    exp = 0.25 * (net.fc1.weight.square().sum() + net.fc2.weight.square().sum())
    torch.testing.assert_close(loss, task + exp)
    reg(net)
    assert len(reg.history["fc1"]) == 2
    wd = float(0.25 * net.fc2.weight.detach().square().sum())
    assert reg.history["fc2"][0] == pytest.approx(wd)


def test_regularizer_bad_selection():
    net = _Net()
    with pytest.raises(ValueError, match="unknown layer names.*fc9"):
        P.Regularizer(net, P.WeightDecay(), names=["fc9"])
    with pytest.raises(ValueError, match="matches no layer"):
        P.Regularizer(net, P.WeightDecay(), pattern="decoder")
    with pytest.raises(ValueError, match="without a >= 2-D weight.*act"):
        P.Regularizer(net, P.WeightDecay(), names=["act"])
    with pytest.raises(ValueError, match="no layer of type"):
        P.Regularizer(net, P.WeightDecay(), types=nn.Conv1d)
    with pytest.raises(TypeError):
        P.Regularizer(net, lambda w: w.sum())


def test_non_finite_errors_name_the_layer():
    net = _Net().double()
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc1.*not finite"):
        P.Regularizer(net, P.WeightDecay())()
    net = _Net().double()
    # lambda_max below the Frechet location: log-density -inf, penalty +inf
    reg = P.Regularizer(net, P.FrechetPrior(2.0, 1.0, 1.0, loc=1e6), names=["fc2"])
    with pytest.raises(ValueError, match="Frechet prior penalty of layer 'fc2' is not finite"):
        reg()


def test_too_few_eigenvalues_for_tail_fit():
    with pytest.raises(ValueError, match="too few for the weighted alpha"):
        P.WeightedAlpha()(torch.randn(5, 1), name="head")
    with pytest.raises(ValueError, match="too few"):
        P.WeightedAlpha(min_tail=8)(torch.randn(6, 6), name="head")


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="alpha must be > 1"):
        P.PowerLawPrior(alpha=1.0, tau=1.0, xmin=1.0)
    with pytest.raises(ValueError, match="not both"):
        P.PowerLawPrior(alpha=2.0, tau=1.0, xmin=1.0, xmin_quantile=0.5)
    with pytest.raises(ValueError, match="tau"):
        P.FrechetPrior(2.0, 1.0, tau=0.0)
    with pytest.raises(ValueError, match="Schatten p"):
        P.SchattenNorm(0.0)
    with pytest.raises(ValueError, match="kind"):
        P.Decayed(P.L1(), kind="cosine")


# ---------------------------------------------------------------- MAP equivalence

def _dist_and_penalty(case, shape):
    if case == "powerlaw":
        return (PowerLawSpectrum(2.5, 0.2, event_shape=shape, xmin=2.0),
                P.PowerLawPrior(alpha=2.5, tau=0.2, xmin=2.0))
    if case == "powerlaw_quantile":
        return (PowerLawSpectrum(2.5, 0.2, event_shape=shape, xmin_quantile=0.6),
                P.PowerLawPrior(alpha=2.5, tau=0.2, xmin_quantile=0.6))
    if case == "powerlaw_default_xmin":
        return (PowerLawSpectrum(2.5, 0.2, event_shape=shape),
                P.PowerLawPrior(alpha=2.5, tau=0.2))
    return (FrechetTopEigenvalue(2.0, 3.0, 0.2, event_shape=shape, loc=0.1),
            P.FrechetPrior(concentration=2.0, scale=3.0, tau=0.2, loc=0.1))


CASES = ["powerlaw", "powerlaw_quantile", "powerlaw_default_xmin", "frechet"]


@pytest.mark.parametrize("tracked", [False, True], ids=["exact", "tracked"])
@pytest.mark.parametrize("weight", [W_MAT, W_CONV], ids=["matrix", "conv"])
@pytest.mark.parametrize("case", CASES)
def test_prior_penalty_is_minus_distribution_penalty_log_prob(case, weight, tracked):
    d, pen = _dist_and_penalty(case, tuple(weight.shape))
    pen.tracked = tracked
    w1 = weight.clone().requires_grad_(True)
    w2 = weight.clone().requires_grad_(True)
    v1, v2 = pen(w1, name="w"), -d.penalty_log_prob(w2)
    (g1,) = torch.autograd.grad(v1, w1)
    (g2,) = torch.autograd.grad(v2, w2)
    torch.testing.assert_close(v1, v2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(g1, g2, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("case", CASES)
def test_map_with_autodelta_equals_penalised_loss(case):
    """Pyro MAP gradient == gradient of ``(N/B) * sum_batch CE + penalty`` (float64).

    Pyro scales the likelihood inside ``pyro.plate(size=N, subsample=...)`` by ``N/B``;
    the prior is counted once. Dividing everything by ``N`` gives the familiar
    ``mean_batch CE + penalty / N``.
    """
    pyro.clear_param_store()
    g = torch.Generator().manual_seed(0)
    N, B, d_in, d_out = 50, 10, 6, 3
    prior, pen = _dist_and_penalty(case, (d_out, d_in))
    X, Y = torch.randn(N, d_in, generator=g), torch.randint(0, d_out, (N,), generator=g)
    idx = torch.arange(B) * 3
    W0 = torch.randn(d_out, d_in, generator=g)

    def model():
        w = pyro.sample("w", prior)  # measure="penalty": log_prob = penalty_log_prob
        with pyro.plate("data", N, subsample=idx):
            pyro.sample("y", dist.Categorical(logits=X[idx] @ w.T), obs=Y[idx])

    guide = AutoDelta(model, init_loc_fn=lambda site: W0.clone())
    guide()
    loc = pyro.param("AutoDelta.w")
    loss = Trace_ELBO().differentiable_loss(model, guide)
    (g_pyro,) = torch.autograd.grad(loss, loc)

    w = W0.clone().requires_grad_(True)
    ce = nn.functional.cross_entropy(X[idx] @ w.T, Y[idx], reduction="sum")
    plain = (N / B) * ce + pen(w)
    (g_plain,) = torch.autograd.grad(plain, w)
    torch.testing.assert_close(loss, plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_pyro, g_plain, rtol=1e-6, atol=1e-6)


# -- in-place gradients (accumulate_grad) ------------------------------------------------
GRAD_CASES = {
    **PENALTIES,
    "decayed_spectral_norm": lambda: P.Decayed(P.SpectralNorm(0.7, seed=3), every=1, rate=0.5),
    "thresholded_weight_decay": lambda: P.Thresholded(P.WeightDecay(0.3), threshold=0.1),
}


@pytest.mark.parametrize("weight", [W_MAT, W_CONV], ids=["matrix", "conv"])
@pytest.mark.parametrize("key", sorted(GRAD_CASES))
def test_accumulate_grad_equals_autograd(key, weight):
    """grad += scale dR/dW and the returned scale R equal autograd of scale * R(W), over three
    successive calls (stateful penalties advance identically); float64 to 1e-12."""
    by_autograd, in_place = GRAD_CASES[key](), GRAD_CASES[key]()
    for pen in (by_autograd, in_place):
        pen.set_epoch(1)
    w, gen = weight.clone(), torch.Generator().manual_seed(1)
    for _ in range(3):
        w = w + 0.05 * torch.randn(w.shape, generator=gen)
        leaf = w.clone().requires_grad_(True)
        value = 0.7 * by_autograd(leaf, name="L")
        (expected,) = torch.autograd.grad(value, leaf, allow_unused=True)
        if expected is None:
            expected = torch.zeros_like(w)
        grad = torch.full_like(w, 0.25)  # accumulates onto what is there
        got = in_place.accumulate_grad(w, grad, name="L", scale=0.7)
        assert float(got) == pytest.approx(float(value.detach()), rel=1e-12, abs=1e-14)
        torch.testing.assert_close(grad - 0.25, expected, rtol=1e-10, atol=1e-12)


def test_regularizer_accumulate_grad_equals_penalised_backward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    grads = []
    for mode in ("loss", "in_place"):
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
        model.load_state_dict(net.state_dict())
        reg = P.Regularizer(model, P.SpectralNorm(0.4, seed=1))
        for _ in range(2):  # the power-iteration state advances the same way
            model.zero_grad(set_to_none=True)
            task = nn.functional.cross_entropy(model(x), y)
            if mode == "loss":
                reg.loss(task).backward()
            else:
                task.backward()
                reg.accumulate_grad()
        grads.append([p.grad.clone() for p in model.parameters()])
        logged = reg.history
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert len(logged["0"]) == 2 and logged["0"][-1] > 0


def test_accumulate_grad_names_the_layer_on_non_finite_weight():
    w = W_MAT.clone()
    w[0, 0] = float("nan")
    for pen in (P.WeightDecay(1.0), P.SpectralNorm(1.0), P.StableRank()):
        with pytest.raises(ValueError, match="fc7"):
            pen.accumulate_grad(w, torch.zeros_like(w), name="fc7")


# --- issue 17: the penalties on every weight of the parameter view --------------------------


class _Seq(nn.Module):
    """A transformer encoder layer, an LSTM, a weight_norm Linear and a one-output head."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(12, 2, 16, dropout=0.0)
        self.lstm = nn.LSTM(12, 10)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(10, 9))
        self.head = nn.Linear(9, 1)  # 1 eigenvalue

    def forward(self, x):
        h, _ = self.lstm(self.enc(x))
        return self.head(torch.tanh(self.wn(h))).squeeze(-1)


@pytest.fixture
def seq():
    torch.manual_seed(0)
    return _Seq()


def test_default_selection_skips_a_one_output_head_and_explicit_raises(seq):
    with pytest.warns(UserWarning, match=r"left out 'head' \(1 eigenvalues, the weighted alpha"):
        reg = P.Regularizer(seq, P.WeightedAlpha())
    assert "head" not in reg.layers
    assert "enc.self_attn.in_proj_weight[q]" in reg.layers and "lstm.weight_hh_l0" in reg.layers
    assert dict(reg.left_out)["head"].startswith("1 eigenvalues")
    assert torch.isfinite(reg())
    with pytest.raises(ValueError, match=r"cannot act on: 'head' \(1 eigenvalues"):
        P.Regularizer(seq, P.WeightedAlpha(), names=["head"])
    # through a schedule wrapper too; a penalty needing one eigenvalue keeps the head
    with pytest.warns(UserWarning, match="'head'"):
        P.Regularizer(seq, P.Decayed(P.WeightedAlpha()))
    assert "head" in P.Regularizer(seq, P.SpectralNorm()).layers
    with pytest.warns(UserWarning, match="'head'"):
        assert torch.isfinite(P.WeightedAlpha()(seq))  # Penalty(module): same default


@pytest.mark.parametrize("make", [lambda: P.WeightedAlpha(), lambda: P.SpectralNorm(seed=1)],
                         ids=["weighted_alpha", "spectral_norm"])
def test_attention_and_recurrent_gradients_reach_the_slices(seq, make):
    E = 12
    attn = seq.enc.self_attn
    reg = P.Regularizer(seq, make(), pattern=r"enc\.self_attn.*|lstm")
    assert list(reg.layers) == [
        "enc.self_attn.in_proj_weight[q]", "enc.self_attn.in_proj_weight[k]",
        "enc.self_attn.in_proj_weight[v]", "enc.self_attn.out_proj", "lstm.weight_ih_l0",
        "lstm.weight_hh_l0"]
    total = reg.per_layer()["enc.self_attn.in_proj_weight[q]"]
    (g_view,) = torch.autograd.grad(total, attn.in_proj_weight)
    leaf = attn.in_proj_weight.detach()[:E].clone().requires_grad_(True)
    (g_slice,) = torch.autograd.grad(make()(leaf, name="q"), leaf)
    torch.testing.assert_close(g_view[:E], g_slice, rtol=1e-10, atol=1e-12)
    assert not g_view[E:].any()


@pytest.mark.parametrize("make", [lambda: P.WeightedAlpha(), lambda: P.SpectralNorm(0.4, seed=1),
                                  lambda: P.WeightDecay(0.3)],
                         ids=["weighted_alpha", "spectral_norm", "weight_decay"])
def test_accumulate_grad_on_split_and_parametrized_rows_equals_backward(seq, make):
    x = torch.randn(5, 3, 12)
    grads = []
    for mode in ("loss", "in_place"):
        model = _Seq()
        model.load_state_dict(seq.state_dict())
        reg = P.Regularizer(model, make(), pattern=r"enc\.self_attn.*|lstm.*|wn")
        for _ in range(2):  # stateful penalties advance the same way
            model.zero_grad(set_to_none=True)
            task = model(x).square().mean()
            if mode == "loss":
                reg.loss(task).backward()
            else:
                task.backward()
                reg.accumulate_grad()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert "wn.parametrizations.weight.original1" in grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-9, atol=1e-12, msg=n)


def test_default_selection_leaves_out_parameters_without_a_matrix_rule():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 6), nn.Embedding(10, 6))
    m.register_parameter("pos", nn.Parameter(torch.randn(1, 3, 6)))
    with pytest.warns(UserWarning, match=r"'pos' \(a 3-D parameter that is not a weight"):
        reg = P.Regularizer(m, P.WeightDecay(0.5))
    assert list(reg.layers) == ["0", "1"]  # the Embedding is a weight row too
    torch.testing.assert_close(reg(), 0.25 * (m[0].weight.square().sum()
                                              + m[1].weight.square().sum()))
    assert list(P.Regularizer(m, P.WeightDecay(), names=["pos"]).layers) == ["pos"]
    assert list(P.Regularizer(m, P.WeightDecay(), hide=nn.Embedding, names=["0", "1"]).layers
                ) == ["0"]
