"""Layer 4: train / eval modes of the networks the library runs.

Training runs in train mode; every prediction and likelihood evaluation (``predict``,
``evaluate``, validation during ``fit``, posterior draws, ``to_inference_data``,
``importance_elpd``) runs in eval mode: BatchNorm uses (and never updates) its running
statistics, Dropout is off, so a prediction does not depend on the batch it is in and two
identical predictions are equal. MC-dropout (Dropout kept on) only when asked. Each
submodule's own ``training`` flag is restored afterwards, whatever the user had set.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eval_mode", "train_mode"]

_DROPOUT = (nn.modules.dropout._DropoutNd,)


@contextmanager
def _mode(modules, training: bool, mc_dropout: bool) -> Iterator[None]:
    mods = [m for m in modules if m is not None and isinstance(m, nn.Module)]
    saved = [(sub, sub.training) for m in mods for sub in m.modules()]
    try:
        for m in mods:
            m.train(training)
            if mc_dropout:
                for sub in m.modules():
                    if isinstance(sub, _DROPOUT):
                        sub.train(True)
        yield
    finally:
        for sub, flag in saved:
            sub.training = flag


def eval_mode(*modules: nn.Module | None, mc_dropout: bool = False):
    """Context: ``modules`` in eval mode (Dropout layers on when ``mc_dropout``); every
    submodule's ``training`` flag restored on exit."""
    return _mode(modules, False, bool(mc_dropout))


def train_mode(*modules: nn.Module | None):
    """Context: ``modules`` in train mode; every submodule's flag restored on exit."""
    return _mode(modules, True, False)
