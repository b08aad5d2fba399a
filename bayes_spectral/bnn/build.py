"""Layer 4: :func:`bayesian`, any ``torch.nn.Module`` -> :class:`BayesianNetwork`.

:func:`bayesian` deep-copies a module, converts the copy with
:func:`pyro.nn.module.to_pyro_module_` and replaces the ``weight`` of the chosen layers by
``PyroSample`` sites whose prior is any distribution with ``event_shape == weight.shape``
(normally a spectral law of :mod:`bayes_spectral.distributions`). Every other parameter stays
a deterministic parameter in Pyro's param store (point estimate).

The weights that can have a prior are the rows of the one parameter view
(:func:`bayes_spectral.select.parameter_view`): Linear, Conv, Embedding, attention Q/K/V
(split from ``in_proj_weight``) and ``out_proj``, recurrent ``weight_ih_l*``/``weight_hh_l*``,
parametrized weights (the effective value), any other >= 2-D parameter; tied weights are one
row, one site, and stay tied (:mod:`~bayes_spectral.bnn.slots`).

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
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pyro.distributions as dist
import torch
from pyro.nn.module import to_pyro_module_
from torch import nn

from ..select import WeightRow, parameter_view
from .likelihoods import LIKELIHOODS
from .network import BayesianNetwork
from .row_keys import pick_row_union, resolve_row_keys
from .site_priors import check_tracked_mode
from .sites import CHECK_ORDER, SiteInstaller, site_installers
from .slots import make_slots, release_parametrizations
from .spectral_factors import ORTHOGONAL_MAPS

__all__ = ["bayesian"]

Selection = Iterable | str | type | bool | None


def _resolve_priors(priors: Mapping, rows: list[WeightRow]) -> dict[str, Any]:
    """Per-row prior; precedence: exact row or parameter name > module name > regular
    expression (the one rule of :func:`bayes_spectral.select.matches`) > type
    (:mod:`~bayes_spectral.bnn.row_keys`)."""
    return resolve_row_keys(priors, rows, "priors")


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
    if not (noise == "learned" if isinstance(noise, str)
            else isinstance(noise, torch.distributions.Distribution)):
        try:
            ok = not isinstance(noise, str) and 0 < float(noise) < math.inf
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError("noise must be a positive float, 'learned' or a Distribution "
                             f"(the prior of the latent noise scale), got {noise!r}")
    if orthogonal_map not in ORTHOGONAL_MAPS:
        raise ValueError("orthogonal_map must be 'cayley', 'matrix_exp' or 'householder', got "
                         f"{orthogonal_map!r}")
    if num_data is not None and (int(num_data) != num_data or num_data < 1):
        raise ValueError(f"num_data must be a positive integer, got {num_data!r}")
    if num_data is None:
        warnings.warn(
            "bayesian(): num_data not given, so a mini-batch likelihood is not scaled by N / B "
            "and the prior is over-weighted by N / B (about 11x for N=1437, B=128) unless "
            "fit() takes N from a dataset's or loader's length; give num_data=N (the training "
            "set size) to silence this", UserWarning, stacklevel=3)


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


def _check_enumerable(names: list[str], rows: Mapping[str, WeightRow]) -> None:
    """Rank enumeration works on the whole ``weight`` of a named submodule."""
    for name in names:
        row = rows[name]
        if row.attr != "weight" or row.index is not None or not row.module_name:
            raise ValueError(f"layer {name!r}: rank enumeration needs the `weight` of a named "
                             f"submodule, not {row.param_name!r}")


def _plan_sites(made: Mapping[str, Any], rows: list[WeightRow], spectral: Selection,
                enumerate_rank: Selection, tracked: Selection, orthogonal_map: str,
                power_iterations: int, tracked_mode: str = "tracked"
                ) -> tuple[dict[str, SiteInstaller], dict[str, str]]:
    """The installers and each prior row's kind of site (``"weight"`` unless a selector
    names it), after the installers checked the selected rows (nothing is built yet).
    ``True`` selects exactly the rows with a prior."""
    selected = {"spectral": pick_row_union(spectral, rows, "spectral", among=made),
                "enumerated": pick_row_union(enumerate_rank, rows, "enumerate_rank",
                                             among=made),
                "tracked": pick_row_union(tracked, rows, "tracked", among=made)}
    if int(power_iterations) != power_iterations or power_iterations < 1:
        raise ValueError(f"power_iterations must be a positive integer, got {power_iterations!r}")
    check_tracked_mode(tracked_mode)
    if tracked_mode != "tracked" and not selected["tracked"]:
        raise ValueError(f"tracked_mode={tracked_mode!r} needs tracked= (the rows whose prior "
                         f"takes the {tracked_mode} path, or True for every row with a prior); "
                         "no row is tracked")
    installers = site_installers(orthogonal_map, power_iterations, tracked_mode)
    _check_selected(installers, selected, made)
    _check_enumerable(selected["enumerated"], {r.name: r for r in rows})
    kinds = {name: next((k for k in CHECK_ORDER if name in selected[k]), "weight")
             for name in made}
    return installers, kinds


def bayesian(
    module: nn.Module,
    priors: Mapping[Any, Any] | None = None,
    *,
    likelihood: str = "categorical",
    noise: float | str | torch.distributions.Distribution = 1.0,
    num_data: int | None = None,
    spectral: Selection = None,
    enumerate_rank: Selection = None,
    orthogonal_map: str = "cayley",
    tracked: Selection = None,
    power_iterations: int = 2,
    tracked_mode: str = "tracked",
    split_qkv: bool = True,
    output_fn: Callable[[Any], torch.Tensor] | None = None,
) -> BayesianNetwork:
    """Turn ``module`` into a Pyro model ``bn(x, y=None)`` (the module itself is untouched).

    :param priors: ``{key: prior}`` with ``key`` a module type (``nn.Linear``,
        ``nn.MultiheadAttention``: its Q/K/V rows, ``nn.LSTM``), an exact row name
        (``"fc1"``, ``"attn.in_proj_weight[q]"``), full parameter name (``"fc1.weight"``,
        ``"lstm.weight_hh_l0"``) or module name (``"lstm"``: all its rows), or a regular
        expression (``re.fullmatch`` against the module name, the full parameter name or the
        row name: :func:`bayes_spectral.select.matches`), and ``prior`` a distribution with
        ``event_shape`` the row's shape or a factory ``lambda shape: Distribution``
        (``None``: keep the row deterministic). Precedence: exact row/parameter name >
        module name > regex > type (:mod:`~bayes_spectral.bnn.row_keys`). Rows without a
        prior (and all biases, norms) stay deterministic parameters.
    :param likelihood: a name of ``LIKELIHOODS``: ``"categorical"`` (``y`` integer labels,
        logits output), ``"gaussian"`` (``y`` real, ``Normal(output, noise)``) or one
        registered by the user (:mod:`~bayes_spectral.bnn.likelihoods`).
    :param noise: Gaussian noise scale: a float (fixed), ``"learned"`` (the latent site
        ``"noise"`` with prior ``LogNormal(0, 1)``) or a positive ``Distribution`` (the
        latent noise's prior; :meth:`BayesianNetwork.set_noise`).
    :param num_data: ``N``, the size of the training set; the batch likelihood is scaled by
        ``N / B`` (:mod:`~bayes_spectral.bnn.network`). ``None``: no scaling (full-batch).
    :param spectral: rows (same keys, or ``True``: exactly the rows with a prior) to
        parameterise as ``U diag(s) V^T``, prior on ``s`` (their prior must be a spectral
        law of :mod:`bayes_spectral.distributions`); a ``torch.nn.utils.parametrize``
        parametrization, so attention's ``out_proj`` and Q/K/V rows work too.
    :param orthogonal_map: the map of :func:`torch.nn.utils.parametrizations.orthogonal`
        keeping ``U`` and ``V`` orthonormal: ``"cayley"`` (default; ~15x faster than
        ``"matrix_exp"`` for a 784 x 512 factor on CPU), ``"matrix_exp"`` or ``"householder"``.
    :param tracked: rows (keys, or ``True``: exactly the rows with a prior) whose
        ``FrechetTopEigenvalue``, ``GaussianSpectrum`` or ``PowerLawSpectrum`` penalty prior
        is evaluated without a full SVD per call by :class:`TrackedSpectralPrior`
        (``power_iterations`` warm-started steps per call for Frechet; a tail tracker for
        the power law).
    :param tracked_mode: how the ``tracked`` rows are evaluated: ``"tracked"`` (default,
        as above), ``"subspace"`` or ``"fused"`` (below) or ``"fast"``, the penalties' fast
        paths
        (:mod:`bayes_spectral.penalties.tail`), whose cost does not grow with the tail:
        ``FrechetTopEigenvalue``: ``lambda_max`` the top Ritz value of a warm-started
        8-column block iteration (one step, two thin products per call; 16 steps on the
        first call), deterministic, biased low (``<= lambda_max``, one power step behind
        the weights; MAP loss within 1e-3 of the exact prior's, prior gradient cosine
        >= 0.99, measured on digits); ``PowerLawSpectrum`` (fixed ``xmin`` only): the tail
        sum by Hutchinson x Chebyshev (16 probes, degree 32), bulk exact, stochastic:
        unbiased for the degree-32 interpolant, one call's sd ``<= sqrt(2/16)
        ||h(G)||_F``, interpolation bias 5e-4..2e-2 of the value, one call's gradient a
        noisy but unbiased sketch; ``GaussianSpectrum``: the tracked formula (exact).
        ``"fused"``: ``FrechetTopEigenvalue`` by the fused penalty's rank-one step without
        hooks (:func:`~bayes_spectral.penalties.rank_one.rank_one_penalty`: a warm
        2-column block, one block step per call, the top Ritz pair in closed form, no
        ``eigh``, no host sync; ``lambda <= lambda_max``, one step behind the weights;
        gradient ``c r v^T + d W``; equal to the exact prior at fixed weights after warm
        calls; along a digits MAP fit the MAP loss within 1e-3 relative, measured 8.7e-5,
        the prior alone lagging by up to 2.8e-3 of itself in the first fast-moving epoch,
        gradient cosine >= 0.998: ``tests/bnn/test_fused_site_prior.py``);
        ``GaussianSpectrum``: the tracked formula; ``PowerLawSpectrum``: refused (no fused
        form, use ``"subspace"``).
        ``"subspace"`` (the recommended mode for the power law): ``PowerLawSpectrum`` (fixed
        ``xmin`` only; ``xmin_quantile`` refused naming the layer) by
        ``PowerLawPrior(mode="subspace")``: a warm fixed-size tail block per layer
        (:class:`~bayes_spectral.spectra.subspace.TailSubspace`: eigenvalues ``>= xmin``
        plus one and a margin, one shifted power step and a Rayleigh-Ritz step per call,
        a block check every 16 calls), the value over the Ritz values with the bulk exact
        through ``||W||_F^2``, deterministic, the gradient exact through the Ritz pairs;
        equal to the exact prior at fixed weights after warm calls (1e-6, cosine 0.9999);
        along a digits MAP fit within 1.1e-5 relative, cosine >= 0.99997; under SVI the
        weights are resampled each step and the block lags the noisy weight (measured at a
        fresh draw: 5.3e-5 relative, lr 3e-2 2.0e-4: ``tests/bnn/test_subspace_site_prior.py``),
        so it suits MAP and the SG-MCMC samplers (small steps) best.
        ``FrechetTopEigenvalue`` under ``"subspace"``: its ``"fast"`` block above (the
        Frechet penalty has no subspace mode; the same warm-block Ritz method, so one mode
        serves a network mixing both laws; the fingerprint records that row as ``"fast"``);
        ``GaussianSpectrum``: the tracked formula. Conv kernels are refused (2-D weights
        only). ``power_iterations`` does not apply. The state (as the tail
        trackers') travels in ``fit``'s checkpoints and is restored on resume
        (:mod:`~bayes_spectral.bnn.tracker_state`); it is not renewed at a checkpoint.
    :param enumerate_rank: layers with a ``SpikeAndSlabSpectrum`` prior whose indicators
        are made explicit and enumerated (``TraceEnum_ELBO``); not with ``spectral``.
    :param output_fn: maps the module's output (a tuple, a dict, a Hugging Face style
        output object) to the tensor the likelihood takes, e.g. ``lambda out: out["logits"]``;
        default identity (a non-tensor output then raises a ``TypeError`` naming
        ``output_fn``). The inputs may be a tensor of any dtype (token ids), a tuple
        (``module(*x)``) or a dict (``module(**x)``) of tensors.
    :param split_qkv: a fused ``in_proj_weight`` of attention is three rows ``[q]``, ``[k]``,
        ``[v]`` (default; each with a prior is its own latent site and the fused matrix is
        their concatenation, a :mod:`torch.nn.utils.parametrize` parametrization, so the
        model's prior on it is the sum of the slices' priors), or one row (``False``).
    :raises ValueError: unknown names, patterns matching nothing, shape mismatches, before
        any training.
    """
    _check_arguments(module, likelihood, noise, orthogonal_map, num_data)
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable, got {type(output_fn).__name__}")
    net = copy.deepcopy(module)
    rows = parameter_view(net, split_qkv=bool(split_qkv), what="bayesian()").rows
    if not rows:
        raise ValueError("bayesian(): the module has no weight with >= 2 dims")
    by_name = {r.name: r for r in rows}
    resolved = _resolve_priors(priors or {}, rows)
    made = {n: _make_prior(n, p, torch.Size(by_name[n].shape)) for n, p in resolved.items()}
    installers, kinds = _plan_sites(made, rows, spectral, enumerate_rank, tracked,
                                    orthogonal_map, power_iterations, tracked_mode)
    release_parametrizations([by_name[n] for n in made])
    to_pyro_module_(net)
    bn = BayesianNetwork(net, likelihood, noise, None if num_data is None else int(num_data))
    bn.weight_layer_names = [r.name for r in rows]
    bn.weight_rows = rows  # the parameter view's rows (row name -> owning module, attribute)
    bn.spectral_factors = {}  # spectral row -> its SpectralFactors (U, V)
    bn.tracked_layers = []  # rows with a tracked prior (state on every data-parallel rank)
    bn.output_fn = output_fn
    slots = make_slots(net, [by_name[n] for n in made], rows)
    for name, prior in made.items():
        bn.prior_sites[name] = installers[kinds[name]].install(bn, slots[name], prior)
    return bn
