"""Layer 5: batched spectra for ``analyze``: same-shape matrices in one ``eigvalsh``.

* :func:`plan_batches`: row indices grouped by equal 2-D shape (groups in order of first
  appearance, rows in order), each batch holding at most ``cap x`` the elements of the
  largest matrix, so memory stays bounded (the batch is read one tensor after another into
  one preallocated stack; never the whole checkpoint); other rows alone.
* :func:`batch_esd`: ascending ESDs of a stack ``(B, m, n)`` on ``device`` (the Gram
  matrix ``W^T W`` or ``W W^T`` and ``eigvalsh`` there), returned on the CPU in the stack's
  dtype. On the CPU torch's batched ``eigvalsh`` runs LAPACK per matrix, so each ESD equals
  the one of :func:`~bayes_spectral.spectra.spectrum.esd` on that matrix alone.
* :func:`check_device`: ``"cpu"`` or an available CUDA device, else ``ValueError``.
* ``gram_dtype=torch.float32`` (:func:`check_gram_dtype`, :func:`gram32_esd`): the Gram
  matrix formed in float32 from the float32 (or half) weight, upcast to float64 for
  ``eigvalsh``; eigenvalues float64. Each entry of ``G = W^T W`` carries a rounding error
  of about ``n eps32 ||W||_2^2`` (``n``: the summed dimension), so by Weyl's inequality an
  eigenvalue moves by at most about that much: relative error ``~ n eps32 lambda_max /
  lambda``, small for the tail (``alpha``, ``alpha_weighted``, ``lambda_max``, the log
  norms, ``stable_rank``: ~1e-7 measured), large for the tiny eigenvalues.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._checks import check_weight
from ..spectra.spectrum import (
    ConvMode,
    SpectrumMethod,
    _check_squares,
    _gram_eigvalsh,
    as_matrices,
)

__all__ = ["batch_esd", "check_device", "check_finite_fast", "check_gram_dtype",
           "gram32_eigvalsh", "gram32_esd", "plan_batches"]


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``: the CPU, or CUDA when available (``ValueError``)."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"analyze(): device={device!r} is not a torch device; use 'cpu' "
                         "or 'cuda'") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"analyze(): device={str(device)!r} but CUDA is not available "
                         "(torch.cuda.is_available() is False); use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"analyze(): device={str(device)!r}: only 'cpu' and 'cuda' are "
                         "supported")
    return dev


def plan_batches(shapes: Sequence[tuple[int, ...]], cap: float = 4.0) -> list[list[int]]:
    """Indices into ``shapes`` in batches: equal 2-D shapes together, each batch at most
    ``cap * max_i prod(shapes[i])`` elements (at least one row); other rows alone, after.
    ``cap <= 0``: every row alone, in order."""
    if cap <= 0 or not shapes:
        return [[i] for i in range(len(shapes))]
    limit = cap * max(math.prod(s) for s in shapes)
    groups: dict[tuple[int, ...], list[int]] = {}
    alone: list[list[int]] = []
    for i, shape in enumerate(shapes):
        if len(shape) == 2:
            groups.setdefault(tuple(shape), []).append(i)
        else:
            alone.append([i])
    batches: list[list[int]] = []
    for shape, members in groups.items():
        per = max(1, int(limit // max(1, math.prod(shape))))
        batches += [members[j:j + per] for j in range(0, len(members), per)]
    return batches + alone


def check_finite_fast(w: torch.Tensor, name: str) -> None:
    """:func:`~bayes_spectral._checks.check_weight` (its error naming the layer) only when
    ``sum(w)`` is not finite (one pass, no mask; NaN/Inf make the sum NaN/Inf) or ``w`` is
    not floating."""
    if not w.is_floating_point() or not bool(torch.isfinite(w.sum())):
        check_weight(w, name)


def check_gram_dtype(gram_dtype, dtype: torch.dtype, method: SpectrumMethod) -> bool:
    """Whether the Gram matrices are formed in float32 (``gram_dtype=torch.float32`` with
    ``dtype=torch.float64``, ``method="gram"``); ``False`` for ``None`` or ``dtype`` (the
    Gram matrix in ``dtype``, as without the option); ``ValueError`` otherwise."""
    if gram_dtype is None or gram_dtype == dtype:
        return False
    if gram_dtype != torch.float32 or dtype != torch.float64:
        raise ValueError(f"analyze(): gram_dtype={gram_dtype!r} with dtype={dtype}: use "
                         "gram_dtype=torch.float32 (with dtype=torch.float64) or "
                         "torch.float64 (the default)")
    if method != "gram":
        raise ValueError(f"analyze(): gram_dtype=torch.float32 needs method='gram', got "
                         f"method={method!r}")
    return True


def gram32_eigvalsh(mats: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """Ascending eigenvalues (``>= 0``, float64) of the smaller Gram matrix of each matrix
    of ``mats`` (``..., m, n``), the product ``W^T W`` (or ``W W^T``) formed in float32 and
    upcast to float64 for ``eigvalsh`` (module docstring: the error bound)."""
    return _gram_eigvalsh(mats.float(), name, eig_dtype=torch.float64,
                          hint="use gram_dtype=torch.float64").flip(-1)


def gram32_esd(weight: torch.Tensor, conv: ConvMode = "pool",
               name: str | None = None) -> torch.Tensor:
    """:func:`~bayes_spectral.spectra.spectrum.esd` (``method="gram"``) of one weight with
    the Gram matrix formed in float32 (:func:`gram32_eigvalsh`): ascending, float64."""
    evals = gram32_eigvalsh(as_matrices(weight, conv=conv, name=name), name)
    _check_squares(evals.sqrt(), evals, name)
    width = evals.shape[-1]
    evals = evals.reshape(-1)
    return torch.sort(evals).values if evals.numel() > width else evals


def batch_esd(stack: torch.Tensor, method: SpectrumMethod, device: torch.device,
              name: str | None = None, gram32: bool = False) -> torch.Tensor:
    """Ascending ESDs ``(B, min(m, n))`` of the (checked, finite) matrices of ``stack``
    computed on ``device`` as :func:`~bayes_spectral.spectra.spectrum.esd` computes them
    (``eigvalsh`` of the smaller Gram matrix, or ``svdvals ** 2``), back on the CPU in
    ``stack``'s dtype (half precision computed in float32, as there); ``gram32``: the Gram
    matrices in float32, the ESDs in float64 (:func:`gram32_eigvalsh`)."""
    mats = stack.to(device)
    if gram32:
        return gram32_eigvalsh(mats, name).to("cpu")
    if mats.dtype in (torch.float16, torch.bfloat16):
        mats = mats.float()
    if method == "gram":
        evals = _gram_eigvalsh(mats, name).flip(-1)
    elif method == "svd":
        evals = torch.linalg.svdvals(mats).square().flip(-1)
    else:
        raise ValueError(f"method must be 'svd' or 'gram', got {method!r}")
    return evals.to("cpu")
