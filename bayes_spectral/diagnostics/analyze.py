"""Layer 5: spectral diagnosis of any ``torch.nn.Module`` as an ``xarray.Dataset``.

Array core first (``metrics.py`` on tensors), thin xarray layer here: one row per weight
of the parameter view (:func:`bayes_spectral.select.parameter_view`) along dim ``layer``
(coordinate values are the row names), with coordinates ``layer_type`` (the row's kind,
read from names and shapes, so a model and its state_dict give equal datasets) and
``shape``; ``.to_dataframe()`` gives a WeightWatcher-like table.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping

import numpy as np
import torch
import xarray as xr
from torch import nn

from .._checks import check_tensor_storage
from ..select import LeftOut, WeightRow, parameter_view, weight_layers
from ..spectra.metrics import spectral_metrics
from ..spectra.spectrum import ConvMode, SpectrumMethod, esd

__all__ = ["analyze", "weight_layers"]

#: row kinds analyze has no matrix rule for
NO_MATRIX_RULE = ("ParamNd",)


def analyze(
    model: nn.Module | Mapping[str, torch.Tensor],
    *,
    layers: str | Iterable[str] | None = None,
    include: Iterable[str] = (),
    types: type | tuple[type, ...] | None = None,
    hide: type | tuple[type, ...] = (),
    split_qkv: bool = True,
    split_gates: bool = False,
    conv: ConvMode = "pool",
    min_evals: int = 8,
    return_esd: bool = False,
    dtype: torch.dtype = torch.float64,
    schatten: tuple[float, ...] = (1.0,),
    method: SpectrumMethod = "gram",
    **fit_kwargs,
) -> xr.Dataset:
    """Spectral metrics of every weight of ``model`` (see ``metrics.py``).

    ``model`` is an ``nn.Module`` or a state_dict; the weights are the rows of
    :func:`~bayes_spectral.select.parameter_view` (Linear, Conv, Embedding, attention
    Q/K/V/out, recurrent matrices, parametrized weights, any other 2-D parameter).
    ``layers``: a regular expression (the one rule: ``re.fullmatch`` on the module name,
    the full parameter name or the row name) or exact names; ``types`` / ``hide``: module
    types to keep / leave out; ``split_qkv``, ``split_gates``: as in the view.
    ``include``: kept for old scripts (every >= 2-D parameter is a row now); its names are
    checked. ``analyze(model)`` equals ``analyze(model.state_dict())``.

    Rows with fewer than ``min_evals`` eigenvalues are left out (WeightWatcher's default
    is 8 too) and listed in ``ds.attrs["skipped"]``; every weight left out is listed with
    its reason in ``ds.attrs["left_out"]`` and matrices among them in a warning. Spectra
    are computed in ``dtype`` (float64 by default) by ``method`` (``"gram"``: eigenvalues
    of the smaller Gram matrix, the fast default; ``"svd"``: singular values, accurate for
    tiny values). ``return_esd=True`` adds ``esd`` (dims ``layer, eval_index``, ascending,
    NaN-padded). Extra keyword arguments go to ``fit_powerlaw``.

    A layer that cannot be analysed (NaN/Inf or all-zero weights, a sparse or meta-device
    tensor, a failed fit) is left out with a warning naming it and the reason (also in
    ``ds.attrs["left_out"]`` and ``ds.attrs["failed"]``); the other layers are analysed.
    :raises ValueError: when no layer could be analysed (the reasons, per layer).
    """
    _check_include(model, include)
    model, failed = _drop_unreadable(model)
    pattern, names = (layers, None) if isinstance(layers, str) else (None, layers)
    view = parameter_view(model, types=types, names=names, pattern=pattern, hide=hide,
                          split_qkv=split_qkv, split_gates=split_gates, what="analyze()")
    kept, skipped, left_out = _split_by_size(view.rows, conv, min_evals)
    left_out = view.left_out + left_out
    rows, spectra, kept, more = _layer_metrics(kept, dtype, conv, schatten, method, return_esd,
                                               fit_kwargs)
    failed += more
    _warn_left_out(left_out, min_evals)
    if not rows:
        if failed:
            raise ValueError("analyze(): no layer could be analysed: "
                             + "; ".join(f"{n}: {why}" for n, why in failed))
        raise ValueError("analyze(): the model has no weight layer with enough eigenvalues")
    left_out = left_out + [LeftOut(n, f"could not be analysed: {why}") for n, why in failed]
    ds = _dataset(rows, kept, skipped, conv)
    ds.attrs["failed"] = "; ".join(f"{n}: {why}" for n, why in failed)
    ds.attrs["left_out"] = "; ".join(f"{n}: {why}" for n, why in left_out)
    if return_esd:
        ds["esd"] = (("layer", "eval_index"), _nan_padded(spectra))
    return ds


def _check_include(model, include: Iterable[str]) -> None:
    """Old ``include=``: each name must be a 2-D parameter of the model."""
    if not isinstance(model, nn.Module):
        return
    params = dict(model.named_parameters())
    for pname in include:
        if pname not in params:
            raise ValueError(f"include: model has no parameter named {pname!r}")
        if params[pname].dim() != 2:
            raise ValueError(f"include: parameter {pname!r} has shape "
                             f"{tuple(params[pname].shape)}, only 2-D parameters can be named")


def _warn_left_out(left_out: list[LeftOut], min_evals: int) -> None:
    """One warning naming every matrix left out (not 1-D weights, not deselected rows)."""
    shown = [f"{n} ({why})" for n, why in left_out
             if "-D weight, not a matrix" not in why and not why.startswith("not selected")
             and "is hidden" not in why]
    if shown:
        warnings.warn(f"analyze(): left out (fewer than {min_evals} eigenvalues or no "
                      f"matrix rule): {', '.join(shown)}", stacklevel=3)


def _split_by_size(found: list[WeightRow], conv: ConvMode, min_evals: int
                   ) -> tuple[list[WeightRow], list[str], list[LeftOut]]:
    """Rows with at least ``min_evals`` eigenvalues; the names of the others; both those
    and rows without a matrix rule as :class:`LeftOut`."""
    kept, skipped, left_out = [], [], []
    for row in found:
        if row.kind in NO_MATRIX_RULE:
            left_out.append(LeftOut(row.name, f"a {len(row.shape)}-D parameter that is not "
                                              "a weight (no matrix rule)"))
        elif row.num_evals(conv) < min_evals:
            skipped.append(row.name)
            left_out.append(LeftOut(row.name, f"{row.num_evals(conv)} eigenvalues "
                                              f"(< min_evals={min_evals})"))
        else:
            kept.append(row)
    return kept, skipped, left_out


def _drop_unreadable(model) -> tuple:
    """A state dict without its sparse and meta-device matrices (``>= 2``-D tensors that hold
    no dense data), and ``(name, reason)`` for each; a module is returned as it is (its
    rows are checked one by one in :func:`_layer_metrics`)."""
    if not isinstance(model, Mapping):
        return model, []
    failed: list[tuple[str, str]] = []
    for key, t in model.items():
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            try:
                check_tensor_storage(t, f"tensor {key!r}")
            except (TypeError, ValueError) as err:
                failed.append((str(key), str(err)))
    if failed:
        warnings.warn("analyze(): left out " + "; ".join(f"{n} ({why})" for n, why in failed),
                      stacklevel=3)
        bad = {n for n, _ in failed}
        model = {k: v for k, v in model.items() if str(k) not in bad}
    return model, failed


def _one_layer(row: WeightRow, dtype: torch.dtype, conv: ConvMode, schatten, method,
               return_esd: bool, fit_kwargs: dict) -> tuple[dict[str, float], np.ndarray | None]:
    """The metrics (floats) and (``return_esd``) the ESD of one row, without autograd."""
    raw = row.read().detach()
    check_tensor_storage(raw, f"weight of layer {row.name!r}")
    w = raw.to(dtype)
    with torch.no_grad():
        m = spectral_metrics(w, conv=conv, schatten=schatten, name=row.name, method=method,
                             **fit_kwargs)
        out = {k: float(v) for k, v in m.items()}
        spectrum = (esd(w, conv=conv, name=row.name, method=method).cpu().numpy()
                    if return_esd else None)
    return out, spectrum


def _layer_metrics(kept: list[WeightRow], dtype: torch.dtype,
                   conv: ConvMode, schatten: tuple[float, ...], method: SpectrumMethod,
                   return_esd: bool, fit_kwargs: dict
                   ) -> tuple[list[dict[str, float]], list[np.ndarray], list[WeightRow],
                              list[tuple[str, str]]]:
    """Per layer, in order: its metrics as floats and (``return_esd``) its ESD, both of
    the weight cast to ``dtype``; a layer that fails is left out with a warning naming it.
    Returns ``(metrics, spectra, rows analysed, [(name, reason) of the failed ones])``."""
    rows: list[dict[str, float]] = []
    spectra: list[np.ndarray] = []
    done: list[WeightRow] = []
    failed: list[tuple[str, str]] = []
    for row in kept:
        try:
            metrics, spectrum = _one_layer(row, dtype, conv, schatten, method, return_esd,
                                           fit_kwargs)
        except (ValueError, TypeError, RuntimeError, ArithmeticError) as err:
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            failed.append((row.name, reason))
            warnings.warn(f"analyze(): layer {row.name!r} could not be analysed and is left "
                          f"out: {reason}", stacklevel=4)
            continue
        rows.append(metrics)
        done.append(row)
        if spectrum is not None:
            spectra.append(spectrum)
    return rows, spectra, done, failed


def _dataset(rows: list[dict[str, float]], kept: list[WeightRow],
             skipped: list[str], conv: ConvMode) -> xr.Dataset:
    """One variable per metric along ``layer``; coords ``layer_type`` and ``shape``."""
    data_vars = {key: ("layer", np.array([r[key] for r in rows])) for key in rows[0]}
    coords = {
        "layer": [r.name for r in kept],
        "layer_type": ("layer", [r.kind for r in kept]),
        "shape": ("layer", ["x".join(str(s) for s in r.shape) for r in kept]),
    }
    ds = xr.Dataset(
        data_vars, coords=coords,
        attrs={"skipped": ", ".join(skipped), "conv": conv, "esd_convention": "sigma^2, no 1/N"},
    )
    for key in ("num_tail", "num_evals", "numerical_rank"):
        ds[key] = ds[key].astype(np.int64)
    return ds


def _nan_padded(spectra: list[np.ndarray]) -> np.ndarray:
    """Ascending spectra of unequal length as rows of one array, NaN-padded on the right."""
    width = max(len(s) for s in spectra)
    padded = np.full((len(spectra), width), np.nan)
    for i, s in enumerate(spectra):
        padded[i, : len(s)] = s
    return padded
