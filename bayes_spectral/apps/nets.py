"""Layer 6: the one MLP factory and the one plain Adam loop of the applications.

``compare``, ``fit`` and ``analyze --example`` of the CLI, the reference models and the
benchmarks all build their ReLU MLPs with :func:`make_mlp`; ``compare``'s baselines and the
CLI's example model train with :func:`train_adam`.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

__all__ = ["make_mlp", "train_adam"]


def make_mlp(num_inputs: int, hidden: tuple[int, ...], num_classes: int,
             seed: int | None = None, *, output_name: str | None = None,
             named: bool = True) -> nn.Sequential:
    """ReLU MLP ``num_inputs -> hidden[0] -> ... -> num_classes``.

    Layers ``fc1, relu1, ..., fcK, reluK`` and the output layer ``output_name`` (default
    ``fc{K+1}``); ``named=False`` gives plain ``nn.Sequential`` indices ``0, 1, ...``.
    PyTorch's default (Kaiming-uniform) initialisation, after ``torch.manual_seed(seed)``
    unless ``seed`` is None (then the global generator is used as it stands).
    """
    if seed is not None:
        torch.manual_seed(seed)
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    widths = (num_inputs, *hidden)
    for i in range(len(hidden)):
        layers[f"fc{i + 1}"] = nn.Linear(widths[i], widths[i + 1])
        layers[f"relu{i + 1}"] = nn.ReLU()
    layers[output_name or f"fc{len(hidden) + 1}"] = nn.Linear(widths[-1], num_classes)
    return nn.Sequential(layers) if named else nn.Sequential(*layers.values())


def train_adam(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int,
               batch_size: int, lr: float, loss_scale: int | float | None = None,
               regularizer=None, seed: int | None = None) -> nn.Module:
    """Adam on ``loss_scale * mean_batch CE(net(x), y)`` (+ the regulariser's gradient).

    Every epoch draws ``torch.randperm(len(x))`` from the global generator (re-seeded with
    ``seed`` first unless it is None) and walks it in batches of ``min(batch_size, len(x))``
    (the last one may be smaller). ``regularizer`` (a
    :class:`~bayes_spectral.penalties.Regularizer`) adds ``dR/dW`` in place after each
    backward pass. Returns ``net``, trained in place.
    """
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    if seed is not None:
        torch.manual_seed(seed)  # the data order of bnn.fit(..., seed=seed): same permutations
    n = x.shape[0]
    bs = min(batch_size, n)
    for _ in range(epochs):
        perm = torch.randperm(n).to(x.device)
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            loss = nn.functional.cross_entropy(net(x[idx]), y[idx])
            if loss_scale is not None:
                loss = loss_scale * loss
            opt.zero_grad()
            loss.backward()
            if regularizer is not None:
                regularizer.accumulate_grad()  # += dR/dW in place (closed form where there is one)
            opt.step()
    return net
