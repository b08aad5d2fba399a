"""Shared: embedded datasets (nothing is downloaded at run time) and loaders for users' files.

``DATASETS`` names the classification sets of ``bayes-spectral compare`` / ``fit``: loaders
``seed -> Split`` called as ``loader(seed=seed)``; users register theirs. :func:`as_xy` is
the one reading of ``data`` given as a pair ``(x, y)`` or a :class:`Split`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from .registry import Registry

__all__ = [
    "DATASETS",
    "Split",
    "as_xy",
    "load_diabetes",
    "load_digits",
    "load_idx",
    "load_mnist1d",
    "load_npz",
    "make_matrix_sensing",
    "make_sparse_regression",
    "make_teacher_regression",
]


class Split(NamedTuple):
    """A train/test split of tensors."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int, dtype, y_dtype):
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    te, tr = perm[:n_test], perm[n_test:]
    t = torch.as_tensor
    return Split(t(x[tr], dtype=dtype), t(y[tr], dtype=y_dtype),
                 t(x[te], dtype=dtype), t(y[te], dtype=y_dtype))


def as_xy(data, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``data``: a :class:`Split` (or anything with ``x_train``/``y_train``:
    its training part) or a pair ``(x, y)``; ``TypeError`` naming ``what`` otherwise."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        return data.x_train, data.y_train
    if isinstance(data, (tuple, list)) and len(data) == 2:
        return data[0], data[1]
    raise TypeError(f"{what} must be a pair (x, y) or a bayes_spectral.data.Split, got "
                    f"{type(data).__name__}")


def load_digits(test_fraction: float = 0.2, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's 8x8 digits (1797 images, 10 classes, ships with scikit-learn).

    Pixels are scaled to [0, 1] (divided by 16) and flattened to 64 features.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = bunch.data.astype(np.float64) / 16.0
    return _split(x, bunch.target, test_fraction, seed, dtype, torch.long)


def load_diabetes(test_fraction: float = 0.2, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's diabetes regression set (442 patients, 10 features, ships with it).

    Features and target are standardised (zero mean, unit variance) with the statistics of
    the *training* part only, so nothing about the test part leaks into training.
    ``y`` has shape ``(n,)``.
    """
    from sklearn.datasets import load_diabetes as _sk_diabetes

    bunch = _sk_diabetes(scaled=False)
    split = _split(bunch.data.astype(np.float64), bunch.target.astype(np.float64),
                   test_fraction, seed, torch.float64, torch.float64)
    mx, sx = split.x_train.mean(0), split.x_train.std(0)
    my, sy = split.y_train.mean(), split.y_train.std()
    return Split(((split.x_train - mx) / sx).to(dtype), ((split.y_train - my) / sy).to(dtype),
                 ((split.x_test - mx) / sx).to(dtype), ((split.y_test - my) / sy).to(dtype))


def load_mnist1d(num_samples: int = 5000, seed: int = 42, test_fraction: float = 0.2,
                 dtype: torch.dtype = torch.float32) -> Split:
    """MNIST-1D (Greydanus 2020), generated locally by the ``mnist1d`` package.

    Uses ``mnist1d.data.make_dataset`` with the package's default arguments (40-sample
    signals, 10 classes) except ``num_samples``, ``seed`` and the train split; nothing is
    downloaded (``get_dataset`` would try to). ``num_samples`` must be a multiple of 10
    (the generator makes ``num_samples // 10`` signals per class). The generator seeds
    numpy's and Python's global random state; both are restored afterwards.
    """
    import random

    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("load_mnist1d needs the 'mnist1d' package: pip install mnist1d") from err
    if num_samples < 10 or num_samples % 10:
        raise ValueError(f"num_samples must be a positive multiple of 10, got {num_samples}")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    args.train_split = 1.0 - test_fraction
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        ds = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002 (the package uses the legacy API)
        random.setstate(py_state)
    t = torch.as_tensor
    return Split(t(ds["x"], dtype=dtype), t(ds["y"], dtype=torch.long),
                 t(ds["x_test"], dtype=dtype), t(ds["y_test"], dtype=torch.long))


#: data set name -> loader, called as ``loader(seed=seed)`` and returning a :class:`Split`
DATASETS: Registry = Registry("dataset")
DATASETS.register("digits")(load_digits)
DATASETS.register("mnist1d")(load_mnist1d)


# --------------------------------------------------------------------------------------
# synthetic generators used by the reference models (bayes_spectral.models)


def make_teacher_regression(
    n: int, dim: int, noise: float = 0.0, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs ``x ~ N(0, I_dim)`` and a single-ReLU teacher ``y = relu(<beta, x>)``.

    ``beta`` is a random unit vector; targets are centred and scaled to unit variance, then
    ``noise * N(0, 1)`` is added. Returns ``(x, y)`` with shapes ``(n, dim)`` and ``(n,)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    beta = torch.randn(dim, generator=g, dtype=torch.float64)
    y = torch.relu(x @ (beta / beta.norm()))
    y = (y - y.mean()) / y.std()
    y = y + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def make_sparse_regression(n: int, dim: int, sparsity: int, noise: float = 0.0, seed: int = 0,
                           dtype: torch.dtype = torch.float64):
    """Compressed-sensing problem ``y = X w* (+ noise)`` with ``X_ij ~ N(0, 1/n)``.

    ``w*`` has ``sparsity`` non-zero entries at random positions, each ``+-1`` times a
    magnitude in ``[1, 2]``. Returns ``(X, y, w_star)``.
    """
    if not 0 < sparsity <= dim:
        raise ValueError(f"sparsity must be in [1, dim={dim}], got {sparsity}")
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) / n**0.5
    w = torch.zeros(dim, dtype=torch.float64)
    idx = torch.randperm(dim, generator=g)[:sparsity]
    sign = torch.randint(0, 2, (sparsity,), generator=g).to(torch.float64) * 2 - 1
    w[idx] = sign * (1 + torch.rand(sparsity, generator=g, dtype=torch.float64))
    y = x @ w + noise * torch.randn(n, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype), w.to(dtype)


def make_matrix_sensing(dim: int, rank: int, num_measurements: int, seed: int = 0,
                        dtype: torch.dtype = torch.float64):
    """Matrix sensing ``y_k = <A_k, M*>`` with i.i.d. ``N(0, 1)`` sensing matrices ``A_k``.

    ``M* = U V^T`` (``dim x dim``, rank ``rank``, ``U, V`` Gaussian) is scaled to
    ``||M*||_F = sqrt(dim)``. Gaussian ensembles satisfy the restricted isometry property
    once ``num_measurements >> rank * dim``. Returns ``(A, y, M_star)`` with ``A`` of
    shape ``(num_measurements, dim, dim)``.
    """
    if not 0 < rank <= dim:
        raise ValueError(f"rank must be in [1, dim={dim}], got {rank}")
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(dim, rank, generator=g, dtype=torch.float64)
    v = torch.randn(dim, rank, generator=g, dtype=torch.float64)
    m = u @ v.T
    m = m * (dim**0.5 / m.norm())
    a = torch.randn(num_measurements, dim, dim, generator=g, dtype=torch.float64)
    y = torch.einsum("kij,ij->k", a, m)
    return a.to(dtype), y.to(dtype), m.to(dtype)


# --------------------------------------------------------------------------------------
# users' own files

_IDX_DTYPES = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
#: bytes read from an IDX stream at a time
_CHUNK = 1 << 20


def _idx_header(head: bytes, path) -> tuple[np.dtype, tuple[int, ...], int]:
    """``(dtype, shape, payload bytes)`` of an IDX header (exact Python-int arithmetic, so
    no declared shape can overflow into a small size)."""
    if len(head) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(head)} bytes)")
    if head[0] != 0 or head[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number starts with {head[:2].hex()}, expected 0000)"
        )
    code, ndim = head[2], head[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX dtype code 0x{code:02x} (expected one of "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES) + ")"
        )
    if len(head) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced, "
                         f"file has {len(head)} bytes)")
    shape = tuple(int.from_bytes(head[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dt = _IDX_DTYPES[code]
    return dt, shape, math.prod(shape) * dt.itemsize


def _read_exact(fh, n: int) -> bytes:
    """Up to ``n`` bytes of ``fh`` (fewer only at the end of the stream), read in chunks so
    that memory grows with the bytes actually present, never with ``n`` alone."""
    parts, left = [], n
    while left > 0:
        chunk = fh.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _open_idx(path):
    """The file, or a streaming gzip reader of it when it starts with the gzip magic."""
    import gzip

    fh = open(path, "rb")  # noqa: SIM115 (returned to the caller's with-block)
    if fh.read(2) == b"\x1f\x8b":
        fh.seek(0)
        return gzip.GzipFile(fileobj=fh, mode="rb")
    fh.seek(0)
    return fh


def load_idx(path) -> torch.Tensor:
    """Read an IDX file (the MNIST distribution format), optionally gzip-compressed.

    Layout: two zero bytes, a dtype code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then one
    big-endian uint32 per dimension, then the data (big-endian, C order). Returns a tensor
    of that shape and dtype (native byte order). Raises ``ValueError`` naming the file for
    a missing or unreadable file, a wrong magic number, an unknown dtype code, a corrupt
    gzip stream, or a truncated / over-long payload.

    A gzip file is decompressed as a stream and never beyond the size the header declares
    (``prod(shape) * itemsize`` plus one byte to detect an over-long payload), so a small
    file that inflates to gigabytes (a "gzip bomb") is rejected with bounded memory.
    """
    import gzip
    import pathlib
    import zlib

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    try:
        with _open_idx(path) as fh:
            head = _read_exact(fh, 4)
            head += _read_exact(fh, 4 * head[3]) if len(head) == 4 else b""
            dt, shape, expected = _idx_header(head, path)
            raw = _read_exact(fh, expected + 1)
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise ValueError(f"{path}: corrupt gzip stream or unreadable file ({err})") from err
    got = len(raw)
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        found = f"{got}" if got <= expected else "more"
        raise ValueError(f"{path}: IDX payload {kind}: shape {shape} of {dt.name} needs "
                         f"{expected} bytes after the header, found {found}")
    data = np.frombuffer(raw, dtype=dt).reshape(shape)
    return torch.from_numpy(data.astype(dt.newbyteorder("="), copy=True))


def _npz_member_check(archive, key: str, path) -> None:
    """The ``.npy`` header of ``key``: ``ValueError`` naming the file if it declares more
    bytes than the archive member holds (so nothing is allocated for a lying header)."""
    info = archive.zip.getinfo(f"{key}.npy")
    with archive.zip.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, _, dtype = read(fh)
    if dtype.hasobject:
        raise ValueError(f"{path}: array {key!r} holds Python objects (pickles are refused)")
    need = math.prod(shape) * dtype.itemsize
    if need > info.file_size:
        raise ValueError(f"{path}: array {key!r} declares shape {tuple(shape)} of {dtype} "
                         f"({need} bytes) but its member holds {info.file_size} bytes")


def _npz_tensor(archive, key: str, path) -> torch.Tensor:
    """The array ``key`` of an open archive as a tensor (native byte order)."""
    import zipfile
    import zlib

    try:
        _npz_member_check(archive, key, path)
        arr = archive[key]
    except ValueError as err:
        if str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: array {key!r} is corrupt or truncated ({err})") from err
    except (zipfile.BadZipFile, EOFError, OSError, RuntimeError, NotImplementedError,
            MemoryError, zlib.error, KeyError) as err:  # encrypted, unknown compression, ...
        raise ValueError(f"{path}: array {key!r} cannot be read "
                         f"({type(err).__name__}: {err})") from err
    if arr.dtype.kind not in "biufc":
        raise ValueError(f"{path}: array {key!r} has dtype {arr.dtype}, expected numbers")
    arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("="), copy=False))
    try:
        return torch.from_numpy(arr)
    except TypeError as err:  # a dtype torch has no tensor type for
        raise ValueError(f"{path}: array {key!r} of dtype {arr.dtype} has no torch "
                         f"equivalent ({err})") from err


def load_npz(path, x_key: str = "x", y_key: str | None = "y"):
    """Read arrays ``x`` (and ``y``) from a NumPy ``.npz`` archive; returns ``(x, y)`` tensors.

    ``y`` is ``None`` when ``y_key`` is ``None``. Pickled (object) arrays are refused. Raises
    ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for anything
    else: a corrupt/truncated/encrypted archive, a header declaring more bytes than the
    archive holds, a non-numeric dtype, a missing key (listing the keys present) or ``x``
    and ``y`` of different lengths. Big-endian arrays are converted to native order.
    """
    import pathlib
    import zipfile

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, RuntimeError,
            NotImplementedError) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: is a single .npy array, expected an .npz archive")
    with archive:
        keys = sorted(archive.files)
        out = []
        for key in (x_key, y_key):
            if key is not None and key not in archive.files:
                raise ValueError(f"{path}: no array named {key!r}; the archive holds {keys}")
            out.append(None if key is None else _npz_tensor(archive, key, path))
    x, y = out
    if y is not None and x.shape[:1] != y.shape[:1]:
        raise ValueError(f"{path}: {x_key!r} has {x.shape[0] if x.dim() else 0} rows but "
                         f"{y_key!r} has {y.shape[0] if y.dim() else 0}")
    return x, y
