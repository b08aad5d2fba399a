"""Layer 4: :class:`FitResult`, what :func:`~bayes_spectral.fit` returns.

A result owns its parameters: when it is made (at the end of ``fit``) it snapshots the
param store and the tensors of its network and guide (:class:`~.param_state.ParamState`),
and every use of it (``predict``, ``evaluate``, ``params``, ``to_module``, guide draws in
the diagnostics) runs inside :meth:`FitResult.active`, which installs that snapshot and puts
the previous state back afterwards. So a later ``fit`` (same layer names or not, with or
without ``pyro.settings.set(module_local_params=True)``) never changes an earlier result.
The result's guide carries that snapshot (``OWNER_STATE``), so ``map_values(res.guide)``
reads it as well; calling ``res.guide`` yourself reads it only inside ``res.active()``
(outside it Pyro's global store, which a later fit replaces).

``active`` also puts the network in eval mode (:mod:`~.modes`): predictions do not depend on
the batch, BatchNorm's running statistics are read, never updated; MC-dropout only with
``mc_dropout=True``; the user's modes are restored.

Using the weights: ``bn.net`` holds ``PyroSample`` sites, so calling it directly draws the
prior layers' weights from the prior (after a fit this warns). ``res.to_module()`` is the
plain ``nn.Module`` with the fitted point weights (MAP; SVI: the guide's median, i.e. the
posterior mean of a Normal guide; NUTS and samplers: the mean of the draws) and
``res.sample_modules(k)`` gives ``k`` modules with posterior draws.

Sampler results (SGLD / SGHMC) also hold ``free_draws``: per kept draw, the network's free
state (:mod:`~.free_state`: parameters without a prior, buffers) of that draw's chain at that
step. ``predict``, ``evaluate``, ``sample_modules`` and the diagnostics evaluate each draw
with its own free state; the snapshot ``state`` (``params()``, and ``to_module()``'s
parameters and buffers other than the prior weights) holds the *last chain's final* values,
so ``to_module()`` is the mean of the draws' prior weights with the last chain's end state.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from pyro import poutine
from pyro.infer.autoguide import AutoGuide
from pyro.poutine.runtime import _PYRO_STACK
from torch import nn

from .batches import as_inputs, first_leaf, inputs_to
from .export import plain_module
from .free_state import installed_free
from .guides import OWNER_STATE
from .modes import eval_mode
from .network import BayesianNetwork
from .param_state import ParamState
from .predict import PredictiveMetrics, evaluate, predictive_probs

__all__ = ["FitResult", "warn_on_bare_calls"]


@dataclass
class FitResult:
    """What :func:`fit` returns. ``samples``: NUTS or SG-MCMC draws ``{site: (chains,
    draws, ...)}`` (constrained values). ``free_draws``: samplers only, the free state of
    each draw ``{name: (chains, draws, *shape)}`` (module docstring; ``None``: none).
    ``state``: the parameter snapshot (taken when the result is made)."""

    model: BayesianNetwork
    method: str
    guide: AutoGuide | None = None
    history: dict[str, list] = field(default_factory=dict)
    samples: dict[str, torch.Tensor] | None = None
    epochs_run: int = 0
    stopped_early: bool = False
    best_epoch: int | None = None
    checkpoint: str | None = None
    draw_steps: list[int] | None = None  # samplers: the kept steps (1-based, per chain)
    free_draws: dict[str, torch.Tensor] | None = None  # samplers: free state per draw
    state: ParamState | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.state is None:
            self.state = ParamState({"model": self.model, "guide": self.guide})
        if self.guide is not None:  # map_values(res.guide) reads this snapshot (guides.py)
            self.guide.__dict__[OWNER_STATE] = self.state

    @contextmanager
    def active(self, mc_dropout: bool = False) -> Iterator[FitResult]:
        """Context: this result's parameters installed, the network in eval mode (Dropout on
        with ``mc_dropout``); the previous parameters and modes restored on exit."""
        with self.state.installed(), eval_mode(self.model, mc_dropout=mc_dropout):
            yield self

    @property
    def num_draws(self) -> int:
        """Distinct posterior draws the result can give: 1 for MAP, ``chains * draws`` for
        NUTS, unbounded (``-1``) for SVI."""
        if self.samples is not None:
            first = next(iter(self.samples.values()))
            return int(first.shape[0] * first.shape[1])
        return 1 if self.method == "map" else -1

    def params(self) -> dict[str, torch.Tensor]:
        """This result's parameters (param store names, unconstrained values), detached
        clones; unchanged by later fits."""
        return self.state.named_values()

    def _input(self, x):
        """``x`` (a tensor, tuple or dict; numpy arrays converted) on the model's device;
        floats in its dtype, integers (token ids) kept."""
        dev = next(iter(self.model.parameters()), torch.zeros(()))
        return inputs_to(as_inputs(x, "x"), dev.device, dev.dtype)

    def predict(self, x: torch.Tensor, num_samples: int | None = None,
                mc_dropout: bool = False) -> torch.Tensor:
        """Posterior-predictive class probabilities ``(S, n, C)`` (or outputs, gaussian), in
        eval mode (``mc_dropout=True``: Dropout active, a fresh mask per draw)."""
        x = self._input(x)
        with self.active(mc_dropout=mc_dropout):
            if self.samples is not None:
                dev = first_leaf(x).device  # draws kept on the CPU (samplers)
                samples = {k: v.to(dev) for k, v in self.samples.items()}
                free = None if not self.free_draws else \
                    {k: v.to(dev) for k, v in self.free_draws.items()}
                return predictive_probs(self.model, x, samples=samples, free=free)
            if num_samples is None:
                num_samples = 1 if self.method == "map" and not mc_dropout else 32
            return predictive_probs(self.model, x, guide=self.guide, num_samples=num_samples)

    def evaluate(self, x, y, num_samples: int | None = None,
                 mc_dropout: bool = False) -> PredictiveMetrics:
        """Metrics of the posterior predictive (:func:`~.predict.evaluate`): classification
        accuracy, NLL, ECE, Brier, entropy, mutual information; Gaussian regression NLL,
        RMSE and 50% / 90% interval coverage."""
        return evaluate(self.predict(x, num_samples, mc_dropout).cpu(), torch.as_tensor(y).cpu())

    # -- plain modules ---------------------------------------------------------------------
    def point_values(self) -> dict[str, torch.Tensor]:
        """One value per latent site: the guide's median (MAP: its point; SVI: the posterior
        mean of a Normal guide) or the mean of the NUTS draws."""
        sites = self.model.latent_sites
        if self.samples is not None:
            return {s: self.samples[s].reshape(-1, *self.samples[s].shape[2:]).mean(0)
                    for s in sites}
        if self.guide is None:
            raise ValueError("the FitResult has neither NUTS samples nor a guide")
        with self.active(), torch.no_grad():
            med = self.guide.median()
        return {s: med[s].detach().clone() for s in sites}

    def to_module(self) -> nn.Module:
        """A plain ``nn.Module`` (a copy of the user's network, no Pyro) carrying the point
        weights of :meth:`point_values` and the fitted values of every other parameter and
        buffer, in eval mode. For MAP its forward equals :meth:`predict`'s (logits). Samplers:
        the mean of the draws with the last chain's final free state (parameters without a
        prior, buffers); :meth:`sample_modules` gives draws with their own."""
        values = self.point_values()
        with self.active():
            return plain_module(self.model, values)

    def sample_modules(self, k: int, seed: int = 0) -> list[nn.Module]:
        """``k`` plain modules with posterior draws: guide draws (SVI; seeded, global RNG
        restored), ``k`` of the NUTS draws (evenly spaced), or ``k`` copies of the point (MAP,
        with a warning: it holds one draw)."""
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        draws = self._draws(int(k), seed)
        with self.active():
            return [self._plain(d) for d in draws]

    def _plain(self, draw: dict[str, torch.Tensor]) -> nn.Module:
        """:func:`plain_module` of one draw (its free state, ``_free``, installed first)."""
        free = draw.pop("_free", None)
        with installed_free(self.model, free):
            return plain_module(self.model, draw)

    def _draws(self, k: int, seed: int) -> list[dict[str, torch.Tensor]]:
        sites = self.model.latent_sites
        if self.samples is not None:
            flat = {s: self.samples[s].reshape(-1, *self.samples[s].shape[2:]) for s in sites}
            n = next(iter(flat.values())).shape[0]
            idx = torch.linspace(0, n - 1, k).round().long().tolist()
            out = [{s: v[i] for s, v in flat.items()} for i in idx]
            if self.free_draws:
                free = {name: v.reshape(n, *v.shape[2:]) for name, v in self.free_draws.items()}
                for d, i in zip(out, idx, strict=True):
                    d["_free"] = {name: v[i] for name, v in free.items()}
            return out
        if self.method == "map":
            warnings.warn("a MAP result holds one draw (its point): sample_modules returns "
                          f"{k} identical modules", UserWarning, stacklevel=3)
            return [self.point_values() for _ in range(k)]
        out = []
        with self.active(), torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed)
            for _ in range(k):
                tr = poutine.trace(self.guide).get_trace()
                out.append({s: tr.nodes[s]["value"].detach().clone() for s in sites})
        return out


def _bare_call(module: nn.Module, args) -> None:
    if not _PYRO_STACK:
        warnings.warn(
            "calling a BayesianNetwork's net outside Pyro draws the prior layers' weights from "
            "the prior, not the fit: use res.to_module() for the fitted weights (or "
            "res.predict / res.sample_modules)", UserWarning, stacklevel=3)


_bare_call._bayes_spectral_hook = True  # type: ignore[attr-defined]


def warn_on_bare_calls(model: BayesianNetwork) -> None:
    """After a fit: calling ``model.net`` outside any Pyro handler warns (once registered)."""
    if not model.__dict__.get("_bs_bare_hook"):
        model.net.register_forward_pre_hook(_bare_call)
        model.__dict__["_bs_bare_hook"] = True
