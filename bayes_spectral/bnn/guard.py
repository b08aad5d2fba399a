"""Layer 4: the NaN/Inf guard of the MAP/SVI step.

:func:`guarded_step` performs the operations of ``pyro.infer.SVI.step`` (loss and gradients,
optimiser update, zeroed gradients) but checks the parameters, the loss and the gradients
*before* the update. On the first non-finite value it raises :class:`NonFiniteError` naming
the parameter or sample site and its layer, with the update not applied, so the parameters
keep their last finite values.
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


def _loss_and_grads(svi: SVI, args, loss_and_grads: Callable[[], float] | None,
                    where: _Where) -> tuple[float, dict[str, torch.Tensor]]:
    """The loss (gradients accumulated) and the unconstrained parameters it touched.
    A distribution refusing NaN/Inf parameters (validation) becomes a NonFiniteError."""
    try:
        with poutine.trace(param_only=True) as capture:
            if loss_and_grads is None:
                loss = float(svi.loss_and_grads(svi.model, svi.guide, *args))
            else:
                loss = float(loss_and_grads())
    except ValueError as exc:
        if "nan" not in str(exc).lower() and "inf" not in str(exc).lower():
            raise
        for p in pyro.get_param_store()._params.values():
            p.grad = None
        first = str(exc).splitlines()[0]
        raise where.error(
            f"non-finite values in the model at {where.text} (parameters overflowed: lower "
            f"the learning rate){where.keep}: {first}") from exc
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
