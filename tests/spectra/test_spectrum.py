"""Layer 1 spectra: ESD conventions, metrics, invariances, gradients, bad input."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import bayes_spectral as bs
from bayes_spectral.spectra.spectrum import PowerIteration


def _rand(*shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


@pytest.mark.parametrize("shape", [(7, 5), (5, 7), (6, 6), (1, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_esd_is_ascending_squared_singular_values_like_numpy(shape, dtype):
    W = _rand(*shape, dtype=dtype)
    ev = bs.esd(W)
    ref = np.sort(np.linalg.svd(W.double().numpy(), compute_uv=False) ** 2)
    assert ev.dtype == dtype
    assert ev.shape == (min(shape),)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    np.testing.assert_allclose(ev.double().numpy(), ref, rtol=tol, atol=tol)
    # eigenvalues of W^T W: the non-trivial ones
    gram = np.linalg.eigvalsh(W.double().numpy().T @ W.double().numpy())[-min(shape):]
    np.testing.assert_allclose(ev.double().numpy(), gram, rtol=tol, atol=1e-9)


@pytest.mark.parametrize("kernel", [(3,), (3, 2), (2, 2, 2)])
def test_conv_kernels_pool_slices_or_flatten(kernel):
    W = _rand(6, 4, *kernel)
    pooled = bs.esd(W)
    slices = [W[(slice(None), slice(None), *idx)] for idx in np.ndindex(*kernel)]
    ref = np.sort(np.concatenate([np.linalg.svd(s.numpy(), compute_uv=False) ** 2 for s in slices]))
    np.testing.assert_allclose(pooled.numpy(), ref, rtol=1e-12)
    flat = bs.esd(W, conv="flatten")
    ref_flat = np.sort(np.linalg.svd(W.reshape(6, -1).numpy(), compute_uv=False) ** 2)
    np.testing.assert_allclose(flat.numpy(), ref_flat, rtol=1e-12)


def test_batched_stack_gives_one_esd_per_matrix():
    stack = _rand(3, 2, 5, 4)
    ev = bs.esd(stack, batch=True)
    assert ev.shape == (3, 2, 4)
    for i in range(3):
        for j in range(2):
            np.testing.assert_allclose(ev[i, j].numpy(), bs.esd(stack[i, j]).numpy(), rtol=1e-12)


def test_orthogonal_matrix_has_unit_spectrum_and_full_stable_rank():
    Q, _ = torch.linalg.qr(_rand(12, 12))
    ev = bs.esd(Q)
    np.testing.assert_allclose(ev.numpy(), np.ones(12), atol=1e-12)
    assert float(bs.stable_rank(ev)) == pytest.approx(12, abs=1e-10)
    assert float(bs.effective_rank(ev)) == pytest.approx(12, abs=1e-9)
    assert int(bs.numerical_rank(ev)) == 12


def test_scaling_scales_eigenvalues_by_c_squared_and_keeps_alpha():
    torch.manual_seed(0)
    W = torch.distributions.StudentT(3.0).sample((200, 100)).double()
    c = 3.7
    ev, ev_c = bs.esd(W), bs.esd(c * W)
    np.testing.assert_allclose(ev_c.numpy(), c**2 * ev.numpy(), rtol=1e-10)
    a, a_c = bs.fit_powerlaw(ev), bs.fit_powerlaw(ev_c)
    assert float(a_c.alpha) == pytest.approx(float(a.alpha), rel=1e-9)
    assert int(a_c.xmin_index) == int(a.xmin_index)


def test_schatten_norms_match_torch_matrix_norms():
    W = _rand(9, 5)
    ev = bs.esd(W)
    nuc = torch.linalg.matrix_norm(W, "nuc")
    assert float(bs.schatten_norm(ev, 1)) == pytest.approx(float(nuc), rel=1e-12)
    assert float(bs.schatten_norm(ev, 2)) == pytest.approx(float(W.norm()), rel=1e-12)
    assert float(bs.schatten_norm(ev, math.inf)) == pytest.approx(
        float(torch.linalg.matrix_norm(W, 2)), rel=1e-12
    )
    sv = np.linalg.svd(W.numpy(), compute_uv=False)
    assert float(bs.schatten_norm(ev, 3)) == pytest.approx((sv**3).sum() ** (1 / 3), rel=1e-12)


def test_effective_and_numerical_rank_on_known_spectra():
    # rank-3 matrix with equal singular values: effective rank 3, numerical rank 3
    U, _ = torch.linalg.qr(_rand(10, 3))
    V, _ = torch.linalg.qr(_rand(8, 3, seed=1))
    W = 2.0 * U @ V.T
    ev = bs.esd(W)
    assert int(bs.numerical_rank(ev, max_dim=10)) == 3
    assert float(bs.effective_rank(ev)) == pytest.approx(3.0, rel=1e-6)
    # entropy formula on an unequal spectrum
    sv = torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
    p = sv / sv.sum()
    expected = math.exp(-float((p * p.log()).sum()))
    assert float(bs.effective_rank(sv**2)) == pytest.approx(expected, rel=1e-12)


def test_metrics_gradcheck_float64():
    W = _rand(6, 4).requires_grad_()

    def f(w):
        m = bs.spectral_metrics(w)
        return torch.stack(
            [m["alpha"], m["alpha_weighted"], m["log_norm"], m["log_spectral_norm"],
             m["stable_rank"], m["effective_rank"], m["schatten_1"], m["log_alpha_norm"]]
        )

    assert torch.autograd.gradcheck(f, (W,), eps=1e-6, atol=1e-6)


def test_stable_rank_gradient_matches_finite_differences_at_repeated_singular_values():
    # W with two equal singular values: gradients through values only stay finite
    U, _ = torch.linalg.qr(_rand(5, 5))
    V, _ = torch.linalg.qr(_rand(4, 4, seed=2))
    W = (U[:, :4] @ torch.diag(torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64)) @ V.T)
    W.requires_grad_()
    sr = bs.stable_rank(bs.esd(W))
    (g,) = torch.autograd.grad(sr, W)
    assert torch.isfinite(g).all()
    assert torch.autograd.gradcheck(lambda w: bs.stable_rank(bs.esd(w)), (W,), eps=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(m=st.integers(3, 12), n=st.integers(3, 12), seed=st.integers(0, 10_000))
def test_esd_invariant_under_rotations_and_transposition(m, n, seed):
    W = _rand(m, n, seed=seed)
    Q1, _ = torch.linalg.qr(_rand(m, m, seed=seed + 1))
    Q2, _ = torch.linalg.qr(_rand(n, n, seed=seed + 2))
    ev = bs.esd(W)
    np.testing.assert_allclose(bs.esd(Q1 @ W @ Q2).numpy(), ev.numpy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bs.esd(W.T).numpy(), ev.numpy(), rtol=1e-12, atol=1e-12)
    assert float(bs.stable_rank(bs.esd(Q1 @ W))) == pytest.approx(float(bs.stable_rank(ev)))


def test_power_iteration_keeps_state_and_converges_to_top_singular_value():
    W = _rand(30, 20)
    top = float(torch.linalg.svdvals(W)[0])
    pi = PowerIteration(W.shape, n_iter=1, generator=torch.Generator().manual_seed(0))
    estimates = [float(pi(W)) for _ in range(200)]
    assert estimates[-1] == pytest.approx(top, rel=1e-8)
    # persistence: the stored u makes one more step start at the fixed point
    u_before = pi.u.clone()
    float(pi(W))
    assert torch.allclose(pi.u, u_before, atol=1e-8)
    assert "u" in pi.state_dict()


def test_power_iteration_gradient_is_u_v_transpose():
    W = _rand(8, 6).requires_grad_()
    pi = PowerIteration(W.shape, n_iter=100)
    s = pi(W)
    (g,) = torch.autograd.grad(s, W)
    U, S, Vh = torch.linalg.svd(W.detach())
    expected = torch.outer(U[:, 0], Vh[0])
    assert torch.allclose(g.abs(), expected.abs(), atol=1e-8)


def test_power_iteration_on_conv_kernel_uses_flattened_view():
    W = _rand(6, 3, 3, 3)
    pi = PowerIteration(W.shape, n_iter=300)
    assert float(pi(W)) == pytest.approx(float(torch.linalg.svdvals(W.reshape(6, -1))[0]), rel=1e-8)


@pytest.mark.parametrize(
    "bad, exc, words",
    [
        (torch.tensor([[1.0, float("nan")], [0.0, 1.0]]), ValueError, "NaN"),
        (torch.tensor([[1.0, float("inf")], [0.0, 1.0]]), ValueError, "Inf"),
        (torch.ones(5), ValueError, "1-D"),
        (torch.ones(1, 1), ValueError, "too few"),
        (np.ones((3, 3)), TypeError, "torch.Tensor"),
        (torch.ones(3, 3, dtype=torch.long), TypeError, "floating"),
    ],
)
def test_bad_input_is_rejected_with_a_clear_message(bad, exc, words):
    with pytest.raises(exc, match=words):
        bs.esd(bad, name="fc1")
    with pytest.raises(exc, match="fc1"):
        bs.esd(bad, name="fc1")


def test_zero_matrix_metrics_raise_instead_of_nan():
    with pytest.raises(ValueError, match="too few non-zero eigenvalues"):
        bs.spectral_metrics(torch.zeros(10, 10), name="dead")
