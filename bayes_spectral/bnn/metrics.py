"""Layer 4: metrics of a posterior predictive distribution (natural logarithms, float64).

**Classification.** ``probs`` of shape ``(S, n, C)`` (``S`` posterior draws, ``n`` points,
``C`` classes) or ``(n, C)`` (one draw / already averaged), integer labels ``(n,)``:

* predictive ``p(y | x) = mean_s probs[s]``; accuracy of its argmax (ties: lowest class);
* NLL ``= -mean_n log p(y_n | x_n)``;
* ECE (15 equal-width bins on the confidence ``max_c p``):
  ``sum_b (n_b / n) |acc_b - conf_b|``; bins ``(k/15, (k+1)/15]``, the first also takes 0;
* Brier score ``mean_n sum_c (p_nc - 1[y_n = c])^2`` (Brier 1950, over all classes);
* predictive entropy ``H[mean_s p_s]`` (total), expected entropy ``mean_s H[p_s]``
  (aleatoric) and mutual information ``H[mean_s p_s] - mean_s H[p_s]`` (epistemic);
* held-out log predictive density per point ``lpd_n = log mean_s p_s(y_n | x_n)``
  (``log mean exp`` of the per-draw log-probabilities), its mean ``LPD = mean_n lpd_n``
  (``= -NLL``) and standard error ``SE = sd_n(lpd_n) / sqrt(n)`` (sample sd, ``ddof=1``;
  0 for one point).

Binary (Bernoulli) predictions ``p = P(y = 1)`` are scored as the two classes
``(1 - p, p)`` (so ``p = 0.5`` predicts 0); their Brier score is then
``2 mean_n (p_n - y_n)^2`` (twice scikit-learn's one-class ``brier_score_loss``).

**Gaussian regression.** A :class:`GaussianPredictive` ``(loc, scale)`` of shape
``(S, n, ...)``: draw ``s`` predicts ``y_n ~ Normal(loc_sn, scale_sn)`` (independent over
trailing output dims); the predictive is the mixture over draws:

* NLL ``= -mean_n log mean_s prod_d N(y_nd | loc_snd, scale_snd)`` (``log mean exp``);
* RMSE ``= sqrt(mean_{n,d} (mean_s loc_snd - y_nd)^2)``;
* coverage of the central ``q`` interval (``q = 0.5, 0.9``), per output dim: with the
  mixture CDF ``F(y) = mean_s Phi((y - loc_s) / scale_s)``, ``y`` lies inside the central
  interval ``[F^-1((1-q)/2), F^-1((1+q)/2)]`` iff ``(1-q)/2 <= F(y) <= (1+q)/2``; the
  coverage is the fraction of ``(n, d)`` inside.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "ClassificationMetrics",
    "GaussianPredictive",
    "LogPredictiveDensity",
    "RegressionMetrics",
    "accuracy",
    "brier_score",
    "classification_metrics",
    "expected_calibration_error",
    "gaussian_nll",
    "interval_coverage",
    "log_predictive_density",
    "mutual_information",
    "negative_log_likelihood",
    "pointwise_log_predictive",
    "predictive_entropy",
    "regression_metrics",
    "rmse",
]


class ClassificationMetrics(NamedTuple):
    """Metrics of a classifier's predictive (entropy and MI averaged over points)."""

    accuracy: float
    nll: float
    ece: float
    entropy: float
    mutual_information: float
    brier: float


class LogPredictiveDensity(NamedTuple):
    """Held-out LPD: ``lpd`` (mean over points), its ``se``, ``pointwise`` ``(n,)``."""

    lpd: float
    se: float
    pointwise: torch.Tensor


class RegressionMetrics(NamedTuple):
    """Metrics of a Gaussian predictive mixture (module docstring)."""

    nll: float
    rmse: float
    coverage_50: float
    coverage_90: float


class GaussianPredictive(NamedTuple):
    """Per-draw Gaussian predictive: ``loc`` and ``scale`` of shape ``(S, n, ...)``."""

    loc: torch.Tensor
    scale: torch.Tensor

    def cpu(self) -> GaussianPredictive:
        """Both tensors on the CPU."""
        return GaussianPredictive(self.loc.cpu(), self.scale.cpu())


# --- classification ----------------------------------------------------------------------


def _mean_probs(probs: torch.Tensor) -> torch.Tensor:
    probs = torch.as_tensor(probs)
    if probs.dim() == 3:
        return probs.mean(0)
    if probs.dim() == 2:
        return probs
    raise ValueError(f"probs must have shape (S, n, C) or (n, C), got {tuple(probs.shape)}")


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(torch.where(p > 0, p * torch.log(p), torch.zeros_like(p))).sum(-1)


def accuracy(probs, y) -> float:
    """Accuracy of the argmax of the (averaged) predictive."""
    p = _mean_probs(probs)
    return float((p.argmax(-1) == torch.as_tensor(y).to(p.device)).to(torch.float64).mean())


def negative_log_likelihood(probs, y) -> float:
    """``-mean_n log mean_s p_s(y_n | x_n)``."""
    p = _mean_probs(probs).to(torch.float64)
    y = torch.as_tensor(y).long().to(p.device)
    py = p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return float(-torch.log(py.clamp_min(torch.finfo(torch.float64).tiny)).mean())


def expected_calibration_error(probs, y, num_bins: int = 15) -> float:
    """ECE with ``num_bins`` equal-width confidence bins (see module docstring)."""
    p = _mean_probs(probs).to(torch.float64)
    y = torch.as_tensor(y).long().to(p.device)
    conf, pred = p.max(-1)
    correct = (pred == y).to(torch.float64)
    # bin k holds conf in (k/B, (k+1)/B]; conf == 0 goes to bin 0
    idx = (torch.ceil(conf * num_bins) - 1).clamp(0, num_bins - 1).long()
    n = conf.numel()
    count = torch.zeros(num_bins, dtype=torch.float64, device=p.device).index_add_(
        0, idx, torch.ones_like(conf))
    gap = torch.zeros_like(count).index_add_(0, idx, correct - conf)
    return float(gap.abs().sum() / n)


def brier_score(probs, y) -> float:
    """``mean_n sum_c (p_nc - 1[y_n = c])^2`` of the averaged predictive."""
    p = _mean_probs(probs).to(torch.float64)
    onehot = torch.nn.functional.one_hot(torch.as_tensor(y).long().to(p.device), p.shape[-1])
    return float((p - onehot).square().sum(-1).mean())


def predictive_entropy(probs) -> torch.Tensor:
    """``H[mean_s p_s]`` per point, shape ``(n,)``."""
    return _entropy(_mean_probs(probs).to(torch.float64))


def mutual_information(probs) -> torch.Tensor:
    """Epistemic part ``H[mean_s p_s] - mean_s H[p_s]`` per point (zero for one draw)."""
    probs = torch.as_tensor(probs).to(torch.float64)
    if probs.dim() == 2:
        return torch.zeros(probs.shape[0], dtype=torch.float64, device=probs.device)
    return _entropy(probs.mean(0)) - _entropy(probs).mean(0)


def pointwise_log_predictive(probs, y) -> torch.Tensor:
    """``lpd_n = log mean_s p_s(y_n | x_n)`` per point, float64 ``(n,)``; ``probs`` ``(S, n,
    C)`` or ``(n, C)``, computed as ``logsumexp_s log p_s - log S`` (no underflow of the
    mean; a zero probability gives ``log`` of the smallest positive float64)."""
    probs = torch.as_tensor(probs).to(torch.float64)
    if probs.dim() == 2:
        probs = probs.unsqueeze(0)
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (S, n, C) or (n, C), got {tuple(probs.shape)}")
    y = torch.as_tensor(y).long().to(probs.device)
    if y.shape != probs.shape[1:2]:
        raise ValueError(f"labels of shape {tuple(y.shape)} do not match probs of shape "
                         f"{tuple(probs.shape)} (S, n, C)")
    py = probs.gather(-1, y.expand(probs.shape[0], -1).unsqueeze(-1)).squeeze(-1)  # (S, n)
    logp = torch.log(py.clamp_min(torch.finfo(torch.float64).tiny))
    return torch.logsumexp(logp, dim=0) - math.log(probs.shape[0])


def log_predictive_density(probs, y) -> LogPredictiveDensity:
    """``LPD = mean_n lpd_n`` and ``SE = sd(lpd_n, ddof=1) / sqrt(n)`` of
    :func:`pointwise_log_predictive` (the held-out figure of merit with its error)."""
    pw = pointwise_log_predictive(probs, y)
    n = pw.numel()
    se = float(pw.std(correction=1) / math.sqrt(n)) if n > 1 else 0.0
    return LogPredictiveDensity(float(pw.mean()), se, pw)


def classification_metrics(probs, y) -> ClassificationMetrics:
    """All classification metrics of ``probs`` ``(S, n, C)`` or ``(n, C)``."""
    return ClassificationMetrics(
        accuracy(probs, y),
        negative_log_likelihood(probs, y),
        expected_calibration_error(probs, y),
        float(predictive_entropy(probs).mean()),
        float(mutual_information(probs).mean()),
        brier_score(probs, y),
    )


# --- Gaussian regression -----------------------------------------------------------------


def _aligned(pred: GaussianPredictive, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``loc``, ``scale`` ``(S, n, ...)`` and ``y`` ``(n, ...)`` in float64, a trailing output
    dim of size 1 that ``y`` lacks dropped; ``ValueError`` on other shape mismatches."""
    loc, scale = (torch.as_tensor(t).to(torch.float64) for t in pred)
    y = torch.as_tensor(y).to(device=loc.device, dtype=torch.float64)
    scale = scale.expand_as(loc)
    if loc.shape[-1:] == (1,) and (loc.dim() == y.dim() + 2 or loc.shape == y.shape + (1,)):
        loc, scale = loc.squeeze(-1), scale.squeeze(-1)
    if loc.shape == y.shape:  # one draw
        loc, scale = loc.unsqueeze(0), scale.unsqueeze(0)
    if tuple(loc.shape[1:]) != tuple(y.shape):
        raise ValueError(f"gaussian metrics: predictions of shape {tuple(loc.shape)} (S, n, "
                         f"...) do not match targets of shape {tuple(y.shape)}")
    return loc, scale, y


def gaussian_nll(pred: GaussianPredictive, y) -> float:
    """``-mean_n log mean_s prod_d N(y_nd | loc_snd, scale_snd)``."""
    loc, scale, y = _aligned(pred, y)
    logp = torch.distributions.Normal(loc, scale).log_prob(y.expand_as(loc))
    logp = logp.reshape(loc.shape[0], loc.shape[1], -1).sum(-1)  # (S, n)
    lse = torch.logsumexp(logp, dim=0) - math.log(loc.shape[0])
    return float(-lse.mean())


def rmse(pred: GaussianPredictive, y) -> float:
    """``sqrt(mean (mean_s loc_s - y)^2)``."""
    loc, _, y = _aligned(pred, y)
    return float((loc.mean(0) - y).square().mean().sqrt())


def interval_coverage(pred: GaussianPredictive, y, level: float) -> float:
    """Fraction of targets inside the central ``level`` interval of the mixture."""
    if not 0 < level < 1:
        raise ValueError(f"interval level must lie in (0, 1), got {level!r}")
    loc, scale, y = _aligned(pred, y)
    cdf = torch.special.ndtr((y - loc) / scale).mean(0)
    inside = (cdf >= (1 - level) / 2) & (cdf <= (1 + level) / 2)
    return float(inside.to(torch.float64).mean())


def regression_metrics(pred: GaussianPredictive, y) -> RegressionMetrics:
    """NLL, RMSE and the coverage of the central 50% and 90% predictive intervals."""
    return RegressionMetrics(gaussian_nll(pred, y), rmse(pred, y),
                             interval_coverage(pred, y, 0.5), interval_coverage(pred, y, 0.9))
