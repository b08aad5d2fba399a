"""Layer 4: the NaN/Inf guard of the MAP/SVI step.

:func:`guarded_step` performs the operations of ``pyro.infer.SVI.step`` (loss and gradients,
optimiser update, zeroed gradients) but checks the parameters, the loss and the gradients
*before* the update. On the first non-finite value it raises :class:`NonFiniteError` naming
the parameter or sample site and its layer, with the update not applied, so the parameters
keep their last finite values. A distribution that refuses its parameters during the step
(Pyro's validation ``ValueError``, e.g. a softplus scale underflowed to 0) becomes a
``NonFiniteError`` naming the parameter that left its support; with every parameter finite,
it names the forward pass instead (the largest parameter and the likely cause).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import SVI

__all__ = ["NonFiniteError", "guarded_step"]


class NonFiniteError(FloatingPointError):
    """A loss or parameter became NaN/Inf. Attributes: ``site``, ``layer``, ``epoch``,
    ``step``, ``checkpoint`` (path of the last good checkpoint or ``None``)."""

    def __init__(self, message, site=None, layer=None, epoch=None, step=None, checkpoint=None):
        super().__init__(message)
        self.site, self.layer, self.epoch, self.step = site, layer, epoch, step
        self.checkpoint = checkpoint


@dataclass(frozen=True)
class _Where:
    """Where a step runs: ``epoch`` (0-based), ``step`` and the last good checkpoint."""

    epoch: int
    step: int
    checkpoint: str | None

    @property
    def text(self) -> str:
        return f"epoch {self.epoch + 1}, step {self.step}"

    @property
    def keep(self) -> str:
        return f"; the last good checkpoint is {self.checkpoint}" if self.checkpoint else ""

    def error(self, message: str, site: str | None = None,
              layer: str | None = None) -> NonFiniteError:
        return NonFiniteError(message, site=site, layer=layer, epoch=self.epoch,
                              step=self.step, checkpoint=self.checkpoint)


def layer_of(model, param_name: str) -> str | None:
    """The layer a param-store name or sample site belongs to (``None`` if not found)."""
    base = param_name.split("$$$")[0]
    for layer, site in model.prior_sites.items():
        if site in base or base.endswith(site):
            return layer
    if base.startswith("net."):
        parts = base[4:].split(".")
        return ".".join(parts[:-1]) if len(parts) > 1 else parts[0]
    return None


def nonfinite_sites(model, guide, elbo_args) -> list[str]:
    """Sample sites whose log-density is not finite (guide draw replayed in the model)."""
    bad = []
    try:
        with torch.no_grad():
            gtr = poutine.trace(guide).get_trace(*elbo_args)
            mtr = poutine.trace(poutine.replay(model, trace=gtr)).get_trace(*elbo_args)
            for tr in (gtr, mtr):
                for name, site in tr.nodes.items():
                    if site["type"] != "sample" or name in bad:
                        continue
                    if site["infer"].get("enumerate"):
                        continue
                    lp = site["fn"].log_prob(site["value"])
                    if not bool(torch.isfinite(lp).all()):
                        bad.append(name)
    except Exception:  # pragma: no cover - diagnosis only
        pass
    return bad


def _check_store(model, where: _Where) -> None:
    """Refuse to start a step from a non-finite parameter of the param store."""
    for name, p in pyro.get_param_store().named_parameters():
        if not bool(torch.isfinite(p).all()):
            layer = layer_of(model, name)
            raise where.error(
                f"non-finite value of parameter {name!r} (layer {layer!r}) before "
                f"{where.text}{where.keep}", site=name, layer=layer)


def _param_out_of_support() -> tuple[str, str] | None:
    """``(name, reason)`` of the first param-store entry whose constrained value is not
    finite or lies outside its constraint (e.g. a softplus scale that underflowed to 0)."""
    store = pyro.get_param_store()
    with torch.no_grad():
        for name in list(store.keys()):
            value = store[name]
            if not bool(torch.isfinite(value).all()):
                return name, "is not finite"
            check = store._constraints.get(name)
            if check is not None and not bool(check.check(value).all()):
                return name, f"left its support ({check})"
    return None


def _distribution_error(model, exc: ValueError, where: _Where) -> NonFiniteError:
    """The NonFiniteError for a distribution that refused its parameters during the step:
    naming the parameter that overflowed (or left its support), or, with every parameter
    finite, the forward pass (the network's output or the loss is not finite)."""
    for p in pyro.get_param_store()._params.values():
        p.grad = None
    first = str(exc).splitlines()[0]
    bad = _param_out_of_support()
    if bad is not None:
        name, reason = bad
        layer = layer_of(model, name)
        return where.error(
            f"non-finite values in the model at {where.text}: parameter {name!r} (layer "
            f"{layer!r}) {reason} (parameters overflowed: lower the learning rate)"
            f"{where.keep}: {first}", site=name, layer=layer)
    return where.error(f"non-finite output of the forward pass at {where.text} with every "
                       f"parameter finite{_forward_hint()}{where.keep}: {first}", site="obs")


def _forward_hint() -> str:
    """The largest parameter and the likely cause of a non-finite forward pass: parameters
    grown huge (above 1e10: the learning rate) or the model's forward (inputs)."""
    store = pyro.get_param_store()
    big, where = 0.0, None
    with torch.no_grad():
        for name, p in store._params.items():
            m = float(p.detach().abs().max()) if p.numel() else 0.0
            if m > big:
                big, where = m, name
    cause = ("the parameters grew huge: lower the learning rate" if big > 1e10 else
             "the network's output is NaN/Inf for some inputs of this batch: check the "
             "model's forward (e.g. a division by zero) and the inputs")
    return f" (largest |parameter| {big:.3g} in {where!r}); {cause}"


def _loss_and_grads(svi: SVI, args, loss_and_grads: Callable[[], float] | None,
                    where: _Where) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss (gradients accumulated) and the unconstrained parameters it touched.
    A distribution refusing its parameters (validation: NaN/Inf, a scale of 0) becomes a
    NonFiniteError naming the parameter, or the forward pass when the parameters are
    finite."""
    try:
        with poutine.trace(param_only=True) as capture:
            if loss_and_grads is None:
                loss = float(svi.loss_and_grads(svi.model, svi.guide, *args))
            else:
                loss = float(loss_and_grads())
    except ValueError as exc:
        text = str(exc)
        if "Expected parameter" not in text and "nan" not in text.lower() \
                and "inf" not in text.lower():
            raise
        raise _distribution_error(svi.model, exc, where) from exc
    # a PyroParam's constrained value links to its unconstrained tensor; with
    # pyro.settings.set(module_local_params=True) a plain nn.Parameter is its own value
    return loss, {name: _unconstrained(site["value"])
                  for name, site in capture.trace.nodes.items()}


def _unconstrained(value: torch.Tensor) -> torch.Tensor:
    link = getattr(value, "unconstrained", None)
    return value if link is None else link()


def _first_nonfinite(params: dict[str, torch.Tensor], what: str) -> tuple[str, str] | None:
    """``(name, what)`` of the first parameter whose value (``what="value"``) or gradient
    (``what="gradient"``) is not finite."""
    for name, p in params.items():
        t = p if what == "value" else p.grad
        if t is not None and not bool(torch.isfinite(t).all()):
            return name, what
    return None


def _check_step(model, guide, args, loss: float, params: dict[str, torch.Tensor],
                where: _Where) -> None:
    """Raise on a non-finite parameter value, sample-site log-density, gradient or loss
    (in that order), with the gradients zeroed and the update not applied."""
    problem = _first_nonfinite(params, "value")
    if problem is None and not np.isfinite(loss):
        sites = nonfinite_sites(model, guide, args)
        if sites == ["obs"] or not sites and _first_nonfinite(params, "gradient") is None:
            pyro.infer.util.zero_grads(set(params.values()))
            raise where.error(
                f"non-finite loss ({loss}) from the forward pass (the likelihood of site "
                f"'obs') at {where.text} with every parameter finite{_forward_hint()}"
                f"{where.keep}", site="obs")
        if sites:
            layer = layer_of(model, sites[0])
            pyro.infer.util.zero_grads(set(params.values()))
            raise where.error(
                f"non-finite loss {loss} at {where.text}: the log-density of site "
                f"{sites[0]!r} (layer {layer!r}) is not finite{where.keep}. Lower the learning "
                "rate or check the prior's hyperparameters.", site=sites[0], layer=layer)
    if problem is None:
        problem = _first_nonfinite(params, "gradient")
    if problem is None and not np.isfinite(loss):
        problem = ("loss", "value")
    if problem is not None:
        pyro.infer.util.zero_grads(set(params.values()))
        name, what = problem
        layer = layer_of(model, name) if name != "loss" else None
        raise where.error(
            f"non-finite {what} of parameter {name!r} (layer {layer!r}) at {where.text} "
            f"(loss {loss}){where.keep}. Lower the learning rate or check the prior's scale.",
            site=name, layer=layer)


def guarded_step(svi: SVI, model, guide, args, epoch: int, step: int, ckpt: str | None,
                 loss_and_grads: Callable[[], float] | None = None) -> float:
    """``SVI.step`` that refuses to apply a non-finite loss or gradient; returns the loss.

    ``ckpt``: the last good checkpoint (named in the error). ``loss_and_grads``: replaces
    ``svi.loss_and_grads`` (the data-parallel step: its loss and gradients are the same on
    every rank, so every rank takes the same decision).
    """
    where = _Where(epoch, step, ckpt)
    _check_store(model, where)
    loss, params = _loss_and_grads(svi, args, loss_and_grads, where)
    _check_step(model, guide, args, loss, params, where)
    svi.optim(set(params.values()))
    pyro.infer.util.zero_grads(set(params.values()))
    return loss
