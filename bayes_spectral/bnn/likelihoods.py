"""Layer 4: observation models of :class:`~bayes_spectral.bnn.network.BayesianNetwork`, by name.

``LIKELIHOODS`` maps a name (the ``likelihood=`` of :func:`~bayes_spectral.bayesian`) to a
:class:`Likelihood`: the law of ``y_n`` given the network output ``f(x_n)``. The model
observes ``y`` at the site ``"obs"`` inside the data plate (scaled by ``N / B``); the
likelihood supplies the law and checks the targets. Users register their own:

    >>> import pyro.distributions as dist
    >>> from bayes_spectral.bnn.likelihoods import LIKELIHOODS, Likelihood
    >>> class LaplaceLikelihood(Likelihood):
    ...     def law(self, out, params):
    ...         return dist.Laplace(out.squeeze(-1), 1.0)
    >>> _ = LIKELIHOODS.register("laplace")(LaplaceLikelihood())
"""

from __future__ import annotations

from typing import Any

import pyro.distributions as dist
import torch

from ..registry import Registry

__all__ = ["LIKELIHOODS", "CategoricalLikelihood", "GaussianLikelihood", "Likelihood"]


class Likelihood:
    """The law of a batch of targets given the network output ``out``.

    :meth:`law` is the one method to write. :meth:`prepare_output` reshapes the output
    before it is observed (and returned by the model); :meth:`parameters` reads learned or
    fixed parameters of the model (e.g. a noise scale) before the data plate is entered;
    :meth:`check_targets` raises a clear error for targets the law cannot take.
    """

    def prepare_output(self, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The output as observed; default: unchanged."""
        return out

    def parameters(self, model: Any) -> Any:
        """Parameters of the law read from ``model`` outside the data plate; default none."""
        return None

    def law(self, out: torch.Tensor, params: Any) -> dist.Distribution:
        """The distribution of ``y`` (batch dim first) given ``out`` and :meth:`parameters`."""
        raise NotImplementedError

    def check_targets(self, out: torch.Tensor, y: torch.Tensor, what: str) -> None:
        """``TypeError``/``ValueError`` naming ``what`` for bad targets; default: accept."""


class CategoricalLikelihood(Likelihood):
    """``y_n ~ Categorical(logits = f(x_n))``, ``y`` integer labels in ``[0, C)``."""

    def law(self, out: torch.Tensor, params: Any) -> dist.Distribution:
        return dist.Categorical(logits=out)

    def check_targets(self, out: torch.Tensor, y: torch.Tensor, what: str) -> None:
        if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
            raise TypeError(f"{what}: categorical labels must be a 1-D integer tensor, got "
                            f"dtype {y.dtype} and shape {tuple(y.shape)}")
        num_classes = out.shape[-1]
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{what}: labels must lie in [0, {num_classes - 1}] (the "
                             f"network has {num_classes} outputs), got range [{lo}, {hi}]")


def _squeezed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out`` without a trailing output dim of size 1 that ``y`` does not have."""
    return out.squeeze(-1) if out.dim() == y.dim() + 1 and out.shape[-1] == 1 else out


class GaussianLikelihood(Likelihood):
    """``y_n ~ Normal(f(x_n), noise)`` (independent over output dims), ``noise`` the
    model's ``noise`` (a learned ``PyroParam``) or its fixed ``noise_value``."""

    def prepare_output(self, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        return out if y is None else _squeezed(out, y)

    def parameters(self, model: Any) -> Any:
        return model.noise if hasattr(model, "noise") else model.noise_value

    def law(self, out: torch.Tensor, params: Any) -> dist.Distribution:
        obs_dist = dist.Normal(out, params)
        if out.dim() > 1:
            obs_dist = obs_dist.to_event(out.dim() - 1)
        return obs_dist

    def check_targets(self, out: torch.Tensor, y: torch.Tensor, what: str) -> None:
        if not y.is_floating_point():
            raise TypeError(f"{what}: gaussian targets must be floating point, got {y.dtype}")
        o = _squeezed(out, y)
        if tuple(o.shape[1:]) != tuple(y.shape[1:]):
            raise ValueError(f"{what}: targets of shape {tuple(y.shape)} do not match the "
                             f"network output of shape (n, {', '.join(map(str, o.shape[1:]))})")
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{what}: y contains NaN or Inf")


#: likelihood name -> :class:`Likelihood` instance
LIKELIHOODS: Registry[Likelihood] = Registry("likelihood")
LIKELIHOODS.register("categorical")(CategoricalLikelihood())
LIKELIHOODS.register("gaussian")(GaussianLikelihood())
