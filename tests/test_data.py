"""Embedded datasets, synthetic generators and the loaders for users' own files."""

from __future__ import annotations

import gzip
import random
import struct

import numpy as np
import pytest
import torch

from bayes_spectral import data


def test_load_digits_unchanged():
    s = data.load_digits()
    assert s.x_train.shape == (1438, 64) and s.x_test.shape == (359, 64)
    assert float(s.x_train.max()) <= 1.0


def test_load_diabetes_standardised_on_train():
    s = data.load_diabetes(seed=3)
    assert s.x_train.shape[1] == 10 and len(s.x_train) + len(s.x_test) == 442
    assert torch.allclose(s.x_train.mean(0), torch.zeros(10), atol=1e-5)
    assert torch.allclose(s.x_train.std(0), torch.ones(10), atol=1e-5)
    assert abs(float(s.y_train.mean())) < 1e-5 and abs(float(s.y_train.std()) - 1) < 1e-5
    assert s.y_train.dtype == torch.float32 and s.y_train.dim() == 1


def test_load_mnist1d_local_and_reproducible():  # the generator uses the legacy global API
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    before = (np.random.rand(), random.random())  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    a = data.load_mnist1d(num_samples=200, seed=5)
    after = (np.random.rand(), random.random())  # noqa: NPY002
    assert before == after  # global random state restored
    b = data.load_mnist1d(num_samples=200, seed=5)
    assert a.x_train.shape == (160, 40) and a.x_test.shape == (40, 40)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert set(a.y_train.tolist()) <= set(range(10))
    c = data.load_mnist1d(num_samples=200, seed=6)
    assert not torch.equal(a.x_train, c.x_train)
    with pytest.raises(ValueError, match="multiple of 10"):
        data.load_mnist1d(num_samples=25)


def test_synthetic_generators():
    x, y = data.make_teacher_regression(50, 7, seed=1)
    assert x.shape == (50, 7) and y.shape == (50,) and abs(float(y.std()) - 1) < 1e-5
    X, y, w = data.make_sparse_regression(20, 40, 3, seed=0)
    assert int((w != 0).sum()) == 3 and torch.allclose(X @ w, y)
    A, y, M = data.make_matrix_sensing(6, 2, 30, seed=0)
    assert A.shape == (30, 6, 6) and int(torch.linalg.matrix_rank(M)) == 2
    assert torch.allclose(torch.einsum("kij,ij->k", A, M), y)
    with pytest.raises(ValueError, match="sparsity"):
        data.make_sparse_regression(5, 4, 0)


# ---------------------------------------------------------------------------- IDX files

def _idx_bytes(arr: np.ndarray, code: int, big: str) -> bytes:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(big).tobytes()


@pytest.mark.parametrize(
    "code,dtype,big",
    [(0x08, np.uint8, "u1"), (0x09, np.int8, "i1"), (0x0B, np.int16, ">i2"),
     (0x0C, np.int32, ">i4"), (0x0D, np.float32, ">f4"), (0x0E, np.float64, ">f8")],
)
def test_load_idx_round_trip(tmp_path, code, dtype, big):
    arr = (np.arange(2 * 3 * 4).reshape(2, 3, 4) - 5).astype(dtype)
    if dtype == np.uint8:
        arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4) * 10
    p = tmp_path / "a.idx"
    p.write_bytes(_idx_bytes(arr, code, big))
    t = data.load_idx(p)
    assert t.shape == (2, 3, 4)
    np.testing.assert_array_equal(t.numpy(), arr)
    gz = tmp_path / "a.idx.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(arr, code, big)))
    np.testing.assert_array_equal(data.load_idx(gz).numpy(), arr)


def test_load_idx_mnist_like_labels(tmp_path):
    labels = np.array([5, 0, 4, 1, 9], dtype=np.uint8)
    p = tmp_path / "labels-idx1-ubyte"
    p.write_bytes(_idx_bytes(labels, 0x08, "u1"))
    assert data.load_idx(p).tolist() == [5, 0, 4, 1, 9]


def test_load_idx_errors(tmp_path):
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    good = _idx_bytes(arr, 0x0D, ">f4")
    p = tmp_path / "x.idx"
    p.write_bytes(b"\x01\x02" + good[2:])
    with pytest.raises(ValueError, match="magic"):
        data.load_idx(p)
    p.write_bytes(good[:2] + b"\x07" + good[3:])
    with pytest.raises(ValueError, match="dtype code 0x07"):
        data.load_idx(p)
    p.write_bytes(good[:-3])
    with pytest.raises(ValueError, match="truncated"):
        data.load_idx(p)
    p.write_bytes(good + b"\x00")
    with pytest.raises(ValueError, match="trailing"):
        data.load_idx(p)
    p.write_bytes(good[:9])
    with pytest.raises(ValueError, match="header"):
        data.load_idx(p)
    p.write_bytes(b"\x00")
    with pytest.raises(ValueError, match="too short"):
        data.load_idx(p)
    p.write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(ValueError, match="gzip"):
        data.load_idx(p)


# ---------------------------------------------------------------------------- npz files

def test_load_npz_round_trip(tmp_path):
    x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    y = np.arange(5)
    p = tmp_path / "d.npz"
    np.savez(p, x=x, y=y)
    tx, ty = data.load_npz(p)
    np.testing.assert_array_equal(tx.numpy(), x)
    np.testing.assert_array_equal(ty.numpy(), y)
    np.savez_compressed(tmp_path / "c.npz", images=x, labels=y)
    tx, ty = data.load_npz(tmp_path / "c.npz", x_key="images", y_key="labels")
    assert tx.shape == (5, 3) and ty.tolist() == list(range(5))
    tx, ty = data.load_npz(tmp_path / "c.npz", x_key="images", y_key=None)
    assert ty is None


def test_load_npz_errors(tmp_path):
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((4, 2)), y=np.zeros(3))
    with pytest.raises(ValueError, match="4 rows"):
        data.load_npz(p)
    with pytest.raises(ValueError, match=r"no array named 'images'.*\['x', 'y'\]"):
        data.load_npz(p, x_key="images")
    raw = p.read_bytes()
    bad = tmp_path / "trunc.npz"
    bad.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="trunc.npz"):
        data.load_npz(bad)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"this is not a zip archive at all")
    with pytest.raises(ValueError, match="junk.npz"):
        data.load_npz(junk)
    with pytest.raises(FileNotFoundError):
        data.load_npz(tmp_path / "missing.npz")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single .npy"):
        data.load_npz(tmp_path / "single.npy")
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(ValueError, match="obj.npz"):
        data.load_npz(tmp_path / "obj.npz")
