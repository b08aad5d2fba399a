"""Flatness (Hessian-trace) regularisation of deep matrix factorisation (Gatmiry et al. 2023).

Problem: matrix sensing of a ``d x d`` rank-``r`` target ``M*`` from ``n`` Gaussian
measurements ``y_k = <A_k, M*>`` (``A_k`` i.i.d. ``N(0, 1)`` entries; RIP for
``n >> r d``), :func:`bayes_spectral.data.make_matrix_sensing`.

Deep linear network of depth ``L``: ``P(theta) = W_L ... W_1`` (all ``d x d``), loss
``loss(theta) = (1 / 2n) sum_k r_k^2`` with residuals ``r_k = <A_k, P> - y_k``.

**Closed-form Hessian trace.** ``Hess loss = (1/n) sum_k (grad r_k grad r_k^T + r_k Hess r_k)``.
``r_k`` is affine in each single ``W_i``, so the diagonal blocks ``d^2 r_k / dW_i^2``
vanish and the second term has zero trace, at every ``theta`` (not only at interpolation).
With ``grad_{W_i} r_k = L_i^T A_k R_i^T``, ``L_i = W_L ... W_{i+1}``, ``R_i = W_{i-1} ... W_1``
(identity when empty)::

    tr Hess loss(theta) = (1/n) sum_k sum_i || L_i^T A_k R_i^T ||_F^2

(:func:`hessian_trace`; checked against ``torch.autograd.functional.hessian`` in the tests).
For Gaussian ``A_k`` its expectation is ``sum_i ||L_i||_F^2 ||R_i||_F^2``; Gatmiry et al.
show its minimum over factorisations of a fixed ``P`` is, under RIP, approximately a
monotone function of the nuclear norm ``||P||_*``, for every depth, while weight decay
``sum_i ||W_i||_F^2`` minimises to ``L ||P||_{S_{2/L}}^{2/L}`` (Schatten-2/L quasi-norm,
depth-dependent; equal to ``2 ||P||_*`` only at ``L = 2``).

Methods compared, for each depth and ``n``:

* ``flatness``: Adam on ``loss + lam * tr Hess loss``;
* ``weight_decay``: Adam on ``loss + lam * sum_i ||W_i||_F^2``;
* ``nuclear``: ``min ||X||_*`` s.t. ``A(X) = y``, approximated by accelerated proximal
  gradient (FISTA with singular-value thresholding) on ``loss(X) + mu ||X||_*`` with
  ``mu`` decreased geometrically (continuation), :func:`nuclear_norm_minimisation`.

Reported: relative recovery error ``||P - M*||_F / ||M*||_F``, relative distance to the
nuclear-norm solution ``||P - X_nuc||_F / ||X_nuc||_F``, the final data loss and the
nuclear norm of ``P``.

Findings (``Config.small()``: d=6, rank 1, seed 0, ``lam = 1e-3``, 1500 Adam steps)::

    n   method        depth  recovery err  dist to X_nuc  ||P||_*  (X_nuc: 2.282)
    14  nuclear         -       0.426          0            2.282
    14  flatness        2       0.324          0.219        2.302   (+0.9%)
    14  flatness        4       0.298          0.235        2.311   (+1.3%)
    14  weight_decay    2       0.607          0.316        2.581   (+13%)
    14  weight_decay    4       0.189          0.336        2.382   (+4.4%)
    30  all methods             <= 0.021 (exact recovery regime; X_nuc recovers M*)

* Supported: at both depths the flatness-regularised solution has nearly the minimal
  nuclear norm (excess about 1%), i.e. its bias is depth-independent and nuclear-norm-like.
  Weight decay is not: at depth 4 it lands on a different, lower-rank-favouring solution
  (Schatten-1/2; better recovery than nuclear norm here, 0.19 vs 0.43).
* Only partly supported: "tracks" is loose. In the under-determined regime (n = 14) the
  flatness solution is still 22-24% (relative Frobenius distance) away from the convex
  solution, because the nuclear-norm level sets are flat there and the penalised
  (``lam > 0``), finitely trained solution is only approximately optimal.
* Weight decay at depth 2 should equal nuclear-norm minimisation in theory
  (``min sum ||W_i||^2 = 2 ||P||_*``); our depth-2 weight-decay run ends 13% above the
  minimal nuclear norm, which we attribute to incomplete optimisation (1500 Adam steps,
  small ``lam``), not to the theory. The test does not assert anything about it.
"""

from __future__ import annotations

import dataclasses
import math

import pandas as pd
import torch

from bayes_spectral.data import make_matrix_sensing
from bayes_spectral.penalties import WeightDecay

from ._common import new_figure, save_figure, torch_threads, write_results
from ._model_claims import write_claims

__all__ = [
    "Config",
    "run",
    "hessian_trace",
    "end_to_end",
    "sensing_loss",
    "nuclear_norm_minimisation",
    "train_deep_linear",
]

_WD = WeightDecay(coef=2.0)  # coef/2 ||W||_F^2 = ||W||_F^2


@dataclasses.dataclass
class Config:
    """Settings of :func:`run`.

    The default is the full-size study (5 seeds; ``results/deep_matrix_factorization``:
    about 8 minutes of one core per 2 seeds on the loaded 2-core machine).
    """

    dim: int = 10
    rank: int = 1
    num_measurements: tuple[int, ...] = (20, 30, 45, 70, 100)
    depths: tuple[int, ...] = (2, 3, 4, 5)
    lam: float = 1e-3
    steps: int = 4000
    lr: float = 1e-2
    init_scale: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    num_threads: int | None = 1

    @classmethod
    def small(cls) -> Config:
        """Seconds: d=6, rank 1, n in {14, 30}, depths 2 and 4, one seed."""
        return cls(dim=6, rank=1, num_measurements=(14, 30), depths=(2, 4), steps=1500,
                   lr=2e-2, seeds=(0,))

    def __post_init__(self) -> None:
        if not 0 < self.rank <= self.dim:
            raise ValueError(f"rank must be in [1, dim], got {self.rank}")
        if any(L < 1 for L in self.depths):
            raise ValueError(f"depths must be >= 1, got {self.depths}")
        if not self.lam > 0:
            raise ValueError(f"lam must be > 0, got {self.lam}")


def end_to_end(weights) -> torch.Tensor:
    """``P = W_L ... W_1`` for ``weights = [W_1, ..., W_L]``."""
    P = weights[0]
    for W in weights[1:]:
        P = W @ P
    return P


def sensing_loss(P: torch.Tensor, A: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``(1 / 2n) sum_k (<A_k, P> - y_k)^2``."""
    r = torch.einsum("kij,ij->k", A, P) - y
    return 0.5 * r.square().mean()


def hessian_trace(weights, A: torch.Tensor) -> torch.Tensor:
    """Exact trace of the Hessian of :func:`sensing_loss` w.r.t. all ``W_i`` (closed form).

    ``(1/n) sum_k sum_i ||L_i^T A_k R_i^T||_F^2`` (module docstring); independent of ``y``.
    Differentiable in the weights.
    """
    # Not penalties.deep_linear_hessian_trace: that closed form is for regression
    # ||W_L...W_1 x_n - y_n||^2 (rank-one sensing matrices e_j x_n^T); general Gaussian A_k
    # need this form. penalties.hutchinson_trace would only estimate it (random probes).
    L = len(weights)
    eye = torch.eye(weights[0].shape[1], dtype=weights[0].dtype, device=weights[0].device)
    right = [eye]  # right[i] = W_i ... W_1 (0-based: product of the first i weights)
    for W in weights:
        right.append(W @ right[-1])
    left = [torch.eye(weights[-1].shape[0], dtype=eye.dtype, device=eye.device)]
    for W in reversed(weights):  # left[j] = W_L ... W_{L-j+1}
        left.append(left[-1] @ W)
    total = A.new_zeros(())
    for i in range(L):
        Li = left[L - 1 - i]  # product of the weights after W_{i+1} (1-based)
        Ri = right[i]  # product of the weights before it
        G = Li.T @ A @ Ri.T  # (n, d, d): L_i^T A_k R_i^T for every k
        total = total + G.square().sum() / A.shape[0]
    return total


def _weight_decay(weights) -> torch.Tensor:
    """``sum_i ||W_i||_F^2`` = :class:`~bayes_spectral.penalties.WeightDecay` with ``coef=2``."""
    return sum(_WD(W, name=f"W{i}") for i, W in enumerate(weights, start=1))


def train_deep_linear(A, y, depth: int, penalty: str, lam: float, steps: int, lr: float,
                      init_scale: float, seed: int):
    """Adam on ``sensing_loss + lam * penalty``; ``penalty`` in {"flatness", "weight_decay"}.

    Each weight starts as ``W_i = s Q_i`` with a random orthogonal ``Q_i`` and
    ``s = init_scale * (||M||_F / sqrt(d))^(1/depth)``, ``||M||_F`` estimated from ``y``
    (Gaussian sensing: ``E y_k^2 = ||M||_F^2``), so ``P`` starts at the target's scale and
    not in the small-initialisation (implicitly low-rank) regime. Returns the weights.
    """
    g = torch.Generator().manual_seed(seed)
    d = A.shape[-1]
    m_norm = y.square().mean().sqrt()
    s = init_scale * float((m_norm / math.sqrt(d)) ** (1.0 / depth))
    weights = []
    for _ in range(depth):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=A.dtype))
        weights.append((s * q).requires_grad_())
    opt = torch.optim.Adam(weights, lr=lr)
    if penalty not in ("flatness", "weight_decay"):
        raise ValueError(f"penalty must be 'flatness' or 'weight_decay', got {penalty!r}")
    reg = (lambda ws: hessian_trace(ws, A)) if penalty == "flatness" else _weight_decay
    for _ in range(steps):
        obj = sensing_loss(end_to_end(weights), A, y) + lam * reg(weights)
        opt.zero_grad(set_to_none=True)
        obj.backward()
        opt.step()
    if not torch.isfinite(obj):
        raise FloatingPointError(f"training diverged (depth {depth}, {penalty})")
    return [W.detach() for W in weights]


def _svt(X: torch.Tensor, tau: float) -> torch.Tensor:
    U, S, Vh = torch.linalg.svd(X, full_matrices=False)
    return (U * (S - tau).clamp_min(0)) @ Vh


def nuclear_norm_minimisation(A, y, mu_final: float = 1e-6, iters_per_stage: int = 300,
                              num_stages: int = 8) -> torch.Tensor:
    """Approximate ``argmin ||X||_*`` s.t. ``<A_k, X> = y_k`` (convex; FISTA + SVT).

    Minimises ``(1/2n)||A(X) - y||^2 + mu ||X||_*`` with ``mu`` decreasing geometrically
    from ``||A^*(y)||_2 / n`` to ``mu_final`` over ``num_stages`` warm-started stages; the
    step is ``1 / Lip``, ``Lip = lambda_max(A_mat^T A_mat) / n``.
    """
    # The convex baseline needs the prox of mu ||X||_* (singular-value thresholding, _svt),
    # not the penalty value, so penalties.NuclearNorm has no role here.
    n, d1, d2 = A.shape
    Amat = A.reshape(n, -1)
    lip = float(torch.linalg.eigvalsh(Amat.T @ Amat / n)[-1])
    step = 1.0 / lip
    grad = lambda X: (Amat.T @ (Amat @ X.reshape(-1) - y) / n).reshape(d1, d2)  # noqa: E731
    mu0 = float(torch.linalg.matrix_norm(grad(torch.zeros(d1, d2, dtype=A.dtype)), ord=2))
    X = Z = torch.zeros(d1, d2, dtype=A.dtype)
    t = 1.0
    for mu in torch.logspace(math.log10(mu0), math.log10(mu_final), num_stages).tolist():
        for _ in range(iters_per_stage):
            X_new = _svt(Z - step * grad(Z), step * mu)
            t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
            Z = X_new + ((t - 1) / t_new) * (X_new - X)
            X, t = X_new, t_new
    return X


def run(config: Config | None = None, out_dir=None) -> pd.DataFrame:
    """One tidy row per (n, seed, method, depth); ``depth`` is 0 for the convex ``nuclear``.

    Columns: ``num_measurements, seed, method, depth, recovery_error, dist_to_nuclear,
    data_loss, nuclear_norm, nuclear_excess`` (``||P||_* / ||X_nuc||_* - 1``). With
    ``out_dir`` writes ``deep_matrix_factorization.csv`` and ``.png``.
    """
    config = config or Config()
    rows = []
    with torch_threads(config.num_threads):
        for n in config.num_measurements:
            for seed in config.seeds:
                A, y, M = make_matrix_sensing(config.dim, config.rank, n, seed=seed)
                X_nuc = nuclear_norm_minimisation(A, y)

                def record(method, depth, P, A=A, y=y, M=M, X_nuc=X_nuc, n=n, seed=seed):
                    rows.append({
                        "num_measurements": n, "seed": seed, "method": method, "depth": depth,
                        "recovery_error": float((P - M).norm() / M.norm()),
                        "dist_to_nuclear": float((P - X_nuc).norm() / X_nuc.norm()),
                        "data_loss": float(sensing_loss(P, A, y)),
                        "nuclear_norm": float(torch.linalg.matrix_norm(P, ord="nuc")),
                        "nuclear_excess": float(torch.linalg.matrix_norm(P, ord="nuc")
                                                / torch.linalg.matrix_norm(X_nuc, ord="nuc") - 1),
                    })

                record("nuclear", 0, X_nuc)
                for depth in config.depths:
                    for method in ("flatness", "weight_decay"):
                        ws = train_deep_linear(A, y, depth, method, config.lam, config.steps,
                                               config.lr, config.init_scale, seed)
                        record(method, depth, end_to_end(ws))
    df = pd.DataFrame(rows)
    write_results(df, out_dir, "deep_matrix_factorization", _plot)
    write_claims(out_dir, "deep_matrix_factorization", df)
    return df


def _plot(df: pd.DataFrame, path) -> None:
    fig, axes = new_figure(2)
    for (method, depth), part in df.groupby(["method", "depth"]):
        mean = part.groupby("num_measurements")[["recovery_error", "dist_to_nuclear"]].mean()
        label = method if method == "nuclear" else f"{method} L={depth}"
        style = "k--" if method == "nuclear" else ("o-" if method == "flatness" else "s:")
        axes[0].plot(mean.index, mean["recovery_error"], style, label=label)
        if method != "nuclear":
            axes[1].plot(mean.index, mean["dist_to_nuclear"], style, label=label)
    axes[0].set_ylabel("||P - M*|| / ||M*||")
    axes[1].set_ylabel("||P - X_nuc|| / ||X_nuc||")
    for ax in axes:
        ax.set_xlabel("number of measurements n")
        ax.legend(fontsize=7)
    save_figure(fig, path)
