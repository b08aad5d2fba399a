"""Spectral norm regularisation (Yoshida & Miyato 2017)."""

from __future__ import annotations

import math

import torch

from .._checks import check_positive
from ..spectra.spectrum import PowerIteration
from .base import Penalty, layer_states

__all__ = ["SpectralNorm"]


class SpectralNorm(Penalty):
    """``coef/2 * sigma_max(W)^2`` per layer, ``sigma_max`` by persistent power iteration.

    One power-iteration step per call (``n_iter``) with the left vector kept per layer
    (:class:`~bayes_spectral.spectra.spectrum.PowerIteration`), so the estimate converges over
    training at the cost of two matrix-vector products. Conv kernels are reshaped to
    ``out x (in*kh*kw)`` (Yoshida & Miyato). The gradient is ``coef * sigma u v^T``.
    State is keyed by the layer name; :meth:`state_dict` / :meth:`load_state_dict` carry it
    through checkpoints.
    """

    label = "spectral norm"

    def __init__(self, coef: float = 1.0, n_iter: int = 1, seed: int = 0) -> None:
        self.coef = check_positive(coef, "coef")
        self.n_iter = int(n_iter)
        self.seed = int(seed)
        self._iters: dict[str, PowerIteration] = {}

    def _iteration(self, weight: torch.Tensor, name: str | None) -> PowerIteration:
        key = self._key(weight, name)
        it = self._iters.get(key)
        if it is None or it.u.shape[0] != weight.shape[0]:
            gen = torch.Generator().manual_seed(self.seed)
            it = PowerIteration(weight.shape, n_iter=self.n_iter, generator=gen)
            self._iters[key] = it
        if it.u.device != weight.device or it.u.dtype != weight.dtype:
            it.to(device=weight.device, dtype=weight.dtype)
        return it

    def sigma(self, weight: torch.Tensor, name: str | None = None) -> torch.Tensor:
        """Differentiable power-iteration estimate of ``sigma_max`` (advances the state)."""
        return self._iteration(weight, name)(weight)

    def accumulate_grad(self, weight, grad, name=None, scale=1.0):
        """``grad += scale coef sigma u v^T`` (one rank-1 update in place, after the same
        power-iteration step as a call); returns ``scale coef/2 sigma^2``."""
        w = weight.detach()
        sigma, u, v = self._iteration(w, name).estimate(w)
        s = float(sigma)  # the one device sync of the call
        if not math.isfinite(s):
            self._checked_value(sigma, w, name)  # raises, naming the layer
        grad.view(grad.shape[0], -1).addr_(u, v, alpha=scale * self.coef * s)
        return sigma.new_tensor(scale * 0.5 * self.coef * s * s)

    def weight_penalty(self, weight, name=None):
        return 0.5 * self.coef * self.sigma(weight, name).square()

    stateful = True

    def state_dict(self) -> dict:
        """``{"layers": {layer: {"u": left vector}}}`` (copies)."""
        return {"layers": {k: {"u": it.u.detach().clone()} for k, it in self._iters.items()}}

    def _restored(self, state: dict) -> dict:
        """``{"_iters": the power iterations of state}`` (built without touching the
        global RNG)."""
        out: dict[str, PowerIteration] = {}
        for key, st in layer_states(state, "SpectralNorm", ("u",)).items():
            u = st.get("u")
            if not isinstance(u, torch.Tensor) or u.dim() != 1 or not u.is_floating_point():
                raise ValueError(f"SpectralNorm: the state of layer {key!r} needs a 1-D "
                                 f"floating 'u', got {u!r:.60}")
            gen = torch.Generator().manual_seed(self.seed)
            it = PowerIteration((u.shape[0], 1), n_iter=self.n_iter, generator=gen)
            it.u = u.detach().clone()
            out[key] = it
        return {"_iters": out}
