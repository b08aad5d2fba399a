"""``analyze`` decomposes each matrix once (issue 21 follow-up), and a resume folder records
WeightWatcher's options by name.

``return_esd=True``, ``resume=`` and the WeightWatcher columns (``mp_fit``, ``fit``,
``fix_fingers``) all need the ESD the metrics are computed from; it is computed once per
matrix (counted by wrapping the eigensolver) and the dataset is bit-for-bit the one of
the separate computations.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import bayes_spectral as bs
from bayes_spectral.diagnostics.scan import ResumeMismatchError
from bayes_spectral.spectra.metrics import spectral_metrics
from bayes_spectral.spectra.spectrum import esd


def heavy(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) / torch.rand(*shape, generator=g).add(0.05)


@pytest.fixture
def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 60), nn.ReLU(), nn.Linear(60, 30), nn.ReLU(),
                        nn.Conv2d(6, 12, 3))
    with torch.no_grad():
        for i, m in enumerate([net[0], net[2], net[4]]):
            m.weight.copy_(heavy(*m.weight.shape, seed=i) * 0.05)
    return net


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({f"layers.{i}.weight": (heavy(30 + 5 * i, 24, seed=i) * 0.05).contiguous()
               for i in range(3)}, str(path))
    return path


def quiet(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bs.analyze(*args, **kwargs)


class Count:
    """Calls of ``torch.linalg.eigvalsh`` and ``torch.linalg.svdvals``."""

    def __init__(self, monkeypatch):
        self.calls = 0
        for fname in ("eigvalsh", "svdvals"):
            real = getattr(torch.linalg, fname)

            def counted(*a, _real=real, **k):
                self.calls += 1
                return _real(*a, **k)

            monkeypatch.setattr(torch.linalg, fname, counted)


def matrices_of(ds) -> int:
    """Eigensolver calls one decomposition per row needs (a conv row is one batched call)."""
    return ds.sizes["layer"]


@pytest.mark.parametrize("method", ["gram", "svd"])
@pytest.mark.parametrize("options", [{}, {"mp_fit": True}, {"fit": "TPL"},
                                     {"fix_fingers": "clip_xmax", "mp_fit": True}])
def test_one_decomposition_per_matrix_with_esd(model, monkeypatch, method, options):
    count = Count(monkeypatch)
    ds = quiet(model, return_esd=True, method=method, **options)
    assert count.calls == matrices_of(ds) == 3


def test_one_decomposition_per_matrix_when_resuming(checkpoint, tmp_path, monkeypatch):
    count = Count(monkeypatch)
    ds = quiet(checkpoint, resume=tmp_path / "resume", mp_fit=True)
    assert count.calls == matrices_of(ds) == 3
    count.calls = 0
    again = quiet(checkpoint, resume=tmp_path / "resume", mp_fit=True)
    assert count.calls == 0  # every row read back
    for var in ds.data_vars:
        np.testing.assert_array_equal(again[var].values, ds[var].values)


@pytest.mark.parametrize("method", ["gram", "svd"])
def test_dataset_bit_identical_with_and_without_esd(model, method):
    plain = quiet(model, method=method, mp_fit=True, fix_fingers="xmin_peak")
    with_esd = quiet(model, method=method, mp_fit=True, fix_fingers="xmin_peak",
                     return_esd=True)
    assert set(with_esd.data_vars) == set(plain.data_vars) | {"esd"}
    for var in plain.data_vars:
        np.testing.assert_array_equal(with_esd[var].values, plain[var].values)
    # the separate computations of the layer-1 functions, bit for bit
    for pos, mod in enumerate([model[0], model[2], model[4]]):
        w = mod.weight.detach().double()
        ref = esd(w, method=method)
        row = with_esd["esd"].values[pos]
        np.testing.assert_array_equal(row[~np.isnan(row)], ref.numpy())
        m = spectral_metrics(w, method=method)
        for key in ("log_norm", "stable_rank", "numerical_rank", "effective_rank",
                    "schatten_1", "log_spectral_norm"):
            assert with_esd[key].values[pos] == float(m[key]), key


@pytest.mark.parametrize("option, first, second", [
    ("mp_fit", False, True), ("randomize", False, 3), ("fit", "PL", "TPL"),
    ("fix_fingers", None, "clip_xmax"), ("max_evals", None, 500)])
def test_resume_refuses_other_ww_options_by_name(checkpoint, tmp_path, option, first, second):
    resume = tmp_path / "resume"
    quiet(checkpoint, resume=resume, **({option: first} if first is not None else {}))
    settings = (resume / "settings.json").read_text()
    for name in ("mp_fit", "randomize", "fit", "fix_fingers", "max_evals", "min_evals"):
        assert f'"{name}"' in settings, name
    with pytest.raises(ResumeMismatchError, match=rf"{option}: was "):
        quiet(checkpoint, resume=resume, **{option: second})


def test_resume_default_options_equal_spelled_out(checkpoint, tmp_path):
    resume = tmp_path / "resume"
    quiet(checkpoint, resume=resume)
    ds = quiet(checkpoint, resume=resume, mp_fit=False, fit="PL", fix_fingers=None,
               randomize=False, max_evals=None)  # the defaults, spelled out: accepted
    assert ds.sizes["layer"] == 3
