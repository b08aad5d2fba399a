"""Layer 4: observation models of :class:`~bayes_spectral.bnn.network.BayesianNetwork`, by name.

``LIKELIHOODS`` maps a name (the ``likelihood=`` of :func:`~bayes_spectral.bayesian`) to a
:class:`Likelihood`: the law of ``y_n`` given the network output ``f(x_n)``. The model
observes ``y`` at the site ``"obs"`` inside the data plate (scaled by ``N / B``).

=================== ======================= ============================================
name                network output          law of ``y_n``
=================== ======================= ============================================
``categorical``     logits ``(n, C)``       ``Categorical(logits = f)``, ``y`` in [0, C)
``gaussian``        mean ``(n, ...)``       ``Normal(f, sigma)``; ``sigma`` fixed, or the
                                            latent site ``"noise"`` (``noise="learned"``)
``bernoulli``       logit ``(n,)``/(n, 1)   ``Bernoulli(logits = f)``, ``y`` in {0, 1}
``heteroskedastic`` ``(n, ..., 2)``         ``Normal(f[..., 0], exp(f[..., 1]))``
=================== ======================= ============================================

Each likelihood supplies the Pyro observation (:meth:`Likelihood.law`, with
:meth:`~Likelihood.prepare_output` / :meth:`~Likelihood.prepare_target` /
:meth:`~Likelihood.parameters`), the pointwise log-likelihood
(:meth:`~Likelihood.log_likelihood`; the diagnostics read the same law from the ``obs``
site of a trace), the predictive distribution of ``S`` draws of the outputs
(:meth:`~Likelihood.predictive`: class probabilities ``(S, n, C)`` or a
:class:`~bayes_spectral.bnn.metrics.GaussianPredictive`) and its metrics
(:meth:`~Likelihood.metrics`, :mod:`~bayes_spectral.bnn.metrics`). Users register their own:

    >>> import pyro.distributions as dist
    >>> from bayes_spectral.bnn.likelihoods import LIKELIHOODS, Likelihood
    >>> class LaplaceLikelihood(Likelihood):
    ...     def law(self, out, params):
    ...         return dist.Laplace(out.squeeze(-1), 1.0)
    >>> _ = LIKELIHOODS.register("laplace")(LaplaceLikelihood())
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro.distributions as dist
import torch

from ..registry import Registry
from .metrics import GaussianPredictive, classification_metrics, regression_metrics

__all__ = ["LIKELIHOODS", "BernoulliLikelihood", "CategoricalLikelihood", "GaussianLikelihood",
           "HeteroskedasticGaussianLikelihood", "Likelihood"]


class Likelihood:
    """The law of a batch of targets given the network output ``out``.

    :meth:`law` is the one method to write for fitting. :meth:`prepare_output` reshapes the
    output before it is observed (and returned by the model); :meth:`prepare_target` casts
    the targets to what the law takes; :meth:`parameters` reads or samples parameters of the
    law (e.g. a noise scale) before the data plate is entered; :meth:`check_targets` raises
    a clear error for targets the law cannot take. For ``evaluate`` and validation,
    :meth:`predictive` and :meth:`metrics` (``task`` names the kind of metrics).
    """

    #: ``"classification"`` (accuracy, NLL, ECE, Brier, entropy, MI), ``"regression"``
    #: (Gaussian NLL, RMSE, interval coverage) or ``None`` (no metrics defined)
    task: str | None = None
    #: whether the law has a noise scale that ``noise="learned"`` can make latent
    has_noise: bool = False

    def prepare_output(self, out: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """The output as observed; default: unchanged."""
        return out

    def prepare_target(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """The targets as the law takes them; default: unchanged."""
        return y

    def parameters(self, model: Any) -> Any:
        """Parameters of the law read from ``model`` outside the data plate; default none."""
        return None

    def parameter_sites(self, model: Any) -> list[str]:
        """Latent sample sites made by :meth:`parameters` (returned with predictions)."""
        return []

    def law(self, out: torch.Tensor, params: Any) -> dist.Distribution:
        """The distribution of ``y`` (batch dim first) given ``out`` and :meth:`parameters`."""
        raise NotImplementedError

    def check_targets(self, out: torch.Tensor, y: torch.Tensor, what: str) -> None:
        """``TypeError``/``ValueError`` naming ``what`` for bad targets; default: accept."""

    def log_likelihood(self, out: torch.Tensor, y: torch.Tensor, params: Any) -> torch.Tensor:
        """Pointwise ``log p(y_n | f(x_n), params)``, shape ``(n,)``, unscaled."""
        out = self.prepare_output(out, y)
        return self.law(out, params).log_prob(self.prepare_target(y, out))

    def predictive(self, model: Any, out: torch.Tensor,
                   draws: Mapping[str, torch.Tensor]) -> Any:
        """Predictive of ``S`` output draws ``out`` ``(S, n, ...)`` and the draws of
        :meth:`parameter_sites` (``(S,)`` each); default: the outputs themselves."""
        return out

    def metrics(self, pred: Any, y: torch.Tensor):
        """The metrics of :meth:`predictive`'s result against targets ``y``."""
        raise NotImplementedError(f"{type(self).__name__} defines no metrics: implement "
                                  "predictive() and metrics() to evaluate or validate with it")


# --- classification ------------------------------------------------------------------------


class CategoricalLikelihood(Likelihood):
    """``y_n ~ Categorical(logits = f(x_n))``, ``y`` integer labels in ``[0, C)``."""

    task = "classification"

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

    def predictive(self, model, out, draws):
        """Class probabilities ``softmax(out)``, ``(S, n, C)``."""
        return torch.softmax(out, dim=-1)

    def metrics(self, pred, y):
        return classification_metrics(pred, y)


def _squeezed(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out`` without a trailing output dim of size 1 that ``y`` does not have."""
    return out.squeeze(-1) if out.dim() == y.dim() + 1 and out.shape[-1] == 1 else out


def _event(dist_: dist.Distribution, out: torch.Tensor) -> dist.Distribution:
    """Independent over the output dims after the batch dim."""
    return dist_.to_event(out.dim() - 1) if out.dim() > 1 else dist_


class BernoulliLikelihood(Likelihood):
    """``y_n ~ Bernoulli(logits = f(x_n))``, ``y`` in {0, 1} (bool, integer or float), the
    output ``(n,)`` or ``(n, 1)`` (or ``(n, k)`` for ``k`` binary labels: ``y`` ``(n, k)``).
    The predictive is the two-class probabilities ``(1 - p, p)``, ``p = sigmoid(f)``, so the
    classification metrics (and ``predict``'s ``(S, n, 2)``) read as for two classes."""

    task = "classification"

    def prepare_output(self, out, y):
        return out if y is None else _squeezed(out, y)

    def prepare_target(self, y, out):
        return y.to(out.dtype)

    def law(self, out, params):
        return _event(dist.Bernoulli(logits=out), out)

    def check_targets(self, out, y, what):
        if y.is_complex():
            raise TypeError(f"{what}: bernoulli targets must be 0 or 1, got dtype {y.dtype}")
        o = _squeezed(out, y)
        if tuple(o.shape[1:]) != tuple(y.shape[1:]):
            raise ValueError(f"{what}: targets of shape {tuple(y.shape)} do not match the "
                             f"network output of shape (n, {', '.join(map(str, o.shape[1:]))})")
        if not bool(((y == 0) | (y == 1)).all()):
            bad = y[(y != 0) & (y != 1)].flatten()[:3].tolist()
            raise ValueError(f"{what}: bernoulli targets must be 0 or 1, got values such as "
                             f"{bad}")

    def predictive(self, model, out, draws):
        """``(1 - p, p)`` with ``p = sigmoid(out)`` (a trailing output dim of 1 dropped)."""
        p = torch.sigmoid(out.squeeze(-1) if out.dim() >= 3 and out.shape[-1] == 1 else out)
        return torch.stack([1 - p, p], dim=-1)

    def metrics(self, pred, y):
        return classification_metrics(pred, torch.as_tensor(y).long())


# --- regression ----------------------------------------------------------------------------


def _check_real(y: torch.Tensor, what: str, kind: str) -> None:
    if not y.is_floating_point():
        raise TypeError(f"{what}: {kind} targets must be floating point, got {y.dtype}")
    if not bool(torch.isfinite(y).all()):
        raise ValueError(f"{what}: y contains NaN or Inf")


class GaussianLikelihood(Likelihood):
    """``y_n ~ Normal(f(x_n), sigma)`` (independent over output dims). ``sigma`` is the
    model's fixed ``noise_value``, or with ``noise="learned"`` the latent site ``"noise"``
    with the prior ``model.noise_prior`` (default ``LogNormal(0, 1)``,
    :mod:`~bayes_spectral.bnn.network`): inferred by every method (MAP point, SVI guide,
    NUTS draws) like the weights."""

    task = "regression"
    has_noise = True

    def prepare_output(self, out, y):
        return out if y is None else _squeezed(out, y)

    def prepare_target(self, y, out):
        return y.to(out.dtype)

    def parameters(self, model):
        return model.sample_noise()

    def parameter_sites(self, model):
        return list(model.noise_sites)

    def law(self, out, params):
        return _event(dist.Normal(out, params), out)

    def check_targets(self, out, y, what):
        _check_real(y, what, "gaussian")
        o = _squeezed(out, y)
        if tuple(o.shape[1:]) != tuple(y.shape[1:]):
            raise ValueError(f"{what}: targets of shape {tuple(y.shape)} do not match the "
                             f"network output of shape (n, {', '.join(map(str, o.shape[1:]))})")

    def predictive(self, model, out, draws):
        """``loc = out``, ``scale`` the fixed noise or its draw ``(S,)``, broadcast."""
        if model.noise_sites:
            s = draws[model.noise_sites[0]].to(out)
            scale = s.reshape(s.shape[:1] + (1,) * (out.dim() - 1)).expand_as(out)
        else:
            scale = torch.full_like(out, float(model.noise_value))
        return GaussianPredictive(out, scale)

    def metrics(self, pred, y):
        return regression_metrics(pred, y)


class HeteroskedasticGaussianLikelihood(Likelihood):
    """``y_n ~ Normal(f(x_n)[..., 0], exp(f(x_n)[..., 1]))``: the network's last dim holds
    the mean and the log-scale (2 columns); ``y`` has the output's shape without it."""

    task = "regression"

    def prepare_target(self, y, out):
        return y.to(out.dtype)

    def law(self, out, params):
        loc, log_scale = out[..., 0], out[..., 1]
        return _event(dist.Normal(loc, log_scale.exp()), loc)

    def check_targets(self, out, y, what):
        _check_real(y, what, "heteroskedastic")
        if out.shape[-1] != 2 or tuple(out.shape[1:-1]) != tuple(y.shape[1:]):
            raise ValueError(f"{what}: the heteroskedastic likelihood needs the network output "
                             f"to have 2 columns (mean, log-scale) in its last dim after the "
                             f"target's shape {tuple(y.shape)}, got an output of shape "
                             f"(n, {', '.join(map(str, out.shape[1:]))})")

    def predictive(self, model, out, draws):
        """``loc = out[..., 0]``, ``scale = exp(out[..., 1])``."""
        return GaussianPredictive(out[..., 0], out[..., 1].exp())

    def metrics(self, pred, y):
        return regression_metrics(pred, y)


#: likelihood name -> :class:`Likelihood` instance
LIKELIHOODS: Registry[Likelihood] = Registry("likelihood")
LIKELIHOODS.register("categorical")(CategoricalLikelihood())
LIKELIHOODS.register("gaussian")(GaussianLikelihood())
LIKELIHOODS.register("bernoulli")(BernoulliLikelihood())
LIKELIHOODS.register("heteroskedastic")(HeteroskedasticGaussianLikelihood())
