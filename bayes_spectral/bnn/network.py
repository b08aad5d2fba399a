"""Layer 4: turn any ``torch.nn.Module`` into a Pyro model with priors on its weights.

:func:`bayesian` deep-copies a module, converts the copy with
:func:`pyro.nn.module.to_pyro_module_` and replaces the ``weight`` of the chosen layers by
``PyroSample`` sites whose prior is any distribution with ``event_shape == weight.shape``
(normally a spectral law of :mod:`bayes_spectral.distributions`). Every other parameter stays
a deterministic parameter in Pyro's param store (point estimate).

Scaling of the data plate (mini-batches): the likelihood sits in
``pyro.plate("data", N, subsample=arange(B))`` with ``N = num_data`` and ``B`` the batch
size, so Pyro multiplies the batch log-likelihood by ``N / B``. One SVI/MAP step therefore
minimises an unbiased estimate of the full-data loss
``-log p(W) - sum_{n=1}^N log p(y_n | x_n, W)`` (the prior is *not* scaled). Dividing by
``N`` gives ``mean_batch NLL - log p(W) / N``: the penalty loop with weight ``1 / N``.

Spectral parameterisation (``spectral=...``): ``W = U diag(s) V^T`` (flattened view
``m x n`` for conv kernels, reshaped back) with ``U`` (``m x r``) and ``V`` (``n x r``)
kept orthonormal by :func:`torch.nn.utils.parametrizations.orthogonal` (point estimates)
and the prior placed directly on ``s`` by :class:`SingularValuePrior` (no SVD per step).

Spike-and-slab rank enumeration (``enumerate_rank=...``): the layer's weight site carries
no density itself and :meth:`SpikeAndSlabSpectrum.rank_model` adds the indicator sites
``"<site>_z"`` (enumerated in parallel) and the half-normal factors; train with
``TraceEnum_ELBO`` (``fit`` does this automatically) and read the rank posterior with
:meth:`BayesianNetwork.rank_posterior`.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, PyroParam, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import nn
from torch.distributions import constraints
from torch.nn.utils.parametrizations import orthogonal

from ..distributions import (
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
    SpectralDistribution,
    SpikeAndSlabSpectrum,
)
from ..penalties.tail import PowerLawPrior
from ..spectra.laws import frechet_log_pdf
from ..spectra.spectrum import PowerIteration

__all__ = ["BayesianNetwork", "SingularValuePrior", "TrackedSpectralPrior", "bayesian"]

LIKELIHOODS = ("categorical", "gaussian")
_EIGENVALUE_LAWS = (PowerLawSpectrum, FrechetTopEigenvalue)


# --- the law of the singular values under the spectral parameterisation -----------------


class SingularValuePrior(dist.TorchDistribution):
    """Law of the ``r`` singular values ``s`` of a spectrally parameterised weight.

    ``log p(s) = base.penalty(sort(s))`` plus, for laws defined on eigenvalues
    ``lambda = s^2`` (``PowerLawSpectrum``, ``FrechetTopEigenvalue``), the change of
    variables ``sum_i log(2 s_i)``, so that ``log_prob`` is a proper density of ``s``
    (unordered, i.i.d. values for the i.i.d. laws) and agrees with :meth:`sample`. The
    ``conv="pool"`` option of the base law does not apply: ``s`` are the singular values of
    the flattened ``m x n`` view. Support: positive reals (event dim 1).
    """

    arg_constraints: dict = {}
    support = constraints.independent(constraints.positive, 1)
    has_rsample = False

    def __init__(self, base: SpectralDistribution, validate_args=None):
        if not isinstance(base, SpectralDistribution):
            raise TypeError(
                "SingularValuePrior needs a spectral law of bayes_spectral.distributions, got "
                f"{type(base).__name__}"
            )
        self.base = base
        super().__init__(base.batch_shape, torch.Size([base._rank]), validate_args=False)

    def expand(self, batch_shape, _instance=None):
        return SingularValuePrior(self.base.expand(batch_shape))

    def log_prob(self, value):
        sv = torch.sort(value, dim=-1, descending=True).values
        lp = self.base._penalty_from_sv(sv)
        if isinstance(self.base, _EIGENVALUE_LAWS):
            lp = lp + (math.log(2.0) + torch.log(sv)).sum(-1)
        return lp

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.base._sample_sv(torch.Size(sample_shape) + self.batch_shape)


class TrackedSpectralPrior(dist.TorchDistribution):
    """Penalty log-density of a spectral prior evaluated without a full SVD per call.

    * ``FrechetTopEigenvalue`` (penalty measure): ``log Frechet(lambda_max)
      - (r - 1) log tau - (||W||_F^2 - lambda_max) / tau``, ``sigma_max`` from a
      warm-started power iteration (``power``: a :class:`PowerIteration`);
    * ``GaussianSpectrum`` (penalty measure): ``r (log sqrt(2/pi) - log s) - ||W||_F^2 / (2 s^2)``
      (exact, needs no power iteration);
    * ``PowerLawSpectrum`` (penalty measure): ``-PowerLawPrior(tracked=True)(W)``, the tail
      above ``xmin`` from :class:`~bayes_spectral.spectra.tracking.TailTracker` and the bulk through
      ``||W||_F^2`` (``power``: that penalty, which holds the tracker). Its state is not a
      buffer: :func:`~bayes_spectral.fit` renews it at every checkpoint boundary (next call
      re-decomposes), so a resumed run repeats the uninterrupted one exactly.

    ``lambda_max = (u^T W v)^2`` with ``u, v`` from ``power.n_iter`` power-iteration steps
    per call, warm-started from the previous call (the state is a buffer of the layer, saved
    in checkpoints); the gradient is that of ``sigma_max`` at the fixed point. An
    approximation while ``W`` moves fast: ``lambda_max`` is a lower bound until converged.
    2-D weights only (``conv="pool"`` spectra of kernels are not tracked).
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base: SpectralDistribution, power: nn.Module | None):
        if not isinstance(base, (FrechetTopEigenvalue, GaussianSpectrum, PowerLawSpectrum)):
            raise TypeError("tracked spectra need a FrechetTopEigenvalue, GaussianSpectrum or "
                            f"PowerLawSpectrum prior, got {type(base).__name__}")
        if base.measure != "penalty":
            raise ValueError("tracked spectra compute the penalty measure; build the prior with "
                             "measure='penalty'")
        if len(base.event_shape) != 2:
            raise ValueError(f"tracked spectra need a 2-D weight, got {tuple(base.event_shape)}")
        self.base, self.power = base, power
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def sample(self, sample_shape=()):
        return self.base.sample(sample_shape)

    def log_prob(self, value):
        base = self.base
        if isinstance(base, PowerLawSpectrum):
            if value.dim() != 2:
                raise ValueError("a tracked power-law prior takes one weight matrix per call, "
                                 f"got shape {tuple(value.shape)} (no vectorised particles)")
            return -self.power(value, name="weight")
        fro = value.square().sum((-2, -1))
        r = base._rank
        if isinstance(base, GaussianSpectrum):
            s = base.scale.to(value)
            return r * (0.5 * math.log(2.0 / math.pi) - torch.log(s)) - fro / (2 * s.square())
        lam_max = self.power(value).square()
        tau = base.tau.to(value)
        top = frechet_log_pdf(lam_max, base.concentration.to(value), base.scale.to(value),
                              base.loc.to(value))
        return top - (r - 1) * torch.log(tau) - (fro - lam_max) / tau


def _prior_to(prior: dist.Distribution, like: torch.Tensor) -> dist.Distribution:
    """A shallow copy of ``prior`` whose tensor parameters follow ``like``'s device/dtype."""
    tensors = {k: v for k, v in vars(prior).items() if isinstance(v, torch.Tensor)}
    if all(v.device == like.device and (not v.is_floating_point() or v.dtype == like.dtype)
           for v in tensors.values()) and not isinstance(prior, SingularValuePrior):
        return prior
    new = copy.copy(prior)
    for k, v in tensors.items():
        new.__dict__[k] = v.to(device=like.device, dtype=like.dtype if v.is_floating_point()
                               else v.dtype)
    if isinstance(prior, SingularValuePrior):
        new.base = _prior_to(prior.base, like)
    return new


# --- spectral factors -------------------------------------------------------------------


class _SpectralFactors(nn.Module):
    """Orthonormal ``U`` (``m x r``) and ``V`` (``n x r``) of a weight, initialised by SVD."""

    def __init__(self, weight: torch.Tensor, orthogonal_map: str = "cayley"):
        super().__init__()
        self.weight_shape = tuple(weight.shape)
        m, n = weight.shape[0], math.prod(weight.shape[1:])
        r = min(m, n)
        with torch.no_grad():
            u, s, vh = torch.linalg.svd(weight.detach().reshape(m, n), full_matrices=False)
        self.u = orthogonal(nn.Linear(r, m, bias=False, dtype=weight.dtype),
                            orthogonal_map=orthogonal_map)
        self.v = orthogonal(nn.Linear(r, n, bias=False, dtype=weight.dtype),
                            orthogonal_map=orthogonal_map)
        with torch.no_grad():
            self.u.weight = u
            self.v.weight = vh.transpose(0, 1).contiguous()
        self.initial_s = s.detach().clone()

    def initial_s_like(self) -> torch.Tensor:
        """A tensor on the factors' device and dtype (priors follow it)."""
        return self.u.parametrizations.weight.original

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        return ((self.u.weight * s) @ self.v.weight.transpose(0, 1)).reshape(self.weight_shape)


def _spectral_pre_hook(layer, args):
    factors = layer.spectral
    fullname = layer._pyro_get_fullname("spectral")
    pyro.module(fullname, factors, update_module_params=True)
    s = layer.spectral_s
    layer.weight = factors(s)


# --- the model --------------------------------------------------------------------------


class BayesianNetwork(PyroModule):
    """A Pyro model ``model(x, y=None)`` built by :func:`bayesian` (see there).

    Attributes: ``net`` (the converted copy), ``prior_sites`` (layer name -> latent site
    name), ``spectral_layers``, ``enumerated_layers``, ``likelihood``, ``num_data``.
    """

    def __init__(self, net: nn.Module, likelihood: str, noise, num_data: int | None):
        super().__init__()
        self.net = net
        self.likelihood = likelihood
        self.num_data = num_data
        self.prior_sites: dict[str, str] = {}
        self.spectral_layers: list[str] = []
        self.enumerated_layers: list[str] = []
        self.weight_layer_names: list[str] = []
        self._priors: dict[str, dist.Distribution] = {}
        self._initial: dict[str, torch.Tensor] = {}
        self._tail_penalties: dict[str, Any] = {}  # tracked power-law layers
        if noise == "learned":
            self.noise = PyroParam(torch.tensor(1.0), constraint=constraints.positive)
        else:
            self.noise_value = float(noise)

    # -- helpers ----------------------------------------------------------------------------
    @property
    def latent_sites(self) -> list[str]:
        """Names of the latent sample sites (weights or singular values), not indicators."""
        return list(self.prior_sites.values())

    def layer(self, name: str) -> nn.Module:
        return self.net.get_submodule(name) if name else self.net

    def initial_values(self) -> dict[str, torch.Tensor]:
        """Site -> the module's weights at :func:`bayesian` time (or their singular values).

        On the current device/dtype of the model's parameters.
        """
        ref = next(iter(self.parameters()), None)
        out = {}
        for site, value in self._initial.items():
            out[site] = value if ref is None else value.to(device=ref.device, dtype=ref.dtype)
        return out

    def renew_tracking(self) -> None:
        """Start the tail trackers of tracked power-law layers afresh (their next call
        re-decomposes). :func:`~bayes_spectral.fit` calls it at every checkpoint boundary,
        whether or not a file is written, so results do not depend on checkpointing and a
        resumed run (fresh trackers) repeats the uninterrupted one bit for bit."""
        self._tail_penalties = {n: _tail_penalty_for(self._priors[n])
                                for n in self._tail_penalties}

    def _prior_for(self, name: str, like: torch.Tensor):
        return _prior_to(self._priors[name], like)

    def weight_of(self, name: str, value: torch.Tensor | None = None) -> torch.Tensor:
        """Current weight of layer ``name`` (``value``: a value of its latent site)."""
        layer = self.layer(name)
        if name in self.spectral_layers:
            s = value if value is not None else self._initial[self.prior_sites[name]]
            return layer.spectral(s.to(next(layer.spectral.parameters())))
        return value if value is not None else self._initial[self.prior_sites[name]]

    # -- model ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        batch = x.shape[0]
        out = self.net(x)
        for name in self.enumerated_layers:
            site = self.prior_sites[name]
            w = self.layer(name).weight
            self._prior_for(name, w).rank_model(w, name=site)
        size = self.num_data if self.num_data is not None and self.num_data >= batch else batch
        if self.likelihood == "gaussian":
            if y is not None and out.dim() == y.dim() + 1 and out.shape[-1] == 1:
                out = out.squeeze(-1)
            noise = self.noise if hasattr(self, "noise") else self.noise_value
            with pyro.plate("data", size, subsample=torch.arange(batch, device=x.device)):
                obs_dist = dist.Normal(out, noise)
                if out.dim() > 1:
                    obs_dist = obs_dist.to_event(out.dim() - 1)
                pyro.sample("obs", obs_dist, obs=y)
        else:
            with pyro.plate("data", size, subsample=torch.arange(batch, device=x.device)):
                pyro.sample("obs", dist.Categorical(logits=out), obs=y)
        return out

    def deterministic_forward(self, x: torch.Tensor, values: Mapping | None = None):
        """Network output with the latent sites fixed to ``values`` (default: initial)."""
        values = self.initial_values() if values is None else values
        with poutine.block(), poutine.condition(data=dict(values)):
            return self.net(x)

    # -- checks -----------------------------------------------------------------------------
    def check_data(self, x, y, what: str = "data") -> None:
        """Clear ``ValueError``/``TypeError`` for data the model cannot take."""
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
            raise TypeError(f"{what}: x and y must be torch tensors, got "
                            f"{type(x).__name__} and {type(y).__name__}")
        if x.dim() < 1 or y.dim() < 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f"{what}: x of shape {tuple(x.shape)} and y of shape "
                             f"{tuple(y.shape)} do not have the same number of rows")
        if x.shape[0] == 0:
            raise ValueError(f"{what}: no rows")
        if not x.is_floating_point():
            raise TypeError(f"{what}: x must be floating point, got {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{what}: x contains NaN or Inf")
        try:
            with torch.no_grad():
                out = self.deterministic_forward(x[:2])
        except RuntimeError as exc:
            raise ValueError(f"{what}: x of shape {tuple(x.shape)} does not fit the network: "
                             f"{exc}") from exc
        if self.likelihood == "categorical":
            if y.is_floating_point() or y.dtype == torch.bool or y.dim() != 1:
                raise TypeError(f"{what}: categorical labels must be a 1-D integer tensor, got "
                                f"dtype {y.dtype} and shape {tuple(y.shape)}")
            num_classes = out.shape[-1]
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"{what}: labels must lie in [0, {num_classes - 1}] (the "
                                 f"network has {num_classes} outputs), got range [{lo}, {hi}]")
        else:
            if not y.is_floating_point():
                raise TypeError(f"{what}: gaussian targets must be floating point, got {y.dtype}")
            o = out.squeeze(-1) if out.dim() == y.dim() + 1 and out.shape[-1] == 1 else out
            if tuple(o.shape[1:]) != tuple(y.shape[1:]):
                raise ValueError(f"{what}: targets of shape {tuple(y.shape)} do not match the "
                                 f"network output of shape (n, {', '.join(map(str, o.shape[1:]))})")
            if not bool(torch.isfinite(y).all()):
                raise ValueError(f"{what}: y contains NaN or Inf")

    # -- spike-and-slab rank posterior ------------------------------------------------------
    def rank_posterior(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``P(rank = k | W)``, ``k = 0..r``, of an enumerated spike-and-slab layer.

        The indicator marginals come from ``TraceEnum_ELBO.compute_marginals`` of the
        indicator model (the sites of :meth:`SpikeAndSlabSpectrum.rank_model`); the rank is
        their Poisson-binomial sum. ``weight`` defaults to the layer's initial weight.
        """
        prior = self._priors.get(name)
        if not isinstance(prior, SpikeAndSlabSpectrum):
            raise ValueError(f"layer {name!r} has no SpikeAndSlabSpectrum prior")
        w = (weight if weight is not None else self._initial[self.prior_sites[name]]).detach()
        site = self.prior_sites[name]

        def model():
            prior.rank_model(w, name=site)

        def guide():
            pass

        elbo = pyro.infer.TraceEnum_ELBO(max_plate_nesting=1)
        marg = elbo.compute_marginals(model, guide)
        p = marg[f"{site}_z"].probs if hasattr(marg[f"{site}_z"], "probs") else None
        if p is None:  # pragma: no cover - pyro returns Bernoulli/Categorical marginals
            p = marg[f"{site}_z"].log_prob(torch.ones(1)).exp()
        p = p.reshape(-1)
        out = torch.zeros(p.shape[-1] + 1, dtype=p.dtype)
        out[0] = 1.0
        for i in range(p.shape[-1]):
            out = out * (1 - p[i]) + torch.nn.functional.pad(out[:-1], (1, 0)) * p[i]
        return out


# --- construction -----------------------------------------------------------------------


def _weight_layers(net: nn.Module) -> dict[str, nn.Module]:
    return {
        name: mod
        for name, mod in net.named_modules()
        if isinstance(mod._parameters.get("weight"), torch.Tensor)
    }


def _select(spec, layers: dict[str, nn.Module], what: str) -> list[str]:
    """Layer names selected by a type, an exact name or a regular expression."""
    if isinstance(spec, type):
        if not issubclass(spec, nn.Module):
            raise TypeError(f"{what}: {spec!r} is not a torch.nn.Module type")
        found = [n for n, m in layers.items() if isinstance(m, spec)]
        if not found:
            raise ValueError(f"{what}: no layer of type {spec.__name__}; weight layers are "
                             f"{sorted(layers)}")
        return found
    if isinstance(spec, str):
        if spec in layers:
            return [spec]
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise ValueError(f"{what}: {spec!r} is neither a layer name nor a valid regular "
                             f"expression ({exc}); weight layers are {sorted(layers)}") from exc
        found = [n for n in layers if pattern.fullmatch(n)]
        if not found:
            raise ValueError(f"{what}: {spec!r} is not a layer name and matches no layer; "
                             f"weight layers are {sorted(layers)}")
        return found
    raise TypeError(f"{what}: layers are chosen by type, name or regex, got {spec!r}")


def _resolve_priors(priors: Mapping, layers: dict[str, nn.Module]) -> dict[str, Any]:
    """Per-layer prior; precedence: exact name > regular expression > type."""
    rank = {}
    chosen: dict[str, Any] = {}
    for key, prior in priors.items():
        if isinstance(key, type):
            level = 0
        elif isinstance(key, str) and key in layers:
            level = 2
        else:
            level = 1
        for name in _select(key, layers, "priors"):
            if name in chosen and rank[name] == level and chosen[name] is not prior:
                raise ValueError(f"priors: layer {name!r} is matched by two keys of the same "
                                 "kind; make the choice explicit with its exact name")
            if name not in chosen or rank[name] <= level:
                chosen[name], rank[name] = prior, level
    return {k: v for k, v in chosen.items() if v is not None}


def _make_prior(name: str, prior, shape: torch.Size) -> dist.Distribution:
    if not isinstance(prior, dist.Distribution) and callable(prior):
        prior = prior(shape)
    if not isinstance(prior, torch.distributions.Distribution):
        raise TypeError(f"prior for layer {name!r} must be a Distribution or a factory "
                        f"`weight_shape -> Distribution`, got {type(prior).__name__}")
    if prior.batch_shape != torch.Size():
        raise ValueError(f"prior for layer {name!r} has batch shape {tuple(prior.batch_shape)}; "
                         "expected a scalar batch with event_shape = weight shape")
    if tuple(prior.event_shape) != tuple(shape):
        raise ValueError(f"prior for layer {name!r} has event_shape {tuple(prior.event_shape)} "
                         f"but the layer's weight has shape {tuple(shape)}")
    return prior


def _names(spec, layers, what) -> list[str]:
    if spec is None or spec is False:
        return []
    if spec is True:
        return list(layers)
    if isinstance(spec, (str, type)):
        spec = [spec]
    out: list[str] = []
    for s in spec:
        out += [n for n in _select(s, layers, what) if n not in out]
    return out


def bayesian(
    module: nn.Module,
    priors: Mapping[Any, Any] | None = None,
    *,
    likelihood: str = "categorical",
    noise: float | str = 1.0,
    num_data: int | None = None,
    spectral: Iterable | str | type | bool | None = None,
    enumerate_rank: Iterable | str | type | bool | None = None,
    orthogonal_map: str = "cayley",
    tracked: Iterable | str | type | bool | None = None,
    power_iterations: int = 2,
) -> BayesianNetwork:
    """Turn ``module`` into a Pyro model ``bn(x, y=None)`` (the module itself is untouched).

    :param priors: ``{key: prior}`` with ``key`` a layer type (``nn.Linear``), an exact layer
        name (``"fc1"``, ``"0"``) or a regular expression (``r"conv.*"``, full match), and
        ``prior`` a distribution with ``event_shape == weight.shape`` or a factory
        ``lambda weight_shape: Distribution`` (``None``: keep the layer deterministic).
        Precedence: exact name > regex > type. Layers without a prior (and all biases) stay
        deterministic parameters.
    :param likelihood: ``"categorical"`` (``y`` integer labels, logits output) or
        ``"gaussian"`` (``y`` real, ``Normal(output, noise)``).
    :param noise: Gaussian noise scale, a float or ``"learned"`` (a positive ``PyroParam``).
    :param num_data: ``N``, the size of the training set; the batch likelihood is scaled by
        ``N / B`` (module docstring). ``None``: no scaling (full-batch).
    :param spectral: layers (same selectors, or ``True`` for all prior layers) to
        parameterise as ``U diag(s) V^T``, prior on ``s`` (their prior must be a spectral
        law of :mod:`bayes_spectral.distributions`).
    :param orthogonal_map: the map of :func:`torch.nn.utils.parametrizations.orthogonal`
        keeping ``U`` and ``V`` orthonormal: ``"cayley"`` (default; ~15x faster than
        ``"matrix_exp"`` for a 784 x 512 factor on CPU), ``"matrix_exp"`` or ``"householder"``.
    :param tracked: layers (selectors, or ``True``) whose ``FrechetTopEigenvalue``,
        ``GaussianSpectrum`` or ``PowerLawSpectrum`` penalty prior is evaluated without a
        full SVD per call by :class:`TrackedSpectralPrior` (``power_iterations``
        warm-started steps per call for Frechet; a tail tracker for the power law).
    :param enumerate_rank: layers with a ``SpikeAndSlabSpectrum`` prior whose indicators
        are made explicit and enumerated (``TraceEnum_ELBO``); not with ``spectral``.
    :raises ValueError: unknown names, patterns matching nothing, shape mismatches, before
        any training.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"bayesian() needs a torch.nn.Module, got {type(module).__name__}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
    if noise != "learned":
        if isinstance(noise, str) or not float(noise) > 0 or not math.isfinite(float(noise)):
            raise ValueError(f"noise must be a positive float or 'learned', got {noise!r}")
    if orthogonal_map not in ("cayley", "matrix_exp", "householder"):
        raise ValueError("orthogonal_map must be 'cayley', 'matrix_exp' or 'householder', got "
                         f"{orthogonal_map!r}")
    if num_data is not None and (int(num_data) != num_data or num_data < 1):
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
    net = copy.deepcopy(module)
    layers = _weight_layers(net)
    if not layers:
        raise ValueError("bayesian(): the module has no layer with a `weight` parameter")
    resolved = _resolve_priors(priors or {}, layers)
    made = {n: _make_prior(n, p, layers[n].weight.shape) for n, p in resolved.items()}
    spectral_names = _names(spectral, layers, "spectral")
    enum_names = _names(enumerate_rank, layers, "enumerate_rank")
    tracked_names = _names(tracked, layers, "tracked")
    if int(power_iterations) != power_iterations or power_iterations < 1:
        raise ValueError(f"power_iterations must be a positive integer, got {power_iterations!r}")
    for n in tracked_names:
        if n not in made:
            raise ValueError(f"layer {n!r} is selected for tracked spectra but has no prior")
        if n in spectral_names or n in enum_names:
            raise ValueError(f"layer {n!r}: tracked spectra apply to a plain weight prior, not "
                             "with spectral= or enumerate_rank=")
        made[n] = TrackedSpectralPrior(made[n], None)  # validates the prior
    for n in spectral_names + enum_names:
        if n not in made:
            raise ValueError(f"layer {n!r} is selected for a spectral parameterisation or rank "
                             "enumeration but has no prior")
    for n in spectral_names:
        if not isinstance(made[n], SpectralDistribution):
            raise TypeError(f"layer {n!r}: the spectral parameterisation needs a spectral law "
                            f"of bayes_spectral.distributions, got {type(made[n]).__name__}")
    for n in enum_names:
        if not isinstance(made[n], SpikeAndSlabSpectrum):
            raise TypeError(f"layer {n!r}: rank enumeration needs a SpikeAndSlabSpectrum prior, "
                            f"got {type(made[n]).__name__}")
        if n in spectral_names:
            raise ValueError(f"layer {n!r}: rank enumeration works on the weight, not with the "
                             "spectral parameterisation")

    to_pyro_module_(net)
    bn = BayesianNetwork(net, likelihood, noise, None if num_data is None else int(num_data))
    bn.weight_layer_names = list(layers)
    for name in layers:
        if name not in made:
            continue
        layer = bn.layer(name)
        prior = made[name]
        weight = layer.weight.detach().clone()
        prefix = "net" + ("." + name if name else "")
        if name in spectral_names:
            factors = _SpectralFactors(weight, orthogonal_map)
            del layer._parameters["weight"]
            layer.spectral = factors
            sv_prior = SingularValuePrior(prior)
            bn._priors[name] = sv_prior
            layer.spectral_s = PyroSample(
                lambda self, _n=name: bn._prior_for(_n, self.spectral.initial_s_like())
            )
            layer.register_forward_pre_hook(_spectral_pre_hook)
            site = prefix + ".spectral_s"
            bn._initial[site] = factors.initial_s
            bn.spectral_layers.append(name)
        else:
            if name in enum_names:
                bn._priors[name] = prior
                improper = dist.ImproperUniform(constraints.real, (), weight.shape)
                layer.weight = PyroSample(improper)
                bn.enumerated_layers.append(name)
            elif name in tracked_names and isinstance(prior.base, PowerLawSpectrum):
                bn._priors[name] = prior.base
                bn._tail_penalties[name] = _tail_penalty_for(prior.base)
                layer.weight = PyroSample(
                    lambda self, _n=name: TrackedSpectralPrior(
                        bn._prior_for(_n, _any_param(self, bn)), bn._tail_penalties[_n])
                )
            elif name in tracked_names:
                bn._priors[name] = prior.base
                layer.power_iteration = PowerIteration(weight.shape, n_iter=int(power_iterations))
                layer.weight = PyroSample(
                    lambda self, _n=name: TrackedSpectralPrior(
                        bn._prior_for(_n, self.power_iteration.u), self.power_iteration)
                )
            else:
                bn._priors[name] = prior
                layer.weight = PyroSample(
                    lambda self, _n=name: bn._prior_for(_n, _any_param(self, bn))
                )
            site = prefix + ".weight"
            bn._initial[site] = weight
        bn.prior_sites[name] = site
    return bn


def _tail_penalty_for(law: PowerLawSpectrum) -> PowerLawPrior:
    """The tracked penalty equal to ``-law.log_prob`` (penalty measure, same xmin rule)."""
    kw = ({"xmin_quantile": law.xmin_quantile} if law.xmin_quantile is not None
          else {"xmin": float(law.xmin)})
    return PowerLawPrior(alpha=float(law.alpha), tau=float(law.tau), tracked=True, **kw)


def _any_param(layer: nn.Module, bn: BayesianNetwork) -> torch.Tensor:
    for p in layer.parameters():
        return p
    for p in bn.parameters():
        return p
    return torch.zeros(())

