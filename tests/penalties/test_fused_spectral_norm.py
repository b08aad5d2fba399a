"""SpectralNorm(mode="fused"): the power iteration and the penalty gradient ride along with
the nn.Linear layers' own forward/backward, installed by Regularizer's hooks: beside the
GEMMs (fuse="adjacent") or inside them as one extra row (fuse="gemm"); both strategies run
every test taking the ``fuse`` fixture."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from fused_helpers import check_fused_resume, steps_without_host_sync
from fused_helpers import data as _data
from fused_helpers import loss as _loss
from fused_helpers import train as _train
from torch import nn

from bayes_spectral import penalties as P

COEF = 0.3


def _fused(fuse="adjacent", **kw):
    """The fused penalty hooking every Linear (these test layers are below the default
    ``fuse_min``)."""
    return P.SpectralNorm(COEF, mode="fused", fuse_min=0, fuse=fuse, **kw)


@pytest.fixture(params=["adjacent", "gemm"])
def fuse(request):
    """Both strategies: beside the layer's GEMMs (hooks with matrix-vector products while W
    and its gradient are fresh) and inside them (one extra row)."""
    return request.param


def _mlp(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(inplace=True), nn.Linear(48, 32),
                         nn.Tanh(), nn.Linear(32, 5)).to(dtype)


class _Block(nn.Module):
    """A transformer-style MLP block on (B, T, d) inputs, then a head."""

    def __init__(self, d=12, hidden=40, out=3):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)
        self.head = nn.Linear(d, out)

    def forward(self, x):
        x = x + self.fc2(nn.functional.gelu(self.fc1(self.ln(x))))
        return self.head(x)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _vs(reg):
    return {n: st.v.clone() for n, st in reg.penalty._fused.items()}


def test_fixed_weights_gradient_is_the_exact_spectral_norm_gradient(fuse):
    """At fixed weights, after 300 steps of the one-step iteration the fused gradient
    (penalised minus plain gradient) equals autograd of coef/2 ||W||_2^2: cosine >= 0.9999,
    relative error <= 1e-9 (float64; measured <= 8.5e-13 at 300 steps, 1.8e-2 at 50 on the
    layer with the smallest gap)."""
    model = _mlp()
    plain = copy.deepcopy(model)
    x, y = _data()
    reg = P.Regularizer(model, _fused(fuse), log=False)
    assert reg.fused == ["0", "2", "4"]
    for _ in range(300):
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        reg.accumulate_grad()
    model.zero_grad(set_to_none=True)
    _loss(model, x, y).backward()
    value = reg.accumulate_grad()
    _loss(plain, x, y).backward()
    exact = 0.0
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        if not name.endswith("weight"):
            continue
        w = p.detach().clone().requires_grad_(True)
        r = 0.5 * COEF * torch.linalg.matrix_norm(w, 2) ** 2
        (g_exact,) = torch.autograd.grad(r, w)
        exact += float(r.detach())
        g_fused = p.grad - q.grad
        cos = torch.nn.functional.cosine_similarity(g_fused.flatten(), g_exact.flatten(), dim=0)
        assert cos >= 0.9999, (name, float(cos))
        assert float((g_fused - g_exact).norm() / g_exact.norm()) <= 1e-9, name
    assert abs(float(value) - exact) <= 1e-9 * exact


def test_real_gradients_are_plain_plus_exactly_c_u_vT(fuse):
    """One step: input gradient and every bias gradient equal the plain ones (bias to
    round-off: the extra row's bias term is taken back out), every weight gradient is the
    plain one plus coef * (W v)(v)^T = c u v^T with c = coef * sigma, sigma = ||W v||, v the
    right vector fed into the forward; the model's output is unchanged bit for bit."""
    model = _mlp()
    plain = copy.deepcopy(model)
    x, y = _data()
    reg = P.Regularizer(model, _fused(fuse), log=False)
    for _ in range(3):  # advance the vectors off their initial values
        model.zero_grad(set_to_none=True)
        _loss(model, x, y).backward()
        reg.accumulate_grad()
    v_used = _vs(reg)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    out = model(xa)
    ref = plain(xb)
    assert torch.equal(out, ref)
    (out - y).square().mean().backward()
    (ref - y).square().mean().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-13, atol=1e-15)
    for name in ("0", "2", "4"):
        w = getattr(plain, name).weight.detach()
        r = w @ v_used[name]
        expected = getattr(plain, name).weight.grad + COEF * torch.outer(r, v_used[name])
        torch.testing.assert_close(getattr(model, name).weight.grad, expected,
                                   rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(getattr(model, name).bias.grad,
                                   getattr(plain, name).bias.grad, rtol=0, atol=1e-14)
        # the next right vector: one power step, v <- W^T W v / |W^T W v|
        nxt = w.t() @ r
        torch.testing.assert_close(reg.penalty._fused[name].v, nxt / nxt.norm(),
                                   rtol=1e-12, atol=1e-14)


def test_trajectory_matches_the_in_place_path_and_the_unfused_math(fuse):
    """40 SGD steps (lr 0.05, coef 0.3), after 100 iteration steps at the initial weights:
    fused weights within 2e-3 (max abs; measured 9.1e-4) of today's in-place SpectralNorm
    (same iteration, v one step behind), while both are ~2e-2 from the exact-sigma_max
    path (the one-step iteration trails the moving weights); the same fused math without
    hooks (reg.loss path, and accumulate_grad after remove_hooks) within 1e-12."""
    x, y = _data()
    runs = {}
    for kind in ("inplace", "fused", "fused loss", "unhooked"):
        model = _mlp()
        pen = P.SpectralNorm(COEF) if kind == "inplace" else _fused(fuse)
        reg = P.Regularizer(model, pen, log=False)
        if kind == "unhooked":
            reg.remove_hooks()
            assert reg.fused == []
        for _ in range(100):  # converge the vectors at fixed weights (no step)
            if kind in ("fused", "fused loss"):
                model(x).sum().backward()  # hooks: one iteration step
            reg.accumulate_grad(scale=0.0)  # the others: one step, no gradient
        _train(model, reg, 40, x, y, in_place=kind != "fused loss")
        runs[kind] = torch.cat([p.detach().flatten() for p in model.parameters()])
        reg.remove_hooks()
    assert float((runs["fused"] - runs["inplace"]).abs().max()) <= 2e-3
    assert float((runs["fused"] - runs["fused loss"]).abs().max()) <= 1e-12
    assert float((runs["fused"] - runs["unhooked"]).abs().max()) <= 1e-12
    # and the penalty moved the weights: the fused run is far from an unpenalised one
    model = _mlp()
    _train(model, P.Regularizer(model, P.WeightDecay(1e-12), log=False), 40, x, y)
    free = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert float((runs["fused"] - free).abs().max()) >= 1e-2


def test_three_d_inputs_eval_and_no_grad(fuse):
    """(B, T, d) inputs through a transformer-style MLP: outputs bit for bit, gradients plain
    + coef r v^T per layer; eval mode and no_grad inject nothing (vectors unchanged)."""
    torch.manual_seed(0)
    model = _Block().double()
    plain = copy.deepcopy(model)
    reg = P.Regularizer(model, _fused(fuse), log=False)
    assert reg.fused == ["fc1", "fc2", "head"]
    x = torch.randn(4, 7, 12, dtype=torch.float64)
    v0 = {n: reg.penalty._layer(n, getattr(model, n).weight).v.clone() for n in reg.fused}
    model.eval()
    assert torch.equal(model(x), plain(x))
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    assert all(torch.equal(v0[k], v) for k, v in _vs(reg).items())
    out, ref = model(x), plain(x)
    assert out.shape == (4, 7, 3) and torch.equal(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for name in ("fc1", "fc2", "head"):
        lin, lin0 = getattr(model, name), getattr(plain, name)
        r = lin0.weight.detach() @ v0[name]
        torch.testing.assert_close(lin.weight.grad, lin0.weight.grad
                                   + COEF * torch.outer(r, v0[name]), rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(lin.bias.grad, lin0.bias.grad, rtol=0, atol=1e-12)
        assert not torch.equal(reg.penalty._fused[name].v, v0[name])
    torch.testing.assert_close(model.ln.weight.grad, plain.ln.weight.grad, rtol=1e-12,
                               atol=1e-13)


def test_repeated_call_injects_once(fuse):
    """A layer applied twice in one forward injects once (the first call); a forward whose
    graph is dropped without a backward does not block the next step's injection."""
    torch.manual_seed(0)
    lin = nn.Linear(6, 6).double()
    model = nn.Sequential(lin)
    plain = copy.deepcopy(lin)
    reg = P.Regularizer(model, _fused(fuse), log=False)
    v0 = reg.penalty._layer("0", lin.weight).v.clone()
    h = torch.randn(3, 6, dtype=torch.float64)
    lin(lin(h)).sum().backward()
    plain(plain(h)).sum().backward()
    r = plain.weight.detach() @ v0
    torch.testing.assert_close(lin.weight.grad, plain.weight.grad + COEF * torch.outer(r, v0),
                               rtol=1e-12, atol=1e-13)
    reg.accumulate_grad()
    lin(h).sum()
    gc.collect()
    lin.weight.grad = None
    plain.weight.grad = None
    v1 = reg.penalty._fused["0"].v.clone()
    lin(h).sum().backward()
    plain(h).sum().backward()
    r = plain.weight.detach() @ v1
    torch.testing.assert_close(lin.weight.grad, plain.weight.grad + COEF * torch.outer(r, v1),
                               rtol=1e-12, atol=1e-13)


def test_conv_layers_fall_back_to_the_in_place_update(fuse):
    """A conv weight (no hooks) gets the same one-step math by two matrix-vector products
    in accumulate_grad: grad += coef (W v) v^T on its out x (in*k*k) matrix."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).double()
    reg = P.Regularizer(model, _fused(fuse), log=False)
    assert reg.fused == ["2"]
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    model(x).sum().backward()
    g_task = model[0].weight.grad.clone()
    v0 = reg.penalty._layer("0", model[0].weight).v.clone()
    reg.accumulate_grad()
    w = model[0].weight.detach().reshape(4, -1)
    r = w @ v0
    torch.testing.assert_close(model[0].weight.grad.reshape(4, -1),
                               g_task.reshape(4, -1) + COEF * torch.outer(r, v0))


def test_resume_bit_for_bit_through_regularizer_state(fuse):
    saved, r2 = check_fused_resume(lambda: _fused(fuse), _mlp)
    # the in-place state is not a fused one (and back)
    inplace = P.Regularizer(_mlp(), P.SpectralNorm(COEF), log=False)
    inplace.accumulate_grad()
    with pytest.raises(ValueError, match="mode"):
        r2.load_state_dict(inplace.state_dict())
    with pytest.raises(ValueError, match="mode"):
        inplace.load_state_dict(saved["r"])
    r2.remove_hooks()


def test_removing_hooks_restores_plain_behaviour(fuse):
    x, y = _data()
    model = _mlp()
    plain = copy.deepcopy(model)
    with P.Regularizer(model, _fused(fuse), log=False) as reg:
        assert all(len(m._forward_hooks) == 1 for m in model if isinstance(m, nn.Linear))
        _loss(model, x, y).backward()
        twin = copy.deepcopy(model)  # carries the hooks, which leave a copy plain
        twin.zero_grad(set_to_none=True)
        assert torch.equal(twin(x), plain(x))
        _loss(twin, x, y).backward()
        _loss(plain, x, y).backward()
        assert all(torch.equal(a.grad, b.grad)
                   for a, b in zip(twin.parameters(), plain.parameters(), strict=True))
        plain.zero_grad(set_to_none=True)
    assert reg.fused == []
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model)
    assert all(not getattr(p, "_post_accumulate_grad_hooks", None) for p in model.parameters())
    model.zero_grad(set_to_none=True)
    out, ref = model(x), plain(x)
    assert torch.equal(out, ref)
    _loss(model, x, y).backward()
    _loss(plain, x, y).backward()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)
    # a dropped Regularizer takes its hooks with it
    reg2 = P.Regularizer(model, _fused(fuse), log=False)
    assert reg2.fused
    del reg2
    gc.collect()
    assert all(not m._forward_hooks for m in model)


def test_refusals(fuse):
    with pytest.raises(ValueError, match="mode"):
        P.SpectralNorm(COEF, mode="bogus")
    with pytest.raises(ValueError, match="n_iter"):
        _fused(fuse, n_iter=2)
    with pytest.raises(ValueError, match="fuse_min"):
        P.SpectralNorm(COEF, mode="fused", fuse_min=-1)
    with pytest.raises(ValueError, match="fuse must"):
        P.SpectralNorm(COEF, mode="fused", fuse="rows")
    model = _mlp()
    with pytest.raises(ValueError, match="every must be an integer"):
        P.Regularizer(model, _fused(fuse), every=0)
    assert all(not m._forward_hooks for m in model)
    lazy = P.Regularizer(model, _fused(fuse), every=4)  # lazy fused: test_fused_every.py
    assert lazy.fused == ["0", "2", "4"]
    lazy.remove_hooks()
    reg = P.Regularizer(model, _fused(fuse))
    with pytest.raises(ValueError, match="already"):
        P.Regularizer(model, _fused(fuse))
    reg.remove_hooks()


def test_fuse_min_leaves_small_layers_to_accumulate_grad():
    """Default fuse_min=65536: of Linear(784, 96) (75264 entries) and Linear(96, 10) only the
    first is hooked; the head gets the same step in accumulate_grad (plain + coef r v^T)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 96), nn.ReLU(), nn.Linear(96, 10))
    reg = P.Regularizer(model, P.SpectralNorm(COEF, mode="fused"), log=False)
    assert reg.fused == ["0"]
    x = torch.randn(8, 784)
    model(x).sum().backward()
    g_task = model[2].weight.grad.clone()
    v0 = reg.penalty._layer("2", model[2].weight).v.clone()
    reg.accumulate_grad()
    r = model[2].weight.detach() @ v0
    torch.testing.assert_close(model[2].weight.grad, g_task + COEF * torch.outer(r, v0))
    reg.remove_hooks()


def test_fused_step_reads_nothing_back_from_the_device(monkeypatch, fuse):
    """No host sync in a fused step: forward, backward, accumulate_grad (log=False) and the
    optimiser step run with every tensor-to-Python read (item, float, bool, int, tolist)
    raising; hooked and unhooked (two matrix-vector products) layers alike."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 96), nn.ReLU(), nn.Linear(96, 10))
    reg = P.Regularizer(model, P.SpectralNorm(COEF, mode="fused", fuse=fuse), log=False)
    x, y = torch.randn(8, 784), torch.randn(8, 10)
    value = steps_without_host_sync(monkeypatch, model, reg, x, y, 2)
    assert float(value) > 0
    reg.remove_hooks()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fused_on_cuda_equals_cpu_without_sync():
    """Device check (``-m cuda``): 5 fused SGD steps on CUDA (both strategies) equal the CPU
    ones (float64, 1e-10), and steps 2-5 run under
    ``torch.cuda.set_sync_debug_mode("error")``."""
    x, y = _data()
    out = []
    for dev, fuse in (("cpu", "adjacent"), ("cuda", "adjacent"), ("cuda", "gemm")):
        model = _mlp().to(dev)
        reg = P.Regularizer(model, _fused(fuse), log=False)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        xd, yd = x.to(dev), y.to(dev)
        for step in range(5):
            if dev == "cuda" and step == 1:
                torch.cuda.set_sync_debug_mode("error")
            try:
                opt.zero_grad(set_to_none=True)
                _loss(model, xd, yd).backward()
                reg.accumulate_grad()
                opt.step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out.append(torch.cat([p.detach().cpu().flatten() for p in model.parameters()]))
        reg.remove_hooks()
    torch.testing.assert_close(out[1], out[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[2], out[0], rtol=1e-10, atol=1e-12)


def test_adjacent_works_under_activation_checkpointing():
    """fuse="adjacent" through torch.utils.checkpoint (non-reentrant): the recomputed
    forward re-arms the same r = W v, the weight hook adds coef r v^T once."""
    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 40), nn.GELU(), nn.Linear(40, 12)).double()
    plain = copy.deepcopy(model)
    reg = P.Regularizer(model, _fused("adjacent"), log=False)
    v0 = {n: reg.penalty._layer(n, model[int(n)].weight).v.clone() for n in reg.fused}
    x = torch.randn(5, 12, dtype=torch.float64, requires_grad=True)
    checkpoint(model, x, use_reentrant=False).sum().backward()
    plain(x).sum().backward()
    for n in ("0", "2"):
        r = plain[int(n)].weight.detach() @ v0[n]
        torch.testing.assert_close(model[int(n)].weight.grad, plain[int(n)].weight.grad
                                   + COEF * torch.outer(r, v0[n]), rtol=1e-12, atol=1e-13)
    reg.remove_hooks()
