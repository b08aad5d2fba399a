"""Trace of the Hessian of a loss: Hutchinson's estimator and the deep-linear closed form.

Hutchinson (1990): for Rademacher probes ``z`` (entries +-1), ``E[z^T H z] = tr H`` and
``Var[z^T H z] = 2 (||H||_F^2 - sum_i H_ii^2)``; ``H z`` comes from double backprop
(``grad(grad(L) . z)``), about the cost of two backward passes per probe.

Deep linear network ``f(x) = W_L ... W_1 x`` with squared loss
``L = c * sum_n ||f(x_n) - y_n||^2`` (``c = 1/(2N)`` by default). For one layer write
``P = A_l W_l B_l`` with ``A_l = W_L ... W_{l+1}`` and ``B_l = W_{l-1} ... W_1`` (identity
when empty). ``L`` is quadratic in ``W_l`` alone, with second derivative in a direction
``E``: ``2c ||A_l E B_l X||_F^2`` (``X`` the ``d_0 x N`` inputs; no residual term, the
residual only enters the off-diagonal blocks ``d^2L / dW_l dW_k``, which do not touch
the trace). Summing this quadratic form over the basis ``E = e_i e_j^T``:

    tr H = 2c * sum_l ||A_l||_F^2 * ||B_l X||_F^2

independent of the targets ``y``. Checked against ``torch.autograd.functional.hessian``
in ``tests/penalties/test_penalties.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["hutchinson_trace", "deep_linear_hessian_trace"]


def hutchinson_trace(
    loss_fn: Callable[[], torch.Tensor],
    params: Sequence[torch.Tensor],
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    create_graph: bool = False,
    return_samples: bool = False,
):
    """Hutchinson estimate ``mean_k z_k^T H z_k`` of ``tr d^2 loss / d params^2``.

    ``loss_fn()`` returns a scalar loss of ``params`` (tensors with ``requires_grad``).
    ``create_graph=True`` keeps the graph so the estimate can itself be minimised (a
    Hessian-trace penalty). ``return_samples=True`` returns ``(estimate, samples)`` with
    the ``num_probes`` values ``z_k^T H z_k`` (their standard error is the estimator's).
    """
    params = list(params)
    if not params:
        raise ValueError("hutchinson_trace needs at least one parameter")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    for i, p in enumerate(params):
        if not p.requires_grad:
            raise ValueError(f"parameter {i} of shape {tuple(p.shape)} does not require grad")
    loss = loss_fn()
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    grads = torch.autograd.grad(loss, params, create_graph=True)
    samples = []
    for k in range(num_probes):
        zs = [
            (torch.randint(0, 2, p.shape, generator=generator).to(p) * 2 - 1)
            for p in params
        ]
        gz = sum((g * z).sum() for g, z in zip(grads, zs, strict=True))
        keep = create_graph or k < num_probes - 1
        hz = torch.autograd.grad(gz, params, create_graph=create_graph, retain_graph=keep)
        samples.append(sum((h * z).sum() for h, z in zip(hz, zs, strict=True)))
    samples_t = torch.stack(samples)
    est = samples_t.mean()
    return (est, samples_t) if return_samples else est


def deep_linear_hessian_trace(
    weights: Sequence[torch.Tensor], x: torch.Tensor, loss_scale: float | None = None
) -> torch.Tensor:
    """Exact ``tr H`` of ``c * sum_n ||W_L...W_1 x_n - y_n||^2`` w.r.t. all ``W_l``.

    ``weights``: ``[W_1, ..., W_L]`` in PyTorch layout (``W_l`` is ``d_l x d_{l-1}``, as in
    ``nn.Linear(bias=False)``); ``x``: inputs ``(N, d_0)``; ``loss_scale`` is ``c``,
    default ``1/(2N)``. (``nn.MSELoss()`` is ``c = 1/(N d_L)``.) See the module docstring
    for the derivation; differentiable in the weights and ``x``.
    """
    weights = list(weights)
    if not weights:
        raise ValueError("deep_linear_hessian_trace needs at least one weight")
    if x.dim() != 2 or x.shape[1] != weights[0].shape[1]:
        raise ValueError(f"x must be (N, {weights[0].shape[1]}), got {tuple(x.shape)}")
    for i in range(1, len(weights)):
        if weights[i].shape[1] != weights[i - 1].shape[0]:
            raise ValueError(
                f"weights {i - 1} {tuple(weights[i - 1].shape)} and {i} "
                f"{tuple(weights[i].shape)} do not chain")
    c = 1.0 / (2 * x.shape[0]) if loss_scale is None else float(loss_scale)
    L = len(weights)
    # forward activations h_l = B_{l+1} X: h_0 = x, h_l = h_{l-1} W_l^T
    acts = [x]
    for W in weights[:-1]:
        acts.append(acts[-1] @ W.mT)
    total = x.new_zeros(())
    A = None  # A_l = W_L ... W_{l+1}, built from the top
    for l in range(L - 1, -1, -1):
        a_sq = (weights[l].new_tensor(float(weights[l].shape[0])) if A is None
                else A.square().sum())
        total = total + a_sq * acts[l].square().sum()
        A = weights[l] if A is None else A @ weights[l]
    return 2 * c * total
