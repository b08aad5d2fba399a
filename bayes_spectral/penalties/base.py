"""The penalty protocol: a callable on a weight (or on every weight layer of a module)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable

import torch
from torch import nn

from .._checks import check_weight
from ..select import LeftOut, View, WeightRow, parameter_view
from ..spectra.subspace import TopEigen

__all__ = ["Penalty", "check_finite", "layer_states", "min_evals_of", "penalty_rows",
           "restored_top_eigen", "weight_layers_of"]

#: row kinds a default selection leaves out (no matrix rule: e.g. a 3-D position table)
NO_MATRIX_RULE = ("ParamNd",)


def weight_layers_of(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, weight)`` of every row of the parameter view of ``module`` (a split row's
    weight is its slice, with graph); see :func:`bayes_spectral.select.parameter_view`."""
    return [(row.name, row.read()) for row in parameter_view(module).rows]


def min_evals_of(penalty: Penalty) -> int:
    """Eigenvalues a penalty needs on one layer: its ``min_evals`` (tail fits), through
    schedule wrappers (``inner``); 1 otherwise."""
    while not hasattr(penalty, "min_evals") and hasattr(penalty, "inner"):
        penalty = penalty.inner
    return int(getattr(penalty, "min_evals", 1))


def _too_small(rows: list[WeightRow], penalty: Penalty) -> list[tuple[WeightRow, str]]:
    """Rows the penalty cannot act on, with the reason."""
    need, conv = min_evals_of(penalty), getattr(penalty, "conv", "pool")
    out = []
    for r in rows:
        if r.kind in NO_MATRIX_RULE:
            out.append((r, f"a {len(r.shape)}-D parameter that is not a weight "
                           "(no matrix rule)"))
        elif r.num_evals(conv) < need:
            out.append((r, f"{r.num_evals(conv)} eigenvalues, the {penalty.label} penalty "
                           f"needs >= {need}"))
    return out


def penalty_rows(model: nn.Module, penalty: Penalty, *,
                 types: type | tuple[type, ...] | None = None,
                 names: str | Iterable[str] | None = None, pattern: str | None = None,
                 hide: type | tuple[type, ...] = (), what: str = "Regularizer") -> View:
    """The rows ``penalty`` acts on: the parameter view's selection (the one rule of
    :func:`~bayes_spectral.select.parameter_view`).

    With no criterion given, rows with too few eigenvalues for the penalty (weighted alpha
    on ``Linear(h, 1)``: 1) or without a matrix rule are left out with a warning naming
    them; an explicit selection of such a row raises.

    :raises ValueError: an explicitly selected row with too few eigenvalues; a default
        selection that leaves nothing.
    """
    view = parameter_view(model, types=types, names=names, pattern=pattern, hide=hide,
                          what=what)
    small = _too_small(view.rows, penalty)
    explicit = types is not None or names is not None or pattern is not None
    if explicit:
        small = [(r, why) for r, why in small if r.kind not in NO_MATRIX_RULE]
    if small and explicit:
        raise ValueError(f"{what}: selected layers the penalty cannot act on: "
                         + "; ".join(f"{r.name!r} ({why})" for r, why in small))
    if small:
        warnings.warn(f"{what}: left out " + "; ".join(f"{r.name!r} ({why})" for r, why in small),
                      stacklevel=3)
    out = {r.name for r, _ in small}
    rows = [r for r in view.rows if r.name not in out]
    if not rows:
        raise ValueError(f"{what}: {type(model).__name__} has no weight the "
                         f"{penalty.label} penalty can act on (left out: {view.left_out})")
    return View(rows, view.left_out + [LeftOut(r.name, why) for r, why in small])


def layer_states(state: dict, owner: str, parts: tuple[str, ...]) -> dict[str, dict]:
    """``state["layers"]`` (``{layer: {part: ...}}``, ``{}`` if absent), checked: a dict of
    dicts whose keys are among ``parts``; ValueError naming ``owner`` and the layer."""
    if not isinstance(state, dict):
        raise ValueError(f"{owner}: a penalty state is a dict, got {type(state).__name__}")
    layers = state.get("layers", {})
    if not isinstance(layers, dict):
        raise ValueError(f"{owner}: state['layers'] must map layer names to dicts, got "
                         f"{type(layers).__name__}")
    for name, st in layers.items():
        if not isinstance(st, dict):
            raise ValueError(f"{owner}: the state of layer {name!r} is a "
                             f"{type(st).__name__}, not a dict")
        unknown = sorted(set(st) - set(parts))
        if unknown:
            raise ValueError(f"{owner}: the state of layer {name!r} holds {unknown}, this "
                             f"penalty keeps {list(parts)}")
    return layers


def restored_top_eigen(state: dict, owner: str, layer: str, *, block: int, power_iters: int,
                       seed: int) -> TopEigen:
    """A :class:`TopEigen` (``block`` columns) holding ``state``, its ``state_dict``; a
    ValueError naming ``owner``, the layer and the block width when it cannot."""
    top = TopEigen(block, power_iters, seed=seed)
    try:
        top.load_state_dict(state)
    except (ValueError, AttributeError) as err:
        raise ValueError(f"{owner}: layer {layer!r}: {err} (block={block})") from err
    return top


def check_finite(value: torch.Tensor, name: str | None, what: str) -> torch.Tensor:
    """Raise a ValueError naming the layer if a penalty value is NaN or Inf."""
    if not bool(torch.isfinite(value).all()):
        where = f" of layer {name!r}" if name else ""
        raise ValueError(f"{what} penalty{where} is not finite ({float(value.detach())}); "
                         "check the weight scale and the hyperparameters")
    return value


class Penalty:
    """Base class: ``penalty(weight, name=None)`` or ``penalty(module)`` -> scalar tensor.

    Subclasses implement :meth:`weight_penalty` for one weight tensor. Calling on an
    ``nn.Module`` sums over the rows of its parameter view (:func:`penalty_rows`: every
    matrix weight, attention and recurrent ones included; biases and norms are never
    penalised); use :class:`~bayes_spectral.penalties.Regularizer` to select layers and log
    per-layer values. ``name`` identifies the layer in errors and keys the per-layer state
    of stateful penalties (power iteration vectors, tracked subspaces).
    """

    label = "penalty"
    #: whether the penalty keeps state between calls that a resumed run needs (trackers,
    #: power-iteration vectors, fast-mode blocks): see :meth:`state_dict`
    stateful = False

    def state_dict(self) -> dict:
        """The state kept between calls, as tensors and plain data (``{}``: none), for
        checkpoints (``torch.save`` / ``torch.load(weights_only=True)``). A wrapper's holds
        its own state only (:meth:`Regularizer.state_dict` walks the ``inner`` chain).
        A custom penalty that keeps state overrides this and :meth:`_restored`, and sets
        ``stateful``."""
        return {}

    def check_state(self, state: dict) -> None:
        """Raise a ValueError if ``state`` cannot be this penalty's :meth:`state_dict`
        (changes nothing)."""
        self._restored(state)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (checked in full first: a refused state changes
        nothing)."""
        vars(self).update(self._restored(state))

    def _restored(self, state: dict) -> dict:
        """The attributes :meth:`load_state_dict` sets from ``state``, built and checked
        without touching ``self`` (a ValueError naming what is wrong)."""
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state, got {sorted(state)}")
        return {}

    def weight_penalty(self, weight: torch.Tensor, name: str | None = None) -> torch.Tensor:
        raise NotImplementedError

    def set_epoch(self, epoch: int) -> None:
        """Hook for schedules; plain penalties ignore it."""

    def __call__(self, target: torch.Tensor | nn.Module, name: str | None = None) -> torch.Tensor:
        if isinstance(target, nn.Module):
            rows = penalty_rows(target, self, what=f"{type(self).__name__}(module)").rows
            return torch.stack([self(r.read(), name=r.name) for r in rows]).sum()
        if not isinstance(target, torch.Tensor) or not target.is_floating_point() \
                or target.dim() < 2:
            check_weight(target, name)  # raises the clear TypeError / ValueError
        # Hot path: no pass over the weight for finiteness; a non-finite weight shows up as
        # a non-finite value (or a linalg failure) and is diagnosed then, naming the layer.
        try:
            value = self.weight_penalty(target, name)
        except RuntimeError:
            check_weight(target, name)
            raise
        return self._checked_value(value, target, name)

    def accumulate_grad(self, weight: torch.Tensor, grad: torch.Tensor, name: str | None = None,
                        scale: float = 1.0) -> torch.Tensor:
        """``grad += scale * dR/dW`` in place; returns ``scale * R(W)`` (detached).

        The penalty's gradient without a graph through the training loss: call it after
        ``loss.backward()`` (see :meth:`Regularizer.accumulate_grad`). This default runs
        autograd on a detached copy of ``weight`` (right for every penalty, and advances
        stateful ones exactly as a call does); penalties with a closed-form gradient
        override it with one fused in-place update (weight decay: ``grad += scale coef W``;
        spectral norm: ``grad += scale coef sigma u v^T``).
        """
        leaf = weight.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self(leaf, name=name)
        if value.requires_grad:
            (g,) = torch.autograd.grad(value, leaf)
            grad.add_(g, alpha=scale)
        return scale * value.detach()

    def _checked_value(self, value: torch.Tensor, weight: torch.Tensor,
                       name: str | None) -> torch.Tensor:
        """The finiteness check of ``__call__`` for values computed without it (one device
        sync per layer; a non-finite value is diagnosed, naming the layer)."""
        if bool(torch.isfinite(value).all()):
            return value
        check_weight(weight, name)  # raises for a non-finite weight
        return check_finite(value, name, self.label)  # raises

    @staticmethod
    def _key(weight: torch.Tensor, name: str | None) -> str:
        return name if name is not None else f"id{id(weight)}"

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"
