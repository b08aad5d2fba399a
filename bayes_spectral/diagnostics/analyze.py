"""Layer 5: spectral diagnosis of any ``torch.nn.Module`` as an ``xarray.Dataset``.

Array core first (``metrics.py`` on tensors), thin xarray layer here: one row per weight
of the parameter view (:func:`bayes_spectral.select.parameter_view`) along dim ``layer``
(coordinate values are the row names), with coordinates ``layer_type`` (the row's kind,
read from names and shapes, so a model and its state_dict give equal datasets) and
``shape``; ``.to_dataframe()`` gives a WeightWatcher-like table.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import xarray as xr
from torch import nn

from .._checks import check_tensor_storage
from .._io import UnreadableFileError
from ..select import LeftOut, View, WeightRow, parameter_view, weight_layers
from ..spectra.metrics import metrics_from_esd, rank_settings
from ..spectra.spectrum import ConvMode, SpectrumMethod, _check_squares, esd
from .batched import (
    batch_esd,
    check_device,
    check_finite_fast,
    check_gram_dtype,
    gram32_esd,
    plan_batches,
)
from .checkpoint_files import (
    CheckpointMismatchError,
    DeltaSource,
    NonFiniteTensorError,
    TensorSource,
    as_source,
)
from .lazy_view import config_head_dim, config_heads, config_kv_heads, per_head_rows, source_view
from .lora import LoraSource
from .scan import ResumeStore, torch_threads
from .scan import progress as progress_bar
from .ww_columns import (
    apply_max_evals,
    check_ww_options,
    split_ww_options,
    ww_columns,
    ww_settings,
)

__all__ = ["analyze", "weight_layers"]

#: row kinds analyze has no matrix rule for
NO_MATRIX_RULE = ("ParamNd",)
#: a batch of equal-shape matrices holds at most this many times the elements of the
#: largest matrix (1: the peak memory of the one-by-one scan, whose largest matrix is alone)
BATCH_CAP = 1.0
_CPU = torch.device("cpu")
#: errors that leave one row out (with a warning) instead of stopping the scan
_ROW_ERRORS = (ValueError, TypeError, RuntimeError, ArithmeticError)


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
    base=None,
    max_aspect: float | None = None,
    heads: int | None = None,
    per_head: bool = False,
    kv_heads: int | None = None,
    resume: str | os.PathLike | None = None,
    on_row: Callable[[str, dict[str, float]], None] | None = None,
    progress: bool | None = None,
    threads: int | None = None,
    strict: bool = False,
    device: str | torch.device | None = None,
    batch: bool = True,
    gram_dtype: torch.dtype | None = None,
    **fit_kwargs,
) -> xr.Dataset:
    """Spectral metrics of every weight of ``model`` (see ``metrics.py``).

    ``model`` is an ``nn.Module``, a state_dict or a checkpoint path (``.safetensors``
    file or sharded folder, ``.bin`` / ``.pt`` state dict, LoRA adapter folder: see
    :mod:`~bayes_spectral.diagnostics.checkpoint_files`), read one tensor at a time;
    ``base=`` (a path, module or state dict) analyses the fine-tune deltas ``W - W_base``.
    The weights are the rows of
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
    tiny values), once per matrix: the metrics, the WeightWatcher columns, the ESD and the
    resume file all use that one ESD. ``return_esd=True`` adds ``esd`` (dims ``layer,
    eval_index``, ascending, NaN-padded). Extra keyword arguments go to ``fit_powerlaw``,
    except WeightWatcher's ``mp_fit``, ``randomize``, ``fit``, ``fix_fingers`` and
    ``max_evals`` (extra columns, and the ``warning`` column:
    :mod:`~bayes_spectral.diagnostics.ww_columns`).

    Transformer conventions (Hugging Face names): GPT-2's fused ``c_attn`` (``Conv1D``
    layout) and ``in_proj_weight`` are split into Q, K, V; ``query_key_value`` (GPT-NeoX,
    rows interleaved per head) too when ``heads`` is given or stated by the config
    (``config.json`` beside the checkpoint, ``model.config``); tied or equal-valued
    matrices (``wte`` / ``lm_head``) count once. ``max_aspect``: matrices with
    ``max(shape) / min(shape)`` above it are left out (very elongated embeddings).
    ``per_head=True``: each Q, K, V row as one row per head (``name[h0]``, ...: the head's
    ``out / heads`` output features); separately stored ``q_proj`` / ``k_proj`` /
    ``v_proj`` (Llama, Mistral; BERT's ``query`` ...) too, keys and values in ``kv_heads``
    heads (grouped-query attention; ``None``: the config's ``num_key_value_heads``, else
    ``out / d`` with ``d`` the query head dim); the head dims are checked against each other
    and the config's ``head_dim`` (or ``hidden_size / heads``), ``ValueError`` naming the
    tensor.

    Long scans: ``resume`` (a folder, checkpoint paths only) keeps every finished row
    (atomic files) and reads them back instead of recomputing; other settings (each
    WeightWatcher option and ``min_evals`` among them) are refused by name
    (:class:`~bayes_spectral.diagnostics.scan.ResumeMismatchError`). ``on_row(name,
    metrics)`` is called after each computed row; ``progress`` shows a tqdm bar (``None``:
    when stderr is a terminal); ``threads``: torch threads (``None``: the cores not busy
    with other work, :func:`~bayes_spectral.diagnostics.scan.default_threads`; the number
    used is ``ds.attrs["threads"]``).

    A layer that cannot be analysed (NaN/Inf or all-zero weights, a sparse or meta-device
    tensor, a failed fit) is left out with a warning naming it and the reason (also in
    ``ds.attrs["left_out"]`` and ``ds.attrs["failed"]``); the other layers are analysed
    (``strict=True``: a file tensor that cannot be read or holds NaN/Inf raises instead).

    Speed: matrices of equal shape are decomposed together, one batched ``eigvalsh`` of
    their Gram matrices (``batch=False``: one at a time; the results are bit for bit the
    same), each batch at most as many elements as the largest matrix (``BATCH_CAP``), so
    the peak memory stays that of the largest matrix; files are read one tensor after
    another into the batch. ``device="cuda"``: the Gram matrices and ``eigvalsh`` on the
    GPU in ``dtype`` (float64 by default), the eigenvalues back on the CPU for the fits
    (``ValueError`` when CUDA is not available); ``"cpu"``: on the CPU; ``None`` (default):
    the CPU for files and CPU models, and a model with weights on a GPU analysed there, one
    matrix at a time, as before.

    ``gram_dtype=torch.float32`` (``method="gram"``, ``dtype=torch.float64``): each weight
    is read in float32 and its Gram matrix ``W^T W`` (smaller side) formed in float32,
    then upcast to float64 for ``eigvalsh``; eigenvalues float64. Faster (a float32
    product) and half the memory per matrix; an eigenvalue's relative error is about
    ``n eps32 ||W||_2^2 / lambda`` (``eps32 = 1.2e-7``, ``n`` the summed dimension), so
    tiny eigenvalues lose accuracy (``numerical_rank`` uses float32's cut) while the
    tail quantities (``alpha``, ``alpha_weighted``, ``lambda_max``, log norms,
    ``stable_rank``) stay within ~1e-6 relative of float64 (measured ~1e-7). ``None``
    (default) or ``torch.float64``: the Gram matrix in ``dtype``, bit for bit as before.
    :raises ValueError: when no layer could be analysed (the reasons, per layer).
    """
    device = _scan_device(model, device)
    _check_include(model, include)
    check_ww_options(fit_kwargs, min_evals)  # mp_fit, randomize, fit, fix_fingers, max_evals
    gram32 = check_gram_dtype(gram_dtype, dtype, method)
    settings = dict(layers=layers, split_qkv=split_qkv, split_gates=split_gates, conv=conv,
                    min_evals=min_evals, dtype=str(dtype), schatten=schatten, method=method,
                    max_aspect=max_aspect, heads=heads, per_head=per_head,
                    powerlaw_fit=split_ww_options(fit_kwargs)[1], **ww_settings(fit_kwargs))
    if gram32:  # only then, so resume folders of earlier scans stay valid
        settings["gram_dtype"] = "torch.float32"
    if kv_heads is not None:
        settings["kv_heads"] = kv_heads
    source, failed = None, []
    if isinstance(model, (str, os.PathLike)) or base is not None:
        source, view = _checkpoint_view(model, base, layers, types, hide, split_qkv,
                                        split_gates, heads, per_head, kv_heads)
    else:
        model, failed = _drop_unreadable(model)
        view = _model_view(model, layers, types, hide, split_qkv, split_gates, heads,
                           per_head, kv_heads)
    kept, skipped, left_out = _split_by_size(view.rows, conv, min_evals, max_aspect)
    kept, skipped, left_out = apply_max_evals(kept, skipped, left_out, conv, fit_kwargs)
    left_out = view.left_out + left_out
    try:
        store = _resume_store(resume, source, settings)
        with torch_threads(threads) as used_threads:
            rows, spectra, kept, more = _layer_metrics(
                kept, dtype, conv, schatten, method, return_esd, fit_kwargs,
                store=store, on_row=on_row, bar=progress, strict=strict, device=device,
                batch=batch, gram32=gram32)
    finally:
        if source is not None:
            source.close()
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
    ds.attrs["threads"] = used_threads
    ds.attrs["left_out"] = "; ".join(f"{n}: {why}" for n, why in left_out)
    if return_esd:
        ds["esd"] = (("layer", "eval_index"), _nan_padded(spectra))
    return ds


def _scan_device(model, device) -> torch.device | None:
    """``device`` checked (:func:`~bayes_spectral.diagnostics.batched.check_device`);
    ``None``: the CPU, unless ``model`` (a module or state dict) holds a tensor on another
    device (then ``None``: each weight where it is)."""
    if device is not None:
        return check_device(device)
    if isinstance(model, nn.Module):
        tensors = [*model.parameters(), *model.buffers()]
    elif isinstance(model, Mapping):
        tensors = [t for t in model.values() if isinstance(t, torch.Tensor)]
    else:
        tensors = []
    on_cpu = all(t.device.type in ("cpu", "meta") for t in tensors)
    return _CPU if on_cpu else None


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
             and "is hidden" not in why and not why.startswith("tied to")]
    if shown:
        warnings.warn(f"analyze(): left out (fewer than {min_evals} eigenvalues or no "
                      f"matrix rule): {', '.join(shown)}", stacklevel=3)


def _model_view(model, layers, types, hide, split_qkv: bool, split_gates: bool,
                heads: int | None, per_head: bool = False, kv_heads: int | None = None
                ) -> View:
    """The view of a module or state dict (transformer conventions on; ``heads`` from
    ``model.config`` when not given; ``per_head``: :func:`per_head_rows`)."""
    pattern, names = (layers, None) if isinstance(layers, str) else (None, layers)
    config = (getattr(model, "config", None) or {}) if isinstance(model, nn.Module) else {}
    if heads is None:
        heads = config_heads(config)
    view = parameter_view(model, types=types, names=names, pattern=pattern, hide=hide,
                          split_qkv=split_qkv, split_gates=split_gates, what="analyze()",
                          transformer=True, heads=heads)
    return _per_head(view, per_head, heads, kv_heads, config)


def _per_head(view: View, per_head: bool, heads: int | None, kv_heads: int | None,
              config) -> View:
    """``view`` with :func:`per_head_rows` (``per_head``), ``kv_heads`` and the head dim
    from ``config`` when not given."""
    if not per_head:
        return view
    kv_heads = kv_heads if kv_heads is not None else config_kv_heads(config)
    rows = per_head_rows(view.rows, heads, kv_heads, config_head_dim(config, heads))
    return View(rows, view.left_out)


def _checkpoint_view(model, base, layers, types, hide, split_qkv: bool, split_gates: bool,
                     heads: int | None, per_head: bool = False, kv_heads: int | None = None
                     ) -> tuple[TensorSource, View]:
    """The source (``W - W_base`` with ``base``) and its lazily read view."""
    if types is not None or hide:
        raise TypeError("analyze(): types= and hide= need an nn.Module; select the rows "
                        "of a checkpoint by layers= (names or a regular expression)")
    source = as_source(model)
    if base is not None:
        if isinstance(source, LoraSource):
            raise CheckpointMismatchError(f"analyze(): {model} is a LoRA adapter, already "
                                          "the update B A * scaling; base= is for full "
                                          "fine-tuned checkpoints")
        source = DeltaSource(source, as_source(base))
    config = source.config or (
        (getattr(model, "config", None) or {}) if isinstance(model, nn.Module) else {})
    if heads is None:
        heads = config_heads(config)
    pattern, names = (layers, None) if isinstance(layers, str) else (None, layers)
    view = source_view(source, names=names, pattern=pattern, split_qkv=split_qkv,
                       split_gates=split_gates, heads=heads)
    extra = [LeftOut(n, why) for n, why in source.left_out]
    view = _per_head(view, per_head, heads, kv_heads, config)
    return source, View(view.rows, extra + view.left_out)


def _resume_store(resume, source: TensorSource | None, settings: dict) -> ResumeStore | None:
    """The resume folder's store, its settings the checkpoint's files and ``settings``."""
    if resume is None:
        return None
    if source is None:
        raise TypeError("analyze(): resume= needs a checkpoint path (a module or state dict "
                        "in memory has nothing to resume)")
    return ResumeStore(resume, {"checkpoint": source.fingerprint(), **settings})


def _split_by_size(found: list[WeightRow], conv: ConvMode, min_evals: int,
                   max_aspect: float | None = None
                   ) -> tuple[list[WeightRow], list[str], list[LeftOut]]:
    """Rows with at least ``min_evals`` eigenvalues (and ``max(shape)/min(shape) <=
    max_aspect`` for matrices); the names of the others; both those and rows without a
    matrix rule as :class:`LeftOut`."""
    kept, skipped, left_out = [], [], []
    for row in found:
        aspect = max(row.shape) / min(row.shape) if len(row.shape) == 2 and min(row.shape) else 0
        if row.kind in NO_MATRIX_RULE:
            left_out.append(LeftOut(row.name, f"a {len(row.shape)}-D parameter that is not "
                                              "a weight (no matrix rule)"))
        elif row.num_evals(conv) < min_evals:
            skipped.append(row.name)
            left_out.append(LeftOut(row.name, f"{row.num_evals(conv)} eigenvalues "
                                              f"(< min_evals={min_evals})"))
        elif max_aspect is not None and aspect > max_aspect:
            left_out.append(LeftOut(row.name, f"aspect ratio {aspect:.3g} > "
                                              f"max_aspect={max_aspect:g}"))
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
               return_esd: bool, fit_kwargs: dict, device: torch.device | None = _CPU,
               gram32: bool = False) -> tuple[dict[str, float], np.ndarray | None]:
    """The metrics (floats) and (``return_esd``) the ESD of one row, without autograd; the
    ESD computed on ``device`` and brought back to the CPU (``gram32``: the weight in
    float32, its Gram matrix formed in float32, :func:`~.batched.gram32_esd`)."""
    raw = row.read().detach()
    check_tensor_storage(raw, f"weight of layer {row.name!r}")
    w = raw.to(torch.float32 if gram32 else dtype)
    del raw  # a file's tensor: only the cast copy stays
    with torch.no_grad():
        if device is None:  # a weight on a GPU, analysed where it is
            evals = _spectrum(w, conv, row.name, method, gram32)
        else:
            evals = _spectrum(w.to(device), conv, row.name, method, gram32).to("cpu")
    return _row_from_esd(row, w, evals, conv, schatten, method, return_esd, fit_kwargs,
                         gram32)


def _spectrum(w: torch.Tensor, conv: ConvMode, name: str, method, gram32: bool
              ) -> torch.Tensor:
    """The ESD of ``w``: :func:`~.batched.gram32_esd` (``gram32``) or ``esd``."""
    return (gram32_esd(w, conv=conv, name=name) if gram32
            else esd(w, conv=conv, name=name, method=method))


def _row_from_esd(row: WeightRow, w: torch.Tensor, evals: torch.Tensor, conv: ConvMode,
                  schatten, method, return_esd: bool, fit_kwargs: dict, gram32: bool = False
                  ) -> tuple[dict[str, float], np.ndarray | None]:
    """Metrics and WeightWatcher columns of ``w`` from its (CPU) ESD ``evals`` (``gram32``:
    the numerical-rank cut of a float32 Gram matrix; a randomised ESD from ``w`` in
    ``evals``' float64)."""
    ww_opts, fit_kwargs = split_ww_options(fit_kwargs)
    if gram32 and ww_opts.get("randomize", False) is not False:
        w = w.to(evals.dtype)
    with torch.no_grad():
        rank = rank_settings(w.shape, conv, method, torch.float32 if gram32 else evals.dtype)
        m = metrics_from_esd(evals, schatten=schatten, name=row.name, **rank, **fit_kwargs)
        out = {k: float(v) for k, v in m.items()}
        out.update(ww_columns(w, out, ww_opts, conv=conv, method=method, name=row.name,
                              evals=evals))
        spectrum = evals.cpu().numpy() if return_esd else None
    return out, spectrum


def _batch_rows(rows: list[WeightRow], positions: list[int], dtype: torch.dtype,
                conv: ConvMode, schatten, method, return_esd: bool, fit_kwargs: dict,
                device: torch.device | None, gram32: bool = False
                ) -> Iterator[tuple[int, tuple | Exception]]:
    """``(position, (metrics, esd) or the error)`` of each row of one batch of equal 2-D
    shapes: read one after another into one stack, one batched ``eigvalsh``
    (:func:`~bayes_spectral.diagnostics.batched.batch_esd`); a row that fails alone."""
    args = (conv, schatten, method, return_esd, fit_kwargs)
    if len(rows) == 1:
        try:
            yield positions[0], _one_layer(rows[0], dtype, *args, device=device,
                                           gram32=gram32)
        except _ROW_ERRORS as err:
            yield positions[0], err
        return
    stack = torch.empty((len(rows), *rows[0].shape),
                        dtype=torch.float32 if gram32 else dtype)
    got: list[tuple[WeightRow, int]] = []
    for row, pos in zip(rows, positions, strict=True):
        try:
            raw = row.read().detach()
            check_tensor_storage(raw, f"weight of layer {row.name!r}")
            check_finite_fast(raw, row.name)
            stack[len(got)].copy_(raw)
            got.append((row, pos))
        except _ROW_ERRORS as err:
            yield pos, err
        raw = None  # a file's tensor: only the copy in the stack stays
    stack = stack[: len(got)]
    try:
        with torch.no_grad():
            evals = batch_esd(stack, method, device, gram32=gram32)
    except ValueError:  # e.g. one Gram matrix overflows: each row alone names its error
        evals = None
    for i, (row, pos) in enumerate(got):
        try:
            if evals is None:
                with torch.no_grad():
                    ev = _spectrum(stack[i].to(device), conv, row.name, method,
                                   gram32).to("cpu")
            else:
                ev = evals[i].clone()
                _check_squares(ev.sqrt(), ev, row.name)
            yield pos, _row_from_esd(row, stack[i], ev, *args, gram32)
        except _ROW_ERRORS as err:
            yield pos, err


def _layer_metrics(kept: list[WeightRow], dtype: torch.dtype,
                   conv: ConvMode, schatten: tuple[float, ...], method: SpectrumMethod,
                   return_esd: bool, fit_kwargs: dict, store: ResumeStore | None = None,
                   on_row=None, bar: bool | None = False, strict: bool = False,
                   device: torch.device | None = _CPU, batch: bool = True,
                   gram32: bool = False
                   ) -> tuple[list[dict[str, float]], list[np.ndarray], list[WeightRow],
                              list[tuple[str, str]]]:
    """Per layer, in order: its metrics as floats and (``return_esd``) its ESD, both of
    the weight cast to ``dtype``; a layer that fails is left out with a warning naming it
    (``strict``: a file's unreadable or non-finite tensor raises). Rows in ``store`` are
    read back; the others computed in batches of equal shape (``batch``, :func:`~bayes_
    spectral.diagnostics.batched.plan_batches`), saved there, then passed to ``on_row(name,
    metrics)``. Returns ``(metrics, spectra, rows analysed, [(name, reason) of the failed
    ones])``."""
    results: dict[int, tuple] = {}
    todo = []
    for pos, row in enumerate(kept):
        got = store.get(row.name) if store is not None else None
        if got is None:
            todo.append(pos)
        else:
            results[pos] = got
    computed = _computed(kept, todo, dtype, conv, schatten, method,
                         return_esd or store is not None, fit_kwargs, device, batch, gram32)
    for pos, result in progress_bar(computed, len(todo), bar):
        row = kept[pos]
        if isinstance(result, Exception):
            if strict and isinstance(result, (UnreadableFileError, NonFiniteTensorError)):
                raise result
            reason = (str(result).strip().splitlines() or [type(result).__name__])[0]
            results[pos] = reason
            warnings.warn(f"analyze(): layer {row.name!r} could not be analysed and is left "
                          f"out: {reason}", stacklevel=4)
            continue
        results[pos] = result
        if store is not None:
            store.save(pos, row.name, *result)
        if on_row is not None:
            on_row(row.name, result[0])
    return _in_order(kept, results, return_esd)


def _computed(kept, todo, dtype, conv, schatten, method, keep_esd, fit_kwargs, device,
              batch: bool, gram32: bool = False) -> Iterator[tuple[int, tuple | Exception]]:
    """``(position, result or error)`` of the rows at ``todo``, in order: a row's whole
    batch is computed when the row is reached, the later members' results kept until
    theirs (so resume files and ``on_row`` follow the rows' order)."""
    plan = plan_batches([kept[p].shape for p in todo],
                        BATCH_CAP if batch and device is not None else 0)
    batch_of = {todo[i]: members for members in plan for i in members}
    pending: dict[int, tuple | Exception] = {}
    for pos in todo:
        if pos not in pending:
            positions = [todo[i] for i in batch_of[pos]]
            pending.update(_batch_rows([kept[p] for p in positions], positions, dtype, conv,
                                       schatten, method, keep_esd, fit_kwargs, device,
                                       gram32))
        yield pos, pending.pop(pos)


def _in_order(kept, results: dict, return_esd: bool):
    """``(metrics, spectra, rows, failed)`` in the rows' order (a str result: failed)."""
    rows, spectra, done, failed = [], [], [], []
    for pos, row in enumerate(kept):
        result = results[pos]
        if isinstance(result, str):
            failed.append((row.name, result))
            continue
        rows.append(result[0])
        done.append(row)
        if return_esd:
            spectra.append(result[1])
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
