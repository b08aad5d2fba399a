"""The fused rank-one penalties' batched fallback (issue 20: small nets are dispatch-bound).

``Regularizer(..., batch=True)`` runs the unhooked rows' fused step (Frechet prior, stable
rank, spectral norm block=2) in one batched pass over a zero-padded stack of the weights
instead of one row at a time. It must equal the per-row path (``batch=False``) to rounding
(float64: value, gradient and state within 1e-12 relative), resume bit for bit, and read
nothing back from the device.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from bayes_spectral import penalties as P
from bayes_spectral.penalties import fused as F
from bayes_spectral.penalties import rank_one as RO

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import test_own_models as om  # noqa: E402

PENS = {
    "frechet": lambda **kw: P.FrechetPrior(2.0, 1.0, 0.5, coef=1e-2, mode="fused", **kw),
    "stable_rank": lambda **kw: P.StableRank(coef=1e-2, mode="fused", **kw),
    "spectral_block2": lambda **kw: P.SpectralNorm(1e-2, mode="fused", block=2, **kw),
    "spectral": lambda **kw: P.SpectralNorm(1e-2, mode="fused", **kw),  # one vector
}
NETS = {
    "transformer": (om.TokenTransformer, lambda g: torch.randint(0, 10, (16, 6), generator=g),
                    2),
    "lstm": (lambda: om.Recurrent(nn.LSTM), lambda g: torch.rand(16, 8, 8, generator=g), 10),
    "dropout_mlp": (om.dropout_mlp, lambda g: torch.rand(16, 64, generator=g), 10),
    "regression": (om.regression_mlp, lambda g: torch.rand(16, 1, generator=g), 1),
}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _reg(model, pen, batch, every=1, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rows with too few eigenvalues left out
        return P.Regularizer(model, pen(**kw), log=False, every=every, batch=batch)


def _run(net: str, pen: str, batch: bool, steps: int, every: int = 1, fuse_min=65536,
         model=None, reg_state=None, start: int = 0):
    """``steps`` SGD steps in float64 through ``accumulate_grad``; returns the values, the
    gradients after each accumulate, the model and the Regularizer."""
    make, data, out = NETS[net]
    if model is None:
        torch.manual_seed(0)
        model = make().double()
    reg = _reg(model, PENS[pen], batch, every, fuse_min=fuse_min)
    if reg_state is not None:
        reg.load_state_dict(reg_state)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)  # stateless: resumes from the model
    values, grads = [], []
    for t in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + t)
        x = data(g)
        x = x.double() if x.is_floating_point() else x
        y = torch.randn(x.shape[0], out, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x).reshape(y.shape), y).backward()
        values.append(reg.accumulate_grad(scale=0.7))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                      if p.grad is not None})
        opt.step()
    return values, grads, model, reg


def _states(reg) -> dict[str, torch.Tensor]:
    return {k: v["v"] for k, v in reg.state_dict()["penalties"][0]["state"]["layers"].items()
            if "v" in v}


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("pen", sorted(PENS))
@pytest.mark.parametrize("net", sorted(NETS))
def test_batched_equals_per_row(net, pen, every):
    """Values, every parameter's gradient and the layers' blocks of 6 steps equal the
    per-row path within 1e-12 relative (float64); attention q/k/v slices, out_proj,
    linear1/2, the head, LSTM matrices and shapes padded together."""
    va, ga, _, ra = _run(net, pen, False, 6, every)
    vb, gb, _, rb = _run(net, pen, True, 6, every)
    for a, b in zip(va, vb, strict=True):
        assert _rel(b, a) <= 1e-12, (a, b)
    for da, db in zip(ga, gb, strict=True):
        assert da.keys() == db.keys()
        for k in da:
            assert _rel(db[k], da[k]) <= 1e-12, k
    sa, sb = _states(ra), _states(rb)
    assert sa.keys() == sb.keys() and len(sa) >= 2
    for k in sa:
        assert sb[k].shape == sa[k].shape
        # a rank-one row (1 x n): the second block vector is rounding noise in W's null
        # space (any unit vector orthogonal to the first), so only the first is compared
        rows = 1 if min(ra.layers[k].shape) == 1 or sa[k].dim() == 1 else 2
        assert _rel(sb[k][:rows], sa[k][:rows]) <= 1e-12, k


def test_batched_mixes_with_hooked_rows():
    """fuse_min=0 on the transformer: linear1/2 and the head are hooked (out_proj is hooked
    but never fires: attention reads its weight directly), the rest batched; equal to the
    per-row path."""
    va, ga, _, ra = _run("transformer", "frechet", False, 5, fuse_min=0)
    vb, gb, _, rb = _run("transformer", "frechet", True, 5, fuse_min=0)
    assert ra.fused and ra.fused == rb.fused
    for a, b in zip(va, vb, strict=True):
        assert _rel(b, a) <= 1e-12
    for da, db in zip(ga, gb, strict=True):
        for k in da:
            assert _rel(db[k], da[k]) <= 1e-12, k


@pytest.fixture
def per_row_calls(monkeypatch) -> list:
    """The names of the rows that went through a per-row step (``_fused_grad``, the spectral
    norm's ``_vector_grad``)."""
    calls = []

    def spy_on(orig):
        def spy(self, *a, **k):
            calls.append(a[2])
            return orig(self, *a, **k)
        return spy

    for cls, attr in ((F.RankOneFused, "_fused_grad"), (P.SpectralNorm, "_vector_grad")):
        monkeypatch.setattr(cls, attr, spy_on(getattr(cls, attr)))
    return calls


def test_batched_path_is_taken(per_row_calls):
    """With batch=True no unhooked row goes through the per-row step."""
    calls = per_row_calls
    for pen in ("stable_rank", "spectral"):
        _run("transformer", pen, True, 2)
        assert calls == []
        _run("transformer", pen, False, 1)
        assert len(calls) == 8
        calls.clear()


def test_flattened_conv_joins_pooled_conv_does_not():
    """ResCNN: conv="flatten" kernels are batched with the head and equal the per-row path;
    with conv="pool" (Frechet default) the kernels keep the fast mode's block."""
    for conv in ("flatten", "pool"):
        out = []
        for batch in (False, True):
            torch.manual_seed(0)
            model = om.ResCNN().double()
            reg = _reg(model, lambda c=conv, **kw: P.FrechetPrior(2.0, 1.0, 0.5, coef=1e-2,
                                                                  mode="fused", conv=c, **kw),
                       batch)
            x = torch.rand(8, 1, 8, 8, dtype=torch.float64)
            vals = []
            for _ in range(3):
                model.zero_grad(set_to_none=True)
                model(x).square().mean().backward()
                vals.append(reg.accumulate_grad())
            out.append((vals, {n: p.grad.clone() for n, p in model.named_parameters()
                               if p.grad is not None}))
        (va, ga), (vb, gb) = out
        for a, b in zip(va, vb, strict=True):
            assert _rel(b, a) <= 1e-12, conv
        for k in ga:
            assert _rel(gb[k], ga[k]) <= 1e-12, (conv, k)


@pytest.mark.parametrize("pen", ["frechet", "spectral"])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("net", ["transformer", "lstm"])
def test_batched_resume_bit_exact(net, every, pen):
    """4 steps, Regularizer.state_dict, a fresh Regularizer on a copy of the model, 4 more:
    the uninterrupted 8 bit for bit (values, gradients, blocks)."""
    vf, gf, _, rf = _run(net, pen, True, 8, every)
    v1, _, model, r1 = _run(net, pen, True, 4, every)
    state = copy.deepcopy(r1.state_dict())
    r1.remove_hooks()
    v2, g2, _, r2 = _run(net, pen, True, 4, every, model=copy.deepcopy(model),
                         reg_state=state, start=4)
    assert all(torch.equal(a, b) for a, b in zip(vf, v1 + v2, strict=True))
    for da, db in zip(gf[4:], g2, strict=True):
        assert all(torch.equal(da[k], db[k]) for k in da)
    sa, sb = _states(rf), _states(r2)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_batched_resume_equals_per_row_resume():
    """The state written by the batched path resumes the per-row path (and back) to
    rounding: the state stays per layer."""
    _, _, model, r1 = _run("transformer", "stable_rank", True, 3)
    state = r1.state_dict()
    assert all(v.is_contiguous() for v in _states(r1).values())
    va, _, _, _ = _run("transformer", "stable_rank", False, 3, model=copy.deepcopy(model),
                       reg_state=copy.deepcopy(state), start=3)
    vb, _, _, _ = _run("transformer", "stable_rank", True, 3, model=copy.deepcopy(model),
                       reg_state=copy.deepcopy(state), start=3)
    for a, b in zip(va, vb, strict=True):
        assert _rel(b, a) <= 1e-12


@pytest.mark.parametrize("pen", ["frechet", "spectral"])
def test_batched_step_reads_nothing_back_from_the_device(monkeypatch, pen):
    """No host sync: backward, accumulate_grad (log=False, batched) and the optimiser step
    with every tensor-to-Python read raising."""
    torch.manual_seed(0)
    model = om.TokenTransformer()
    reg = _reg(model, PENS[pen], True)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randint(0, 10, (8, 6))
    model(x).square().mean().backward()
    reg.accumulate_grad()  # states created

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        value = reg.accumulate_grad()
        opt.step()
    monkeypatch.undo()
    assert float(value) != 0


def test_batched_helpers_match_single_row_and_keep_padding_zero():
    """orth2_rows / top_ritz_rows / block_step_rows on a zero-padded (L, M, N) stack equal
    orth2 / top_ritz per row (1e-13), and the padded coordinates of the blocks, the
    products and the gradient stay exactly zero."""
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (16, 3), (2, 16), (16, 16)]
    M, N = max(s[0] for s in shapes), max(s[1] for s in shapes)
    ws = [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]
    vs = [RO.orth2(torch.randn(2, s[1], generator=g, dtype=torch.float64)) for s in shapes]
    W = torch.zeros(len(shapes), M, N, dtype=torch.float64)
    V = torch.zeros(len(shapes), 2, N, dtype=torch.float64)
    for i, (w, v) in enumerate(zip(ws, vs, strict=True)):
        W[i, :w.shape[0], :w.shape[1]] = w
        V[i, :, :v.shape[1]] = v
    V2 = RO.orth2_rows(torch.bmm(torch.bmm(V, W.transpose(1, 2)), W))
    RB = torch.bmm(V2, W.transpose(1, 2))
    Y = RO.top_ritz_rows(RB)
    for i, (w, v) in enumerate(zip(ws, vs, strict=True)):
        m, n = w.shape
        v2 = RO.orth2(v @ w.t() @ w)
        assert _rel(V2[i, :, :n], v2) <= 1e-13
        assert torch.count_nonzero(V2[i, :, n:]) == 0
        assert torch.count_nonzero(RB[i, :, m:]) == 0
        y = RO.top_ritz(v2 @ w.t())
        assert _rel(Y[i], y) <= 1e-13
    # the whole step: padded gradient entries exactly zero
    coefs = P.StableRank(coef=1.0, mode="fused")._rank_one_coefs
    delta, lam, total, nxt = RO.block_step_rows(W, V, lambda lam, tot: coefs(lam, tot, 0))
    for i, (m, n) in enumerate(shapes):
        assert torch.count_nonzero(delta[i, m:, :]) == 0
        assert torch.count_nonzero(delta[i, :, n:]) == 0
        assert torch.count_nonzero(nxt[i, :, n:]) == 0
        assert _rel(total[i], ws[i].square().sum()) <= 1e-14


def test_batch_option_checked():
    with pytest.raises(ValueError, match="batch"):
        P.Regularizer(om.dropout_mlp(), PENS["frechet"](), batch="yes")


@pytest.mark.parametrize("pen", ["frechet", "spectral"])
def test_parametrized_rows_read_once_and_equal_per_row(pen):
    """Weight-normed Linears (parametrized rows): the batched Frechet step and the spectral
    norm's per-row steps (3 vectors, under its 4-row minimum) give the per-row path's
    gradients on the originals (1e-12) and read each row's parametrization once per call."""
    from torch.nn.utils.parametrizations import weight_norm

    out = []
    for batch in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(weight_norm(nn.Linear(12, 16)), nn.Tanh(),
                              weight_norm(nn.Linear(16, 16)), nn.Tanh(),
                              weight_norm(nn.Linear(16, 3))).double()
        reg = _reg(model, PENS[pen], batch)
        reads = []
        for i in (0, 2, 4):
            model[i].parametrizations.weight.register_forward_hook(
                lambda *_, i=i, reads=reads: reads.append(i))
        vals = []
        for t in range(3):
            x = torch.rand(8, 12, generator=torch.Generator().manual_seed(t),
                           dtype=torch.float64)
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            reads.clear()
            vals.append(reg.accumulate_grad())
            assert sorted(reads) == [0, 2, 4], (batch, reads)
        out.append((vals, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (va, ga), (vb, gb) = out
    for a, b in zip(va, vb, strict=True):
        assert _rel(b, a) <= 1e-12
    assert ga.keys() == gb.keys() and any("original1" in k for k in ga)
    for k in ga:
        assert _rel(gb[k], ga[k]) <= 1e-12, k


@pytest.mark.parametrize("mode", ["shape", "pad"])
def test_grouped_by_shape_and_frozen_rows(mode):
    """batch="shape" (one stack per exact shape) equals the per-row path too; a frozen row
    (requires_grad=False) counts in the value and gets no .grad on either path."""
    out = []
    for batch in (False, mode):
        torch.manual_seed(0)
        model = om.TokenTransformer().double()
        model.enc.layers[0].linear2.weight.requires_grad_(False)
        reg = _reg(model, PENS["stable_rank"], batch, 2)
        vals = []
        for t in range(4):
            x = torch.randint(0, 10, (8, 6), generator=torch.Generator().manual_seed(t))
            model.zero_grad(set_to_none=True)
            model(x).square().mean().backward()
            vals.append(reg.accumulate_grad())
        assert model.enc.layers[0].linear2.weight.grad is None
        out.append((vals, {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}, _states(reg)))
    (va, ga, sa), (vb, gb, sb) = out
    for a, b in zip(va, vb, strict=True):
        assert _rel(b, a) <= 1e-12
    assert ga.keys() == gb.keys()
    for k in ga:
        assert _rel(gb[k], ga[k]) <= 1e-12, k
    for k in sa:
        assert _rel(sb[k], sa[k]) <= 1e-12, k


def test_single_row_bucket_takes_the_per_row_step(per_row_calls):
    """A bucket of one row (here: the only unhooked row of an MLP whose other layers are
    hooked) goes through the per-row step: it is cheaper there."""
    calls = per_row_calls
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    reg = _reg(model, PENS["frechet"], True, fuse_min=1000)
    assert reg.fused == ["0"]
    model(torch.randn(4, 64)).sum().backward()
    reg.accumulate_grad()
    assert calls == ["0", "2"]
    reg.remove_hooks()


def test_fewer_than_four_vectors_take_their_own_steps(per_row_calls):
    """The spectral norm's one vector batches from 4 rows on (2-3 rows: as fast or faster
    one at a time): the dropout MLP's 2 rows and the LSTM's 3 go row by row, the
    transformer's 8 in one pass."""
    for net, want in (("dropout_mlp", 2), ("lstm", 3), ("transformer", 0)):
        _run(net, "spectral", True, 1)
        assert len(per_row_calls) == want, net
        per_row_calls.clear()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pen", ["frechet", "spectral"])
def test_batched_on_cuda_equals_cpu_without_sync(pen):
    """On CUDA the batched step runs under set_sync_debug_mode("error") (after the first
    call, which creates the states and buckets) and equals the CPU run (float64)."""
    runs = []
    for dev in ("cpu", "cuda"):
        torch.manual_seed(0)
        model = om.TokenTransformer().double().to(dev)
        reg = _reg(model, PENS[pen], True)
        vals = []
        for t in range(3):
            x = torch.randint(0, 10, (8, 6), generator=torch.Generator().manual_seed(t))
            model.zero_grad(set_to_none=True)
            model(x.to(dev)).square().mean().backward()
            if dev == "cuda" and t:
                torch.cuda.set_sync_debug_mode("error")
            try:
                vals.append(reg.accumulate_grad().cpu() if dev == "cpu" else
                            reg.accumulate_grad())
            finally:
                torch.cuda.set_sync_debug_mode("default")
        runs.append(([v.cpu() for v in vals],
                     {n: p.grad.cpu() for n, p in model.named_parameters()
                      if p.grad is not None}))
    (va, ga), (vb, gb) = runs
    for a, b in zip(va, vb, strict=True):
        assert _rel(b, a) <= 1e-12
    for k in ga:
        assert _rel(gb[k], ga[k]) <= 1e-12, k
