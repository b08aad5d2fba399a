"""Shared machinery of the priors on the spectrum of a weight matrix (not public).

A weight ``W`` of event shape ``(out, in)`` (or a conv kernel ``(out, in, *k)``) has the SVD
``W = U diag(sigma) V^T``. Two measures are offered by every spectral prior:

* **penalty** ``sum_i log f(spectrum_i)``: the per-value law summed over the spectrum, what
  MAP-as-regularisation maximises. For conv kernels (``conv="pool"``, default) the spectrum
  is pooled over the ``prod(k)`` slices ``W[:, :, i, j]`` as :func:`bayes_spectral.esd` does;
  ``conv="flatten"`` uses the ``out x (in * prod(k))`` matrix.
* **generative**: the density of ``W`` itself (Lebesgue measure on ``R^{out x in prod(k)}``,
  always the flattened view ``m x n``) when the ordered singular values have joint density
  ``p(sigma)`` and ``U`` (``m x r``), ``V`` (``n x r``) are Haar, ``r = min(m, n)``::

      log p(W) = log p(sigma) - log J(sigma) - log vol(m, n)
      J(sigma) = prod_{i<j} |sigma_i^2 - sigma_j^2| * prod_i sigma_i^{|m - n|}

  with the normalising constant ``vol(m, n)`` of :func:`spectral_laws.log_haar_volume`, so
  the generative ``log_prob`` is a normalised density. For i.i.d. values with density
  ``f`` the ordered density is ``p(sigma) = r! prod_i f(sigma_i)``; where ``f`` is a law on
  ``lambda = sigma^2`` the change of variables adds ``sum_i log(2 sigma_i)``.
  ``sample()`` draws exactly from this distribution: ordered values from the law, ``U`` and
  ``V`` from the QR decomposition of Gaussian matrices with the sign fix ``Q diag(sign R_ii)``.

Gradients flow through singular values only (``torch.linalg.svdvals``), so the penalty form
is differentiable at repeated singular values. The generative form of a law whose ``p(sigma)``
does not vanish there is ``+inf`` at repeated (or, if ``m != n``, zero) singular values: the
density of ``W`` really is unbounded there (an integrable singularity).
"""

from __future__ import annotations

import math
import operator

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .._checks import check_finite_params, float_tensor
from ..spectra.laws import log_haar_volume, log_sv_jacobian

MEASURES = ("penalty", "generative")


class _OpenInterval(constraints.Constraint):
    """``lower < x < upper`` (torch has only closed and half-open intervals)."""

    def __init__(self, lower: float, upper: float) -> None:
        self.lower_bound = lower
        self.upper_bound = upper
        super().__init__()

    def check(self, value):
        return (self.lower_bound < value) & (value < self.upper_bound)

    def __repr__(self) -> str:
        return f"OpenInterval(lower_bound={self.lower_bound}, upper_bound={self.upper_bound})"


open_unit_interval = _OpenInterval(0.0, 1.0)


def check_event_shape(event_shape, owner: str) -> torch.Size:
    """A weight shape ``(out, in)`` or ``(out, in, *k)`` with 1 to 3 kernel dims."""
    try:
        shape = torch.Size(operator.index(d) for d in event_shape)
    except TypeError as exc:
        raise TypeError(
            f"{owner}: event_shape must be a tuple of ints (no floats, no truncation), "
            f"got {event_shape!r}"
        ) from exc
    if not 2 <= len(shape) <= 5 or any(d < 1 for d in shape):
        raise ValueError(
            f"{owner}: event_shape {tuple(shape)} is not a weight shape; expected (out, in) "
            "or a conv kernel (out, in, *kernel) with positive sizes"
        )
    if min(shape[0], math.prod(shape[1:])) < 1 or math.prod(shape) < 2:
        raise ValueError(f"{owner}: event_shape {tuple(shape)} has too few elements")
    return shape


def haar_stiefel(shape, d: int, r: int, dtype, device) -> torch.Tensor:
    """Haar-distributed ``d x r`` matrices with orthonormal columns, batch ``shape``."""
    g = torch.randn(*shape, d, r, dtype=dtype, device=device)
    q, rr = torch.linalg.qr(g)
    sign = torch.sign(torch.diagonal(rr, dim1=-2, dim2=-1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return q * sign.unsqueeze(-2)


class SpectralDistribution(TorchDistribution):
    """Base class: a law on the spectrum of a weight of shape ``event_shape``.

    Subclasses set ``_param_names`` and implement ``_penalty_from_sv(sv)`` (``sv``: pooled
    singular values, descending, last dim), ``_sv_log_density(sv)`` (log of the joint density
    of the ``r`` ordered singular values of the flattened matrix) and ``_sample_sv(shape)``.
    """

    has_rsample = False
    _param_names: tuple[str, ...] = ()

    def __init__(self, params: dict, event_shape, measure: str, conv: str, validate_args):
        name = type(self).__name__
        event_shape = check_event_shape(event_shape, name)
        if measure not in MEASURES:
            raise ValueError(f"{name}: measure must be 'penalty' or 'generative', got {measure!r}")
        if conv not in ("pool", "flatten"):
            raise ValueError(f"{name}: conv must be 'pool' or 'flatten', got {conv!r}")
        values = broadcast_all(*params.values())
        for key, val in zip(params, values, strict=True):
            setattr(self, key, val)
        self.measure = measure
        self.conv = conv
        self._m = event_shape[0]
        self._n = math.prod(event_shape[1:])
        self._rank = min(self._m, self._n)
        super().__init__(values[0].shape, event_shape, validate_args=validate_args)
        if self._validate_args:
            check_finite_params(name, dict(zip(params, values, strict=True)))

    # -- Pyro plumbing -------------------------------------------------------------------
    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def expand(self, batch_shape, _instance=None):
        cls = type(self)
        new = self._get_checked_instance(cls, _instance)
        batch_shape = torch.Size(batch_shape)
        for key, val in self.__dict__.items():
            if key in self._param_names:
                new.__dict__[key] = val.expand(batch_shape)
            elif key not in ("_batch_shape", "_event_shape", "_validate_args"):
                new.__dict__[key] = val
        TorchDistribution.__init__(new, batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _param(self, key: str, like: torch.Tensor) -> torch.Tensor:
        """Parameter ``key`` cast to ``like``'s dtype/device, with a trailing dim for values."""
        return getattr(self, key).to(dtype=like.dtype, device=like.device).unsqueeze(-1)

    @property
    def _dtype(self):
        return getattr(self, self._param_names[0]).dtype

    @property
    def _device(self):
        return getattr(self, self._param_names[0]).device

    # -- value checks and spectra --------------------------------------------------------
    def _check_value(self, value) -> torch.Tensor:
        name = type(self).__name__
        value = float_tensor(value, f"{name}: weight")
        k = len(self.event_shape)
        if value.dim() < k or value.shape[-k:] != self.event_shape:
            raise ValueError(
                f"{name}: weight of shape {tuple(value.shape)} does not end with the event "
                f"shape {tuple(self.event_shape)} this prior was built for"
            )
        if self._validate_args:
            bad = ~torch.isfinite(value)
            if bool(bad.any()):
                raise ValueError(
                    f"{name}: weight of shape {tuple(value.shape)} is not finite: "
                    f"{int(torch.isnan(value).sum())} NaN and {int(torch.isinf(value).sum())} "
                    "Inf entries"
                )
        return value

    def _lead(self, value: torch.Tensor) -> torch.Size:
        return value.shape[: value.dim() - len(self.event_shape)]

    def flat_singular_values(self, value: torch.Tensor) -> torch.Tensor:
        """Singular values (descending) of the ``m x n`` flattened view, shape ``(..., r)``."""
        value = self._check_value(value)
        return torch.linalg.svdvals(value.reshape(*self._lead(value), self._m, self._n))

    def penalty_singular_values(self, value: torch.Tensor) -> torch.Tensor:
        """Singular values (descending) the penalty is summed over, pooled over conv slices."""
        value = self._check_value(value)
        lead = self._lead(value)
        if len(self.event_shape) == 2 or self.conv == "flatten":
            return torch.linalg.svdvals(value.reshape(*lead, self._m, self._n))
        out_ch, in_ch = self.event_shape[:2]
        slices = value.reshape(*lead, out_ch, in_ch, -1).movedim(-1, -3)
        sv = torch.linalg.svdvals(slices).reshape(*lead, -1)
        return torch.sort(sv, dim=-1, descending=True).values

    # -- the two measures ----------------------------------------------------------------
    def penalty_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``sum_i log f(spectrum_i)``, the MAP-as-regularisation objective."""
        return self._penalty_from_sv(self.penalty_singular_values(value))

    def generative_log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """Normalised density of ``W``: ``log p(sigma) - log J(sigma) - log vol(m, n)``.

        At singular points (a zero or a repeated singular value) the formula is ``-inf -
        (-inf)``; there the value is its limit (:meth:`_singular_limit`) and the gradient 0.
        """
        sv = self.flat_singular_values(value)
        singular = self._singular_rows(sv)
        if not bool(singular.any()):
            return self._generative_from_sv(sv)
        safe = torch.linspace(2.0, 1.0, sv.shape[-1], dtype=sv.dtype, device=sv.device)
        regular = self._generative_from_sv(torch.where(singular.unsqueeze(-1), safe, sv))
        with torch.no_grad():
            limit = self._singular_limit(sv.detach())
        return torch.where(singular, limit, regular)

    def _generative_from_sv(self, sv: torch.Tensor) -> torch.Tensor:
        return (
            self._sv_log_density(sv)
            - log_sv_jacobian(sv, self._m, self._n)
            - log_haar_volume(self._m, self._n)
        )

    @staticmethod
    def _singular_rows(sv: torch.Tensor) -> torch.Tensor:
        """Rows (descending ``sv``) with a zero or two equal singular values."""
        repeated = (sv[..., :-1] == sv[..., 1:]).any(-1)
        return repeated | (sv[..., -1] <= 0)

    #: ``k`` with ``p(sigma) ~ prod_i sigma_i^k`` near ``sigma_i = 0`` (law on ``sigma^2``: 1)
    _sv_power = 0

    def _singular_limit(self, sv: torch.Tensor) -> torch.Tensor:
        """``lim log p(W)`` at a singular point. Scaling the ``z`` zero singular values by
        ``t -> 0`` the density behaves as ``t^e``, ``e = z (k - |m-n|) - z (z - 1)``
        (``k = _sv_power``): ``+inf`` for ``e < 0``, ``-inf`` for ``e > 0``, the value at
        ``sigma = tiny`` for ``e = 0``. Repeated non-zero values: ``+inf`` where the law's
        density is positive (``J = 0``). ``-inf`` where :meth:`_law_vanishes`."""
        tiny = torch.finfo(sv.dtype).tiny
        z = (sv <= 0).sum(-1)
        e = z * (self._sv_power - abs(self._m - self._n)) - z * (z - 1)
        at_tiny = self._generative_from_sv(sv.clamp_min(tiny ** 0.25))
        inf = torch.full_like(at_tiny, math.inf)
        out = torch.where(e < 0, inf, torch.where(e > 0, -inf, at_tiny))
        repeated = (sv[..., :-1] == sv[..., 1:]) & (sv[..., 1:] > 0)
        out = torch.where(repeated.any(-1) & (e <= 0), inf, out)
        return torch.where(self._law_vanishes(sv), -inf, out)

    def _law_vanishes(self, sv: torch.Tensor) -> torch.Tensor:
        """Rows where the law's own density is 0 (faster than any power): default none."""
        return torch.zeros(sv.shape[:-1], dtype=torch.bool, device=sv.device)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """The measure chosen at construction (``self.measure``)."""
        if self.measure == "generative":
            return self.generative_log_prob(value)
        return self.penalty_log_prob(value)

    def sample(self, sample_shape=()) -> torch.Tensor:
        """Exact draw from the generative distribution: ``U diag(sigma) V^T`` (Haar U, V)."""
        shape = torch.Size(sample_shape) + self.batch_shape
        with torch.no_grad():
            sv = self._sample_sv(shape)
            u = haar_stiefel(shape, self._m, self._rank, self._dtype, self._device)
            v = haar_stiefel(shape, self._n, self._rank, self._dtype, self._device)
            w = (u * sv.unsqueeze(-2)) @ v.transpose(-1, -2)
            self._check_draws(sv, w)
        return w.reshape(shape + self.event_shape)

    def _check_draws(self, sv: torch.Tensor, w: torch.Tensor) -> None:
        """Raise ValueError when a draw is not representable in the parameters' dtype."""
        if bool(torch.isfinite(w).all()):
            return
        params = ", ".join(
            f"{k}=[{', '.join(f'{x:.4g}' for x in getattr(self, k).flatten()[:3].tolist())}]"
            for k in self._param_names)
        n_bad = int((~torch.isfinite(sv)).any(-1).sum())
        raise ValueError(
            f"{type(self).__name__}.sample ({params}): {n_bad} draws overflow {w.dtype} "
            f"(the largest singular value exceeds {torch.finfo(w.dtype).max:.3g}); the law's "
            "tail is too heavy for this dtype: use float64 parameters or a lighter tail"
        )

    def rsample(self, sample_shape=()) -> torch.Tensor:
        """Not available: singular values are drawn by inverse CDF but the QR of the Haar
        factors is not a reparameterisation worth differentiating."""
        raise NotImplementedError(
            f"{type(self).__name__} has no reparameterised sampler (has_rsample=False): use "
            ".sample() (no gradient), or put the prior on a latent and use a guide")

    @property
    def mean(self):
        raise NotImplementedError(
            f"{type(self).__name__}.mean is not implemented: E[W] = 0 where E[sigma] is "
            "finite (Haar U, V are sign-symmetric) but need not exist for heavy tails; use "
            ".sample(shape).mean(0), or bs.esd of samples for the spectrum")

    @property
    def variance(self):
        raise NotImplementedError(
            f"{type(self).__name__}.variance: not available in closed form; estimate it "
            "from .sample(shape)")

    @staticmethod
    def _log_factorial(r: int) -> float:
        return math.lgamma(r + 1)

    @staticmethod
    def _sort_desc(x: torch.Tensor) -> torch.Tensor:
        return torch.sort(x, dim=-1, descending=True).values

    def _penalty_from_sv(self, sv: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _sv_log_density(self, sv: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _sample_sv(self, shape: torch.Size) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError
