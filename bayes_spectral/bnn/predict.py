"""Layer 4: posterior predictive and the metrics of a predictive distribution.

Metric functions take ``probs`` of shape ``(S, n, C)`` (``S`` posterior draws, ``n`` points,
``C`` classes) or ``(n, C)`` (one draw / already averaged) and integer labels ``(n,)``;
natural logarithms throughout.

* predictive ``p(y | x) = mean_s probs[s]``; accuracy of its argmax;
* NLL ``= -mean_n log p(y_n | x_n)``;
* ECE (15 equal-width bins on the confidence ``max_c p``):
  ``sum_b (n_b / n) |acc_b - conf_b|``; bins ``(k/15, (k+1)/15]``, the first also takes 0;
* predictive entropy ``H[mean_s p_s]`` (total), expected entropy ``mean_s H[p_s]``
  (aleatoric) and mutual information ``H[mean_s p_s] - mean_s H[p_s]`` (epistemic).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from pyro.infer import Predictive

__all__ = [
    "PredictiveMetrics",
    "accuracy",
    "evaluate",
    "expected_calibration_error",
    "mutual_information",
    "negative_log_likelihood",
    "predictive_entropy",
    "predictive_probs",
]


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
    return float((p.argmax(-1) == torch.as_tensor(y)).to(torch.float64).mean())


def negative_log_likelihood(probs, y) -> float:
    """``-mean_n log mean_s p_s(y_n | x_n)``."""
    p = _mean_probs(probs).to(torch.float64)
    y = torch.as_tensor(y).long()
    py = p.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return float(-torch.log(py.clamp_min(torch.finfo(torch.float64).tiny)).mean())


def expected_calibration_error(probs, y, num_bins: int = 15) -> float:
    """ECE with ``num_bins`` equal-width confidence bins (see module docstring)."""
    p = _mean_probs(probs).to(torch.float64)
    y = torch.as_tensor(y).long()
    conf, pred = p.max(-1)
    correct = (pred == y).to(torch.float64)
    # bin k holds conf in (k/B, (k+1)/B]; conf == 0 goes to bin 0
    idx = (torch.ceil(conf * num_bins) - 1).clamp(0, num_bins - 1).long()
    ece = torch.zeros((), dtype=torch.float64)
    n = conf.numel()
    for k in range(num_bins):
        mask = idx == k
        nk = int(mask.sum())
        if nk:
            ece = ece + nk / n * (correct[mask].mean() - conf[mask].mean()).abs()
    return float(ece)


def predictive_entropy(probs) -> torch.Tensor:
    """``H[mean_s p_s]`` per point, shape ``(n,)``."""
    return _entropy(_mean_probs(probs).to(torch.float64))


def mutual_information(probs) -> torch.Tensor:
    """Epistemic part ``H[mean_s p_s] - mean_s H[p_s]`` per point (zero for one draw)."""
    probs = torch.as_tensor(probs).to(torch.float64)
    if probs.dim() == 2:
        return torch.zeros(probs.shape[0], dtype=torch.float64)
    return _entropy(probs.mean(0)) - _entropy(probs).mean(0)


class PredictiveMetrics(NamedTuple):
    accuracy: float
    nll: float
    ece: float
    entropy: float
    mutual_information: float


def evaluate(probs, y) -> PredictiveMetrics:
    """All metrics; entropy and mutual information averaged over points."""
    return PredictiveMetrics(
        accuracy(probs, y),
        negative_log_likelihood(probs, y),
        expected_calibration_error(probs, y),
        float(predictive_entropy(probs).mean()),
        float(mutual_information(probs).mean()),
    )


def predictive_probs(model, x: torch.Tensor, *, guide=None,
                     samples: Mapping[str, torch.Tensor] | None = None,
                     num_samples: int = 32, batch_size: int = 4096) -> torch.Tensor:
    """Class probabilities ``(S, n, C)`` (categorical) or outputs ``(S, n, ...)`` (gaussian)
    under the posterior: ``pyro.infer.Predictive`` with a ``guide`` (``num_samples`` draws)
    or with ``samples`` (e.g. NUTS draws, a dict of ``(S, ...)`` tensors)."""
    if (guide is None) == (samples is None):
        raise ValueError("give exactly one of guide= or samples=")
    if samples is not None:
        samples = {k: v.reshape(-1, *v.shape[-len(_event(model, k)):]) if _event(model, k)
                   else v for k, v in samples.items() if k in model.latent_sites}
        pred = Predictive(model, posterior_samples=samples, return_sites=["_RETURN"])
    else:
        pred = Predictive(model, guide=guide, num_samples=num_samples,
                          return_sites=["_RETURN"])
    outs = []
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            outs.append(pred(x[i:i + batch_size])["_RETURN"])
    out = torch.cat(outs, dim=1)
    if model.likelihood == "categorical":
        return torch.softmax(out, dim=-1)
    return out


def _event(model, site: str) -> tuple:
    init = model._initial.get(site)
    return tuple(init.shape) if init is not None else ()
