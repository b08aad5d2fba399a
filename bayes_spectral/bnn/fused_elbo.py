"""Layer 4: a fused mean-field ELBO for ``AutoNormal`` guides (:class:`FusedELBO`) and the
guide class that asks for it (:class:`FusedNormal`, guides ``"fused_normal"`` and
``"local_reparam"``).

``AutoNormal`` puts ``q(z) = T_# N(mu, sigma^2)`` on every latent site (``T = biject_to`` of
the site's support). ``Trace_ELBO`` estimates

    ELBO = E_q[ sum_n s_n log p(y_n | z) + sum_sites log p(z) - log q(z) ]

by tracing the guide (one sample site, one Delta site and their log-densities per latent
site), replaying the model and summing every site's ``log_prob``. :class:`FusedELBO`
computes the same estimate in one pass: for each site ``z_u = mu + sigma * eps`` (the same
``eps`` draws, in the same order, as ``AutoNormal``), the model traced once conditioned on
``z = T(z_u)``, the likelihood read from its observed sites (scale ``N / B`` of the data
plate included) and the prior from its latent sites through the model's own distributions
(spectral, tracked, lazy ``prior_every`` scaling and masks included). With
``analytic=True`` (default):

* entropy: ``H[q] = sum(log sigma) + d/2 (1 + log 2 pi) + E[log |dT/dz_u|]`` (Gaussian part
  exact, the Jacobian of a constrained site sampled at ``z_u``);
* an (independent) Normal prior ``N(m0, s0^2)`` on a real site: the expected log-density in
  closed form, ``-sum(log s0 + log(2 pi)/2 + ((mu - m0)^2 + sigma^2) / (2 s0^2))``, so
  ``prior + entropy = -KL(q || p)``.

Both replace a one-draw estimate by its expectation: the ELBO estimate is unbiased, with a
smaller variance. ``analytic=False`` gives ``-log q(z)`` and ``log p(z)`` at the draw: the
estimate (and gradient) of ``Trace_ELBO`` with ``AutoNormal`` at the same seed, to
round-off.

``local_reparam=True``: the weights of Linear/Conv layers with a plain (or tracked) weight
site are not drawn for the likelihood; the layer runs at ``mu`` and adds its local noise
(:mod:`~bayes_spectral.bnn.local_reparam`), the entropy is analytic, and the prior is
analytic for a Normal prior, else evaluated at a separate draw ``mu + sigma * eps'`` (an
unbiased estimate of ``E_q log p(W)``, the expectations of the likelihood and the prior
being separate terms). In expectation the ELBO is that of weight sampling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO
from pyro.infer.autoguide import AutoNormal
from pyro.infer.util import torch_item
from pyro.poutine.util import site_is_subsample
from torch import nn
from torch.distributions import biject_to, constraints

from .local_reparam import noise_hooks, supports_local

__all__ = ["FusedELBO", "FusedNormal", "sample_outputs"]

_HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
_NORMALS = (dist.Normal, torch.distributions.Normal)


class FusedNormal(AutoNormal):
    """``AutoNormal`` that trains with :class:`FusedELBO` (``make_elbo``): with ``Trace_ELBO``
    it is an ``AutoNormal``. ``local_reparam``: Linear/Conv weights by local
    reparameterisation in :meth:`make_elbo`'s ELBO.

    The scales are ``sigma = exp(rho)`` (``constraints.positive``; ``AutoNormal``'s default
    is ``softplus(rho)``): ``log sigma`` in the entropy is the parameter itself, and ``exp``
    costs a fraction of ``softplus`` and its backward over every weight."""

    scale_constraint = constraints.positive

    def __init__(self, model, *, local_reparam: bool = False, **kwargs) -> None:
        super().__init__(model, **kwargs)
        self.local_reparam = bool(local_reparam)

    def make_elbo(self, num_particles: int = 1, **kwargs) -> FusedELBO:
        """The ELBO this guide is meant for: ``FusedELBO(num_particles, local_reparam=...)``."""
        return FusedELBO(num_particles=num_particles, local_reparam=self.local_reparam,
                         **kwargs)


@dataclass(frozen=True)
class _Site:
    name: str
    transform: torch.distributions.Transform
    real: bool
    layer: nn.Module | None  # set when local reparameterisation can apply


def _is_real(support) -> bool:
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    return support is constraints.real


def _local_layers(model) -> dict[str, nn.Module]:
    """Latent site -> its Linear/Conv layer, for plain or tracked weight sites of a
    :class:`~bayes_spectral.bnn.network.BayesianNetwork` (else empty)."""
    prior_sites = getattr(model, "prior_sites", None)
    if not prior_sites:
        return {}
    skip = set(model.spectral_layers) | set(model.enumerated_layers)
    rows = {row.name: row for row in model.weight_rows}
    out = {}
    for row_name, site in prior_sites.items():
        row = rows.get(row_name)
        if row is None or row_name in skip or row.tied or row.index is not None:
            continue
        layer = model.layer(row_name)
        if supports_local(layer, row.attr):
            out[site] = layer
    return out


def _broadcasts_to(shape, target) -> bool:
    """``shape`` broadcasts to ``target`` without growing it (``torch.broadcast_shapes``
    without its cost: this runs every step)."""
    shape, target = tuple(shape), tuple(target)
    if len(shape) > len(target):
        return False
    tail = target[len(target) - len(shape):]
    return all(a in (1, b) for a, b in zip(shape, tail, strict=True))


def _unwrap(fn):
    """``(base, True)`` for ``Independent(Normal)`` / ``Normal``, else ``(fn, False)``."""
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn, type(fn) in _NORMALS


class FusedELBO(ELBO):
    """The mean-field ELBO of an ``AutoNormal`` guide in one model pass (module docstring).

    :param num_particles: draws averaged per step.
    :param analytic: Gaussian entropy and Normal priors' expected log-density in closed
        form (``True``) or at the draw (``False``: ``Trace_ELBO``'s estimate, same draws).
    :param local_reparam: local reparameterisation of Linear/Conv weight sites.
    """

    def __init__(self, num_particles: int = 1, *, analytic: bool = True,
                 local_reparam: bool = False, **kwargs) -> None:
        if not isinstance(analytic, bool) or not isinstance(local_reparam, bool):
            raise ValueError(f"analytic and local_reparam must be True or False, got "
                             f"{analytic!r} and {local_reparam!r}")
        super().__init__(num_particles=num_particles, **kwargs)
        self.analytic = analytic
        self.local_reparam = local_reparam
        self._plans: dict = {}

    # -- set-up -----------------------------------------------------------------------------
    def _plan(self, model, guide, args, kwargs) -> list[_Site]:
        if not isinstance(guide, AutoNormal):
            raise TypeError(f"FusedELBO needs an AutoNormal guide (e.g. guide "
                            f"'fused_normal'), got {type(guide).__name__}")
        if getattr(model, "enumerated_layers", None):
            raise ValueError("FusedELBO: enumerated spike-and-slab layers need TraceEnum_ELBO")
        if guide.prototype_trace is None:
            guide._setup_prototype(*args, **kwargs)
        key = (id(guide), id(guide.prototype_trace), id(model))
        if key not in self._plans:
            layers = _local_layers(model) if self.local_reparam else {}
            plan = []
            for name, site in guide.prototype_trace.iter_stochastic_nodes():
                if any(f.vectorized for f in site["cond_indep_stack"]):
                    raise ValueError(f"FusedELBO: latent site {name!r} is inside a plate "
                                     "(local latent variables are not supported)")
                support = site["fn"].support
                real = _is_real(support)
                plan.append(_Site(name, biject_to(support), real,
                                  layers.get(name) if real else None))
            self._plans = {key: plan}
        return self._plans[key]

    # -- one particle ---------------------------------------------------------------------
    def _draw(self, guide, plan):
        """Conditioning values, local layers, per-site ``(mu, sigma)`` and the entropy."""
        values, local, params, entropy = {}, [], {}, 0.0
        exp_param = guide.scale_constraint is constraints.positive
        with guide._pyro_context:  # as in guide(...): pyro.param sites that SVI sees
            params = {s.name: guide._get_loc_and_scale(s.name) for s in plan}
        for s in plan:
            loc, scale = params[s.name]
            if s.layer is not None:
                values[s.name] = loc
                local.append((s.name, s.layer, scale))
                entropy = entropy + _gaussian_entropy(scale, exp_param)
                continue
            z_u = loc + torch.empty_like(loc).normal_() * scale
            z = z_u if s.real else s.transform(z_u)
            values[s.name] = z
            if self.analytic:
                entropy = entropy + _gaussian_entropy(scale, exp_param)
            else:
                entropy = entropy - dist.Normal(loc, scale).log_prob(z_u).sum()
            if not s.real:
                entropy = entropy + s.transform.log_abs_det_jacobian(z_u, z).sum()
        return values, local, params, entropy

    def _log_prior(self, site, s: _Site, loc, scale) -> torch.Tensor:
        """``E_q log p(z)`` of one latent site (closed form or one draw), scaled/masked."""
        fn = site["fn"]
        base, normal = _unwrap(fn)
        if self.analytic and normal and s.real and site["mask"] is None \
                and _broadcasts_to(base.batch_shape, loc.shape):
            return _normal_cross_entropy(loc, scale, _compact(base.loc),
                                         _compact(base.scale)) * site["scale"]
        value = site["value"]
        if s.layer is not None:  # the layer ran at mu: the prior at its own draw
            value = loc + torch.empty_like(loc).normal_() * scale
        lp = fn.log_prob(value, *site["args"], **site["kwargs"])
        return scale_and_mask(lp, site["scale"], site["mask"]).sum()

    def _particle(self, model, guide, plan, args, kwargs) -> torch.Tensor:
        values, local, params, entropy = self._draw(guide, plan)
        with noise_hooks(local):
            trace = poutine.trace(poutine.condition(model, data=values)).get_trace(
                *args, **kwargs)
        by_name = {s.name: s for s in plan}
        elbo = entropy
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if name in by_name:
                elbo = elbo + self._log_prior(site, by_name[name], *params[name])
            elif site["is_observed"]:
                lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
                elbo = elbo + scale_and_mask(lp, site["scale"], site["mask"]).sum()
            else:
                raise ValueError(f"FusedELBO: the model's latent site {name!r} is not in the "
                                 "guide")
        return -elbo

    # -- pyro.infer.ELBO interface ----------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("FusedELBO computes the ELBO without a guide trace: use "
                                  "loss, loss_and_grads or differentiable_loss")

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        """``-ELBO``, averaged over ``num_particles`` draws, differentiable."""
        plan = self._plan(model, guide, args, kwargs)
        loss = 0.0
        for _ in range(self.num_particles):
            loss = loss + self._particle(model, guide, plan, args, kwargs)
        return loss / self.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        """``-ELBO`` as a float."""
        with torch.no_grad():
            return torch_item(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """``-ELBO`` as a float; its gradient accumulated into the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if getattr(loss, "requires_grad", False):
            loss.backward(retain_graph=self.retain_graph)
        return torch_item(loss)


def _log_scale(scale: torch.Tensor, exp_param: bool) -> torch.Tensor:
    """``log sigma``: with ``exp_param`` (``sigma = exp(rho)``, a param-store value) the
    unconstrained parameter ``rho`` itself (no pass over the weights), else ``log``."""
    ref = getattr(scale, "unconstrained", None) if exp_param else None
    rho = ref() if callable(ref) else None
    return scale.log() if rho is None else rho


def _normal_cross_entropy(loc, scale, m0, s0) -> torch.Tensor:
    """``E_q log N(w; m0, s0^2) = -sum(log s0 + log(2 pi)/2 + ((mu - m0)^2 + sigma^2)
    / (2 s0^2))`` over the weights, ``w ~ N(mu, sigma^2)``. With one ``s0`` (an i.i.d.
    prior scale) the sums are two dot products, ``(|mu - m0|^2 + |sigma|^2) / (2 s0^2)``."""
    n = loc.numel()
    const = (s0.log() + _HALF_LOG_2PI).sum() * (n // s0.numel())
    if s0.numel() == 1:
        d, sd = (loc - m0).reshape(-1), scale.reshape(-1)
        sq = torch.dot(d, d) + torch.dot(sd, sd)
        return -(sq / (2 * s0.reshape(()).square()) + const)
    quad = ((loc - m0).square() + scale.square()) / (2 * s0.square())
    return -(quad.sum() + const)


def _gaussian_entropy(scale: torch.Tensor, exp_param: bool) -> torch.Tensor:
    """``sum(log sigma) + d (1 + log 2 pi) / 2``."""
    return _log_scale(scale, exp_param).sum() + scale.numel() * (0.5 + _HALF_LOG_2PI)


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` with its broadcast (stride-0) dimensions cut to size 1: a prior's ``loc`` and
    ``scale`` expanded to the weight's shape cost one element, not one per weight."""
    if t.dim() == 0 or all(st != 0 for st in t.stride()):
        return t
    return t[tuple(slice(0, 1) if st == 0 else slice(None) for st in t.stride())]


def sample_outputs(model, guide: AutoNormal, x, local_reparam: bool = False) -> torch.Tensor:
    """``model.net_output(x)`` at one draw of ``guide`` (weights sampled, or local noise
    for Linear/Conv layers with ``local_reparam``)."""
    elbo = FusedELBO(local_reparam=local_reparam)
    plan = elbo._plan(model, guide, (x,), {})
    values, local, _, _ = elbo._draw(guide, plan)
    with noise_hooks(local), poutine.condition(data=values):
        return model.net_output(x)
