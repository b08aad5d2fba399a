"""bayesian(): prior selection, bad input, data-plate scaling, spectral parameterisation,
spike-and-slab rank enumeration."""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import (
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
    SpikeAndSlabSpectrum,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3)
        self.conv2 = nn.Conv2d(4, 4, 3)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.head(h.flatten(1))


def gauss(shape):
    return GaussianSpectrum(1.0, shape, measure="penalty")


def sites(bn, *args):
    tr = poutine.trace(bn).get_trace(*args)
    return {n: s for n, s in tr.nodes.items() if s["type"] == "sample"}


def test_priors_by_type_name_regex_with_precedence():
    torch.manual_seed(0)
    pl = PowerLawSpectrum(2.0, 0.5, (4, 5))
    bn = bs.bayesian(Net(), {nn.Linear: gauss, "fc2": pl, r"fc\d": gauss, "out": None})
    assert bn.prior_sites == {"fc1": "net.fc1.weight", "fc2": "net.fc2.weight"}
    assert bn._priors["fc2"] is pl  # exact name wins over regex and type
    s = sites(bn, torch.randn(7, 6), torch.randint(0, 3, (7,)))
    assert isinstance(s["net.fc1.weight"]["fn"], GaussianSpectrum)
    assert "net.out.weight" not in s  # deterministic layer
    assert "net.out.weight" in pyro.get_param_store()
    assert "net.fc1.bias" in pyro.get_param_store()


def test_module_is_untouched_and_initial_values_are_its_weights():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    bn = bs.bayesian(net, {nn.Linear: gauss})
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert isinstance(net.fc1, nn.Linear) and not isinstance(net.fc1, pyro.nn.PyroModule)
    init = bn.initial_values()
    assert torch.equal(init["net.fc1.weight"], net.fc1.weight)
    out = bn.deterministic_forward(torch.ones(2, 6))
    assert torch.allclose(out, net(torch.ones(2, 6)))


@pytest.mark.parametrize(
    "priors, err",
    [
        ({"fc3": gauss}, "matches no layer"),
        ({r"conv.*": gauss}, "matches no layer"),
        ({"fc[": gauss}, "neither a layer name nor a valid regular expression"),
        ({nn.Conv2d: gauss}, "no layer of type Conv2d"),
        ({"fc1": PowerLawSpectrum(2.0, 0.5, (5, 5))}, r"layer 'fc1'.*\(5, 5\).*\(5, 6\)"),
        ({nn.Linear: PowerLawSpectrum(2.0, 0.5, (5, 6))}, "layer 'fc2'"),
        ({"fc1": lambda s: PowerLawSpectrum(torch.full((2,), 2.0), 0.5, s)}, "batch shape"),
        ({"fc1": "not a prior"}, "Distribution or a factory"),
    ],
)
def test_bad_priors_raise_clear_errors(priors, err):
    with pytest.raises((ValueError, TypeError), match=err):
        bs.bayesian(Net(), priors)


def test_bad_arguments():
    with pytest.raises(ValueError, match="likelihood"):
        bs.bayesian(Net(), {}, likelihood="poisson")
    with pytest.raises(ValueError, match="noise"):
        bs.bayesian(Net(), {}, likelihood="gaussian", noise=-1.0)
    with pytest.raises(ValueError, match="num_data"):
        bs.bayesian(Net(), {}, num_data=0)
    with pytest.raises(ValueError, match="spectral"):
        bs.bayesian(Net(), {"fc1": gauss}, spectral="nope")
    with pytest.raises(ValueError, match="has no prior"):
        bs.bayesian(Net(), {"fc1": gauss}, spectral="fc2")
    with pytest.raises(TypeError, match="SpikeAndSlabSpectrum"):
        bs.bayesian(Net(), {"fc1": gauss}, enumerate_rank="fc1")
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bs.bayesian(lambda x: x, {})


def test_data_plate_scales_likelihood_by_n_over_b():
    bn = bs.bayesian(Net(), {nn.Linear: gauss}, num_data=100)
    s = sites(bn, torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert s["obs"]["scale"] == pytest.approx(100 / 8)
    assert s["net.fc1.weight"]["scale"] == 1.0  # the prior is not scaled
    bn_full = bs.bayesian(Net(), {nn.Linear: gauss})
    assert sites(bn_full, torch.randn(8, 6), torch.randint(0, 3, (8,)))["obs"]["scale"] == 1.0


def test_conv_net_with_regex_prior_and_factory():
    torch.manual_seed(0)
    bn = bs.bayesian(CNN(), {r"conv\d": lambda s: PowerLawSpectrum(2.0, 0.5, s)}, num_data=50)
    assert sorted(bn.prior_sites) == ["conv1", "conv2"]
    x, y = torch.randn(5, 1, 8, 8), torch.randint(0, 3, (5,))
    s = sites(bn, x, y)
    assert s["net.conv2.weight"]["value"].shape == (4, 4, 3, 3)
    bn.check_data(x, y)
    res = bs.fit(bn, (x, y), "map", epochs=2, batch_size=5, progress=False)
    assert set(res.guide.median()) == {"net.conv1.weight", "net.conv2.weight"}


# --- spectral parameterisation --------------------------------------------------------


def test_singular_value_prior_density():
    base = PowerLawSpectrum(2.5, 0.3, (4, 6))
    prior = bs.SingularValuePrior(base)
    s = torch.tensor([0.2, 1.3, 0.7, 0.05])
    sd = torch.sort(s, descending=True).values
    expected = base._penalty_from_sv(sd) + (math.log(2.0) + torch.log(s)).sum()
    assert torch.allclose(prior.log_prob(s), expected)
    g = GaussianSpectrum(0.5, (4, 6), measure="penalty")
    assert torch.allclose(bs.SingularValuePrior(g).log_prob(s), g._penalty_from_sv(sd))
    assert prior.sample((3,)).shape == (3, 4)
    assert prior.event_shape == (4,)
    with pytest.raises(TypeError):
        bs.SingularValuePrior(pyro.distributions.Normal(0.0, 1.0))


@pytest.mark.parametrize("orthogonal_map", ["cayley", "matrix_exp"])
def test_spectral_layers_reconstruct_and_stay_orthonormal_after_training(orthogonal_map):
    split = bs.data.load_digits()
    x, y = split.x_train[:300], split.y_train[:300]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    bn = bs.bayesian(net, {nn.Linear: lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)},
                     num_data=300, spectral=True, orthogonal_map=orthogonal_map)
    assert bn.prior_sites == {"0": "net.0.spectral_s", "1": "net.2.spectral_s"} or \
        bn.prior_sites == {"0": "net.0.spectral_s", "2": "net.2.spectral_s"}
    # at construction U diag(s) V^T is the module's weight
    w0 = bn.weight_of("0")
    assert torch.allclose(w0, net[0].weight, atol=1e-5)
    s = sites(bn, x[:4], y[:4])
    assert s["net.0.spectral_s"]["value"].shape == (32,)
    assert "net.0.weight" not in s
    res = bs.fit(bn, (x, y), "map", epochs=3, batch_size=50, lr=1e-2, progress=False)
    assert res.history["loss"][-1] < res.history["loss"][0]
    for name, m in (("0", 32), ("2", 10)):
        f = bn.layer(name).spectral
        for q in (f.u.weight, f.v.weight):
            eye = torch.eye(q.shape[1])
            assert (q.T @ q - eye).abs().max() < 1e-5
        s_map = res.guide.median()[bn.prior_sites[name]]
        assert s_map.shape == (m,) and bool((s_map > 0).all())
        # the U, V parameters moved away from their initial SVD
    store = pyro.get_param_store()
    assert any("spectral$$$u" in k for k in store.keys())
    acc = res.evaluate(split.x_test, split.y_test).accuracy
    assert acc > 0.6


def test_spectral_needs_spectral_law():
    prior = {"fc1": pyro.distributions.Normal(0.0, 1.0).expand((5, 6)).to_event(2)}
    bs.bayesian(Net(), prior)  # fine as a plain prior
    with pytest.raises(TypeError, match="spectral law"):
        bs.bayesian(Net(), prior, spectral="fc1")


# --- spike-and-slab indicators, enumerated ---------------------------------------------


def test_enumerated_indicators_sum_out_to_mixture_and_give_rank_posterior():
    torch.manual_seed(0)
    prior = SpikeAndSlabSpectrum(0.3, 0.01, 1.0, (5, 6))
    x, y = torch.randn(12, 6), torch.randint(0, 3, (12,))
    net = Net()
    bn_enum = bs.bayesian(net, {"fc1": prior}, enumerate_rank="fc1", num_data=12)
    bn_plain = bs.bayesian(net, {"fc1": prior}, num_data=12)
    assert bn_enum.enumerated_layers == ["fc1"]
    g_enum, g_plain = bs.auto_delta(bn_enum), bs.auto_delta(bn_plain)
    pyro.clear_param_store()
    loss_enum = TraceEnum_ELBO(max_plate_nesting=1).loss(bn_enum, g_enum, x, y)
    pyro.clear_param_store()
    loss_plain = Trace_ELBO().loss(bn_plain, g_plain, x, y)
    assert loss_enum == pytest.approx(loss_plain, rel=1e-5)
    # fit with enumeration (fit picks TraceEnum_ELBO), then the posterior over the rank
    res = bs.fit(bn_enum, (x, y), "map", epochs=3, batch_size=12, progress=False)
    w = res.guide.median()["net.fc1.weight"]
    rank_post = bn_enum.rank_posterior("fc1", w)
    assert rank_post.shape == (6,)
    assert float(rank_post.sum()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(rank_post, prior.rank_posterior(w), atol=1e-5)
    with pytest.raises(ValueError, match="SpikeAndSlabSpectrum"):
        bn_enum.rank_posterior("fc2")


def test_rank_posterior_finds_low_rank_weight():
    prior = SpikeAndSlabSpectrum(0.5, 0.01, 1.0, (5, 6))
    bn = bs.bayesian(Net(), {"fc1": prior}, enumerate_rank="fc1")
    u, _ = torch.linalg.qr(torch.randn(5, 5))
    v, _ = torch.linalg.qr(torch.randn(6, 5))
    w = (u * torch.tensor([2.0, 1.5, 0.002, 0.001, 0.001])) @ v.T
    post = bn.rank_posterior("fc1", w)
    assert int(post.argmax()) == 2 and float(post[2]) > 0.95


# --- tracked spectra (no SVD per step) ---------------------------------------------------


@pytest.mark.parametrize(
    "base",
    [FrechetTopEigenvalue(2.0, 1.0, 0.5, (20, 30)), GaussianSpectrum(0.3, (20, 30), "penalty")],
)
def test_tracked_prior_matches_exact_penalty_when_converged(base):
    torch.manual_seed(0)
    w = torch.randn(20, 30, requires_grad=True)
    tp = bs.TrackedSpectralPrior(base, bs.PowerIteration((20, 30), n_iter=300))
    lp, exact = tp.log_prob(w), base.penalty_log_prob(w)
    assert torch.allclose(lp, exact, rtol=1e-5)
    (g1,) = torch.autograd.grad(lp, w)
    (g2,) = torch.autograd.grad(base.penalty_log_prob(w), w)
    assert torch.allclose(g1, g2, rtol=1e-3, atol=1e-4)


def test_tracked_layers_train_and_reject_unsupported_priors():
    split = bs.data.load_digits()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    bn = bs.bayesian(net, {nn.Linear: lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)},
                     num_data=len(split.x_train), tracked=True)
    # besides the network's own private "_device_like" (it follows .to() when no parameter
    # is left), the trackers' vectors are the only buffers
    assert sorted(k for k, _ in bn.named_buffers() if not k.startswith("_")) == [
        "net.0.power_iteration.u", "net.2.power_iteration.u"]
    res = bs.fit(bn, split, "map", epochs=6, batch_size=64, progress=False)
    assert res.evaluate(split.x_test, split.y_test).accuracy >= 0.90
    with pytest.raises(TypeError, match="FrechetTopEigenvalue, GaussianSpectrum or"):
        bs.bayesian(Net(), {"fc1": SpikeAndSlabSpectrum(0.5, 0.01, 1.0, (5, 6))}, tracked="fc1")
    with pytest.raises(ValueError, match="measure='penalty'"):
        bs.bayesian(Net(), {"fc1": GaussianSpectrum(1.0, (5, 6))}, tracked="fc1")
    with pytest.raises(ValueError, match="no prior"):
        bs.bayesian(Net(), {}, tracked="fc1")


@pytest.mark.parametrize("kw", [{"xmin": 0.8}, {"xmin_quantile": 0.7}], ids=["xmin", "quantile"])
def test_tracked_powerlaw_prior_equals_exact_penalty(kw):
    """A fresh tracker decomposes fully: value and gradient equal the exact penalty measure
    (float64); a stack of weights (vectorised particles) is refused."""
    torch.manual_seed(0)
    base = PowerLawSpectrum(2.5, 0.5, (20, 30), **kw)
    w = (0.3 * torch.randn(20, 30, dtype=torch.float64)).requires_grad_(True)
    tp = bs.TrackedSpectralPrior(base, bs.bnn.site_priors._tail_penalty_for(base))
    lp, exact = tp.log_prob(w), base.penalty_log_prob(w)
    assert torch.allclose(lp, exact.to(lp), rtol=1e-10)
    (g1,) = torch.autograd.grad(lp, w)
    (g2,) = torch.autograd.grad(base.penalty_log_prob(w), w)
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="one weight matrix per call"):
        tp.log_prob(torch.randn(2, 20, 30, dtype=torch.float64))


def test_tracked_powerlaw_layers_train_track_and_resume_exactly(tmp_path):
    split = bs.data.load_digits()
    x, y = split.x_train[:512], split.y_train[:512]
    # the top 10% as the tail: a block k = need + 8 well below min(m, n) = 64, so the
    # tracker really tracks (no full decomposition per call)
    prior = {"0": PowerLawSpectrum(2.0, 0.5, (128, 64), xmin_quantile=0.9)}

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        return bs.bayesian(net, prior, num_data=len(x), tracked="0")

    # a small learning rate: the tracker follows without drift refreshes, so a resumed run
    # (fresh tracker) would differ if fit()'s checkpoint did not hold the trackers' state
    kw = dict(batch_size=64, lr=2e-3, progress=False, seed=1)
    full = bs.fit(model(), (x, y), "map", epochs=4, **kw)
    a = full.params()  # the global param store: snapshot before the next fit clears it
    acc = full.evaluate(split.x_test, split.y_test).accuracy
    values = bs.map_values(full.guide)
    part = bs.fit(model(), (x, y), "map", epochs=2, checkpoint_dir=tmp_path, **kw)
    assert part.epochs_run == 2
    resumed = bs.fit(model(), (x, y), "map", epochs=4, checkpoint_dir=tmp_path, **kw)
    b = resumed.params()
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit on CPU
    assert acc >= 0.80
    # the tracked log-density still equals the exact one at the trained weights (1e-3)
    bn = full.model
    for layer, site in bn.prior_sites.items():
        w = values[site]
        tracked = bs.TrackedSpectralPrior(bn._priors[layer], bn._tail_penalties[layer])
        exact = bn._priors[layer].penalty_log_prob(w)
        assert torch.allclose(tracked.log_prob(w), exact, rtol=1e-3), layer


# --- the likelihood registry ------------------------------------------------------------


def test_likelihood_registry_lists_builtin_likelihoods():
    from bayes_spectral.bnn.likelihoods import LIKELIHOODS, GaussianLikelihood

    assert LIKELIHOODS.names()[:2] == ["categorical", "gaussian"]
    assert isinstance(LIKELIHOODS.get("gaussian"), GaussianLikelihood)


def test_user_registered_likelihood_is_used_by_name(monkeypatch):
    from bayes_spectral.bnn.likelihoods import LIKELIHOODS, Likelihood

    monkeypatch.setattr(LIKELIHOODS, "_items", dict(LIKELIHOODS._items))  # restored after

    class StudentT(Likelihood):
        """``y ~ StudentT(3, f(x), 0.5)`` for a one-output regression."""

        def prepare_output(self, out, y):
            return out.squeeze(-1)

        def law(self, out, params):
            return pyro.distributions.StudentT(3.0, out, 0.5)

        def check_targets(self, out, y, what):
            if not y.is_floating_point():
                raise TypeError(f"{what}: student-t targets must be floating point")

    LIKELIHOODS.register("student_t")(StudentT())
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 1))
    bn = bs.bayesian(net, {"0": gauss}, likelihood="student_t", num_data=20)
    x, y = torch.randn(10, 6), torch.randn(10)
    tr = poutine.trace(poutine.condition(bn, data=bn.initial_values())).get_trace(x, y)
    obs = tr.nodes["obs"]
    assert obs["scale"] == pytest.approx(20 / 10)
    expected = pyro.distributions.StudentT(3.0, net(x).squeeze(-1), 0.5).log_prob(y)
    assert torch.allclose(obs["fn"].log_prob(y), expected, atol=1e-6)
    bn.check_data(x, y)
    with pytest.raises(TypeError, match="student-t targets"):
        bn.check_data(x, torch.zeros(10, dtype=torch.long))
    res = bs.fit(bn, (x, y), "map", epochs=2, batch_size=10, progress=False)
    assert all(math.isfinite(v) for v in res.history["loss"])
    with pytest.raises(ValueError, match=r"likelihood must be one of \(.*'student_t'\)"):
        bs.bayesian(net, {}, likelihood="poisson")
