"""Issue 21 (speed): ``analyze`` decomposes same-shape matrices in one batched ``eigvalsh``
(bounded batches, files read one tensor after another) with results equal to the one-by-one
path (exact or 1e-12 relative), on and off resume and with the WeightWatcher options that
reuse the ESD; ``device=`` moves the Gram matrix and ``eigvalsh`` (CUDA checks marked
``cuda``, skipped without it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import bayes_spectral as bs
from bayes_spectral import cli
from bayes_spectral.diagnostics.batched import plan_batches

RTOL = 1e-12


def heavy(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).add(0.05)


def blocks(n_blocks: int = 3, d: int = 24) -> dict[str, torch.Tensor]:
    """A transformer-like state dict: per block q, k, v, o (d x d), up (4d x d), down."""
    out = {}
    for b in range(n_blocks):
        for j, (name, shape) in enumerate([("q", (d, d)), ("k", (d, d)), ("v", (d, d)),
                                           ("o", (d, d)), ("up", (4 * d, d)),
                                           ("down", (d, 4 * d))]):
            out[f"h.{b}.{name}.weight"] = (heavy(*shape, seed=10 * b + j) * 0.05).contiguous()
    return out


def quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bs.analyze(*args, **kwargs)


def assert_same(a, b, rtol=RTOL):
    assert list(a.layer.values) == list(b.layer.values)
    assert set(a.data_vars) == set(b.data_vars)
    for var in a.data_vars:
        if a[var].dtype.kind not in "fiu":  # the warning column
            np.testing.assert_array_equal(a[var].values, b[var].values, err_msg=var)
            continue
        np.testing.assert_allclose(a[var].values, b[var].values, rtol=rtol, atol=0,
                                   equal_nan=True, err_msg=var)


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(blocks(), str(path))
    return path


class Count:
    """Calls of ``torch.linalg.eigvalsh`` and the number of matrices each call held."""

    def __init__(self, monkeypatch):
        self.sizes: list[int] = []
        real = torch.linalg.eigvalsh

        def counted(a, *args, **kwargs):
            self.sizes.append(a.shape[0] if a.dim() == 3 else 1)
            return real(a, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, "eigvalsh", counted)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_batched_equals_one_by_one_state_dict(method):
    sd = blocks()
    one = quiet(sd, batch=False, return_esd=True, method=method)
    many = quiet(sd, return_esd=True, method=method)
    assert many.sizes["layer"] == 18
    assert_same(one, many)


def test_batched_calls_fewer_eigvalsh_and_bounded(monkeypatch):
    count = Count(monkeypatch)
    ds = quiet(blocks(), return_esd=True)
    # cap: the largest matrix's 96*24 elements: 12 squares 24x24 in 3 calls of 4 each,
    # the 3 up and 3 down (as large as the cap) alone
    assert sum(count.sizes) == ds.sizes["layer"] == 18
    assert sorted(count.sizes) == [1] * 6 + [4, 4, 4]


@pytest.mark.parametrize("options", [{"mp_fit": True}, {"randomize": 0},
                                     {"fit": "TPL"}, {"fix_fingers": "clip_xmax"},
                                     {"mp_fit": True, "randomize": 1, "max_evals": 60}])
def test_batched_equals_one_by_one_with_ww_options(options):
    sd = blocks(n_blocks=2)
    assert_same(quiet(sd, batch=False, **options), quiet(sd, **options))


@pytest.mark.parametrize("resume", [False, True])
def test_batched_equals_one_by_one_from_file(checkpoint, tmp_path, resume):
    kw = {"resume": tmp_path / "r"} if resume else {}
    one = quiet(checkpoint, batch=False, return_esd=True, mp_fit=True)
    many = quiet(checkpoint, return_esd=True, mp_fit=True, **kw)
    assert_same(one, many)
    if resume:  # read back, and a half-finished folder completed by a batched scan
        assert_same(one, quiet(checkpoint, return_esd=True, mp_fit=True, **kw))
        rows = sorted((tmp_path / "r" / "rows").glob("*.json"))
        for path in rows[::2]:
            path.unlink()
        assert_same(one, quiet(checkpoint, return_esd=True, mp_fit=True, **kw))


def test_bad_row_in_a_batch_is_left_out_alone():
    sd = blocks(n_blocks=2)
    sd["h.1.k.weight"] = sd["h.1.k.weight"].clone()
    sd["h.1.k.weight"][0, 0] = float("nan")
    with pytest.warns(UserWarning, match=r"'h\.1\.k'.*(NaN|finite)"):
        ds = bs.analyze(sd)
    assert "h.1.k" not in list(ds.layer.values) and ds.sizes["layer"] == 11
    good = {k: v for k, v in sd.items() if k != "h.1.k.weight"}
    assert_same(quiet(good, batch=False), ds)


def test_plan_batches_cap_and_order():
    shapes = [(4, 4), (8, 4), (4, 4), (4, 4), (2, 2, 2, 2), (4, 4), (8, 4), (4, 4), (4, 4)]
    plan = plan_batches(shapes, cap=4.0)
    # largest matrix 32 elements -> cap 128: 8 of the 4x4 (16 each), 4 of the 8x4
    assert plan == [[0, 2, 3, 5, 7, 8], [1, 6], [4]]
    assert plan_batches(shapes, cap=1.0) == [[0, 2], [3, 5], [7, 8], [1], [6], [4]]
    assert plan_batches(shapes, cap=0) == [[i] for i in range(len(shapes))]


def test_device_refused_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    with pytest.raises(ValueError, match="device='cuda'.*CUDA is not available"):
        bs.analyze(blocks(n_blocks=1), device="cuda")
    with pytest.raises(ValueError, match="device="):
        bs.analyze(blocks(n_blocks=1), device="tpu")


def test_cli_device(checkpoint, capsys):
    assert cli.main(["analyze", str(checkpoint), "--device", "cpu"]) == 0
    assert "alpha_weighted" in capsys.readouterr().out
    if not torch.cuda.is_available():
        assert cli.main(["analyze", str(checkpoint), "--device", "cuda"]) == cli.EXIT_USAGE
        assert "CUDA is not available" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("options", [{}, {"mp_fit": True}])
def test_cuda_equals_cpu(checkpoint, options):
    cpu = quiet(checkpoint, return_esd=True, **options)
    gpu = quiet(checkpoint, return_esd=True, device="cuda", **options)
    assert gpu["esd"].dtype == np.float64
    np.testing.assert_allclose(gpu["esd"].values, cpu["esd"].values, rtol=1e-9,
                               atol=1e-12 * float(np.nanmax(cpu["esd"].values)))
    for var in ("alpha", "alpha_weighted", "stable_rank", "log_norm", "log_spectral_norm"):
        np.testing.assert_allclose(gpu[var].values, cpu[var].values, rtol=1e-8, err_msg=var)


def test_overflowing_gram_in_a_batch_falls_back_row_by_row():
    sd = blocks(n_blocks=2)
    sd["h.0.v.weight"] = sd["h.0.v.weight"] * 1e20  # W^T W overflows float32
    with pytest.warns(UserWarning, match=r"'h\.0\.v'.*overflows"):
        ds = bs.analyze(sd, dtype=torch.float32)
    assert "h.0.v" not in list(ds.layer.values) and ds.sizes["layer"] == 11
    assert_same(quiet(sd, dtype=torch.float32, batch=False), ds)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_state_dict_default_device_stays_on_gpu():
    sd = blocks(n_blocks=1)
    cpu = quiet(sd)
    gpu = quiet({k: v.cuda() for k, v in sd.items()})  # device=None: analysed where it is
    for var in ("alpha", "stable_rank", "log_norm"):
        np.testing.assert_allclose(gpu[var].values, cpu[var].values, rtol=1e-8, err_msg=var)
