"""float64 models end to end (SVI and MAP): ``fit`` keeps the model's dtype unless ``dtype=``
is given, ``predict`` / ``evaluate`` / ``to_module`` / ``to_inference_data`` run in it, and
float32 models are unchanged. The pointwise log-likelihood of ``to_inference_data`` for a
MAP fit equals ``log`` of ``predict``'s probability of the observed class (1e-12 in float64,
1e-5 in float32)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import bayes_spectral as bs
from bayes_spectral.distributions import PowerLawSpectrum

PRIOR = {nn.Linear: lambda s: PowerLawSpectrum(2.0, 0.5, s)}


def _data(dtype, n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def _bn(dtype):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)).to(dtype)
    return bs.bayesian(net, PRIOR, num_data=64)


def _loglik(idata) -> np.ndarray:
    return np.asarray(idata["log_likelihood"]["y"].values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("method", ["svi", "map"])
def test_the_models_dtype_end_to_end(method, dtype):
    x, y = _data(dtype)
    bn = _bn(dtype)
    res = bs.fit(bn, (x, y), method, epochs=2, batch_size=32, lr=0.05, progress=False,
                 val_data=(x, y))
    assert all(p.dtype == dtype for p in bn.parameters())
    probs = res.predict(x, 4)
    assert probs.dtype == dtype
    assert res.evaluate(x, y, 4).accuracy > 0.5
    module = res.to_module()
    assert all(p.dtype == dtype for p in module.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MAP: "holds one draw"
        idata = bs.to_inference_data(res, (x, y), num_samples=4)
    ll = _loglik(idata)
    assert ll.shape == ((1, 4, 64) if method == "svi" else (1, 1, 64))
    assert np.isfinite(ll).all()
    if method == "map":
        p_obs = probs[0, torch.arange(64), y].double().log().numpy()
        tol = 1e-12 if dtype == torch.float64 else 1e-5
        np.testing.assert_allclose(ll[0, 0], p_obs, atol=tol, rtol=tol)


def test_float32_data_on_a_float64_result_and_explicit_dtype():
    """Inputs of another floating dtype are cast to the result's (predict and
    to_inference_data alike); ``dtype=`` still converts the model."""
    x64, y = _data(torch.float64)
    res = bs.fit(_bn(torch.float64), (x64, y), "svi", epochs=1, batch_size=32,
                 progress=False)
    idata = bs.to_inference_data(res, (x64.float(), y), num_samples=2)
    assert np.isfinite(_loglik(idata)).all()
    assert res.predict(x64.float(), 2).dtype == torch.float64
    bn = _bn(torch.float32)
    bs.fit(bn, (x64, y), "svi", epochs=1, batch_size=32, progress=False, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in bn.parameters())


def test_importance_elpd_takes_float32_data_on_a_float64_fit():
    """``diagnostics.traces.as_data`` casts before the model's data check (it checked first,
    so a float64 fit refused float32 data there)."""
    from bayes_spectral.diagnostics.loo import importance_elpd

    x64, y = _data(torch.float64)
    res = bs.fit(_bn(torch.float64), (x64, y), "svi", epochs=1, batch_size=32, progress=False)
    a = importance_elpd(res, (x64.float(), y), num_samples=32, seed=0)
    b = importance_elpd(res, (x64, y), num_samples=32, seed=0)
    assert np.isfinite(a.elpd) and a.elpd == pytest.approx(b.elpd, rel=1e-6)
