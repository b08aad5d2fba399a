"""Layer 1: stochastic spectral sums ``sum_i f(lambda_i) = tr f(G)`` from products with ``W``.

``G`` is the smaller Gram matrix of ``W`` (``m x n``): ``W^T W`` when ``n <= m``, else
``W W^T``; its ``N = min(m, n)`` eigenvalues are the ESD ``lambda_i = sigma_i(W)^2``.
``f`` is replaced by its Chebyshev interpolant ``p`` of degree ``d = 2K`` on ``[0, b]``
(``b >= lambda_max``; Chebyshev nodes, optional Jackson damping), and the trace by
Hutchinson's estimator with ``q`` Rademacher probes ``Z`` (``N x q``, ``probes=q``)::

    tr p(G) ~ (1/q) sum_j z_j^T p(G) z_j,      p(G) = sum_k c_k T_k((2/b) G - I)

The moments ``z^T T_k z`` up to ``2K`` come from ``K`` products with ``G`` (two thin
products with ``W`` each) through ``T_{2k} = 2 T_k^2 - 1`` and
``T_{2k+1} = 2 T_{k+1} T_k - T_1`` (the KPM doubling trick). The estimate is a polynomial in
``W``, so autograd gives ``d/dW`` of the same estimator (``2 W p'(W^T W)`` sketched by the
probes), unbiased for ``d tr p(G)/dW``.

Error: ``E[estimate] = tr p(G)`` exactly (Rademacher probes), the variance of one probe
is ``2 (||p(G)||_F^2 - sum_i p(G)_ii^2) <= 2 ||p(G)||_F^2``, so ``sd <= sqrt(2/q) ||p(G)||_F``
(tested);
the deterministic bias is ``sum_i [f(lambda_i) - p(lambda_i)]`` (Chebyshev interpolation:
geometric in ``d`` for analytic ``f``, ``O(b/d)`` per eigenvalue near a kink of ``f``).
``probes="exact"`` uses ``Z = I`` (``N`` columns): ``tr p(G)`` without sampling error.
Cost: ``K`` Gram products forward, about twice that for the gradient; on one CPU thread a
thin product costs nearly as much as a 128-column one (it streams ``W``), so the cost is
set by ``degree``, hardly by ``probes`` (``benchmarks/bench_penalties.py``, floor row).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["chebyshev_nodes_matrix", "chebyshev_coefficients", "chebyshev_moments",
           "spectral_sum", "rademacher"]


def chebyshev_nodes_matrix(degree: int, dtype=torch.float64, device=None):
    """``(x, T)``: the ``d + 1`` Chebyshev nodes ``x_j = cos(pi (j + 1/2)/(d + 1))`` and
    ``T[k, j] = (2 - [k = 0])/(d + 1) T_k(x_j)``, so that ``c = T @ f(x)`` interpolates."""
    if int(degree) < 1:
        raise ValueError(f"spectral_sum: degree must be >= 1, got {degree!r}")
    n = int(degree) + 1
    theta = math.pi * (torch.arange(n, dtype=dtype, device=device) + 0.5) / n
    k = torch.arange(n, dtype=dtype, device=device).unsqueeze(1)
    T = torch.cos(k * theta) * (2.0 / n)
    T[0] /= 2
    return torch.cos(theta), T


def _jackson(degree: int, dtype, device) -> torch.Tensor:
    """Jackson damping ``g_k = [(d+2-k) cos(pi k/(d+2)) + sin(pi k/(d+2)) cot(pi/(d+2))]/(d+2)``."""
    q = degree + 2
    k = torch.arange(degree + 1, dtype=dtype, device=device)
    a = math.pi / q
    return ((q - k) * torch.cos(a * k) + torch.sin(a * k) / math.tan(a)) / q


def chebyshev_coefficients(f: Callable[[torch.Tensor], torch.Tensor], degree: int,
                           upper: torch.Tensor, jackson: bool = False) -> torch.Tensor:
    """Coefficients ``c_k`` of the interpolant of ``f`` on ``[0, upper]`` in
    ``T_k(2 lambda/upper - 1)``; ``upper`` may be a tensor (no host sync), ``(...)`` batched."""
    upper = torch.as_tensor(upper)
    x, T = chebyshev_nodes_matrix(degree, dtype=upper.dtype, device=upper.device)
    lam = (x + 1) * (0.5 * upper.unsqueeze(-1))
    c = f(lam) @ T.T
    if jackson:
        c = c * _jackson(degree, c.dtype, c.device)
    return c


def rademacher(N: int, probes: int, like: torch.Tensor, batch: tuple[int, ...] = (),
               generator: torch.Generator | None = None) -> torch.Tensor:
    """``(*batch, N, probes)`` random signs, dtype/device of ``like`` (drawn on the
    generator's device: CPU unless the generator is on ``like``'s device)."""
    dev = generator.device if generator is not None else like.device
    z = torch.randint(0, 2, (*batch, N, probes), generator=generator, device=dev)
    return (2 * z - 1).to(dtype=like.dtype, device=like.device)


def _gram_apply(W: torch.Tensor, V: torch.Tensor, wide: bool) -> torch.Tensor:
    """``G V``: ``W (W^T V)`` for a wide ``W`` (``G = W W^T``), else ``W^T (W V)``."""
    if wide:
        return W @ (V.mT @ W).mT
    return ((W @ V).mT @ W).mT  # W^T Y as (Y^T W)^T: streams W by rows (~3x faster thin)


def chebyshev_moments(W: torch.Tensor, Z: torch.Tensor, degree: int,
                      upper: torch.Tensor) -> torch.Tensor:
    """``mu_k = sum_j z_j^T T_k(X) z_j`` for ``k = 0..degree``, ``X = (2/upper) G - I``
    (``W``: ``(..., m, n)``, ``Z``: ``(..., N, p)``), from ``ceil(degree/2)`` products
    with ``G`` (the doubling trick of the module docstring). Differentiable in ``W``."""
    wide = W.shape[-2] < W.shape[-1]
    s = (2.0 / upper).reshape(*upper.shape, 1, 1) if torch.is_tensor(upper) else 2.0 / upper
    K = (degree + 1) // 2
    V = [Z, s * _gram_apply(W, Z, wide) - Z]
    for _ in range(2, K + 1):
        V.append(2 * (s * _gram_apply(W, V[-1], wide) - V[-1]) - V[-2])

    def dot(a, b):
        return (a * b).sum((-2, -1))

    mu0, mu1 = dot(Z, Z), dot(Z, V[1])
    mus = [mu0, mu1]
    for k in range(2, degree + 1):
        h = k // 2
        if k % 2 == 0:
            mus.append(2 * dot(V[h], V[h]) - mu0)
        else:
            mus.append(2 * dot(V[h + 1], V[h]) - mu1)
    return torch.stack(mus, -1)


def spectral_sum(W: torch.Tensor, f: Callable[[torch.Tensor], torch.Tensor], upper,
                 degree: int = 32, probes: int | str = 8, jackson: bool = False,
                 generator: torch.Generator | None = None, Z: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Estimate of ``sum_i f(lambda_i)`` over the ``N = min(m, n)`` eigenvalues of ``W^T W``.

    ``W``: ``(..., m, n)`` (a stack gives one estimate per matrix); ``upper``: a bound
    ``>= lambda_max`` (tensor or float; eigenvalues above it are extrapolated, badly);
    ``probes``: number of Rademacher columns, or ``"exact"`` (``Z = I``, the exact trace of
    the interpolant); ``Z``: explicit probes ``(..., N, q)``. Returns the estimate of
    ``(1/q) sum_j z_j^T p(G) z_j`` (graph through ``W`` if it requires grad); see the
    module docstring for its mean and sd.
    """
    if W.dim() < 2 or not W.is_floating_point():
        raise TypeError(f"spectral_sum: W must be a floating (..., m, n) tensor, got "
                        f"{tuple(W.shape)} {W.dtype}")
    N = min(W.shape[-2], W.shape[-1])
    per = None  # the probes' weight: 1/p (Hutchinson) or 1 (Z = I, the trace itself)
    if Z is None:
        if probes == "exact":
            Z = torch.eye(N, dtype=W.dtype, device=W.device).expand(*W.shape[:-2], N, N)
            per = 1.0
        elif isinstance(probes, int) and probes >= 1:
            Z = rademacher(N, probes, W, tuple(W.shape[:-2]), generator)
        else:
            raise ValueError(f"spectral_sum: probes must be an int >= 1 or 'exact', "
                             f"got {probes!r}")
    upper = torch.as_tensor(upper, dtype=W.dtype, device=W.device)
    c = chebyshev_coefficients(f, degree, upper, jackson=jackson)
    mu = chebyshev_moments(W, Z, degree, upper)
    return (c * mu).sum(-1) * (1.0 / Z.shape[-1] if per is None else per)
