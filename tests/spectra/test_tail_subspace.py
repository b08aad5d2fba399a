"""``TailSubspace``: the warm-started fixed-size block iteration behind the tail penalties'
``mode="subspace"`` (layer 1)."""

from __future__ import annotations

import pytest
import torch

from bayes_spectral.spectra.subspace import TailSubspace, gram_eigh


@pytest.mark.parametrize("shape", [(1, 90, 60), (1, 50, 80), (4, 30, 25)])
def test_converges_to_the_top_eigenpairs_from_a_random_block(shape):
    """From a random orthonormal 12-column block, 60 calls at fixed weights: the 8 leading
    Ritz values equal the top 8 eigenvalues of the small-side Gram (1e-9 relative; the last
    columns are the margin, converging slowest), all 12 are below their eigenvalues
    (interlacing), the Ritz vectors are orthonormal, ``A U`` is ``A`` times them and
    ``|A u_i|^2 = theta_i``."""
    g = torch.Generator().manual_seed(0)
    mats = torch.randn(*shape, generator=g, dtype=torch.float64)
    d, k = min(shape[1:]), 12
    sub = TailSubspace()
    sub.V = torch.linalg.qr(torch.randn(shape[0], d, k, generator=g,
                                        dtype=torch.float64)).Q
    for _ in range(60):
        theta, AU, U = sub(mats)
    evals = gram_eigh(mats)[0].flip(-1)[..., :k]
    torch.testing.assert_close(theta[..., :8], evals[..., :8], rtol=1e-9, atol=0)
    assert bool((theta <= evals * (1 + 1e-12)).all())
    eye = torch.eye(k, dtype=torch.float64).expand(shape[0], k, k)
    torch.testing.assert_close(U.mT @ U, eye, rtol=0, atol=1e-12)
    A = mats.mT if shape[1] < shape[2] else mats
    torch.testing.assert_close(AU, A @ U, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(AU.square().sum(-2), theta, rtol=1e-10, atol=0)


def test_the_shift_speeds_convergence_over_a_plain_power_step():
    """Ten calls from the same random block on a Marchenko-Pastur-like matrix: the smallest
    needed Ritz value (index 20 of a 28-column block) is closer to its eigenvalue with the
    shifted step than with ``sigma = 0`` (the block's own plain power step)."""
    g = torch.Generator().manual_seed(1)
    mats = torch.randn(1, 200, 120, generator=g, dtype=torch.float64)
    V0 = torch.linalg.qr(torch.randn(1, 120, 28, generator=g, dtype=torch.float64)).Q
    evals = gram_eigh(mats)[0].flip(-1)[0]

    def error(shifted):
        sub = TailSubspace()
        sub.V = V0.clone()
        for _ in range(10):
            if shifted:
                theta = sub(mats)[0]
            else:  # the same iteration with sigma = 0
                A, V = mats[0], sub.V[0]
                Q = torch.linalg.qr(A.mT @ (A @ V)).Q
                Y = A @ Q
                th, S = torch.linalg.eigh(Y.mT @ Y)
                sub.V = (Q @ S.flip(-1)).unsqueeze(0)
                theta = th.flip(-1).unsqueeze(0)
        return float((evals[20] - theta[0, 20]) / evals[20])

    assert 0 <= error(True) < 0.5 * error(False)
