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

import torch
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

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
        shape = torch.Size(int(d) for d in event_shape)
    except TypeError as exc:
        raise TypeError(
            f"{owner}: event_shape must be a tuple of ints, got {event_shape!r}"
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
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor weight, got {type(value).__name__}")
        if not value.is_floating_point():
            raise TypeError(f"{name}: weight must be floating point, got {value.dtype}")
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
        """Normalised density of ``W``: ``log p(sigma) - log J(sigma) - log vol(m, n)``."""
        sv = self.flat_singular_values(value)
        return (
            self._sv_log_density(sv)
            - log_sv_jacobian(sv, self._m, self._n)
            - log_haar_volume(self._m, self._n)
        )

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
        return w.reshape(shape + self.event_shape)

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
