"""Shared: embedded datasets (nothing is downloaded at run time) and loaders for users' files.

``DATASETS`` names the classification sets of ``bayes-spectral compare`` / ``fit``: loaders
``seed -> Split`` called as ``loader(seed=seed)``; users register theirs. :func:`as_xy` is
the one reading of ``data`` given as a pair ``(x, y)`` or a :class:`Split`.
"""

from __future__ import annotations

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


def load_idx(path) -> torch.Tensor:
    """Read an IDX file (the MNIST distribution format), optionally gzip-compressed.

    Layout: two zero bytes, a dtype code (``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16,
    ``0x0C`` int32, ``0x0D`` float32, ``0x0E`` float64), the number of dimensions, then one
    big-endian uint32 per dimension, then the data (big-endian, C order). Returns a tensor
    of that shape and dtype (native byte order). Raises ``ValueError`` naming the file for
    a wrong magic number, an unknown dtype code, or a truncated / over-long payload.
    """
    import gzip
    import pathlib

    path = pathlib.Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise ValueError(f"{path}: corrupt gzip stream ({err})") from err
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file (magic number starts with {raw[:2].hex()}, expected 0000)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX dtype code 0x{code:02x} (expected one of "
            + ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES) + ")"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({ndim} dimensions announced, "
                         f"file has {len(raw)} bytes)")
    shape = tuple(int(s) for s in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dt = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "has trailing bytes"
        raise ValueError(f"{path}: IDX payload {kind}: shape {shape} of {dt.name} needs "
                         f"{expected} bytes after the header, found {got}")
    data = np.frombuffer(raw, dtype=dt, offset=header).reshape(shape)
    return torch.from_numpy(data.astype(dt.newbyteorder("="), copy=True))


def load_npz(path, x_key: str = "x", y_key: str | None = "y"):
    """Read arrays ``x`` (and ``y``) from a NumPy ``.npz`` archive; returns ``(x, y)`` tensors.

    ``y`` is ``None`` when ``y_key`` is ``None``. Pickled (object) arrays are refused. Raises
    ``ValueError`` naming the file for a corrupt/truncated archive, a missing key (listing
    the keys present) or ``x`` and ``y`` of different lengths.
    """
    import pathlib
    import zipfile

    path = pathlib.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{path}: not a readable .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: is a single .npy array, expected an .npz archive")
    with archive:
        keys = sorted(archive.files)
        out = []
        for key in (x_key, y_key):
            if key is None:
                out.append(None)
                continue
            if key not in archive.files:
                raise ValueError(f"{path}: no array named {key!r}; the archive holds {keys}")
            try:
                arr = archive[key]
            except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
                raise ValueError(f"{path}: array {key!r} is corrupt or truncated ({err})") from err
            if arr.dtype == object:  # pragma: no cover - allow_pickle=False already refuses
                raise ValueError(f"{path}: array {key!r} holds Python objects")
            out.append(torch.from_numpy(np.ascontiguousarray(arr)))
    x, y = out
    if y is not None and x.shape[:1] != y.shape[:1]:
        raise ValueError(f"{path}: {x_key!r} has {x.shape[0] if x.dim() else 0} rows but "
                         f"{y_key!r} has {y.shape[0] if y.dim() else 0}")
    return x, y
