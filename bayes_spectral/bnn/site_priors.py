"""Layer 4: the priors that :func:`~bayes_spectral.bayesian` puts on a latent site when the
site is not the plain weight with its own law.

* :class:`SingularValuePrior`: the law of the singular values ``s`` of a spectrally
  parameterised weight ``W = U diag(s) V^T``;
* :class:`TrackedSpectralPrior`: a spectral penalty prior evaluated without a full SVD per
  call (power iteration or tail tracker);
* :func:`_prior_to`: a prior whose tensors follow the model's device and dtype.

Law-specific behaviour lives in tables keyed by law class (looked up along the class's MRO,
so a subclass of a law behaves as the law): :data:`LOG_JACOBIAN_TO_SV` (laws on
eigenvalues) and :data:`TRACKED_LAWS` (laws that can be tracked, their log-density and the
kind of tracker they need).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from ..distributions import (
    FrechetTopEigenvalue,
    GaussianSpectrum,
    PowerLawSpectrum,
    SpectralDistribution,
)
from ..penalties.rank_one import rank_one_loss
from ..penalties.tail import FrechetPrior, PowerLawPrior
from ..spectra.laws import frechet_log_pdf

__all__ = [
    "FAST_LAWS",
    "FUSED_LAWS",
    "LOG_JACOBIAN_TO_SV",
    "MODE_LAWS",
    "SUBSPACE_LAWS",
    "TRACKED_MODES",
    "TRACKED_LAWS",
    "SingularValuePrior",
    "TrackedLaw",
    "TrackedSpectralPrior",
    "law_entry",
]

V = TypeVar("V")


def law_entry(table: Mapping[type, V], law: object) -> V | None:
    """The entry of ``law``'s class in ``table``, or of its nearest base class (``isinstance``
    semantics); ``None`` if no class of its MRO is a key."""
    for cls in type(law).__mro__:
        if cls in table:
            return table[cls]
    return None


# --- the law of the singular values under the spectral parameterisation -----------------


def _eigenvalue_log_jacobian(sv: torch.Tensor) -> torch.Tensor:
    """``log |d lambda / d s| = sum_i log(2 s_i)`` for ``lambda_i = s_i^2``."""
    return (math.log(2.0) + torch.log(sv)).sum(-1)


#: law class -> ``log |d(law's variable) / d s|`` for laws not defined on ``s`` itself
LOG_JACOBIAN_TO_SV: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
    PowerLawSpectrum: _eigenvalue_log_jacobian,
    FrechetTopEigenvalue: _eigenvalue_log_jacobian,
}


class SingularValuePrior(dist.TorchDistribution):
    """Law of the ``r`` singular values ``s`` of a spectrally parameterised weight.

    ``log p(s) = base.penalty(sort(s))`` plus, for laws defined on eigenvalues
    ``lambda = s^2`` (``PowerLawSpectrum``, ``FrechetTopEigenvalue``: the keys of
    :data:`LOG_JACOBIAN_TO_SV`), the change of variables ``sum_i log(2 s_i)``, so that
    ``log_prob`` is a proper density of ``s`` (unordered, i.i.d. values for the i.i.d. laws)
    and agrees with :meth:`sample`. The ``conv="pool"`` option of the base law does not
    apply: ``s`` are the singular values of the flattened ``m x n`` view. Support: positive
    reals (event dim 1).
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
        log_jacobian = law_entry(LOG_JACOBIAN_TO_SV, self.base)
        if log_jacobian is not None:
            lp = lp + log_jacobian(sv)
        return lp

    def sample(self, sample_shape=()):
        with torch.no_grad():
            return self.base._sample_sv(torch.Size(sample_shape) + self.batch_shape)


# --- tracked spectral priors ------------------------------------------------------------


def _frechet_tracked(base: FrechetTopEigenvalue, power: Any, value: torch.Tensor):
    """``log Frechet(lambda_max) - (r - 1) log tau - (||W||_F^2 - lambda_max) / tau``."""
    fro = value.square().sum((-2, -1))
    r = base._rank
    lam_max = power(value).square()
    tau = base.tau.to(value)
    top = frechet_log_pdf(lam_max, base.concentration.to(value), base.scale.to(value),
                          base.loc.to(value))
    return top - (r - 1) * torch.log(tau) - (fro - lam_max) / tau


def _gaussian_tracked(base: GaussianSpectrum, power: Any, value: torch.Tensor):
    """``r (log sqrt(2/pi) - log s) - ||W||_F^2 / (2 s^2)`` (exact; ``power`` unused)."""
    fro = value.square().sum((-2, -1))
    r = base._rank
    s = base.scale.to(value)
    return r * (0.5 * math.log(2.0 / math.pi) - torch.log(s)) - fro / (2 * s.square())


def _powerlaw_tracked(base: SpectralDistribution, power: Any, value: torch.Tensor):
    """``-power(W)``, ``power`` the law's penalty (``PowerLawPrior(tracked=True)``, or a
    ``mode="fast"`` / ``"subspace"`` penalty): one weight matrix per call."""
    if value.dim() != 2:
        raise ValueError(f"a tracked {type(base).__name__} prior takes one weight matrix per "
                         f"call, got shape {tuple(value.shape)} (no vectorised particles)")
    return -power(value, name="weight")


def _fused_tracked(base: SpectralDistribution, power: Any, value: torch.Tensor):
    """``-R(W)``, ``R`` the law's ``mode="fused"`` penalty (``power``) by its rank-one
    closed-form step without hooks (:func:`~bayes_spectral.penalties.rank_one.rank_one_loss`:
    one block step per call, gradient ``c r v^T + d W``)."""
    if value.dim() != 2:
        raise ValueError(f"a fused {type(base).__name__} prior takes one weight matrix per "
                         f"call, got shape {tuple(value.shape)} (no vectorised particles)")
    return -rank_one_loss(power, value, "weight")


@dataclass(frozen=True)
class TrackedLaw:
    """How one law is tracked: ``log_prob(base, power, value)`` and the ``tracker`` it
    needs: ``"power_iteration"`` (a warm-started :class:`PowerIteration`, a buffer of the
    layer) or ``"tail"`` (a :class:`PowerLawPrior` with a tail tracker, held by the network,
    its state in ``fit``'s checkpoints: :mod:`~bayes_spectral.bnn.tracker_state`)."""

    log_prob: Callable[[Any, Any, torch.Tensor], torch.Tensor]
    tracker: str


#: law class -> how a tracked prior of that law is evaluated (the laws that can be tracked)
TRACKED_LAWS: dict[type, TrackedLaw] = {
    FrechetTopEigenvalue: TrackedLaw(_frechet_tracked, "power_iteration"),
    GaussianSpectrum: TrackedLaw(_gaussian_tracked, "power_iteration"),
    PowerLawSpectrum: TrackedLaw(_powerlaw_tracked, "tail"),
}


#: ``tracked_mode`` values of :func:`~bayes_spectral.bayesian`
TRACKED_MODES = ("tracked", "fast", "fused", "subspace")

#: law class -> how ``tracked_mode="fast"`` evaluates it: ``"penalty"`` (the law's
#: ``mode="fast"`` penalty, :func:`_tail_penalty_for`) or ``"tracked"`` (the tracked
#: formula, already exact and one pass over ``W``)
FAST_LAWS: dict[type, str] = {
    FrechetTopEigenvalue: "penalty",
    GaussianSpectrum: "tracked",
    PowerLawSpectrum: "penalty",
}

#: law class -> how ``tracked_mode="fused"`` evaluates it: ``"penalty"`` (the law's
#: ``mode="fused"`` penalty through :func:`_fused_tracked`) or ``"tracked"`` (the exact
#: tracked formula); a law missing here has no fused form (``PowerLawSpectrum``: its tail
#: sum is not a rank-one function of ``W``)
FUSED_LAWS: dict[type, str] = {
    FrechetTopEigenvalue: "penalty",
    GaussianSpectrum: "tracked",
}

#: law class -> how ``tracked_mode="subspace"`` evaluates it: ``"penalty"`` (the penalty of
#: :func:`_tail_penalty_for` in that mode: ``PowerLawPrior(mode="subspace")`` for the power
#: law, a warm tail block with the gradient through its Ritz pairs; for Frechet, whose
#: penalty has no subspace mode, ``FrechetPrior(mode="fast")``: its warm 8-column block and
#: top Ritz value, the same deterministic block method) or ``"tracked"`` (exact formula)
SUBSPACE_LAWS: dict[type, str] = {
    FrechetTopEigenvalue: "penalty",
    GaussianSpectrum: "tracked",
    PowerLawSpectrum: "penalty",
}

#: ``tracked_mode`` (other than ``"tracked"``) -> its table of laws
MODE_LAWS: dict[str, dict[type, str]] = {"fast": FAST_LAWS, "fused": FUSED_LAWS,
                                         "subspace": SUBSPACE_LAWS}

#: ``tracked_mode`` -> the log-density of a law going through its mode's penalty
_PENALTY_LOG_PROB = {"fast": _powerlaw_tracked, "fused": _fused_tracked,
                     "subspace": _powerlaw_tracked}

#: ``tracked_mode`` -> the mode of the Frechet penalty it builds (``"subspace"``: the
#: Frechet penalty's deterministic ``"fast"`` block, it has no subspace mode)
_FRECHET_PENALTY_MODE = {"fast": "fast", "fused": "fused", "subspace": "fast"}


def mode_choices() -> str:
    """``"'tracked', 'fast', 'fused' or 'subspace'"``: the ``tracked_mode`` values, for
    messages."""
    names = [repr(m) for m in TRACKED_MODES]
    return ", ".join(names[:-1]) + " or " + names[-1]


def check_tracked_mode(mode: Any) -> None:
    """``ValueError`` naming the choices when ``mode`` is not one of :data:`TRACKED_MODES`."""
    if not isinstance(mode, str) or mode not in TRACKED_MODES:
        raise ValueError(f"tracked_mode must be {mode_choices()}, got {mode!r}")


def mode_kind(mode: str, law: object) -> str | None:
    """How ``mode`` evaluates ``law``: ``"penalty"``, ``"tracked"`` (the tracked formula or,
    for ``mode="tracked"``, the law's tracker) or ``None`` (no form in that mode)."""
    return "tracked" if mode == "tracked" else law_entry(MODE_LAWS[mode], law)


def _tracked_law_names() -> str:
    """``"A, B or C"``: the trackable laws, for error messages."""
    names = [cls.__name__ for cls in TRACKED_LAWS]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


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
      buffer: :func:`~bayes_spectral.fit`'s checkpoints carry it
      (:mod:`~bayes_spectral.bnn.tracker_state`), so a resumed run repeats the
      uninterrupted one exactly and a checkpoint boundary changes nothing.

    ``lambda_max = (u^T W v)^2`` with ``u, v`` from ``power.n_iter`` power-iteration steps
    per call, warm-started from the previous call (the state is a buffer of the layer, saved
    in checkpoints); the gradient is that of ``sigma_max`` at the fixed point. An
    approximation while ``W`` moves fast: ``lambda_max`` is a lower bound until converged.
    2-D weights only (``conv="pool"`` spectra of kernels are not tracked). The trackable
    laws are the keys of :data:`TRACKED_LAWS`.

    ``mode="fast"`` (``power``: the law's ``mode="fast"`` penalty, :func:`_tail_penalty_for`;
    the estimators' bias and variance are stated in :mod:`bayes_spectral.penalties.tail`):
    ``-power(W)``. Frechet: ``lambda_max`` the top Ritz value of a warm-started 8-column
    block iteration (deterministic, ``<=`` the true one); power law (fixed ``xmin``):
    Hutchinson x Chebyshev on the tail, bulk exact (stochastic, unbiased for the
    interpolant); ``GaussianSpectrum``: the tracked formula (exact).

    ``mode="fused"`` (``power``: the law's ``mode="fused"`` penalty): Frechet's ``-R(W)``
    by one closed-form rank-one step on a kept 2-column block per call
    (:func:`~bayes_spectral.penalties.rank_one.rank_one_penalty`: ``lambda`` the top Ritz
    value of ``W V``, ``<= lambda_max``, one block power step behind; gradient ``c r v^T +
    d W``; no hooks, no host sync), deterministic, equal to the exact prior at
    convergence; ``GaussianSpectrum``: the tracked formula; ``PowerLawSpectrum`` has no
    fused form (refused).

    ``mode="subspace"`` (``power``: :func:`_tail_penalty_for`'s penalty,
    :data:`SUBSPACE_LAWS`): power law (fixed ``xmin``) ``-PowerLawPrior(mode="subspace")(W)``
    = ``-coef (||W||_F^2/tau - sum_i h(theta_i) + N log Z)`` over the Ritz values
    ``theta_i = |W u_i|^2`` of a warm fixed-size tail block
    (:class:`~bayes_spectral.spectra.subspace.TailSubspace`, one shifted power step and a
    Rayleigh-Ritz step per call, ``u_i`` detached, so autograd gives the exact gradient
    through the Ritz pairs ``2 W U diag(dR/dtheta) U^T + 2 (coef/tau) W``); deterministic,
    ``theta_i <= lambda_i``, equal to the exact prior once the block has converged.
    Frechet: its ``"fast"`` block (the Frechet penalty has no subspace mode);
    ``GaussianSpectrum``: the tracked formula.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, base: SpectralDistribution, power: nn.Module | None,
                 mode: str = "tracked"):
        check_tracked_mode(mode)
        law = law_entry(TRACKED_LAWS, base)
        if law is None:
            raise TypeError(f"tracked spectra need a {_tracked_law_names()} prior, got "
                            f"{type(base).__name__}")
        if base.measure != "penalty":
            raise ValueError("tracked spectra compute the penalty measure; build the prior with "
                             "measure='penalty'")
        if len(base.event_shape) != 2:
            raise ValueError(f"tracked spectra need a 2-D weight, got {tuple(base.event_shape)}")
        kind = mode_kind(mode, base)
        if kind is None:
            raise ValueError(f"tracked_mode={mode!r} has no form for {type(base).__name__} "
                             f"(fused laws: {', '.join(c.__name__ for c in FUSED_LAWS)}); "
                             "use tracked_mode='subspace', 'fast' or 'tracked'")
        if kind == "penalty":
            law = TrackedLaw(_PENALTY_LOG_PROB[mode], mode)
        self.base, self.power, self._law, self.tracked_mode = base, power, law, mode
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def sample(self, sample_shape=()):
        return self.base.sample(sample_shape)

    def log_prob(self, value):
        return self._law.log_prob(self.base, self.power, value)


def _tail_penalty_for(law: PowerLawSpectrum | FrechetTopEigenvalue, mode: str = "tracked"
                     ) -> PowerLawPrior | FrechetPrior:
    """The penalty equal to ``-law.log_prob`` (penalty measure, same xmin rule) in ``mode``
    (``"tracked"``: a power law's tail tracker; ``"fast"``: the penalty's fast mode;
    ``"fused"``: Frechet's rank-one fused mode; ``"subspace"``: the power law's warm tail
    block, Frechet's ``"fast"`` block, :data:`SUBSPACE_LAWS`)."""
    if isinstance(law, FrechetTopEigenvalue):
        if mode not in _FRECHET_PENALTY_MODE:
            raise ValueError("a tracked FrechetTopEigenvalue prior uses a power iteration, "
                             "not a penalty; only tracked_mode='fast', 'fused' or 'subspace' "
                             "builds one")
        return FrechetPrior(float(law.concentration), float(law.scale), float(law.tau),
                            loc=float(law.loc), mode=_FRECHET_PENALTY_MODE[mode])
    if mode == "fused":
        raise ValueError(f"tracked_mode='fused' has no form for {type(law).__name__}; use "
                         "tracked_mode='subspace' or 'fast'")
    if mode in ("fast", "subspace") and law.xmin_quantile is not None:
        raise ValueError(f"tracked_mode={mode!r} needs a PowerLawSpectrum with a fixed xmin "
                         f"(xmin=...), got xmin_quantile={law.xmin_quantile} (a quantile "
                         "xmin is a counting problem: use tracked_mode='tracked')")
    kw = ({"xmin_quantile": law.xmin_quantile} if law.xmin_quantile is not None
          else {"xmin": float(law.xmin)})
    return PowerLawPrior(alpha=float(law.alpha), tau=float(law.tau), mode=mode, **kw)


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
