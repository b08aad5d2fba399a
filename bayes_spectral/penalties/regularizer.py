"""Attach a penalty to selected layers of any ``nn.Module``: ``loss = task + reg(model)``."""

from __future__ import annotations

import numbers
import weakref
from collections.abc import Iterable

import torch
from torch import nn

from ..select import LeftOut, WeightRow
from .base import Penalty, penalty_rows
from .fused import Cadence
from .fused_rows import BATCH_MODES, DEFAULT

__all__ = ["Regularizer"]


def _sliced_param(row: WeightRow) -> nn.Parameter | None:
    """The parameter of a row that is a dim-0 slice of it (``in_proj_weight[q]``, a
    recurrent gate), else ``None``: its gradient is added to the parameter's ``.grad``
    slice directly (what autograd of the slice adds, without the graph)."""
    if not isinstance(row.index, slice) or row.module is None:
        return None
    full = row.module._parameters.get(row.attr)
    leaves = row.leaves()
    ok = isinstance(full, nn.Parameter) and len(leaves) == 1 and leaves[0] is full
    return full if ok else None


class Regularizer:
    """A penalty applied to the selected weights of ``model``, with a per-layer log.

    The weights are the rows of the parameter view
    (:func:`bayes_spectral.select.parameter_view`: Linear, Conv, Embedding, attention
    ``in_proj_weight[q]`` / ``[k]`` / ``[v]`` and ``out_proj``, recurrent matrices,
    parametrized weights by their effective value). Selection (all given criteria must
    hold; none given = every row the penalty can act on):

    * ``types``: module classes (e.g. ``nn.Linear``); ``hide``: module classes left out;
    * ``names``: exact row, module or full parameter names;
    * ``pattern``: the one regex rule, ``re.fullmatch`` on the module name, the full
      parameter name or the row name (``"attn.*"``: every weight under ``attn``).

    The default selection leaves out, with a warning, rows with too few eigenvalues for
    the penalty (weighted alpha on a one-output head ``Linear(h, 1)``: 1 eigenvalue);
    selecting such a row explicitly raises a ValueError naming it, as do unknown names, a
    pattern or type that selects nothing, and selected modules without a ``>= 2``-D weight.
    ``reg(model)`` (or ``reg()``) returns the summed penalty; ``reg.loss(task_loss)``
    returns ``task_loss + reg(model)``. ``layers``: ``{name: WeightRow}``; ``left_out``:
    what was not selected and why. ``history[layer]`` lists the penalty value of every
    call (``log=False`` to skip; the values are read back with one device sync per call).
    ``set_epoch`` is forwarded to the penalty (schedules).

    Lazy regularisation (``every=k``, as StyleGAN2's lazy R1): calls ``0, k, 2k, ...``
    (counted by ``calls``, in :meth:`state_dict`) evaluate the penalty and return
    ``k * R(W)`` (``accumulate_grad``: add ``k * scale * dR/dW``); the others return a zero
    scalar on the weights' device/dtype and touch no ``.grad`` (no penalty work, no device
    sync: the decision is on the Python counter). Over a window of ``k`` calls the summed
    gradient is ``k dR/dW(W_t)`` instead of ``sum_j dR/dW(W_{t+j})``: unbiased only as far
    as the weights stay put within the window (the bias is ``O(k * lr)``). ``history`` gets
    one entry per evaluating call, the unscaled ``R`` (``scale * R`` for ``accumulate_grad``).
    With SGD the penalty's average pull is that of ``every=1``. Adam's update is invariant
    to one constant factor on *all* gradients; here only the penalty part is multiplied by
    ``k``, on one step in ``k``. The second moment ``v`` then holds the spike's average:
    where ``g_R`` dominates a coordinate ``v ~ k g_R^2`` while ``m`` averages ``g_R``, so
    that coordinate moves ``~lr / sqrt(k)`` per step instead of ``lr`` (the transient is
    ``sqrt(k)`` times slower). Where Adam settles nothing changes: ``m ~ 0`` where the
    window-averaged gradient, equal to the exact one, vanishes; measured on digits
    (``tests/penalties/test_lazy.py``, Adam, 8 epochs, ``every=8``) the penalty's effect is
    0.89-1.01 of the exact path's (weight decay, spectral norm with 30 power iterations).
    A warm-started tracker (spectral norm's one power iteration, tracked tails) advances
    once per window, so it is less converged: spectral norm ``n_iter=1`` measured 0.4-0.9.

    Checkpoints: :meth:`state_dict` holds the counter, the selected layers' shapes and the
    state of every penalty in the wrapper chain (:meth:`penalties`; index 0 the penalty
    given, then its ``inner`` ones): tail trackers (``tracked=True``), spectral norm's
    power-iteration vectors, the fast modes' warm-started blocks, weighted alpha's Hill
    refresh counters / held ``xmin`` and the probe generators, keyed by layer name; tensors
    and plain data only (``torch.save`` / ``torch.load(weights_only=True)``; safetensors
    through :func:`bayes_spectral.penalties.state.flatten_state`). Saved with the model and
    optimiser and loaded into freshly built objects (:meth:`load_state_dict`, which refuses
    a state of other layers, shapes or penalties, naming them), the resumed run equals the
    uninterrupted one bit for bit on the same device (``tests/penalties/
    test_regularizer_state.py``). ``history`` is not saved.

    Fused penalties (``SpectralNorm``, ``FrechetPrior``, ``StableRank`` with
    ``mode="fused"``) hook the selected ``nn.Linear`` layers (listed in :attr:`fused`): their
    gradient is added during the
    layers' own backward, ``reg()`` / ``accumulate_grad()`` only return (and log) their
    value. The hooks stay until :meth:`remove_hooks`, the end of a ``with Regularizer(...)``
    block or this Regularizer's garbage collection. With ``every=k`` the hooks share the call
    counter (:class:`~bayes_spectral.penalties.fused.Cadence`): a layer's forward that runs
    before call ``c`` (call ``reg()`` / ``accumulate_grad`` after the forward, once per step,
    as with ``every=1``) is due when ``c % k == 0``; its backward adds ``k`` times the penalty
    gradient, the same semantics and bias as above. Off steps do no penalty work at all (the
    hooks return at once; Python counter, no device sync); a due step first runs
    ``min(k - 1, 4)`` extra power / block steps at the current weights, so that the
    iteration has caught up with the ``k`` optimiser steps it skipped. Measured against
    running the iteration on every step and skipping only the gradient (``Cadence(off=
    "iterate")``), on the digits Adam trajectory (``tests/penalties/test_fused_every.py``,
    every=8, due steps from 20): Frechet 3.5e-5 vs 7.3e-5 relative, stable rank 4.0e-4 vs
    1.4e-4 (cosine >= 0.998 both), and amortised per step over plain (interleaved, 1
    thread, 3 runs on MLPs 784-512-512-10 / 784-1024-1024-10) spectral norm 1.00-1.08x vs
    1.03-1.12x, Frechet 1.01-1.15x vs 1.09-1.21x, stable rank 1.01-1.15x vs 1.12-1.23x:
    skipping is the default. Without the catch-up the stable-rank value was 0.21 off.

    ``batch`` (fused penalties: ``FrechetPrior`` / ``StableRank`` / ``SpectralNorm``
    ``mode="fused"``, either block width): ``accumulate_grad`` runs the step of every
    row no hook served (small layers under ``fuse_min``, attention slices, recurrent
    matrices, ``conv="flatten"`` kernels) in one batched pass
    (:mod:`~bayes_spectral.penalties.fused_rows`) instead of one row at a time, equal to it
    to rounding (float64: value, gradient and state within 1e-12 relative; the state stays
    per layer, resumes bit for bit). ``True`` / ``"pad"``: the rows zero-padded to one
    stack per device / dtype (grouped by shape where padding would more than double the
    entries), ``"shape"``: one stack per exact shape, ``False``: one row at a time; a
    bucket of one row takes the per-row step. Measured on the own-models nets (1 thread,
    ``accumulate_grad`` alone, transformer / LSTM / dropout MLP, Frechet): per row 2.46 /
    0.78 / 0.53 ms, padded 0.85 / 0.50 / 0.42 ms, by shape 1.91 / 0.90 / 0.62 ms; per step
    over plain (``bench_penalties.py --rows own``) transformer 1.8-1.9x -> 1.15-1.19x,
    LSTM 1.75-1.79x -> 1.38-1.45x.
    """

    def __init__(self, model: nn.Module, penalty: Penalty, *,
                 types: type | tuple[type, ...] | None = None,
                 names: str | Iterable[str] | None = None,
                 pattern: str | None = None, hide: type | tuple[type, ...] = (),
                 log: bool = True, every: int = 1, batch: bool | str = True) -> None:
        if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
            raise ValueError(f"Regularizer: every must be an integer >= 1 (apply the penalty "
                             f"every k-th call, scaled by k), got {every!r}")
        if not (isinstance(batch, bool) or isinstance(batch, str) and batch in BATCH_MODES):
            raise ValueError(f"Regularizer: batch must be True, False, 'pad' or 'shape' (the "
                             f"fused penalties' unhooked rows in one batched pass), got "
                             f"{batch!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"Regularizer needs an nn.Module, got {type(model).__name__}")
        if not isinstance(penalty, Penalty):
            raise TypeError(f"penalty must be a Penalty, got {type(penalty).__name__}")
        self.model = model
        self.penalty = penalty
        self.log = bool(log)
        self.every = int(every)
        self.batch = DEFAULT if batch is True else batch
        # calls so far (self.calls); call c evaluates the penalty when c % every == 0; shared
        # with fused hooks, which add the gradient in the backward of a due step
        self._cadence = Cadence(self.every)
        view = penalty_rows(model, penalty, types=types, names=names, pattern=pattern,
                            hide=hide)
        self.layers: dict[str, WeightRow] = view.by_name()
        self.left_out: list[LeftOut] = view.left_out
        self.history: dict[str, list[float]] = {n: [] for n in self.layers}
        self._hooks = self._attach(penalty)

    def _attach(self, penalty: Penalty):
        """The penalty's hooks on the selected layers (``penalty.attach``: spectral
        norm's ``mode="fused"``), removed with :meth:`remove_hooks`, on leaving a ``with``
        block or when this Regularizer is garbage-collected; ``None`` if it has none."""
        attach = getattr(penalty, "attach", None)
        if not callable(attach):
            return None
        # every=k: the hooks share the call counter (a penalty's attach(rows, cadence=...))
        hooks = attach(self.layers) if self.every == 1 else \
            attach(self.layers, cadence=self._cadence)
        if hooks is None:
            return None
        weakref.finalize(self, hooks.remove)
        return hooks

    @property
    def calls(self) -> int:
        """Calls so far (``reg()`` / ``accumulate_grad``); call ``c`` is due when ``c % every
        == 0``."""
        return self._cadence.calls

    @calls.setter
    def calls(self, value: int) -> None:
        self._cadence.calls = int(value)

    @property
    def fused(self) -> list[str]:
        """The layers whose penalty gradient rides along with their own forward/backward
        (hooks installed)."""
        return [] if self._hooks is None else list(self._hooks.names)

    def remove_hooks(self) -> None:
        """Take the penalty's hooks off the model (plain layers again; the fused spectral
        norm then runs its two matrix-vector products in ``accumulate_grad``)."""
        if self._hooks is not None:
            self._hooks.remove()

    def __enter__(self) -> Regularizer:
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def set_epoch(self, epoch: int) -> None:
        self.penalty.set_epoch(epoch)

    def penalties(self) -> list[Penalty]:
        """The penalty and, through wrappers (``inner``), every penalty it wraps: index
        ``i`` of :meth:`state_dict`'s ``penalties``."""
        out, p = [], self.penalty
        while isinstance(p, Penalty):
            out.append(p)
            p = getattr(p, "inner", None)
        return out

    def state_dict(self) -> dict:
        """Everything a resumed run needs, as tensors and plain data (no pickled object):
        ``calls`` (the lazy counter), ``layers`` (``{name: shape}`` of the selected rows)
        and ``penalties``, one ``{"type": class name, "state": penalty.state_dict()}`` per
        entry of :meth:`penalties` (tail trackers, power-iteration vectors, fast-mode
        blocks, refresh counters and probe generators, keyed by layer name). Copies: later
        calls do not change it. ``history`` is a log and is not included."""
        return {"calls": self.calls,
                "layers": {n: list(row.shape) for n, row in self.layers.items()},
                "penalties": [{"type": type(p).__name__, "state": p.state_dict()}
                              for p in self.penalties()]}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into this Regularizer and its penalties.

        Checked in full before anything changes: a state of another penalty list (type by
        index), of other layers (selected names) or shapes, or of another penalty mode is
        a ValueError naming what differs. A counter-only state (``{"calls": c}``) is
        accepted when no penalty keeps state, and refused otherwise (the trackers would
        restart: not the uninterrupted run).
        """
        if not isinstance(state, dict) or "calls" not in state:
            raise ValueError("Regularizer.load_state_dict: expected the dict of "
                             f"Regularizer.state_dict() (with 'calls'), got {state!r:.80}")
        chain = self.penalties()
        if "penalties" not in state:
            stateful = [f"{type(p).__name__} (penalty {i})" for i, p in enumerate(chain)
                        if p.stateful]
            if stateful:
                raise ValueError(
                    f"Regularizer.load_state_dict: {stateful[0]} keeps state between calls "
                    "(trackers, power-iteration vectors, fast-mode blocks), but the state holds "
                    "no penalty state (only the call counter): resuming without it is not the "
                    "uninterrupted run; save Regularizer.state_dict() with its penalties")
            self.calls = int(state["calls"])
            return
        entries = self._checked_entries(state["penalties"], chain)
        self._check_layers(state.get("layers"))
        for i, (p, st) in enumerate(zip(chain, entries, strict=True)):
            try:
                p.check_state(st)
            except ValueError as err:
                raise ValueError(f"Regularizer.load_state_dict: penalty {i} "
                                 f"({type(p).__name__}): {err}") from err
        for p, st in zip(chain, entries, strict=True):
            p.load_state_dict(st)
        self.calls = int(state["calls"])

    @staticmethod
    def _checked_entries(entries, chain: list[Penalty]) -> list[dict]:
        """The penalties' states of ``entries``; a ValueError naming the first index whose
        type differs from ``chain``'s."""
        ok = isinstance(entries, list) and all(
            isinstance(e, dict) and "type" in e and "state" in e for e in entries)
        if not ok:
            raise ValueError("Regularizer.load_state_dict: state['penalties'] must be a list "
                             "of {'type', 'state'} dicts")
        saved = [e["type"] for e in entries]
        here = [type(p).__name__ for p in chain]
        if saved != here:
            pairs = zip(saved, here, strict=False)  # the shorter list ends the comparison
            i = next((j for j, (a, b) in enumerate(pairs) if a != b), min(len(saved), len(here)))
            a = saved[i] if i < len(saved) else "absent"
            b = here[i] if i < len(here) else "absent"
            raise ValueError(f"Regularizer.load_state_dict: the state belongs to another "
                             f"penalty list: penalty {i} is {a} in the state, {b} here "
                             f"(state: {saved}, this Regularizer: {here})")
        return [e["state"] for e in entries]

    def _check_layers(self, layers) -> None:
        """A ValueError listing every layer of the state that is not selected here, every
        selected layer missing from it and every shape that differs."""
        if not isinstance(layers, dict):
            raise ValueError("Regularizer.load_state_dict: state['layers'] must map layer "
                             f"names to shapes, got {type(layers).__name__}")
        problems = []
        for n, shape in layers.items():
            row = self.layers.get(n)
            if row is None:
                problems.append(f"layer {n!r} is in the state but not selected here "
                                f"(selected: {list(self.layers)})")
            elif tuple(shape) != tuple(row.shape):
                problems.append(f"layer {n!r}: the state is for shape {tuple(shape)}, this "
                                f"model's is {tuple(row.shape)}")
        problems += [f"layer {n!r} is selected here but not in the state" for n in self.layers
                     if n not in layers]
        if problems:
            raise ValueError("Regularizer.load_state_dict: the state belongs to other layers: "
                             + "; ".join(problems))

    def _due(self) -> bool:
        """Advance the call counter; whether this call evaluates the penalty (Python
        arithmetic only, never a tensor read)."""
        due = self.calls % self.every == 0
        self.calls += 1
        return due

    def _zero(self) -> torch.Tensor:
        """The value of a skipped call: ``0`` on the first weight's device and dtype."""
        w = next(iter(self.layers.values())).leaves()[0]
        return torch.zeros((), device=w.device, dtype=w.dtype)

    def per_layer(self) -> dict[str, torch.Tensor]:
        """Penalty of every selected layer (scalar tensors, with graph)."""
        out = {}
        for n, row in self.layers.items():
            out[n] = self.penalty(row.read(), name=n)  # checked for finiteness, naming n
        return out

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        if model is not None and model is not self.model:
            raise ValueError("this Regularizer is attached to another model")
        if not self._due():
            return self._zero()
        total = self._record(self.per_layer())
        return total if self.every == 1 else total * self.every

    def _record(self, vals: dict[str, torch.Tensor], factor: int = 1) -> torch.Tensor:
        """Log the per-layer values divided by ``factor`` (one device sync) and return
        their sum."""
        if self.log:
            logged = torch.stack([v.detach() for v in vals.values()])
            floats = (logged if factor == 1 else logged / factor).tolist()
            for n, f in zip(vals, floats, strict=True):
                self.history[n].append(f)
        return torch.stack(list(vals.values())).sum()

    def accumulate_grad(self, scale: float = 1.0) -> torch.Tensor:
        """After ``task_loss.backward()``: add ``scale * dR/dW`` to every selected weight's
        ``.grad`` in place (allocated if ``None``) and return ``scale * R`` (detached).

        The same update as ``(task_loss + scale * reg()).backward()`` (tested to float64
        round-off; a frozen weight, ``requires_grad=False``, gets no ``.grad`` on either
        path, but its penalty counts in the returned value) without a graph through the
        penalty: weight decay and spectral norm then cost one fused pass over each weight
        instead of autograd's extra gradient buffers and accumulation
        (``benchmarks/bench_penalties.py``, rows ``[grad]``). With ``every=k``: every
        k-th call adds ``k * scale * dR/dW`` and returns ``k * scale * R``, the others add
        nothing and return ``0`` (class docstring).
        """
        if not self._due():
            return self._zero()
        scale = scale * self.every if self.every != 1 else scale
        vals = {}
        batched, read = self._accumulate_rows(scale)
        for n, row in self.layers.items():
            if n in batched:
                vals[n] = batched[n]
            elif row.is_leaf():
                w = row.leaves()[0]
                if not w.requires_grad:  # frozen: its value counts, its .grad stays as is
                    vals[n] = self.penalty.accumulate_grad(w, torch.zeros_like(w), name=n,
                                                           scale=scale)
                    continue
                if w.grad is None:
                    w.grad = torch.zeros_like(w)
                vals[n] = self.penalty.accumulate_grad(w, w.grad, name=n, scale=scale)
            else:
                vals[n] = self._accumulate_view(row, scale, read.get(n))
        return self._record(vals, self.every)

    def _accumulate_rows(self, scale: float) -> tuple[dict, dict]:
        """``batch``: the penalty's batched step (``accumulate_grad_rows``: the fused rank-one
        penalties' unhooked rows, :mod:`~bayes_spectral.penalties.fused_rows`) on every row
        it takes; a slice / parametrized row's gradient is pulled back by autograd. Returns
        ``({name: scale R} of the rows taken, {name: value with graph} of the parametrized
        rows it read but did not take, for :meth:`_accumulate_view`)."""
        rows_fn = getattr(self.penalty, "accumulate_grad_rows", None)
        if not self.batch or not callable(rows_fn) \
                or not getattr(self.penalty, "batches_rows", False):
            return {}, {}
        items, views = [], {}
        for n, row in self.layers.items():
            w = _sliced_param(row)
            if row.is_leaf() or w is not None:
                w = row.leaves()[0] if w is None else w
                if w.requires_grad and w.grad is None:
                    w.grad = torch.zeros_like(w)
                g = w.grad if w.requires_grad else None
                if row.index is not None:  # a dim-0 slice of a parameter: its grad's slice
                    w, g = w.detach()[row.index], None if g is None else g[row.index]
                items.append((n, w, g))
            else:
                with torch.enable_grad():
                    views[n] = row.read()
                items.append((n, views[n].detach(), None))
        got = rows_fn(items, scale, mode=self.batch)
        for n, value in views.items():
            if n in got and value.requires_grad:
                value.backward(got[n][1].view(value.shape))
        return ({n: v for n, (v, _) in got.items()},
                {n: value for n, value in views.items() if n not in got})

    def _accumulate_view(self, row: WeightRow, scale: float,
                         value: torch.Tensor | None = None) -> torch.Tensor:
        """A slice or parametrized row: the penalty's gradient ``G`` w.r.t. the row's value
        (``value``: already read, with graph), then ``G`` pulled back to the parameters by
        autograd (``sum(W * G)`` backward: the slice of ``in_proj_weight``, a
        parametrization's originals)."""
        if value is None:
            with torch.enable_grad():
                value = row.read()
        g = torch.zeros_like(value, memory_format=torch.contiguous_format)
        out = self.penalty.accumulate_grad(value.detach(), g, name=row.name, scale=scale)
        if value.requires_grad:
            value.backward(g)
        return out

    def loss(self, task_loss: torch.Tensor) -> torch.Tensor:
        """``task_loss + reg(model)``."""
        return task_loss + self()
