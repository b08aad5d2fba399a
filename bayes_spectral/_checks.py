"""Input validation shared by every layer: clear errors instead of silent NaNs."""

from __future__ import annotations

import torch

__all__ = ["check_weight", "check_positive", "check_tensor_storage", "check_finite_params"]

#: dtypes without linear-algebra kernels: computed in float32 instead
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _where(name: str | None) -> str:
    return f" (layer {name!r})" if name else ""


def float_tensor(value: object, what: str) -> torch.Tensor:
    """``value`` as a dense floating tensor, float16/bfloat16 upcast to float32 (linalg has
    no half kernels); TypeError/ValueError naming ``what`` for a non-tensor, an integer
    tensor, or a sparse or meta-device one."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{what} must be floating point, got dtype {value.dtype}")
    check_tensor_storage(value, what)
    return value.float() if value.dtype in HALF_DTYPES else value


def check_weight(weight: object, name: str | None = None, min_dim: int = 2) -> torch.Tensor:
    """Return ``weight`` as a floating tensor, or raise a clear TypeError/ValueError.

    float16/bfloat16 weights are returned as float32 (linalg has no half kernels).
    Rejects non-tensors, sparse or meta-device tensors, integer tensors, fewer than
    ``min_dim`` dimensions, empty or single-element tensors and non-finite entries; the
    message names the layer.
    """
    weight = float_tensor(weight, f"weight{_where(name)}")
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


def check_tensor_storage(tensor: torch.Tensor, what: str) -> None:
    """Raise unless ``tensor`` is a dense (strided) tensor holding data (not on ``meta``)."""
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{what} is a {tensor.layout} tensor of shape {tuple(tensor.shape)}: spectra "
            "need a dense tensor (call .to_dense() first)"
        )
    if tensor.device.type == "meta":
        raise ValueError(
            f"{what} of shape {tuple(tensor.shape)} is on the meta device (a shape without "
            "data): load or materialise the weights first (e.g. module.to_empty(device='cpu'))"
        )


def check_finite_params(owner: str, params: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first parameter with a NaN or infinite entry."""
    for key, val in params.items():
        if isinstance(val, torch.Tensor) and val.device.type != "meta" and not bool(
            torch.isfinite(val).all()
        ):
            shown = val.detach().flatten()[:6].tolist()
            more = ", ..." if val.numel() > 6 else ""
            raise ValueError(f"{owner}: parameter {key} must be finite, got {shown}{more}")
