"""Warm-started block iteration for lambda_max (``spectra/subspace.py``) against eigvalsh."""

import torch

from bayes_spectral.spectra.subspace import TopEigen, _cholesky_qr, _top_pair_squaring


def _spd_with_top(evals, n=40, seed=0):
    """``W`` (n x n) with ``W^T W`` having the given top eigenvalues (rest in [0, 1])."""
    g = torch.Generator().manual_seed(seed)
    Q = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64)).Q
    lam = torch.rand(n, generator=g, dtype=torch.float64)
    lam[: len(evals)] = torch.tensor(evals, dtype=torch.float64)
    return (Q * lam.sqrt()) @ Q.T, Q


def test_first_call_finds_lambda_max_and_its_vectors():
    W, Q = _spd_with_top([3.0, 2.0])
    lam, u, v = TopEigen()(W.unsqueeze(0))
    assert abs(float(lam[0]) - 3.0) < 1e-8
    assert abs(abs(float(v[0] @ Q[:, 0])) - 1) < 1e-6
    torch.testing.assert_close(u[0], W @ v[0])


def test_follows_an_eigenvalue_crossing_in_one_call():
    """Top two eigenvalues swap between calls (3, 2.9) -> (2.9, 3.1): one call with
    ``n_iter=1`` reports the new maximum (single-vector power iteration would keep 2.9)."""
    W, Q = _spd_with_top([3.0, 2.9])
    top = TopEigen(k=4)
    top(W.unsqueeze(0))
    lam = torch.linalg.eigvalsh(W.T @ W)
    lam2 = lam.clone()
    lam2[-1], lam2[-2] = 2.9, 3.1  # same eigenvectors, the top pair swapped and moved
    ev, vec = torch.linalg.eigh(W.T @ W)
    W2 = (vec * lam2.sqrt()) @ vec.T
    got = float(top(W2.unsqueeze(0))[0][0])
    assert abs(got - 3.1) < 1e-6, got


def test_stack_and_lower_bound():
    g = torch.Generator().manual_seed(1)
    mats = torch.randn(3, 30, 20, generator=g, dtype=torch.float64)
    lam = TopEigen(first_iter=4)(mats)[0]
    exact = torch.linalg.eigvalsh(mats.mT @ mats)[..., -1]
    assert bool((lam <= exact * (1 + 1e-12)).all())
    assert bool(((exact - lam) / exact < 0.05).all())


def test_sync_free_top_pair_and_orth_match_linalg():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(5, 8, 8, generator=g, dtype=torch.float64)
    H = A @ A.mT
    theta, s = _top_pair_squaring(H)  # the CUDA path, checked on the CPU
    torch.testing.assert_close(theta, torch.linalg.eigvalsh(H)[..., -1], rtol=1e-10, atol=0)
    torch.testing.assert_close(H @ s, theta[..., None, None] * s, rtol=1e-8, atol=1e-8)
    Z = torch.randn(2, 50, 8, generator=g)
    Qz = _cholesky_qr(Z)
    torch.testing.assert_close(Qz.mT @ Qz, torch.eye(8).expand(2, 8, 8), rtol=0, atol=1e-5)
    proj = Qz @ (Qz.mT @ Z)  # same span
    torch.testing.assert_close(proj, Z, rtol=0, atol=1e-4)
