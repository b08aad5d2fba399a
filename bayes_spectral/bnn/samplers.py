"""Layer 4: SG-MCMC update rules (SGLD, SGHMC) as ``torch.optim.Optimizer`` subclasses.

They act on the unconstrained parameters ``theta`` of the MAP guide (``AutoDelta``), whose
gradient is that of the potential (:mod:`~bayes_spectral.bnn.sampling`)::

    U(theta) = -log p(theta) - (N / B) sum_batch log p(y | x, theta) - log|det J(theta)|

with ``J`` the Jacobian of the unconstrained -> constrained transforms. The step size is
``eta = lr / N`` (``lr`` acts on the per-example potential ``U / N``, so its magnitudes
resemble SGD's), ``xi ~ N(0, I)``, ``T`` the temperature (the chain targets
``exp(-U / T)``; ``T = 1`` is the Bayes posterior, ``T < 1`` a cold posterior):

- SGLD (Welling & Teh 2011): ``theta <- theta - eta grad U + sqrt(2 eta T) xi``.
- SGHMC (Chen et al. 2014, momentum form, friction ``a`` in (0, 1]; the gradient-noise
  estimate ``beta_hat`` is taken as 0): ``v <- (1 - a) v - eta grad U + sqrt(2 a eta T) xi``,
  ``theta <- theta + v``.
- Mini-batch gradient noise (what ``beta_hat = 0`` leaves): the batch gradient's noise,
  covariance ``Q = N^2 / B (1 - (B - 1) / (N - 1)) C`` (``C`` the covariance of the
  per-example gradients of ``-log p(y_i | x_i, theta)``), adds ``eta^2 Q`` to the injected
  ``2 a eta T``, so along a unit direction ``u`` the stationary variance is about
  ``1 + r(u)`` times the target's, ``r(u) = eta u^T Q u / (2 a T)`` (SGLD: ``eta u^T Q u /
  (2 T)``). ``Q`` is concentrated in the few directions the likelihood pins down: on the
  digits MLP 64-64-10 (``benchmarks/loo_floor.py``) at ``B = 256``, ``lr = 0.2``,
  ``a = 0.05`` the largest diagonal ``r`` is 0.2 at the MAP and 1.5-3 at posterior draws,
  but the top eigen-direction's 11 and 28-52. There Chen et al.'s correction (inject
  ``2 a eta T - eta^2 Q_hat``) does not exist (it is not positive definite) and a diagonal
  ``Q_hat`` would not see it; ``p_loo`` came out 183 against 72 with full batches and 70
  with NUTS (``tests/bnn/test_sampler_minibatch_noise.py`` checks ``1 + r``). Use full
  batches (``batch_size = N``: ``Q = 0``) when the spread itself matters (PSIS-LOO,
  posterior sds), or ``B``, ``lr``, ``a`` with ``r`` well below 1.
- Preconditioned (pSGLD, Li et al. 2016): a diagonal ``G = 1 / (eps + sqrt(V))`` with
  ``V <- rho V + (1 - rho) (grad U / N)^2`` (RMSprop of the per-example gradient, started
  at the first gradient's square rather than 0); the drift ``eta G grad U`` and the noise
  ``sqrt(2 eta T G) xi`` (SGHMC: ``sqrt(2 a eta T G) xi``). The correction term
  ``Gamma(theta) = sum_j d G_ij / d theta_j`` is ignored (as in Li et al.'s experiments):
  a bias that vanishes as ``V`` settles.
- Cyclical schedule (cSG-MCMC, Zhang et al. 2020) over ``K`` steps in ``M`` cycles of
  ``L = ceil(K / M)`` steps: ``eta_k = eta_0 / 2 (cos(pi mod(k, L) / L) + 1)``
  (:func:`cyclical_lr`); the first ``explore`` fraction of each cycle
  (``mod(k, L) / L < explore``) is exploration: no noise (and no draws, decided by the
  loop with :func:`in_sampling_phase`).

Parameters without a prior (``noise=False`` in their group: biases without prior,
BatchNorm's affine parameters) get the same drift without noise (a point estimate along the
chain). The step counter, momentum and ``V`` are in ``self.state`` (checkpointed with the
optimiser); the step size is a Python float computed from the counter: no host sync per
step. The noise standard deviation is the method :meth:`SGLD.noise_std` /
:meth:`SGHMC.noise_std` (tests replace it).

The step is fused (the cost the sampler adds to a MAP step, ``benchmarks/bench_infer.py``):
every parameter in a few multi-tensor passes (``torch._foreach_*``; SGHMC: ``v <- (1 - a)
v``, ``v += -eta G grad``, ``v += std xi``, ``theta += v``) instead of one optimiser per
parameter. The noise: one ``normal_`` of the global torch RNG per noisy parameter (into one
buffer), scaled, then added: the numbers and the operations of
:meth:`SGMCMC.reference_step`, the per-parameter update of before, so a run equals the one
of before bit for bit (``tests/bnn/test_sampler_optim.py``). On the CPU the draw is torch's
serial mt19937 stream (about 3 ms for the 670k weights of 784-512-512-10, 4 ns a number),
the floor of the step. An own generator drawn once per step, or drawn ahead in a
background thread, was tried and measured no faster on this project's 2 shared cores
(``bench_infer``: SGHMC 1.49-1.56x the MAP step either way), so it was removed.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SGHMC", "SGLD", "SGMCMC", "cyclical_lr", "in_sampling_phase"]


def cycle_length(total: int, cycles: int) -> int:
    """``L = ceil(K / M)`` steps per cycle."""
    return max(1, math.ceil(int(total) / int(cycles)))


def cyclical_lr(eta0: float, k: int, total: int, cycles: int | None) -> float:
    """``eta_k = eta0 / 2 (cos(pi mod(k, L) / L) + 1)`` for the 0-based step ``k`` of ``K =
    total`` steps in ``M = cycles`` cycles (``L = ceil(K / M)``); ``eta0`` when ``cycles`` is
    ``None``."""
    if cycles is None:
        return eta0
    length = cycle_length(total, cycles)
    return 0.5 * eta0 * (math.cos(math.pi * (k % length) / length) + 1.0)


def in_sampling_phase(k: int, total: int, cycles: int | None, explore: float) -> bool:
    """Whether the 0-based step ``k`` is in a sampling phase: always without cycles, else
    when ``mod(k, L) / L >= explore``."""
    if cycles is None:
        return True
    length = cycle_length(total, cycles)
    return (k % length) >= explore * length


class SGMCMC(torch.optim.Optimizer):
    """Shared machinery of :class:`SGLD` and :class:`SGHMC` (module docstring).

    :param lr: the per-example learning rate; the step is ``eta = lr / num_data``.
    :param num_data: ``N``; :param temperature: ``T > 0``; :param noise: whether these
        parameters are sampled (``False``: drift only); :param precondition: pSGLD's ``G``
        (``rho``: ``alpha``, ``eps``); :param total_steps, cycles, explore: the cyclical
        schedule (``cycles=None``: constant ``eta``).

    :meth:`step` (and :meth:`step_params`, with the parameters' order given) updates every
    parameter with a gradient in a few multi-tensor passes per bucket (parameters of one
    group, step count, device and dtype). The noise of a bucket: one ``normal_`` of the
    global torch RNG per parameter into one buffer, scaled, then added: the numbers and
    operations of :meth:`reference_step` (the per-parameter update of before), so the
    result equals it bit for bit.
    """

    def __init__(self, params, lr: float, *, num_data: int = 1, temperature: float = 1.0,
                 friction: float = 0.1, noise: bool = True, precondition: bool = False,
                 alpha: float = 0.99, eps: float = 1e-5, total_steps: int = 1,
                 cycles: int | None = None, explore: float = 0.0):
        defaults = dict(lr=float(lr), num_data=int(num_data), temperature=float(temperature),
                        friction=float(friction), noise=bool(noise),
                        precondition=bool(precondition), alpha=float(alpha), eps=float(eps),
                        total_steps=int(total_steps), cycles=cycles, explore=float(explore))
        super().__init__(params, defaults)

    def noise_std(self, eta: float, group: dict[str, Any]) -> float:
        """The standard deviation of the injected Gaussian noise at step size ``eta``."""
        raise NotImplementedError

    @staticmethod
    def _preconditioner(grad: torch.Tensor, group: dict, state: dict) -> torch.Tensor:
        """``G = 1 / (eps + sqrt(V))``, ``V`` the RMSprop average of ``(grad / N)^2``."""
        g = grad / group["num_data"]
        if "square_avg" not in state:
            state["square_avg"] = g * g
        else:
            state["square_avg"].mul_(group["alpha"]).addcmul_(g, g, value=1 - group["alpha"])
        return (state["square_avg"].sqrt().add_(group["eps"])).reciprocal_()

    def _schedule(self, group: dict, k: int) -> tuple[float, bool]:
        """``(eta_k, noisy)`` of the 0-based step ``k`` in ``group``."""
        eta = cyclical_lr(group["lr"] / group["num_data"], k, group["total_steps"],
                          group["cycles"])
        noisy = group["noise"] and in_sampling_phase(k, group["total_steps"], group["cycles"],
                                                     group["explore"])
        return eta, noisy

    # -- the fused step -----------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter with a gradient, in param-group order (``closure``
        is not supported)."""
        if closure is not None:
            raise ValueError("SG-MCMC samplers take no closure")
        self.step_params([p for g in self.param_groups for p in g["params"]])

    @torch.no_grad()
    def step_params(self, params: list[torch.Tensor]) -> None:
        """One step of those of ``params`` that have a gradient, in that order (the order
        in which they share the noise draw of their bucket)."""
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        buckets: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            if p.grad is None:
                continue
            group = group_of[p]
            k = int(self.state[p].get("step", 0))
            if group["lr"] == 0.0 and not group["noise"]:  # free_params="fixed"
                continue
            key = (id(group), k, p.device, p.dtype)
            buckets.setdefault(key, []).append(p)
        for (_, k, _, _), ps in buckets.items():
            self._fused(ps, group_of[ps[0]], k)

    def _fused(self, ps: list[torch.Tensor], group: dict, k: int) -> None:
        """Drift ``G grad``, noise ``std sqrt(G) xi`` (scaled before it is added), update."""
        states = [self.state[p] for p in ps]
        for st in states:
            st["step"] = k + 1
        eta, noisy = self._schedule(group, k)
        grads = [p.grad for p in ps]
        scales = [self._preconditioner(g, group, st) for g, st in zip(grads, states,
                                                                      strict=True)] \
            if group["precondition"] else None
        drifts = grads if scales is None else torch._foreach_mul(grads, scales)
        xis = None
        if noisy:
            xis = self._draw(ps)
            if scales is not None:
                torch._foreach_mul_(xis, torch._foreach_sqrt(scales))
            torch._foreach_mul_(xis, self.noise_std(eta, group))
        self._apply(ps, drifts, xis, eta, group, states)

    @staticmethod
    def _draw(ps: list[torch.Tensor]) -> list[torch.Tensor]:
        """``xi`` per parameter, views of one flat buffer: one ``normal_`` of the global RNG
        per parameter, in order (the numbers ``randn_like(p)`` gave the per-parameter
        samplers)."""
        sizes = [p.numel() for p in ps]
        flat = torch.empty(sum(sizes), dtype=ps[0].dtype, device=ps[0].device)
        xis = [x.view_as(p) for x, p in zip(flat.split(sizes), ps, strict=True)]
        for x in xis:
            x.normal_()
        return xis

    def _apply(self, ps, drifts, xis, eta, group, states) -> None:
        raise NotImplementedError

    # -- the per-parameter reference ----------------------------------------------------
    def _noise(self, p: torch.Tensor, eta: float, group: dict,
               scale: torch.Tensor | None) -> torch.Tensor:
        """``noise_std(eta) * sqrt(G) * xi`` (reference path)."""
        xi = torch.randn_like(p)
        if scale is not None:
            xi.mul_(scale.sqrt())
        return xi.mul_(self.noise_std(eta, group))

    @torch.no_grad()
    def reference_step(self) -> None:
        """The per-parameter update of before the fused :meth:`step` (one ``randn_like``
        per parameter, noise scaled before it is added): the exactness tests' reference."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                k = int(state.get("step", 0))
                state["step"] = k + 1
                eta, noisy = self._schedule(group, k)
                scale = self._preconditioner(p.grad, group, state) \
                    if group["precondition"] else None
                drift = p.grad if scale is None else p.grad * scale
                self._update(p, drift, eta, group, state,
                             self._noise(p, eta, group, scale) if noisy else None)

    def _update(self, p, drift, eta, group, state, noise) -> None:
        raise NotImplementedError


class SGLD(SGMCMC):
    """Stochastic-gradient Langevin dynamics: ``theta <- theta - eta G grad U +
    sqrt(2 eta T G) xi`` (``G = 1`` unless ``precondition``)."""

    def noise_std(self, eta: float, group: dict[str, Any]) -> float:
        """``sqrt(2 eta T)``."""
        return math.sqrt(2.0 * eta * group["temperature"])

    def _apply(self, ps, drifts, xis, eta, group, states) -> None:
        """``theta += -eta drift``, then ``theta += xi`` (``xi`` scaled)."""
        torch._foreach_add_(ps, drifts, alpha=-eta)
        if xis is not None:
            torch._foreach_add_(ps, xis)

    def _update(self, p, drift, eta, group, state, noise) -> None:
        p.add_(drift, alpha=-eta)
        if noise is not None:
            p.add_(noise)


class SGHMC(SGMCMC):
    """Stochastic-gradient HMC with friction ``a``: ``v <- (1 - a) v - eta G grad U +
    sqrt(2 a eta T G) xi``, ``theta <- theta + v`` (``v`` starts at 0)."""

    def noise_std(self, eta: float, group: dict[str, Any]) -> float:
        """``sqrt(2 a eta T)``."""
        return math.sqrt(2.0 * group["friction"] * eta * group["temperature"])

    def _apply(self, ps, drifts, xis, eta, group, states) -> None:
        """``v = (1 - a) v - eta drift + xi`` (``xi`` scaled), ``theta += v``."""
        vs = []
        for p, st in zip(ps, states, strict=True):
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(p)
            vs.append(st["momentum"])
        torch._foreach_mul_(vs, 1.0 - group["friction"])
        torch._foreach_add_(vs, drifts, alpha=-eta)
        if xis is not None:
            torch._foreach_add_(vs, xis)
        torch._foreach_add_(ps, vs)

    def _update(self, p, drift, eta, group, state, noise) -> None:
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        v = state["momentum"]
        v.mul_(1.0 - group["friction"]).add_(drift, alpha=-eta)
        if noise is not None:
            v.add_(noise)
        p.add_(v)


SAMPLERS = {"sgld": SGLD, "sghmc": SGHMC}
