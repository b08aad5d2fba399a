"""Layer 1: spectra of weight matrices (pure torch, batched, differentiable).

Conventions (see DESIGN.md):

* A weight ``W`` of shape ``(out, in)`` has ESD ``lambda_i = sigma_i(W)^2``, the eigenvalues
  of ``W^T W`` restricted to the ``min(out, in)`` non-trivial ones, sorted ascending, with
  no ``1/N`` normalisation (WeightWatcher >= 0.6.5).
* A convolution kernel ``(out, in, k1[, k2[, k3]])`` is, by default (``conv="pool"``), the
  stack of its ``k1*k2*k3`` slices ``W[:, :, i, j]``; their eigenvalues are pooled into one
  ESD, as WeightWatcher does for Conv2d. ``conv="flatten"`` uses the single matrix
  ``out x (in*k1*k2*k3)`` (the Yoshida & Miyato / ``torch.nn.utils.spectral_norm`` view).
  No rescaling is applied (WeightWatcher multiplies Conv2d slices by ``sqrt(1/2)``, see
  ``tests/diagnostics/test_weightwatcher_parity.py``).
* Gradients flow through singular values only, never through singular vectors, so they
  stay finite when values repeat.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .._checks import check_weight

ConvMode = Literal["pool", "flatten"]
SpectrumMethod = Literal["svd", "gram"]

__all__ = [
    "as_matrices",
    "singular_values",
    "esd",
    "stable_rank",
    "schatten_norm",
    "effective_rank",
    "numerical_rank",
    "PowerIteration",
]


def as_matrices(
    weight: torch.Tensor, conv: ConvMode = "pool", batch: bool = False, name: str | None = None
) -> torch.Tensor:
    """Return ``weight`` as a stack of matrices of shape ``(..., out, in)``.

    * 2-D ``(out, in)`` -> ``(1, out, in)``.
    * conv kernel ``(out, in, *k)`` with ``conv="pool"`` -> ``(prod(k), out, in)``,
      the slices ``W[:, :, i, j, ...]``; with ``conv="flatten"`` -> ``(1, out, in*prod(k))``.
    * ``batch=True``: ``weight`` is already a stack ``(..., m, n)``, returned unchanged.
    """
    weight = check_weight(weight, name)
    if batch:
        return weight
    if conv not in ("pool", "flatten"):
        raise ValueError(f"conv must be 'pool' or 'flatten', got {conv!r}")
    if weight.dim() == 2:
        return weight.unsqueeze(0)
    if weight.dim() > 5:
        raise ValueError(
            f"weight{f' (layer {name!r})' if name else ''} has shape {tuple(weight.shape)}: "
            "expected a 2-D matrix or a Conv1d/2d/3d kernel (out, in, *kernel)"
        )
    out_ch, in_ch = weight.shape[:2]
    if conv == "flatten":
        return weight.reshape(1, out_ch, -1)
    k = math.prod(weight.shape[2:])
    return weight.reshape(out_ch, in_ch, k).permute(2, 0, 1)


def _gram_eigvalsh(mats: torch.Tensor, name: str | None = None, eig_dtype=None,
                   hint: str = "pass weight.double() or use method='svd'") -> torch.Tensor:
    """Descending eigenvalues of the smaller Gram matrix (``W^T W`` or ``W W^T``), >= 0:
    the product in ``mats``' dtype, ``eigvalsh`` in ``eig_dtype`` (default the same)."""
    m, n = mats.shape[-2:]
    gram = mats.mT @ mats if n <= m else mats @ mats.mT
    if not bool(torch.isfinite(gram).all()):
        where = f" (layer {name!r})" if name else ""
        raise ValueError(f"Gram matrix of weight{where} overflows {gram.dtype} (entries of "
                         f"W^T W beyond its range); {hint}")
    gram = gram if eig_dtype is None else gram.to(eig_dtype)
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0)


def singular_values(
    weight: torch.Tensor,
    conv: ConvMode = "pool",
    batch: bool = False,
    name: str | None = None,
    method: SpectrumMethod = "svd",
) -> torch.Tensor:
    """Singular values ``sigma_i`` (descending) of every matrix of :func:`as_matrices`.

    Returns shape ``(..., min(m, n))``. ``method="svd"`` (default) uses
    ``torch.linalg.svdvals``: accurate to ``eps * sigma_i`` and with gradients well
    defined for repeated values. ``method="gram"`` takes ``sqrt`` of the eigenvalues of
    the smaller Gram matrix: 1.5-4x faster on CPU, but small values are only accurate to
    ``sqrt(eps) * sigma_max`` (fine for tail fits and norms, not for numerical rank).
    """
    mats = as_matrices(weight, conv=conv, batch=batch, name=name)
    if method == "gram":
        return _gram_eigvalsh(mats, name).sqrt()
    if method != "svd":
        raise ValueError(f"method must be 'svd' or 'gram', got {method!r}")
    return torch.linalg.svdvals(mats)


def esd(
    weight: torch.Tensor,
    conv: ConvMode = "pool",
    batch: bool = False,
    name: str | None = None,
    method: SpectrumMethod = "svd",
) -> torch.Tensor:
    """Empirical spectral density: ascending eigenvalues ``lambda_i = sigma_i(W)^2``.

    For a 2-D weight or a conv kernel returns one 1-D tensor (pooled over kernel slices,
    length ``prod(k) * min(out, in)``). With ``batch=True`` a stack ``(..., m, n)`` gives
    ``(..., min(m, n))``, one ascending ESD per matrix. ``method``: see
    :func:`singular_values` (``"gram"`` returns the Gram eigenvalues directly).
    """
    if method == "gram":
        mats = as_matrices(weight, conv=conv, batch=batch, name=name)
        evals = _gram_eigvalsh(mats, name).flip(-1)
        sv = evals
        _check_squares(evals.sqrt(), evals, name)
    else:
        sv = singular_values(weight, conv=conv, batch=batch, name=name, method=method)
        evals = sv.square().flip(-1)
        _check_squares(sv, evals, name)
    if batch:
        return evals
    evals = evals.reshape(-1)
    if evals.numel() > sv.shape[-1]:
        evals = torch.sort(evals).values
    return evals


def _check_squares(sv: torch.Tensor, evals: torch.Tensor, name: str | None) -> None:
    """Raise ValueError when ``lambda = sigma^2`` leaves the dtype's normal range: overflow
    (``sigma_max^2 > finfo.max``) or underflow (``0 < sigma_max^2 < finfo.tiny``)."""
    fi = torch.finfo(evals.dtype)
    top = float(sv.detach().amax()) if sv.numel() else 0.0
    lam_max = float(evals.detach().amax()) if evals.numel() else 0.0
    where = f" (layer {name!r})" if name else ""
    hint = "; pass weight.double() or rescale it (alpha is scale-free)"
    if not bool(torch.isfinite(evals).all()):
        raise ValueError(
            f"ESD of weight{where} overflows {evals.dtype}: sigma_max = {top:.4g}, "
            f"sigma_max^2 > {fi.max:.4g}{hint}"
        )
    if 0.0 < lam_max < fi.tiny or (top > 0 and lam_max == 0):
        raise ValueError(
            f"ESD of weight{where} underflows {evals.dtype}: sigma_max = {top:.4g}, "
            f"sigma_max^2 < {fi.tiny:.4g} (the smallest normal number){hint}"
        )


def stable_rank(evals: torch.Tensor) -> torch.Tensor:
    """Stable rank ``sum_i lambda_i / lambda_max = ||W||_F^2 / ||W||_2^2`` (last dim)."""
    return evals.sum(-1) / evals.amax(-1)


def schatten_norm(evals: torch.Tensor, p: float) -> torch.Tensor:
    """Schatten-p norm ``(sum_i sigma_i^p)^(1/p)`` from eigenvalues ``lambda = sigma^2``.

    ``p=1`` is the nuclear norm, ``p=2`` Frobenius, ``p=inf`` the spectral norm.
    """
    sv = evals.clamp_min(0).sqrt()
    if math.isinf(p):
        return sv.amax(-1)
    if p <= 0:
        raise ValueError(f"Schatten p must be > 0, got {p}")
    return sv.pow(p).sum(-1).pow(1.0 / p)


def effective_rank(evals: torch.Tensor) -> torch.Tensor:
    """Effective rank (Roy & Vetterli 2007): ``exp(H(p))``, ``p_i = sigma_i / sum_j sigma_j``.

    ``H(p) = -sum_i p_i log p_i`` with ``0 log 0 = 0``; equals ``r`` for ``r`` equal
    non-zero singular values.
    """
    sv = evals.clamp_min(0).sqrt()
    p = sv / sv.sum(-1, keepdim=True)
    plogp = torch.where(p > 0, p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny)), 0.0)
    return torch.exp(-plogp.sum(-1))


def numerical_rank(
    evals: torch.Tensor, rtol: float | None = None, max_dim: int | None = None
) -> torch.Tensor:
    """Number of ``sigma_i > rtol * sigma_max``.

    Default ``rtol = max_dim * eps(dtype)`` (``max_dim`` defaults to the number of
    eigenvalues), the convention of ``numpy.linalg.matrix_rank``.
    """
    sv = evals.clamp_min(0).sqrt()
    if rtol is None:
        rtol = (max_dim or sv.shape[-1]) * torch.finfo(sv.dtype).eps
    return (sv > rtol * sv.amax(-1, keepdim=True)).sum(-1)


class PowerIteration(nn.Module):
    """Persistent power-iteration estimate of ``sigma_max(W)`` (Yoshida & Miyato 2017).

    Keeps the left vector ``u`` as a buffer between calls (so it follows ``.to(device)``
    and ``state_dict``). Each call runs ``n_iter`` steps ``v = W^T u/|W^T u|,
    u = W v/|W v|`` without gradient and returns ``sigma = u^T W v``, whose gradient is
    ``u v^T`` (exact at the fixed point, as in ``torch.nn.utils.spectral_norm``).
    Conv kernels are reshaped to ``out x (in*k)``; stacks ``(..., m, n)`` are supported.
    """

    u: torch.Tensor

    def __init__(self, shape: tuple[int, ...] | torch.Size, n_iter: int = 1, eps: float = 1e-12,
                 generator: torch.Generator | None = None, batch: bool = False) -> None:
        super().__init__()
        if n_iter < 1:
            raise ValueError(f"n_iter must be >= 1, got {n_iter}")
        shape = tuple(shape)
        if len(shape) < 2:
            raise ValueError(f"PowerIteration needs a matrix shape, got {shape}")
        self.batch = batch
        self.n_iter = n_iter
        self.eps = eps
        lead = shape[:-2] if batch else ()
        rows = shape[-2] if batch else shape[0]
        u = torch.randn(*lead, rows, generator=generator)
        self.register_buffer("u", u / u.norm(dim=-1, keepdim=True))

    def _matrix(self, weight: torch.Tensor) -> torch.Tensor:
        if self.batch:
            return weight
        return weight.reshape(weight.shape[0], -1)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """Return the differentiable estimate ``u^T W v`` of the top singular value."""
        W, u, v, _ = self._iterate(weight)
        return torch.einsum("...m,...mn,...n->...", u, W, v)

    def _iterate(self, weight: torch.Tensor):
        """``(W, u, v, |W v|)``: the matrix of ``weight`` and ``n_iter`` steps without
        gradient from the stored ``u`` (which is updated); ``u = W v / |W v|``, so
        ``u^T W v = |W v|``. Plain matrix-vector products for a single matrix."""
        W = self._matrix(weight)
        if self.u.shape != W.shape[:-1]:
            raise ValueError(
                f"PowerIteration was built for left dimension {tuple(self.u.shape)}, "
                f"got a weight of shape {tuple(weight.shape)}"
            )
        # few, fused ops: on a 10 x 512 layer the call is all dispatch overhead
        with torch.no_grad():
            Wd = W.detach()
            u = self.u
            if u.dtype != Wd.dtype or u.device != Wd.device:
                u = u.to(dtype=Wd.dtype, device=Wd.device)
            plain = Wd.dim() == 2
            for _ in range(self.n_iter):
                v = torch.mv(Wd.t(), u) if plain else torch.einsum("...mn,...m->...n", Wd, u)
                v = v.div_(torch.linalg.vector_norm(v, dim=-1, keepdim=True).clamp_min_(self.eps))
                u = torch.mv(Wd, v) if plain else torch.einsum("...mn,...n->...m", Wd, v)
                norm = torch.linalg.vector_norm(u, dim=-1)
                u = u.div_(norm.unsqueeze(-1).clamp_min(self.eps))
            self.u = u  # a fresh tensor: callers never write into it
        return W, u, v, norm

    def estimate(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(sigma, u, v)`` without gradient, after the same steps as a call: ``sigma =
        u^T W v = |W v|`` and ``d sigma / dW = u v^T`` (for the matrix of ``weight``)."""
        _, u, v, sigma = self._iterate(weight.detach())
        return sigma, u, v
