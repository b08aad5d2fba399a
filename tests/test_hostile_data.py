"""Hostile and careless data files (issue 18, item 8 and the loaders' unclear items): every
bad file is a ``ValueError`` naming it, memory stays bounded, nothing is unpickled."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from bayes_spectral.data import load_idx, load_npz


def idx_header(code: int, shape) -> bytes:
    return bytes([0, 0, code, len(shape)]) + b"".join(int(s).to_bytes(4, "big") for s in shape)


def gzip_bomb(path: Path, header: bytes, zeros: int) -> Path:
    """``header`` then ``zeros`` zero bytes (a multiple of 16 MiB) as gzip members in a row
    (a valid gzip file: readers decompress the members in sequence)."""
    block = gzip.compress(bytes(16 << 20), compresslevel=9)
    path.write_bytes(gzip.compress(header) + block * (zeros // (16 << 20)))
    return path


# --------------------------------------------------------------------------------------
# item 8: the gzip memory bomb, measured


def test_gzip_bomb_peak_memory_is_bounded(tmp_path):
    """A ~0.5 MB ``.idx.gz`` whose header declares 10 bytes but inflates to 512 MB: the peak
    RSS of a process loading it stays within 200 MB of its baseline (the old loader
    decompressed all of it first), and the error names the file."""
    bomb = gzip_bomb(tmp_path / "bomb.idx.gz", idx_header(0x08, (10,)) + bytes(10), 512 << 20)
    assert bomb.stat().st_size < 2 << 20
    script = textwrap.dedent(f"""
        import json, resource
        from bayes_spectral.data import load_idx
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_idx({str(bomb)!r})
            msg = None
        except ValueError as err:
            msg = str(err)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"extra_mb": (peak - base) / 1024, "msg": msg}}))
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["extra_mb"] < 200, got
    assert got["msg"] is not None and "bomb.idx.gz" in got["msg"] and "trailing" in got["msg"]


# --------------------------------------------------------------------------------------
# load_idx: a table of bad files, each a ValueError naming the file


def _overflow(tmp_path, gz):
    raw = idx_header(0x08, (65536, 65536, 65536, 65536))  # 2**64 elements: int64 wraps to 0
    path = tmp_path / ("over.idx.gz" if gz else "over.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def _overflow_f64(tmp_path):
    path = tmp_path / "over8.idx"  # (2**32 - 1)**3 * 8 bytes: wraps in int64
    path.write_bytes(idx_header(0x0E, (2**32 - 1,) * 3) + bytes(64))
    return path


def _small_bomb(tmp_path):
    return gzip_bomb(tmp_path / "small.idx.gz", idx_header(0x08, (4,)) + bytes(4), 16 << 20)


def _huge_declared(tmp_path):
    path = tmp_path / "huge.idx.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, (10**9, 28, 28)) + bytes(100)))
    return path


def _corrupt_deflate(tmp_path):
    data = bytearray(gzip.compress(idx_header(0x0D, (64,)) + np.arange(64, dtype=">f4")
                                   .tobytes(), compresslevel=9))
    data[20:30] = b"\xff" * 10  # inside the deflate stream
    path = tmp_path / "bad.idx.gz"
    path.write_bytes(bytes(data))
    return path


def _cut_gzip(tmp_path):
    data = gzip.compress(idx_header(0x08, (1000,)) + os.urandom(1000))
    path = tmp_path / "cut.idx.gz"
    path.write_bytes(data[: len(data) // 2])
    return path


def _garbage_after(tmp_path):
    path = tmp_path / "tail.idx.gz"
    path.write_bytes(gzip.compress(idx_header(0x08, (3,)) + b"abc") + b"not gzip")
    return path


def _folder(tmp_path):
    (tmp_path / "dir.idx").mkdir()
    return tmp_path / "dir.idx"


def _bad_ndim(tmp_path):
    path = tmp_path / "ndim.idx.gz"
    path.write_bytes(gzip.compress(bytes([0, 0, 8, 255]) + bytes(8)))
    return path


IDX_CASES = [
    ("overflow", lambda t: _overflow(t, False), r"over\.idx.*(truncated|needs)"),
    ("overflow gz", lambda t: _overflow(t, True), r"over\.idx\.gz.*(truncated|needs)"),
    ("overflow float64", _overflow_f64, r"over8\.idx.*truncated"),
    ("gzip bomb", _small_bomb, r"small\.idx\.gz.*trailing"),
    ("declared 10^9 images", _huge_declared, r"huge\.idx\.gz.*truncated"),
    ("corrupt deflate", _corrupt_deflate, r"bad\.idx\.gz.*corrupt"),
    ("cut gzip", _cut_gzip, r"cut\.idx\.gz.*corrupt"),
    ("garbage after member", _garbage_after, r"tail\.idx\.gz"),
    ("folder", _folder, r"dir\.idx"),
    ("255 dims, 8 bytes", _bad_ndim, r"ndim\.idx\.gz.*header"),
]


@pytest.mark.parametrize("kind, make, pattern", IDX_CASES, ids=[c[0] for c in IDX_CASES])
def test_load_idx_bad_file_names_it(kind, make, pattern, tmp_path):
    path = make(tmp_path)
    before = path.read_bytes() if path.is_file() else None
    with pytest.raises(ValueError) as exc:
        load_idx(path)
    assert re.search(pattern, str(exc.value)), str(exc.value)
    if before is not None:
        assert path.read_bytes() == before


@pytest.mark.parametrize("gz", [False, True])
def test_load_idx_streamed_reader_keeps_valid_files(tmp_path, gz):
    """The streamed, header-bounded reader returns the same tensor as the format says."""
    values = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * -7).astype(">i2")
    raw = idx_header(0x0B, (2, 3, 5)) + values.tobytes()
    path = tmp_path / ("v.idx.gz" if gz else "v.idx")
    path.write_bytes(gzip.compress(raw) if gz else raw)
    got = load_idx(path)
    assert got.dtype == torch.int16 and got.shape == (2, 3, 5)
    assert torch.equal(got, torch.from_numpy(values.astype("<i2")))


def test_load_idx_scalar(tmp_path):
    (tmp_path / "s.idx").write_bytes(idx_header(0x08, ()) + b"\x07")
    assert load_idx(tmp_path / "s.idx").item() == 7


# --------------------------------------------------------------------------------------
# load_npz: every error a ValueError naming the file; nothing unpickled


def _npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def _patch_zip(path: Path, local_off: int, central_off: int, value: bytes) -> None:
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", local_off), (b"PK\x01\x02", central_off)):
        i = data.find(sig)
        while i >= 0:
            data[i + off: i + off + len(value)] = value
            i = data.find(sig, i + 4)
    path.write_bytes(bytes(data))


def _encrypted(t):
    p = _npz(t / "enc.npz", x=np.zeros(3), y=np.zeros(3))
    _patch_zip(p, 6, 8, b"\x01\x00")
    return p


def _unknown_method(t):
    p = _npz(t / "meth.npz", x=np.zeros(3), y=np.zeros(3))
    _patch_zip(p, 8, 10, b"\x63\x00")  # compression method 99
    return p


def _lying_header(t):
    """x.npy declares 10**12 float64 values (8 TB) but holds 80 bytes."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f8", "fortran_order": False,
                                               "shape": (10**12,)})
    p = t / "lie.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", buf.getvalue() + bytes(80))
        z.writestr("y.npy", _npy(np.zeros(3)))
    return p


def _npy(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


NPZ_CASES = [
    ("strings", lambda t: _npz(t / "str.npz", x=np.array(["a", "b"]), y=np.zeros(2)),
     r"str\.npz.*'x'.*dtype"),
    ("bytes", lambda t: _npz(t / "b.npz", x=np.array([b"a", b"b"]), y=np.zeros(2)),
     r"b\.npz.*'x'.*dtype"),
    ("datetime", lambda t: _npz(t / "dt.npz", x=np.array(["2020-01-01"] * 2,
                                                          dtype="datetime64[D]"), y=np.zeros(2)),
     r"dt\.npz.*'x'.*dtype"),
    ("structured", lambda t: _npz(t / "rec.npz", x=np.zeros(2, dtype=[("a", "f4")]),
                                  y=np.zeros(2)), r"rec\.npz.*'x'"),
    ("encrypted", _encrypted, r"enc\.npz"),
    ("unknown compression", _unknown_method, r"meth\.npz"),
    ("lying header", _lying_header, r"lie\.npz.*'x'.*declares"),
    ("empty file", lambda t: (t / "e.npz").write_bytes(b"") or t / "e.npz", r"e\.npz"),
    ("folder", lambda t: (t / "d.npz").mkdir() or t / "d.npz", r"d\.npz"),
    ("garbage member", lambda t: _zip(t / "g.npz", {"x.npy": b"garbage", "y.npy":
                                                   _npy(np.zeros(1))}), r"g\.npz.*'x'"),
]


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


@pytest.mark.parametrize("kind, make, pattern", NPZ_CASES, ids=[c[0] for c in NPZ_CASES])
def test_load_npz_bad_file_names_it(kind, make, pattern, tmp_path):
    path = make(tmp_path)
    with pytest.raises(ValueError) as exc:
        load_npz(path)
    assert re.search(pattern, str(exc.value)), str(exc.value)


class Marker:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_load_npz_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "PWNED"
    arr = np.empty(1, dtype=object)
    arr[0] = Marker(marker)
    np.savez(tmp_path / "evil.npz", x=arr, y=np.zeros(1))
    with pytest.raises(ValueError, match=r"evil\.npz.*objects"):
        load_npz(tmp_path / "evil.npz")
    assert not marker.exists()
    with open(tmp_path / "evil.npy", "wb") as fh:  # a raw pickle given as an archive
        pickle.dump(Marker(marker), fh)
    with pytest.raises(ValueError, match=r"evil\.npy"):
        load_npz(tmp_path / "evil.npy")
    assert not marker.exists()


def test_load_npz_big_endian_is_read_in_native_order(tmp_path):
    x = np.arange(6, dtype=">f8").reshape(3, 2) / 3
    np.savez(tmp_path / "be.npz", x=x, y=np.array([1, 2, 3], dtype=">i4"))
    tx, ty = load_npz(tmp_path / "be.npz")
    assert tx.dtype == torch.float64 and ty.dtype == torch.int32
    assert torch.equal(tx, torch.from_numpy(x.astype("<f8")))
    assert ty.tolist() == [1, 2, 3]
