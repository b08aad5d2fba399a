"""Resumable training with stateful penalties: ``Regularizer.state_dict()`` carries every
tracker / power-iteration vector / fast-mode block, refresh counter and probe generator,
so a run saved after ``k`` steps (model + optimiser + regulariser through a real file,
``torch.load(weights_only=True)``) and restored into freshly built objects continues
bit for bit as the uninterrupted run (``torch.equal`` on the losses and the weights)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from resume_helpers import Interrupt, stop_after
from torch import nn

import bayes_spectral as bs
from bayes_spectral import penalties as P

STEPS, SAVE_AT = 9, 4  # 4 steps, checkpoint, 5 more (a lazy window and a refresh straddle it)

#: name -> (penalty factory, Regularizer kwargs)
CASES = {
    "weighted alpha tracked": (lambda: P.WeightedAlpha(coef=1e-2, tracked=True, margin=4),
                               {}),
    "power law tracked": (lambda: P.PowerLawPrior(2.5, 0.5, xmin=2.0, coef=1e-3,
                                                  tracked=True), {}),
    "Frechet tracked": (lambda: P.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3, tracked=True), {}),
    "spectral norm": (lambda: P.SpectralNorm(coef=1e-2), {}),
    "weighted alpha fast": (lambda: P.WeightedAlpha(coef=1e-2, estimator="hill", mode="fast",
                                                    refresh=3), {}),
    "power law fast": (lambda: P.PowerLawPrior(2.5, 0.5, xmin=2.0, coef=1e-3, mode="fast"),
                       {}),
    "Frechet fast": (lambda: P.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3, mode="fast"), {}),
    "stable rank fast": (lambda: P.StableRank(coef=1e-2, mode="fast"), {}),
    "decayed spectral norm": (lambda: P.Decayed(P.SpectralNorm(coef=1e-2), rate=0.5), {}),
    "every=3 weight decay": (lambda: P.WeightDecay(1e-2), {"every": 3}),
    "every=3 Frechet tracked": (lambda: P.FrechetPrior(2.0, 1.0, 0.5, coef=1e-3,
                                                       tracked=True), {"every": 3}),
}


def _net(widths=(64, 96, 80, 10), seed=0) -> nn.Sequential:
    """An MLP whose hidden layers carry 4 strong rank-one spikes over the Marchenko-Pastur
    bulk (eigenvalues ~3-7 against a bulk edge <= 1.7): tail trackers then hold a thin block
    (no "wide" refresh on every call) and the power-law tail above ``xmin = 2`` is small."""
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.uniform_(-a ** -0.5, a ** -0.5, generator=g)
            lin.bias.zero_()
            if i < len(widths) - 2:
                u = torch.linalg.qr(torch.randn(b, 4, generator=g)).Q
                v = torch.linalg.qr(torch.randn(a, 4, generator=g)).Q
                lin.weight.add_(u @ torch.diag(torch.tensor([2.6, 2.2, 2.0, 1.8])) @ v.T)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _data(n_in=64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(128, n_in, generator=g), torch.randint(0, 10, (128,), generator=g)


def _build(case, widths=(64, 96, 80, 10), device="cpu"):
    make, kw = CASES[case]
    model = _net(widths).to(device)
    reg = P.Regularizer(model, make(), log=False, **kw)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, reg, opt


def _train(model, reg, opt, steps, path, start=0):
    """``steps`` Adam steps on one batch; the penalty through autograd (``path="loss"``) or
    in place (``"grad"``); returns the losses (task + penalty)."""
    dev = model[0].weight.device
    x, y = (t.to(dev) for t in _data(model[0].in_features))
    out = []
    for t in range(start, start + steps):
        reg.set_epoch(t // 3)
        opt.zero_grad(set_to_none=True)
        task = F.cross_entropy(model(x), y)
        if path == "loss":
            loss = reg.loss(task)
            loss.backward()
        else:
            task.backward()
            loss = task.detach() + reg.accumulate_grad()
        opt.step()
        out.append(loss.detach().clone())
    assert all(bool(torch.isfinite(v)) for v in out)
    return out


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _resumed(case, path, file, device="cpu"):
    """``(full, resumed)``: losses and final weights of the uninterrupted run and of the run
    saved after ``SAVE_AT`` steps to ``file`` and resumed in fresh objects."""
    model, reg, opt = _build(case, device=device)
    full = _train(model, reg, opt, STEPS, path)
    full_w = _weights(model)
    model, reg, opt = _build(case, device=device)
    first = _train(model, reg, opt, SAVE_AT, path)
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(),
                "reg": reg.state_dict()}, file)
    del model, reg, opt
    saved = torch.load(file, weights_only=True, map_location=device)
    model, reg, opt = _build(case, device=device)  # fresh objects, as in a new process
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    reg.load_state_dict(saved["reg"])
    rest = _train(model, reg, opt, STEPS - SAVE_AT, path, start=SAVE_AT)
    return (full, full_w), (first + rest, _weights(model))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", ["spectral norm", "Frechet tracked", "power law fast",
                                  "weighted alpha fast", "Frechet fast"])
def test_resume_on_cuda_equals_the_uninterrupted_run(case, tmp_path):
    """The same on the GPU (probe generators on the device, Cholesky-QR blocks)."""
    (full, full_w), (res, res_w) = _resumed(case, "grad", tmp_path / "ckpt.pt", "cuda")
    assert _same(res, full), case
    assert _same_weights(res_w, full_w), case


@pytest.mark.parametrize("path", ["loss", "grad"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_resumed_run_equals_the_uninterrupted_one(case, path, tmp_path):
    file = tmp_path / "ckpt.pt"
    (full, full_w), (res, res_w) = _resumed(case, path, file)
    assert _same(res, full), case
    assert _same_weights(res_w, full_w), case

    # control: the same resume without the regulariser's state is not the same run (the
    # state this test restores really matters)
    saved = torch.load(file, weights_only=True)
    model, reg, opt = _build(case)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optim"])
    _train(model, reg, opt, STEPS - SAVE_AT, path, start=SAVE_AT)
    assert not _same_weights(_weights(model), full_w), case


def test_tracked_cases_really_track():
    """The tracked penalties' hidden layers are followed by the block iteration (not a full
    decomposition at every call), so their tracker state is what the resume restores."""
    for case in ("weighted alpha tracked", "power law tracked", "Frechet tracked"):
        model, reg, opt = _build(case)
        _train(model, reg, opt, STEPS, "grad")
        for name in ("0", "2"):
            tr = reg.penalty.tracker(name)
            assert tr.num_refreshes < tr.num_calls, (case, name, tr.num_refreshes)


def test_state_holds_only_tensors_and_plain_data(tmp_path):
    """Every leaf of the state is a tensor, an int, a float, a bool or a string: it loads
    with ``weights_only=True`` (no pickled object) and round-trips unchanged."""
    model, reg, opt = _build("weighted alpha fast")
    _train(model, reg, opt, 2, "grad")
    state = reg.state_dict()

    def leaves(x):
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                yield from leaves(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                yield from leaves(v)
        else:
            yield x

    assert all(isinstance(v, (torch.Tensor, int, float, bool, str)) for v in leaves(state))
    torch.save(state, tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    other = _build("weighted alpha fast")[1]
    other.load_state_dict(back)
    again = other.state_dict()
    flat_a, flat_b = list(leaves(state)), list(leaves(again))
    assert len(flat_a) == len(flat_b)
    for a, b in zip(flat_a, flat_b, strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_safetensors_round_trip(tmp_path):
    """``flatten_state`` gives safetensors' ``{name: tensor}`` plus JSON-able metadata;
    ``unflatten_state`` restores the state, and the resumed run is still bit for bit."""
    from safetensors.torch import load_file, save_file

    from bayes_spectral.penalties.state import flatten_state, unflatten_state

    case, path = "power law fast", "grad"
    model, reg, opt = _build(case)
    full = _train(model, reg, opt, STEPS, path)
    model, reg, opt = _build(case)
    first = _train(model, reg, opt, SAVE_AT, path)
    tensors, meta = flatten_state(reg.state_dict())
    save_file(tensors, tmp_path / "reg.safetensors", metadata=meta)
    opt_state, model_state = opt.state_dict(), _weights(model)
    model, reg, opt = _build(case)
    model.load_state_dict(model_state)
    opt.load_state_dict(opt_state)
    from safetensors import safe_open
    with safe_open(tmp_path / "reg.safetensors", "pt") as fh:
        meta_back = fh.metadata()
    reg.load_state_dict(unflatten_state(load_file(tmp_path / "reg.safetensors"), meta_back))
    rest = _train(model, reg, opt, STEPS - SAVE_AT, path, start=SAVE_AT)
    assert _same(first + rest, full)


# --- mismatches: a clear ValueError naming what differs ---------------------------------

def _state(case="spectral norm", widths=(64, 96, 80, 10)):
    model, reg, opt = _build(case, widths)
    _train(model, reg, opt, 2, "grad")
    return reg.state_dict()


def test_state_of_a_net_with_other_widths_is_refused():
    state = _state(widths=(64, 96, 72, 10))  # layers "2" and "4" have other shapes
    reg = _build("spectral norm")[1]
    with pytest.raises(ValueError, match=r"layer '2'.*\(72, 96\).*\(80, 96\)"):
        reg.load_state_dict(state)


def test_state_of_other_layers_is_refused():
    state = _state()
    make, _ = CASES["spectral norm"]
    model = _net()
    reg = P.Regularizer(model, make(), names=["0", "2"], log=False)
    with pytest.raises(ValueError, match=r"layer '4'.*not selected"):
        reg.load_state_dict(state)


@pytest.mark.parametrize("saved, here, match", [
    ("spectral norm", "weighted alpha tracked", r"penalty 0.*SpectralNorm.*WeightedAlpha"),
    ("decayed spectral norm", "spectral norm", r"penalty 0.*Decayed.*SpectralNorm"),
    ("weighted alpha tracked", "weighted alpha fast", r"penalty 0.*WeightedAlpha.*mode.*"
                                                      r"'tracked'.*'fast'"),
])
def test_state_of_another_penalty_is_refused(saved, here, match):
    state = _state(saved)
    reg = _build(here)[1]
    with pytest.raises(ValueError, match=match):
        reg.load_state_dict(state)


def test_counter_only_state_into_a_stateful_penalty_is_refused():
    """A state without the penalty's part (``{"calls": c}``, as saved before it was
    included) would silently restart the trackers: refused, naming the penalty."""
    reg = _build("spectral norm")[1]
    with pytest.raises(ValueError, match=r"SpectralNorm.*no penalty state"):
        reg.load_state_dict({"calls": 4})
    plain = _build("every=3 weight decay")[1]
    plain.load_state_dict({"calls": 4})  # a stateless penalty: the counter is all there is
    assert plain.calls == 4


def test_failed_load_changes_nothing():
    model, reg, opt = _build("spectral norm")
    _train(model, reg, opt, 2, "grad")
    before = reg.state_dict()
    bad = _state(widths=(64, 96, 72, 10))
    with pytest.raises(ValueError):
        reg.load_state_dict(bad)
    after = reg.state_dict()
    assert after["calls"] == before["calls"]
    for name, st in before["penalties"][0]["state"]["layers"].items():
        assert torch.equal(st["u"], after["penalties"][0]["state"]["layers"][name]["u"])


# --- the Bayesian-network path ------------------------------------------------------------

@pytest.mark.parametrize("method, mode", [("map", "tracked"), ("svi", "tracked"),
                                          ("map", "fast")])
def test_fit_tracked_priors_resume_bit_for_bit(tmp_path, method, mode):
    """``fit(..., tracked=True)``: a tracked power-law prior (tail tracker, saved in the
    checkpoint) and a tracked Frechet prior (power-iteration buffer, saved with
    the model), or both in ``tracked_mode="fast"`` (block iterations and probe generator,
    saved too): stopped after epoch 2 and resumed from the file, equal to the
    uninterrupted run bit for bit."""
    from bayes_spectral.distributions import FrechetTopEigenvalue, PowerLawSpectrum

    digits = bs.data.load_digits()
    x, y = digits.x_train[:192], digits.y_train[:192]

    def model():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
        priors = {"0": PowerLawSpectrum(2.5, 0.05, (96, 64), xmin=0.2),
                  "2": FrechetTopEigenvalue(2.0, 1.0, 0.5, (10, 96))}
        return bs.bayesian(net, priors, num_data=len(x), tracked=True, tracked_mode=mode)

    kw = dict(epochs=4, batch_size=64, lr=2e-3, progress=False, seed=2)
    full = bs.fit(model(), (x, y), method, checkpoint_dir=tmp_path / "a", **kw)
    a = full.params()

    with pytest.raises(Interrupt):
        bs.fit(model(), (x, y), method, checkpoint_dir=tmp_path / "b",
               callbacks=[stop_after(2)], **kw)
    assert os.path.exists(tmp_path / "b" / "checkpoint.pt")
    resumed = bs.fit(model(), (x, y), method, checkpoint_dir=tmp_path / "b", **kw)
    b = resumed.params()
    assert resumed.history["loss"] == full.history["loss"]
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_of_another_block_width_is_refused():
    """A fast-mode block saved with ``block=8`` cannot seed a ``block=4`` penalty."""
    state = _state("stable rank fast")
    reg = P.Regularizer(_net(), P.StableRank(coef=1e-2, mode="fast", block=4), log=False)
    with pytest.raises(ValueError, match=r"penalty 0 \(StableRank\).*layer '0'.*block=4"):
        reg.load_state_dict(state)
