"""Layer 5: Pyro traces of a fitted network, shared by the draws, the ArviZ container and
importance-weighted LOO.

* :func:`check_result`: the fit's :class:`BayesianNetwork`, which must have prior layers;
* :func:`as_data`: all rows ``(x, y)`` of any data form ``fit`` takes, checked and moved
  to the model (integer inputs kept);
* :func:`guide_trace`: one guide draw and its ``log q``;
* :func:`trace_draw`: ``log p(y_i | theta)`` per point (float64,
  :func:`float64_log_likelihood`) and ``log p(theta)`` of one draw;
* :func:`pointwise_log_likelihood`: ``log p(y_i | x_i, theta_{c,d})`` over all draws.
"""

from __future__ import annotations

from collections.abc import Mapping

import pyro.distributions as dist
import torch
from pyro import poutine

from ..bnn.batches import Inputs, as_source, inputs_to, targets_to
from ..bnn.fit import FitResult
from ..bnn.network import BayesianNetwork

__all__ = ["as_data", "categorical_log_prob", "check_result", "float64_log_likelihood",
           "guide_trace", "pointwise_log_likelihood", "trace_draw"]


def check_result(result) -> BayesianNetwork:
    """The model of a ``FitResult`` that has prior layers (else ``TypeError``/``ValueError``)."""
    if not isinstance(result, FitResult):
        raise TypeError(f"expected a bayes_spectral.FitResult, got {type(result).__name__}")
    model = result.model
    if not model.prior_sites:
        raise ValueError("the FitResult's model has no prior layers: no posterior over "
                         "weights to describe (give bayesian() priors)")
    return model


def _model_like(model: BayesianNetwork) -> torch.Tensor:
    return next(iter(model.parameters()), torch.zeros(()))


def as_data(model: BayesianNetwork, data) -> tuple[Inputs, torch.Tensor]:
    """All rows ``(x, y)`` of ``data`` in any form ``fit`` takes (a pair, a ``Split``'s
    training part, a ``Dataset``, a ``DataLoader`` or re-iterable of batches: read whole,
    :func:`~bayes_spectral.bnn.batches.as_source`), checked by the model and moved to its
    device; floating-point tensors in its dtype, integer ones (token ids, labels) kept."""
    x, y = as_source(data, "data").materialize()
    ref = _model_like(model)
    x, y = inputs_to(x, ref.device, ref.dtype), targets_to(y, ref.device, ref.dtype)
    model.check_data(x, y, "data")  # after the conversion: float32 data on a float64 model
    return x, y


def guide_trace(result: FitResult, args: tuple):
    """One guide draw: (values of the latent sites, ``log q`` of the draw)."""
    tr = poutine.trace(result.guide).get_trace(*args)
    values = {s: tr.nodes[s]["value"].detach() for s in result.model.latent_sites}
    log_q = sum(site["fn"].log_prob(site["value"]).sum() for site in tr.nodes.values()
                if site["type"] == "sample" and not site["is_observed"])
    return values, torch.as_tensor(log_q).detach()


def trace_draw(model: BayesianNetwork, values: Mapping[str, torch.Tensor], x, y):
    """``(log p(y_i | theta) for each i, log p(theta))`` with the latent sites fixed; the
    pointwise term in float64 (:func:`float64_log_likelihood`)."""
    with poutine.trace() as tr, poutine.condition(data=dict(values)):
        out = model(x, y)
    loglik = float64_log_likelihood(model, tr.trace, out, y)  # unscaled by the plate's N / B
    logprior = sum(tr.trace.nodes[s]["fn"].log_prob(tr.trace.nodes[s]["value"]).sum()
                   for s in model.latent_sites)
    return loglik, torch.as_tensor(logprior).detach()


def float64_log_likelihood(model: BayesianNetwork, trace, out: torch.Tensor,
                           y: torch.Tensor) -> torch.Tensor:
    """``log p(y_i | theta)`` ``(n,)`` in float64 from the traced network output ``out``:
    the observation law rebuilt on ``out`` and its parameters (read with the traced sample
    values, e.g. a learned noise's draw) cast to float64 (on the CPU for MPS, which lacks
    it); a categorical law through :func:`categorical_log_prob`. A float32 law rounds
    ``log p`` of a confidently predicted point to exactly 0 in every draw, and PSIS then
    sees a tail of ties."""
    law = model.observation
    drawn = {name: node["value"] for name, node in trace.nodes.items()
             if node["type"] == "sample" and name != "obs"}
    with poutine.block(), poutine.condition(data=drawn):  # e.g. the learned noise's draw
        params = law.parameters(model)
    dev = out.device if out.device.type != "mps" else torch.device("cpu")
    out64 = out.detach().to(dev, torch.float64)
    params64 = _to_float64(params, dev)
    target = law.prepare_target(y.detach().to(dev), out64)
    fn = law.law(out64, params64)
    if type(fn) in (torch.distributions.Categorical, dist.Categorical):
        return categorical_log_prob(fn.logits, target)
    return fn.log_prob(target).detach()


def categorical_log_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[y]`` without cancellation: ``-log1p(sum_{j != y} exp(x_j -
    x_y))`` where ``y`` is the argmax (exact down to ``~1e-308``, where ``x_y - logsumexp x``
    is exactly 0 beyond a margin of ~37 in float64), ``x_y - logsumexp x`` elsewhere."""
    xy = logits.gather(-1, y.long().unsqueeze(-1))
    others = torch.exp(logits - xy).scatter(-1, y.long().unsqueeze(-1), 0.0).sum(-1)
    top = xy.squeeze(-1) >= logits.amax(-1)
    plain = xy.squeeze(-1) - torch.logsumexp(logits, -1)
    return torch.where(top, -torch.log1p(torch.where(top, others, 0.0)), plain)


def _to_float64(params, device: torch.device):
    """Floating tensors in ``params`` (a tensor, a tuple/list/dict of them, or anything
    else, kept) as float64 on ``device``."""
    if isinstance(params, torch.Tensor):
        return params.detach().to(device, torch.float64) if params.is_floating_point() \
            else params.to(device)
    if isinstance(params, (tuple, list)):
        return type(params)(_to_float64(p, device) for p in params)
    if isinstance(params, dict):
        return {k: _to_float64(v, device) for k, v in params.items()}
    return params


def pointwise_log_likelihood(model: BayesianNetwork, latent: Mapping[str, torch.Tensor],
                             x: Inputs, y: torch.Tensor) -> torch.Tensor:
    """``log p(y_i | x_i, theta_{c,d})`` of shape ``(chain, draw, n)`` for latent draws
    ``{site: (chain, draw, *event)}`` (one conditioned forward pass per draw)."""
    first = next(iter(latent.values()))
    c, d = first.shape[:2]
    rows = []
    with torch.no_grad():
        for i in range(c * d):
            vals = {s: v.reshape(c * d, *v.shape[2:])[i] for s, v in latent.items()}
            rows.append(trace_draw(model, vals, x, y)[0])
    return torch.stack(rows).reshape(c, d, -1)
