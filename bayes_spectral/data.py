"""Layer 6: embedded datasets (nothing is downloaded at run time) and loaders for users' files."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

__all__ = ["Split", "load_digits"]


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


def load_digits(test_fraction: float = 0.2, seed: int = 0,
                dtype: torch.dtype = torch.float32) -> Split:
    """scikit-learn's 8x8 digits (1797 images, 10 classes, ships with scikit-learn).

    Pixels are scaled to [0, 1] (divided by 16) and flattened to 64 features.
    """
    from sklearn.datasets import load_digits as _sk_digits

    bunch = _sk_digits()
    x = bunch.data.astype(np.float64) / 16.0
    return _split(x, bunch.target, test_fraction, seed, dtype, torch.long)
