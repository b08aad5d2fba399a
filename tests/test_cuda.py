"""Device checks (``-m cuda``; skipped without CUDA, run by ``benchmarks/gpu_check.py``):
spectra, penalty gradients and a MAP fit on CUDA equal the CPU ones; the skipped calls of
a lazy Regularizer make no host sync."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral import penalties as P
from bayes_spectral.distributions import FrechetTopEigenvalue
from bayes_spectral.spectra.spectrum import esd, singular_values

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

PENALTIES = {
    "weight decay": lambda: P.WeightDecay(1e-2),
    "spectral norm": lambda: P.SpectralNorm(1e-2, n_iter=50),
    "weighted alpha exact": lambda: P.WeightedAlpha(1e-2),
    "weighted alpha tracked": lambda: P.WeightedAlpha(1e-2, tracked=True),
    "power-law prior": lambda: P.PowerLawPrior(3.0, 0.05, xmin_quantile=0.8, coef=1e-2),
    "Frechet prior tracked": lambda: P.FrechetPrior(2.0, 1.0, 0.05, coef=1e-2, tracked=True),
}


def net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, 48), nn.ReLU(), nn.Linear(48, 32)).double()


def test_spectra_on_cuda_equal_cpu():
    torch.manual_seed(0)
    for w, batch in ((torch.randn(64, 96, dtype=torch.float64), False),
                     (torch.randn(3, 64, 96, dtype=torch.float64), True)):
        for fn in (esd, singular_values):
            cpu, gpu = fn(w, batch=batch), fn(w.cuda(), batch=batch).cpu()
            torch.testing.assert_close(gpu, cpu, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", sorted(PENALTIES))
@pytest.mark.parametrize("every", [1, 4])
def test_penalty_gradient_on_cuda_equals_cpu(name, every):
    out = {}
    for dev in ("cpu", "cuda"):
        model = net().to(dev)
        reg = P.Regularizer(model, PENALTIES[name](), log=False, every=every)
        vals = [reg.accumulate_grad() for _ in range(every)]
        assert all(v.device.type == dev for v in vals)
        out[dev] = (torch.stack(vals).sum().cpu(),
                    [p.grad.cpu() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-5, atol=1e-8)
    for a, b in zip(out["cuda"][1], out["cpu"][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_lazy_skipped_calls_make_no_host_sync():
    model = net().cuda()
    reg = P.Regularizer(model, P.WeightedAlpha(1e-2, tracked=True), log=False, every=4)
    reg.accumulate_grad()  # call 0, due: may sync (tracker decisions, logging off)
    torch.cuda.synchronize()
    loss = torch.zeros((), device="cuda", dtype=torch.float64)
    torch.cuda.set_sync_debug_mode("error")
    try:  # calls 1, 2, 3: the skipped ones, through each entry point (every call counts)
        skipped = [reg.accumulate_grad(), reg(), reg.loss(loss)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(float(v) == 0.0 for v in skipped)
    assert reg.calls % reg.every == 0  # call 4 is due again (the window had 3 skipped calls)


def test_map_fit_on_cuda_runs_and_to_module_equals_predict():
    torch.manual_seed(0)
    x, y = torch.randn(200, 10), torch.randint(0, 3, (200,))
    mlp = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    bn = bs.bayesian(mlp, {nn.Linear: lambda s: FrechetTopEigenvalue(2.0, 1.0, 0.5, s)},
                     num_data=200, tracked=True)
    res = bs.fit(bn, (x, y), "map", epochs=2, batch_size=50, device="cuda", progress=False,
                 prior_every=2)
    assert next(bn.parameters()).device.type == "cuda"
    probs = res.predict(x)[0].cpu()
    module = res.to_module()
    dev = next(module.parameters()).device
    with torch.no_grad():
        logits = module(x.to(dev)).cpu()
    torch.testing.assert_close(logits.softmax(-1), probs, rtol=1e-5, atol=1e-6)
