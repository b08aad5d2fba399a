"""A small CNN and one SGD loop with a penalty, shared by the reference models (private).

The MLPs are :func:`bayes_spectral.apps.nets.make_mlp` (``output_name="out"``).

Training objective (every model that uses :func:`train_classifier`)::

    loss(theta) = mean_batch CE(f_theta(x), y) + penalty(model)

``penalty`` is any :class:`bayes_spectral.penalties.Penalty` (summed over the Linear/Conv
weights, never the biases) or ``None``. A prior MAP fits the same loop with the penalty
``-log p(W) / N`` (``N`` = training-set size, see :mod:`bayes_spectral.penalties`).
"""

from __future__ import annotations

import collections
import math

import torch
from torch import nn

from bayes_spectral.penalties import Penalty

__all__ = ["digits_cnn", "lenet5", "train_classifier", "accuracy"]


def digits_cnn(channels: tuple[int, int], hidden: int, num_classes: int, seed: int,
               side: int = 8) -> nn.Sequential:
    """Two 3x3 convs (padding 1, ReLU), 2x2 max-pool, ``fc1`` (ReLU) and ``out``.

    Input: flat ``side * side`` images (reshaped inside), e.g. the 8x8 digits.
    """
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(collections.OrderedDict([
        ("image", nn.Unflatten(1, (1, side, side))),
        ("conv1", nn.Conv2d(1, c1, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(c1, c2, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.MaxPool2d(2)), ("flat", nn.Flatten()),
        ("fc1", nn.Linear(c2 * (side // 2) ** 2, hidden)), ("relu3", nn.ReLU()),
        ("out", nn.Linear(hidden, num_classes)),
    ]))


def lenet5(num_classes: int, seed: int, shape: tuple[int, ...] = (8, 8)) -> nn.Sequential:
    """LeNet5-sized CNN: conv 6 -> pool -> conv 16 -> pool -> fc1 120 -> fc2 84 -> out.

    Input: flat signals of ``prod(shape)`` values, reshaped inside to one channel of
    ``shape``: ``(8, 8)`` digits (Conv2d) or ``(40,)`` MNIST-1D signals (Conv1d). Kernels
    are 5 (5x5 in 2-D) with "same" padding 2, ReLU and 2-wide max-pooling (LeCun et al.'s
    unpadded 5x5 convs need 32x32 inputs: 8 -> 4 -> 0). Flattened size
    ``16 * prod(s // 4 for s in shape)``: 64 for 8x8, 160 for 40.
    """
    if len(shape) not in (1, 2) or min(shape) < 4:
        raise ValueError(f"lenet5: shape must be 1-D or 2-D with sides >= 4, got {shape}")
    torch.manual_seed(seed)
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if len(shape) == 1 else (nn.Conv2d, nn.MaxPool2d)
    flat = 16 * math.prod(s // 4 for s in shape)
    return nn.Sequential(collections.OrderedDict([
        ("signal", nn.Unflatten(1, (1, *shape))),
        ("conv1", conv(1, 6, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", pool(2)),
        ("conv2", conv(6, 16, 5, padding=2)), ("relu2", nn.ReLU()), ("pool2", pool(2)),
        ("flat", nn.Flatten()),
        ("fc1", nn.Linear(flat, 120)), ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(120, 84)), ("relu4", nn.ReLU()),
        ("out", nn.Linear(84, num_classes)),
    ]))


def train_classifier(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     penalty: Penalty | None, *, steps: int, batch_size: int, lr: float,
                     momentum: float, seed: int, stop_at: float | None = None,
                     check_every: int = 50) -> int:
    """SGD (``momentum``, no built-in weight decay) on ``mean CE + penalty(model)``.

    Minibatches are drawn without replacement from a fresh permutation every epoch
    (``batch_size >= len(x)`` is full-batch GD); ``penalty.set_epoch(epoch)`` is called at
    the start of each epoch (schedules). At most ``steps`` steps; with ``stop_at`` training
    stops once the accuracy on all of ``(x, y)`` reaches it (checked at the end of an epoch,
    at most every ``check_every`` steps). Returns the number of steps taken. Raises
    ``FloatingPointError`` on divergence.
    """
    g = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    b = min(batch_size, n)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    step, epoch, checked = 0, 0, 0
    model.train()
    while step < steps:
        if stop_at is not None and step - checked >= check_every:
            checked = step
            if accuracy(model, x, y) >= stop_at:
                break
        if penalty is not None:
            penalty.set_epoch(epoch)
        perm = torch.randperm(n, generator=g)
        for start in range(0, n - b + 1, b):
            idx = perm[start:start + b]
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            if penalty is not None:
                loss = loss + penalty(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training diverged at step {step} (loss {loss.item()})")
            if step >= steps:
                break
        epoch += 1
    model.eval()
    return step


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``argmax f(x) == y`` (in eval mode; the mode is restored)."""
    was_training = model.training
    model.eval()
    acc = float((model(x).argmax(-1) == y).float().mean())
    model.train(was_training)
    return acc
