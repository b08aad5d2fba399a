"""Input validation shared by every layer: clear errors instead of silent NaNs."""

from __future__ import annotations

import torch

__all__ = ["check_weight", "check_positive"]


def _where(name: str | None) -> str:
    return f" (layer {name!r})" if name else ""


def check_weight(weight: object, name: str | None = None, min_dim: int = 2) -> torch.Tensor:
    """Return ``weight`` as a floating tensor, or raise a clear TypeError/ValueError.

    Rejects non-tensors, integer tensors, fewer than ``min_dim`` dimensions, empty or
    single-element tensors and non-finite entries; the message names the layer.
    """
    if not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"expected a torch.Tensor weight{_where(name)}, got {type(weight).__name__}"
        )
    if not weight.is_floating_point():
        raise TypeError(f"weight{_where(name)} must be floating point, got dtype {weight.dtype}")
    if weight.dim() < min_dim:
        raise ValueError(
            f"weight{_where(name)} has shape {tuple(weight.shape)}: a spectrum needs at least "
            f"{min_dim} dimensions (1-D parameters such as biases have no ESD)"
        )
    if weight.numel() < 2 or min(weight.shape[-2:]) < 1:
        raise ValueError(f"weight{_where(name)} has shape {tuple(weight.shape)}: too few elements")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(weight).sum())
        n_inf = int(torch.isinf(weight).sum())
        raise ValueError(
            f"weight{_where(name)} of shape {tuple(weight.shape)} is not finite: "
            f"{n_nan} NaN and {n_inf} Inf entries"
        )
    return weight


def check_positive(value: float, what: str) -> float:
    """Raise ValueError unless ``value`` is a finite number > 0."""
    v = float(value)
    if not (v > 0 and v < float("inf")):
        raise ValueError(f"{what} must be a finite positive number, got {value!r}")
    return v
