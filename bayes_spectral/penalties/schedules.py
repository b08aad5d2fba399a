"""Schedule wrappers for any penalty: small composable pieces (optax style).

``Decayed(Thresholded(WeightedAlpha(), 2.0), every=5, rate=0.5, floor=1e-3)`` is a
weighted-alpha penalty that acts on a layer only while its value exceeds 2, with a
coefficient halved every 5 epochs and switched off once it falls below 1e-3. Epochs are
set with :meth:`set_epoch` (the :class:`Regularizer` forwards it); wrappers forward
``set_epoch`` to what they wrap.
"""

from __future__ import annotations

import torch

from .base import Penalty

__all__ = ["Decayed", "Thresholded"]


class _Wrapper(Penalty):
    def __init__(self, inner: Penalty) -> None:
        if not isinstance(inner, Penalty):
            raise TypeError(f"expected a Penalty to wrap, got {type(inner).__name__}")
        self.inner = inner
        self.label = inner.label

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)


class Decayed(_Wrapper):
    """``factor(epoch) * inner``, with the factor decayed every ``every`` epochs.

    With ``j = epoch // every``: ``kind="exponential"``: ``factor = rate**j``;
    ``kind="polynomial"``: ``factor = (1 + j)**(-power)``. Once ``factor < floor`` the
    penalty is switched off (factor 0, and the inner penalty is not even evaluated).
    """

    def __init__(self, inner: Penalty, every: int = 1, kind: str = "exponential",
                 rate: float = 0.5, power: float = 1.0, floor: float = 0.0) -> None:
        super().__init__(inner)
        if every < 1:
            raise ValueError(f"every must be >= 1 epoch, got {every}")
        if kind not in ("exponential", "polynomial"):
            raise ValueError(f"kind must be 'exponential' or 'polynomial', got {kind!r}")
        if kind == "exponential" and not 0 < rate <= 1:
            raise ValueError(f"exponential decay rate must be in (0, 1], got {rate}")
        if kind == "polynomial" and not power > 0:
            raise ValueError(f"polynomial decay power must be > 0, got {power}")
        if not floor >= 0:
            raise ValueError(f"floor must be >= 0, got {floor}")
        self.every, self.kind, self.rate = int(every), kind, float(rate)
        self.power, self.floor = float(power), float(floor)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)
        super().set_epoch(epoch)

    def state_dict(self) -> dict:
        """``{"epoch": e}`` (the inner penalty's state is its own)."""
        return {"epoch": self.epoch}

    def _restored(self, state: dict) -> dict:
        epoch = state.get("epoch") if isinstance(state, dict) else None
        if set(state or {}) != {"epoch"} or isinstance(epoch, bool) \
                or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"Decayed: expected the state {{'epoch': int >= 0}}, got {state!r}")
        return {"epoch": int(epoch)}

    def factor(self, epoch: int | None = None) -> float:
        """The multiplier at ``epoch`` (default: the current one); 0 below ``floor``."""
        j = (self.epoch if epoch is None else int(epoch)) // self.every
        f = self.rate**j if self.kind == "exponential" else (1.0 + j) ** (-self.power)
        return 0.0 if f < self.floor else f

    def weight_penalty(self, weight, name=None):
        f = self.factor()
        if f == 0.0:
            return weight.new_zeros(())
        return f * self.inner(weight, name=name)

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """The inner penalty's in-place gradient, scaled by ``factor(epoch)``."""
        f = self.factor()
        if f == 0.0:
            return weight.detach().new_zeros(())
        return self.inner.accumulate_grad(weight, grad, name=name, scale=scale * f)


class Thresholded(_Wrapper):
    """``inner`` while its value (per layer) exceeds ``threshold``, else 0 (no gradient)."""

    def __init__(self, inner: Penalty, threshold: float) -> None:
        super().__init__(inner)
        self.threshold = float(threshold)

    def weight_penalty(self, weight, name=None):
        value = self.inner(weight, name=name)
        if bool(value.detach() > self.threshold):
            return value
        return torch.zeros((), dtype=value.dtype, device=value.device)
