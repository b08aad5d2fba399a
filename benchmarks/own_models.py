"""The models of ``tests/test_own_models.py`` with one batch of data each (shared by
``bench_infer.py`` and ``bench_penalties.py``; the ``benchmarks/`` folder on ``sys.path``,
as it is when one of them runs as a script)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn


def own_models():
    """``{name: (make, x, y, likelihood)}``: the models of ``tests/test_own_models.py``."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import test_own_models as om  # noqa: PLC0415

    g = torch.Generator().manual_seed(0)
    img, seq = torch.rand(128, 1, 8, 8, generator=g), torch.rand(128, 8, 8, generator=g)
    labels = torch.randint(0, 10, (128,), generator=g)
    tok = torch.randint(0, 10, (128, 6), generator=g)
    xr = torch.rand(128, 1, generator=g) * 4 - 2
    return {
        "cnn + BatchNorm, residual": (om.ResCNN, img, labels, "categorical"),
        "embedding + transformer": (om.TokenTransformer, tok, (tok == 3).any(1).long(),
                                    "categorical"),
        "lstm": (lambda: om.Recurrent(nn.LSTM), seq, labels, "categorical"),
        "gru": (lambda: om.Recurrent(nn.GRU), seq, labels, "categorical"),
        "regression mlp, learned noise": (om.regression_mlp, xr, torch.sin(2 * xr[:, 0]),
                                          "gaussian"),
        "mlp + dropout": (om.dropout_mlp, torch.rand(128, 64, generator=g), labels,
                          "categorical"),
    }


def task_loss(likelihood: str):
    """The plain training loss of a likelihood: ``cross_entropy(logits, y)`` for
    ``"categorical"``, ``mse_loss(out.squeeze(-1), y)`` for ``"gaussian"``."""
    if likelihood == "categorical":
        return nn.functional.cross_entropy
    if likelihood == "gaussian":
        return lambda out, t: nn.functional.mse_loss(out.squeeze(-1), t)
    raise ValueError(f"task_loss: likelihood must be 'categorical' or 'gaussian', "
                     f"got {likelihood!r}")
