"""analyze(..., gram_dtype=torch.float32): the Gram matrix formed in float32, eigvalsh in
float64. Tolerances are ~5x the errors measured on these seeded matrices (see each test)."""

import math
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bayes_spectral as bs
from bayes_spectral import cli

EPS32 = torch.finfo(torch.float32).eps


def quiet(model, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bs.analyze(model, threads=1, **kw)


def power_law_matrix(m: int, n: int, exponent: float, seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` with power-law singular values ``s_i = 3 (i + 1)^-exponent``
    (a trained-like heavy-tailed ESD), float32."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = 3.0 * (torch.arange(min(m, n), dtype=torch.float64) + 1).pow(-exponent)
    return ((u * s) @ v.T).float()


def heavy_tailed(m: int, n: int, seed: int) -> torch.Tensor:
    """Gaussian over uniform (Student-like heavy-tailed entries), float32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) / torch.rand(m, n, generator=g).add(0.05)
    return w * 0.02 / math.sqrt(n)


@pytest.fixture(scope="module")
def state():
    g = torch.Generator().manual_seed(1)
    return {"gauss.weight": torch.randn(256, 128, generator=g),
            "wide.weight": torch.randn(96, 300, generator=g) * 0.05,
            "pl.weight": power_law_matrix(384, 256, 0.6, seed=2),
            "pl2.weight": power_law_matrix(200, 400, 1.0, seed=3),
            "ht.weight": heavy_tailed(320, 320, seed=4),
            "ht2.weight": heavy_tailed(320, 320, seed=5)}


def test_default_and_float64_gram_are_bit_identical(state):
    a = quiet(state, return_esd=True)
    b = quiet(state, return_esd=True, gram_dtype=torch.float64)
    for key in a.data_vars:
        np.testing.assert_array_equal(a[key].values, b[key].values, err_msg=key)


# measured on this fixture (relative; log norms and alpha_weighted relative to max(1, |x|)):
# alpha 2.3e-6 (pl2, whose tail reaches its tiny eigenvalues), else <= 1.5e-7;
# alpha_weighted 2.3e-6; stable_rank 1.8e-8; log_norm / log_spectral_norm 7e-9;
# log_alpha_norm 1.9e-6; lambda_max 2.2e-8. Tolerances 5-10x those.
TOLERANCE = {"alpha": 2e-5, "alpha_weighted": 2e-5, "stable_rank": 1e-7,
             "log_norm": 5e-8, "log_spectral_norm": 5e-8, "log_alpha_norm": 1e-5}
RELATIVE_TO_ONE = ("log_norm", "log_spectral_norm", "log_alpha_norm", "alpha_weighted")


def test_float32_gram_keeps_the_tail_metrics(state):
    ref = quiet(state, return_esd=True)
    got = quiet(state, return_esd=True, gram_dtype=torch.float32)
    assert list(got.layer.values) == list(ref.layer.values)
    for key, tol in TOLERANCE.items():
        err = np.abs(got[key].values - ref[key].values)
        scale = (np.maximum(1.0, np.abs(ref[key].values)) if key in RELATIVE_TO_ONE
                 else np.abs(ref[key].values))
        assert (err <= tol * scale).all(), (key, err / scale)
    np.testing.assert_allclose(got.lambda_max.values, ref.lambda_max.values, rtol=1e-5)
    np.testing.assert_array_equal(got.num_tail.values, ref.num_tail.values)
    assert got.esd.dtype == np.float64


def test_float32_gram_eigenvalue_error_within_the_stated_bound(state):
    """|lambda_32 - lambda_64| <= c n eps32 lambda_max (the docstring's bound, c = 1)."""
    ref = quiet(state, return_esd=True)
    got = quiet(state, return_esd=True, gram_dtype=torch.float32)
    for i, name in enumerate(ref.layer.values):
        m, n = (int(s) for s in str(ref.shape.values[i]).split("x"))
        a, b = ref.esd.values[i], got.esd.values[i]
        keep = ~np.isnan(a)
        bound = min(m, n) * EPS32 * np.nanmax(a)
        assert np.abs(a[keep] - b[keep]).max() <= bound, name
        # the top eigenvalue is accurate to a few eps32, relative
        assert abs(np.nanmax(b) / np.nanmax(a) - 1) < 1e-5, name


def test_float32_gram_differs_from_float64_on_the_small_eigenvalues(state):
    """The option is not a no-op: small eigenvalues carry float32 rounding."""
    ref = quiet(state, return_esd=True, layers="pl")
    got = quiet(state, return_esd=True, gram_dtype=torch.float32, layers="pl")
    assert not np.array_equal(ref.esd.values, got.esd.values)


def test_float32_gram_batched_equals_one_by_one_and_bf16_weights(state):
    a = quiet(state, gram_dtype=torch.float32)
    b = quiet(state, gram_dtype=torch.float32, batch=False)
    for key in a.data_vars:
        np.testing.assert_array_equal(a[key].values, b[key].values, err_msg=key)
    bf = {k: v.bfloat16() for k, v in state.items()}
    c = quiet(bf, gram_dtype=torch.float32)
    d = quiet(bf)
    # bf16 weights are exact in float32: only the Gram rounding (measured 1.0e-5, pl2)
    np.testing.assert_allclose(c.alpha.values, d.alpha.values, rtol=5e-5)


def test_float32_gram_on_a_checkpoint_file(state, tmp_path):
    save_file(state, str(tmp_path / "m.safetensors"))
    a = quiet(tmp_path / "m.safetensors", gram_dtype=torch.float32)
    b = quiet(state, gram_dtype=torch.float32).sel(layer=a.layer.values)
    for key in a.data_vars:
        np.testing.assert_array_equal(a[key].values, b[key].values, err_msg=key)


@pytest.mark.parametrize("kw, words", [
    (dict(gram_dtype=torch.float16), "gram_dtype"),
    (dict(gram_dtype="float32"), "gram_dtype"),
    (dict(gram_dtype=torch.float32, method="svd"), "method='gram'"),
])
def test_bad_gram_dtype_is_refused(state, kw, words):
    with pytest.raises((ValueError, TypeError), match=words):
        quiet(state, **kw)


def test_cli_gram_dtype_flag(state, tmp_path, capsys):
    save_file(state, str(tmp_path / "m.safetensors"))
    out = tmp_path / "out"
    assert cli.main(["analyze", str(tmp_path / "m.safetensors"), "--gram-dtype", "float32",
                     "--out", str(out), "--threads", "1"]) == 0
    capsys.readouterr()
    import pandas as pd

    table = pd.read_csv(out / "analysis.csv", index_col=0)
    want = quiet(state, gram_dtype=torch.float32)
    np.testing.assert_allclose(table.loc[list(want.layer.values), "alpha"].values,
                               want.alpha.values, rtol=1e-9)


def test_float32_gram_on_conv_kernels_and_module():
    """Conv kernels (pooled slices) and an nn.Module take the same float32-Gram path."""
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(64, 48))
    ref = quiet(model, return_esd=True)
    got = quiet(model, return_esd=True, gram_dtype=torch.float32)
    np.testing.assert_allclose(got.alpha.values, ref.alpha.values, rtol=TOLERANCE["alpha"])
    np.testing.assert_allclose(got.lambda_max.values, ref.lambda_max.values, rtol=1e-5)
    assert got.num_evals.values.tolist() == ref.num_evals.values.tolist() == [9 * 16, 48]
