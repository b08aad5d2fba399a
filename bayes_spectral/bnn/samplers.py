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

    def _noise(self, p: torch.Tensor, eta: float, group: dict,
               scale: torch.Tensor | None) -> torch.Tensor:
        """``noise_std(eta) * sqrt(G) * xi``."""
        xi = torch.randn_like(p)
        if scale is not None:
            xi.mul_(scale.sqrt())
        return xi.mul_(self.noise_std(eta, group))

    @torch.no_grad()
    def step(self, closure=None):
        """One step of every parameter with a gradient (``closure`` is not supported)."""
        if closure is not None:
            raise ValueError("SG-MCMC samplers take no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                k = int(state.get("step", 0))
                state["step"] = k + 1
                eta = cyclical_lr(group["lr"] / group["num_data"], k, group["total_steps"],
                                  group["cycles"])
                noisy = group["noise"] and in_sampling_phase(
                    k, group["total_steps"], group["cycles"], group["explore"])
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

    def _update(self, p, drift, eta, group, state, noise) -> None:
        if "momentum" not in state:
            state["momentum"] = torch.zeros_like(p)
        v = state["momentum"]
        v.mul_(1.0 - group["friction"]).add_(drift, alpha=-eta)
        if noise is not None:
            v.add_(noise)
        p.add_(v)


SAMPLERS = {"sgld": SGLD, "sghmc": SGHMC}
