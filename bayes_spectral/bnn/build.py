"""Layer 4: :func:`bayesian`, any ``torch.nn.Module`` -> :class:`BayesianNetwork`.

:func:`bayesian` deep-copies a module, converts the copy with
:func:`pyro.nn.module.to_pyro_module_` and replaces the ``weight`` of the chosen layers by
``PyroSample`` sites whose prior is any distribution with ``event_shape == weight.shape``
(normally a spectral law of :mod:`bayes_spectral.distributions`). Every other parameter stays
a deterministic parameter in Pyro's param store (point estimate).

Each layer with a prior gets one site installer of :mod:`~bayes_spectral.bnn.sites`, by the
selector naming it: a plain latent weight (default), a tracked penalty prior
(``tracked=``), the spectral parameterisation ``W = U diag(s) V^T`` with the prior on ``s``
(``spectral=``) or the enumerated spike-and-slab rank model (``enumerate_rank=``; train with
``TraceEnum_ELBO``, which ``fit`` picks, and read :meth:`BayesianNetwork.rank_posterior`).
Every selection and prior is checked before anything is built.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import pyro.distributions as dist
import torch
from pyro.nn.module import to_pyro_module_
from torch import nn

from ..select import pick_union, resolve_keys, weight_modules
from .likelihoods import LIKELIHOODS
from .network import BayesianNetwork
from .sites import CHECK_ORDER, SiteInstaller, site_installers
from .spectral_factors import ORTHOGONAL_MAPS

__all__ = ["bayesian"]

Selection = Iterable | str | type | bool | None


def _resolve_priors(priors: Mapping, layers: dict[str, nn.Module]) -> dict[str, Any]:
    """Per-layer prior; precedence: exact name > regular expression (``re.fullmatch``) >
    type (:func:`bayes_spectral.select.resolve_keys`)."""
    return resolve_keys(priors, layers, "priors", mode="fullmatch")


def _make_prior(name: str, prior, shape: torch.Size) -> torch.distributions.Distribution:
    """The prior of layer ``name`` (a factory is called with the weight's shape), checked:
    scalar batch, ``event_shape == shape``."""
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


def _check_arguments(module, likelihood, noise, orthogonal_map, num_data) -> None:
    """The scalar arguments of :func:`bayesian`, before the module is copied."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"bayesian() needs a torch.nn.Module, got {type(module).__name__}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {tuple(LIKELIHOODS.names())}, got "
                         f"{likelihood!r}")
    if noise != "learned":
        if isinstance(noise, str) or not float(noise) > 0 or not math.isfinite(float(noise)):
            raise ValueError(f"noise must be a positive float or 'learned', got {noise!r}")
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise ValueError("orthogonal_map must be 'cayley', 'matrix_exp' or 'householder', got "
                         f"{orthogonal_map!r}")
    if num_data is not None and (int(num_data) != num_data or num_data < 1):
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}")


def _check_selected(installers: Mapping[str, SiteInstaller],
                    selected: Mapping[str, list[str]], made: Mapping[str, Any]) -> None:
    """Each selected layer checked by its kind's installer, in a fixed order (which error
    comes first when there are several): tracked layers one by one (prior, then law), then
    the priors of all spectral and enumerated layers, then their laws."""
    for name in selected["tracked"]:
        installers["tracked"].check_prior(name, made.get(name))
        installers["tracked"].check(name, made[name], selected)
    rest = [(kind, name) for kind in ("spectral", "enumerated") for name in selected[kind]]
    for kind, name in rest:
        installers[kind].check_prior(name, made.get(name))
    for kind, name in rest:
        installers[kind].check(name, made[name], selected)


def _plan_sites(made: Mapping[str, Any], layers: dict[str, nn.Module], spectral: Selection,
                enumerate_rank: Selection, tracked: Selection, orthogonal_map: str,
                power_iterations: int) -> tuple[dict[str, SiteInstaller], dict[str, str]]:
    """The installers and each prior layer's kind of site (``"weight"`` unless a selector
    names it), after the installers checked the selected layers (nothing is built yet)."""
    selected = {"spectral": pick_union(spectral, layers, "spectral"),
                "enumerated": pick_union(enumerate_rank, layers, "enumerate_rank"),
                "tracked": pick_union(tracked, layers, "tracked")}
    if int(power_iterations) != power_iterations or power_iterations < 1:
        raise ValueError(f"power_iterations must be a positive integer, got {power_iterations!r}")
    installers = site_installers(orthogonal_map, power_iterations)
    _check_selected(installers, selected, made)
    kinds = {name: next((k for k in CHECK_ORDER if name in selected[k]), "weight")
             for name in made}
    return installers, kinds


def bayesian(
    module: nn.Module,
    priors: Mapping[Any, Any] | None = None,
    *,
    likelihood: str = "categorical",
    noise: float | str = 1.0,
    num_data: int | None = None,
    spectral: Selection = None,
    enumerate_rank: Selection = None,
    orthogonal_map: str = "cayley",
    tracked: Selection = None,
    power_iterations: int = 2,
) -> BayesianNetwork:
    """Turn ``module`` into a Pyro model ``bn(x, y=None)`` (the module itself is untouched).

    :param priors: ``{key: prior}`` with ``key`` a layer type (``nn.Linear``), an exact layer
        name (``"fc1"``, ``"0"``) or a regular expression (``r"conv.*"``, full match), and
        ``prior`` a distribution with ``event_shape == weight.shape`` or a factory
        ``lambda weight_shape: Distribution`` (``None``: keep the layer deterministic).
        Precedence: exact name > regex > type. Layers without a prior (and all biases) stay
        deterministic parameters.
    :param likelihood: a name of ``LIKELIHOODS``: ``"categorical"`` (``y`` integer labels,
        logits output), ``"gaussian"`` (``y`` real, ``Normal(output, noise)``) or one
        registered by the user (:mod:`~bayes_spectral.bnn.likelihoods`).
    :param noise: Gaussian noise scale, a float or ``"learned"`` (a positive ``PyroParam``).
    :param num_data: ``N``, the size of the training set; the batch likelihood is scaled by
        ``N / B`` (:mod:`~bayes_spectral.bnn.network`). ``None``: no scaling (full-batch).
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
    _check_arguments(module, likelihood, noise, orthogonal_map, num_data)
    net = copy.deepcopy(module)
    layers = weight_modules(net, types=None, source="parameter", min_dim=0, root="").modules()
    if not layers:
        raise ValueError("bayesian(): the module has no layer with a `weight` parameter")
    resolved = _resolve_priors(priors or {}, layers)
    made = {n: _make_prior(n, p, layers[n].weight.shape) for n, p in resolved.items()}
    installers, kinds = _plan_sites(made, layers, spectral, enumerate_rank, tracked,
                                    orthogonal_map, power_iterations)
    to_pyro_module_(net)
    bn = BayesianNetwork(net, likelihood, noise, None if num_data is None else int(num_data))
    bn.weight_layer_names = list(layers)
    for name in layers:
        if name in made:
            installer = installers[kinds[name]]
            bn.prior_sites[name] = installer.install(bn, name, bn.layer(name), made[name])
    return bn
