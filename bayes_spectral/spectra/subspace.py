"""Layer 1: warm-started block subspace iteration for ``lambda_max`` of ``W^T W``
(:class:`TopEigen`, below) and for its top ``k`` eigenpairs (:class:`TailSubspace`, the
tail penalties' ``mode="subspace"``).

A ``k``-column orthonormal block ``V`` (``n x k``) per matrix, kept between calls. One call
takes the Rayleigh-Ritz step on the stored block, ``Y = W V``, ``H = Y^T Y``, top eigenpair
``(theta, s)`` of ``H``, and stores the next block ``orth(W^T Y)`` (one power step;
``n_iter`` steps in all per call, two thin products for ``n_iter = 1``):
``lambda_max ~ theta``, the top Ritz value of ``W`` in a block one power step behind
(``<= lambda_max``, error ``O(|tan angle|^2)`` times the spectral width), with ``v = V s``
and ``W v``. Unlike single-vector power iteration it follows the top eigenvalue through a
crossing inside the block (``lambda_max`` is the largest Ritz value, whichever vector
carries it; tested). Cost per call (``n_iter = 1``): two thin products with ``W``, a
QR of the ``n x k`` block and the ``k x k`` top eigenpair: ``qr`` / ``eigh`` on the CPU,
Cholesky QR and repeated squaring on other devices (``qr`` / ``eigh`` check errors there,
a host sync).
"""

from __future__ import annotations

import torch

__all__ = ["TailSubspace", "TopEigen", "gram_eigh", "oriented"]


def _top_pair(H: torch.Tensor, squarings: int = 12):
    """Top eigenpair ``(theta, s)`` of the PSD ``(..., k, k)`` ``H``: ``eigh`` on the CPU
    (no host sync there), repeated squaring elsewhere (:func:`_top_pair_squaring`)."""
    if H.device.type == "cpu":
        theta, S = torch.linalg.eigh(H)
        return theta[..., -1], S[..., -1:]
    return _top_pair_squaring(H, squarings)


def _top_pair_squaring(H: torch.Tensor, squarings: int = 12):
    """``(theta, s)``: top eigenpair of the PSD ``(..., k, k)`` ``H`` by repeated squaring,
    ``M <- M^2 / tr M^2`` (``M -> s s^T``, other directions damped by
    ``(theta_j/theta_1)^4096``), ``s`` its largest-diagonal column normalised,
    ``theta = s^T H s``. Unlike ``torch.linalg.eigh`` no error check, so no host sync.
    (Traces are floored at ``1e-30``: an all-zero ``H`` gives ``theta = 0``.)"""
    tiny = 1e-30  # not finfo.tiny: scalar ops with it ran 5x slower on the CPU here

    def unit_trace(M):
        return M / M.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None].clamp_min(tiny)

    M = unit_trace(H)
    for _ in range(squarings):
        M = unit_trace(M @ M)
    idx = M.diagonal(dim1=-2, dim2=-1).argmax(-1, keepdim=True).unsqueeze(-2)  # (..., 1, 1)
    s = torch.take_along_dim(M, idx, dim=-1)  # the column, (..., k, 1)
    s = s / torch.linalg.vector_norm(s, dim=-2, keepdim=True).clamp_min(tiny)
    return (s.mT @ H @ s)[..., 0, 0], s


def _orth(Z: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``Z`` (``(..., n, k)``): Householder QR on the CPU,
    :func:`_cholesky_qr` elsewhere (no host sync)."""
    if Z.device.type == "cpu":
        return torch.linalg.qr(Z).Q
    return _cholesky_qr(Z)


def _cholesky_qr(Z: torch.Tensor) -> torch.Tensor:
    """Orthonormal columns spanning ``Z`` (``(..., n, k)``) by Cholesky QR, twice:
    ``Z <- Z L^{-T}``, ``L L^T = Z^T Z + eps tr(Z^T Z)/k I`` (the shift keeps a rank-deficient
    block finite). ``cholesky_ex`` and ``solve_triangular`` check no error: no host sync."""
    k = Z.shape[-1]
    eye = torch.eye(k, dtype=Z.dtype, device=Z.device)
    eps = 8 * torch.finfo(Z.dtype).eps
    for _ in range(2):
        C = Z.mT @ Z
        shift = C.diagonal(dim1=-2, dim2=-1).sum(-1)[..., None, None] * (eps / k)
        L = torch.linalg.cholesky_ex(C + shift * eye).L
        Z = torch.linalg.solve_triangular(L.mT, Z, upper=True, left=False)
    return Z


def _tmm(W: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``W^T Y`` as ``(Y^T W)^T``: a thin ``Y`` against a row-major ``W`` streams ``W`` by rows
    (measured 3.5x faster than ``W.mT @ Y`` for 512 x 784 x 8 on one CPU thread)."""
    return (Y.mT @ W).mT




class TopEigen:
    """Top eigenpair of ``W^T W`` for a stack ``(B, m, n)`` by warm-started block iteration.

    ``__call__(mats)`` returns ``(lam, u, v)``: ``lam`` ``(B,)`` the top Ritz values, ``v``
    ``(B, n)`` unit Ritz vectors and ``u = W v`` ``(B, m)`` (so ``lam = |u|^2`` and
    ``d lam/dW = 2 u v^T`` at a fixed ``v``). The first call runs ``first_iter`` steps from
    a seeded random block, later ones ``n_iter``. No gradient is recorded.
    """

    def __init__(self, k: int = 8, n_iter: int = 1, first_iter: int = 16, seed: int = 0):
        if int(k) < 1 or int(n_iter) < 0 or int(first_iter) < 0:
            raise ValueError(f"TopEigen: need k >= 1, n_iter >= 0, first_iter >= 0, got "
                             f"{k}, {n_iter}, {first_iter}")
        self.k, self.n_iter, self.first_iter = int(k), int(n_iter), int(first_iter)
        self.seed = int(seed)
        self.V: torch.Tensor | None = None

    def state_dict(self) -> dict:
        """``{"V": block}`` (a copy), ``{}`` before the first call."""
        return {} if self.V is None else {"V": self.V.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (``{}``: start afresh at the next call). A block of
        another width than ``min(k, n)`` is a ValueError; one of another shape or device
        than the next call's weights is replaced by a fresh start there."""
        V = state.get("V")
        if V is not None and (V.dim() != 3 or V.shape[-1] != min(self.k, V.shape[-2])):
            raise ValueError(f"TopEigen.load_state_dict: a block of shape {tuple(V.shape)}, "
                             f"expected (B, n, min(k={self.k}, n))")
        self.V = None if V is None else V.detach().clone()

    def _start(self, mats: torch.Tensor) -> torch.Tensor:
        B, _, n = mats.shape
        gen = torch.Generator().manual_seed(self.seed)
        V = torch.randn(B, n, min(self.k, n), generator=gen, dtype=torch.float64)
        return _orth(V.to(dtype=mats.dtype, device=mats.device))

    @torch.no_grad()
    def __call__(self, mats: torch.Tensor):
        W = mats.detach()
        V = self.V
        fresh = V is None or V.shape[:2] != (W.shape[0], W.shape[2]) or V.device != W.device
        if fresh:
            V, iters = self._start(W), self.first_iter
        else:
            V, iters = V.to(W.dtype), self.n_iter - 1
        one = W.shape[0] == 1  # one matrix: 2-D products (batched ones cost ~30% more here)
        W2, V2 = (W[0], V[0]) if one else (W, V)
        for _ in range(max(iters, 0)):
            V2 = _orth(_tmm(W2, W2 @ V2))
        Y = W2 @ V2
        theta, s = _top_pair(Y.mT @ Y)  # the top Ritz pair of the block
        u, v = (Y @ s)[..., 0], (V2 @ s)[..., 0]
        if self.n_iter > 0:  # the next call's block: one power step, from this call's W Y
            V2 = _orth(_tmm(W2, Y))
        self.V = V2.unsqueeze(0) if one else V2
        lam = theta.clamp_min(0)
        return (lam.reshape(1), u.unsqueeze(0), v.unsqueeze(0)) if one else (lam, u, v)


def oriented(mats: torch.Tensor) -> torch.Tensor:
    """``A``: ``mats`` (``(B, m, n)``) or its transpose, whichever has the smaller side last
    (``A^T A`` is the ``d x d`` Gram, ``d = min(m, n)``; ``W W^T`` and ``W^T W`` share their
    non-zero eigenvalues)."""
    return mats.mT if mats.shape[-2] < mats.shape[-1] else mats


@torch.no_grad()
def gram_eigh(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(evals, vecs)`` of the small-side Gram ``A^T A`` of every slice (``(B, d)``
    ascending, clamped at 0, and ``(B, d, d)``), by a float64 ``eigh`` cast back to the
    dtype of ``mats`` (a float32 Gram loses eigenvalues below ~1e-6 ``lambda_max``)."""
    A = oriented(mats.detach()).to(torch.float64)
    evals, vecs = torch.linalg.eigh(A.mT @ A)
    return evals.clamp_min(0).to(mats.dtype), vecs.to(mats.dtype)


class TailSubspace:
    """The top ``k`` eigenpairs of ``G = A^T A`` (:func:`oriented`) of a stack ``(B, m, n)``
    by a fixed-size warm-started block subspace iteration.

    Holds an orthonormal ``(B, d, k)`` block ``V`` (the last call's Ritz vectors, descending).
    A call (``n_iter = 1``) first takes one shifted power step at the current weights,
    ``V <- orth(A^T A V - sigma V)``, ``sigma = |A v_k|^2 / 2`` (half the Rayleigh quotient of
    the last column: the eigenvalues below the block, in ``[0, ~theta_k]``, are damped to
    ``<= theta_k / 2`` against ``theta_i - theta_k / 2`` above, a gap ratio
    ``(theta_k/2)/(theta_i - theta_k/2)`` per step instead of ``lambda_{k+1}/theta_i``), then
    Rayleigh-Ritz on it: ``Y = A V``, ``Y^T Y = S diag(theta) S^T`` (``k x k`` ``eigh``,
    descending), Ritz vectors ``U = V S`` (the next block) and ``A U = Y S``. Three
    ``m x n x k`` products (two per power step, ``n_iter`` steps, plus one), a ``k x k``
    ``eigh`` and a ``d x k`` QR. Stepping at the current weights before the Ritz step (not
    after it, for the next call) matters when the weights move between calls: on a digits Adam
    trajectory called every 8 steps the lagging order left the top Ritz value 0.3-18%
    low. ``theta_i = |A u_i|^2 <= lambda_i`` (interlacing), error ``O(sin^2)`` of the block's
    angle to the eigenvectors; ``d theta_i/dA = 2 (A u_i) u_i^T`` at a fixed ``u_i``, the
    exact eigenvalue gradient when ``u_i`` is an eigenvector. No gradient is recorded. On the
    CPU nothing reads back from the device; elsewhere the QR is Cholesky QR (no sync) but the
    ``k x k`` ``eigh`` checks its error (a host sync: torch has no ``eigh_ex``).
    """

    def __init__(self, n_iter: int = 1) -> None:
        if int(n_iter) < 0:
            raise ValueError(f"TailSubspace: need n_iter >= 0, got {n_iter}")
        self.n_iter = int(n_iter)
        self.V: torch.Tensor | None = None

    def start(self, vecs: torch.Tensor, k: int) -> None:
        """Set the block to the ``k`` leading columns of ``vecs`` (``(B, d, d)``, eigenvectors
        ascending, as :func:`gram_eigh` gives them), descending."""
        self.V = vecs[..., -int(k):].flip(-1).contiguous()

    @torch.no_grad()
    def __call__(self, mats: torch.Tensor):
        """``(theta, AU, U)``: Ritz values ``(B, k)`` descending, ``A U`` ``(B, p, k)`` and
        the Ritz vectors ``U`` ``(B, d, k)``; ``U`` is the next call's block."""
        A = oriented(mats.detach())
        V = self.V.to(A.device, A.dtype)
        one = A.shape[0] == 1  # one matrix: 2-D products (batched ones cost ~30% more here)
        if one:
            A, V = A[0], V[0]
        for _ in range(self.n_iter):
            Y = A @ V
            shift = Y[..., -1:].square().sum(-2, keepdim=True) * 0.5  # |A v_k|^2 / 2
            V = _orth(torch.addcmul(A.mT @ Y, V, shift, value=-1.0))
        Y = A @ V
        theta, S = torch.linalg.eigh(Y.mT @ Y)
        theta, S = theta.flip(-1).clamp_min(0), S.flip(-1)
        U, Y = V @ S, Y @ S
        if one:
            theta, Y, U = theta.unsqueeze(0), Y.unsqueeze(0), U.unsqueeze(0)
        self.V = U
        return theta, Y, U
