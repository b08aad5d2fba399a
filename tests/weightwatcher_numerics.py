"""Pin WeightWatcher 0.7.7 to the numerics of its CPU branch for the parity tests.

WeightWatcher chooses its numerics when ``weightwatcher.RMT_Util`` is imported (RMT_Util.py
lines 196-256): if ``torch.cuda.is_available()``, it rounds every PyTorch weight to **float16**
(``torch_T_to_np = T.half().numpy()``, "changed to half to save memory"), takes the SVD in
**float32** on the GPU (``torch.linalg.svdvals(torch.Tensor(W).cuda())``) and uses
``EPSILON = 6e-5`` in its matrix entropy. Without CUDA it reads float32 weights, casts them
to float64 (``W.astype(float)``) and takes the SVD with ``scipy.linalg.svd`` in float64
(``EPSILON = 1e-10``): the same float64 spectrum as ours, to ~1e-15 relative.

The float16 rounding moves each entry by up to 2^-11 relative, and so the eigenvalues by
~3e-5 to 5e-4 relative, xmin, alpha and every column built on them alike (the 19 failures
of the parity tests on a machine with a GPU). The parity tests compare formulas, so they
pin the CPU branch on every machine (``pin_cpu_numerics``); that WeightWatcher's GPU numbers
are ours on the float16-rounded weights is checked in
tests/diagnostics/test_weightwatcher_cuda_branch.py.
"""

from __future__ import annotations

import numpy as np
import torch


def took_cuda_branch() -> bool:
    """True when WeightWatcher was imported with CUDA (it then reads weights as float16)."""
    from weightwatcher import weightwatcher as wwmod

    return wwmod.torch_T_to_np(torch.ones(1)).dtype == np.float16


def pin_cpu_numerics(monkeypatch) -> None:
    """Set the attributes WeightWatcher's CUDA branch overrides back to its CPU branch's
    values (a no-op without CUDA); ``monkeypatch`` undoes it after the test."""
    from weightwatcher import RMT_Util, constants
    from weightwatcher import weightwatcher as wwmod

    def to_numpy(t):  # RMT_Util.py line 126 / 253
        return t.to("cpu").float().numpy()

    monkeypatch.setattr(wwmod, "torch_T_to_np", to_numpy)
    monkeypatch.setattr(RMT_Util, "torch_T_to_np", to_numpy)
    for name in ("eig_full", "svd_full", "svd_vals", "svd_lowrank", "svd_values",
                 "smooth_W"):
        monkeypatch.setattr(RMT_Util, f"_{name}_fast", getattr(RMT_Util, f"_{name}_accurate"))
    monkeypatch.setattr(RMT_Util, "EPSILON", constants.EPSILON)
    monkeypatch.setattr(RMT_Util, "EVALS_THRESH", constants.EVALS_THRESH)
