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
parameter. The noise: by default one ``normal_`` of the global torch RNG per noisy
parameter (into one buffer), scaled, then added: the numbers and the operations of
:meth:`SGMCMC.reference_step`, the per-parameter update of before, so a run equals the one
of before bit for bit (``tests/bnn/test_sampler_optim.py``). Optionally
(``noise_source``, a :class:`NoiseStream`) one draw per step from an own
``torch.Generator``, the scale applied inside the addition (one pass less), optionally
drawn ahead in a background thread. On the CPU the draw is torch's serial mt19937 stream
(about 3 ms for the 670k weights of 784-512-512-10, 4 ns a number), the floor of the step;
one draw instead of one per tensor saved nothing measurable, and neither K generators
filled in parallel threads nor drawing ahead beat it on this project's 2 shared cores
(measured; they need an idle core).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["SGHMC", "SGLD", "SGMCMC", "NoiseStream", "cyclical_lr", "in_sampling_phase"]


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


#: the smallest draw :class:`NoiseStream` draws ahead in a background thread (numbers)
PREFETCH_MIN = 1 << 15


class NoiseStream:
    """The standard-normal draws of a sampler run: an own ``torch.Generator`` per device,
    seeded ``seed`` (``fit``: drawn from the global RNG right after it is seeded with
    ``seed + chain``), so the noise does not interleave with other users of the global
    RNG (dropout, shuffling) and its state travels with the checkpoint
    (:meth:`state_dict`: the state of every generator as of the draws handed out).

    ``prefetch=True`` (CPU draws of ``PREFETCH_MIN`` numbers or more): after each draw the
    next one (same size, dtype, device) is drawn in a background thread (torch's kernels
    release the GIL) while the caller runs its forward and backward pass; a request of
    another shape puts the generator back to where it was before the prefetch and draws
    again, so the numbers handed out do not depend on ``prefetch`` or on the thread count.
    """

    def __init__(self, seed: int, *, prefetch: bool = False):
        self.seed, self.prefetch = int(seed), bool(prefetch)
        self._gens: dict[str, torch.Generator] = {}
        self._pending: tuple | None = None  # (key, future, buffer, generator state before)
        self._buffers: dict[tuple, list[torch.Tensor]] = {}  # key -> the two CPU buffers
        self._pool = None

    def _gen(self, device: torch.device) -> torch.Generator:
        name = str(device)
        gen = self._gens.get(name)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._gens[name] = gen
        return gen

    def _settle(self, key: tuple | None = None) -> torch.Tensor | None:
        """Wait for the pending prefetch: its buffer when it was for ``key``, else (the
        draw is not used) the generator put back to its state before it and ``None``."""
        if self._pending is None:
            return None
        pkey, future, buf, before = self._pending
        self._pending = None
        future.result()
        if pkey == key:
            return buf
        self._gens[pkey[2]].set_state(before)
        return None

    def standard_normal(self, n: int, dtype: torch.dtype, device) -> torch.Tensor:
        """``n`` i.i.d. ``N(0, 1)`` numbers (flat), the next ones of ``device``'s stream."""
        device = torch.device(device)
        key = (int(n), dtype, str(device))
        out = self._settle(key)
        if out is None:
            out = self._buffer(key, 0) if self._ahead(key) else \
                torch.empty(key[0], dtype=dtype, device=device)
            out.normal_(generator=self._gen(device))
        if self._ahead(key):
            self._launch(key, out)
        return out

    def _ahead(self, key: tuple) -> bool:
        """Whether to draw ``key`` ahead: CPU draws of at least ``PREFETCH_MIN`` numbers
        (a smaller draw costs less than handing it to a thread)."""
        return self.prefetch and key[2].startswith("cpu") and key[0] >= PREFETCH_MIN

    def _buffer(self, key: tuple, i: int) -> torch.Tensor:
        bufs = self._buffers.get(key)
        if bufs is None:
            bufs = self._buffers[key] = [torch.empty(key[0], dtype=key[1]) for _ in range(2)]
        return bufs[i]

    def _launch(self, key: tuple, used: torch.Tensor) -> None:
        """Draw the next ``key`` in the background into the buffer not handed out."""
        from concurrent.futures import ThreadPoolExecutor

        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="sgmcmc-noise")
        buf = self._buffer(key, 1 if used is self._buffer(key, 0) else 0)
        gen = self._gens[key[2]]
        before = gen.get_state()
        self._pending = (key, self._pool.submit(buf.normal_, generator=gen), buf, before)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{device: generator state}`` as of the draws handed out (a prefetch not)."""
        busy = None if self._pending is None else self._pending[0][2]
        return {name: self._pending[3].clone() if name == busy else g.get_state()
                for name, g in self._gens.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Continue from :meth:`state_dict`'s output (a pending prefetch dropped)."""
        self._settle()
        for name, value in state.items():
            self._gen(torch.device(name)).set_state(value.cpu() if torch.is_tensor(value)
                                                    else torch.as_tensor(value))


class SGMCMC(torch.optim.Optimizer):
    """Shared machinery of :class:`SGLD` and :class:`SGHMC` (module docstring).

    :param lr: the per-example learning rate; the step is ``eta = lr / num_data``.
    :param num_data: ``N``; :param temperature: ``T > 0``; :param noise: whether these
        parameters are sampled (``False``: drift only); :param precondition: pSGLD's ``G``
        (``rho``: ``alpha``, ``eps``); :param total_steps, cycles, explore: the cyclical
        schedule (``cycles=None``: constant ``eta``).

    :meth:`step` (and :meth:`step_params`, with the parameters' order given) updates every
    parameter with a gradient in a few multi-tensor passes per bucket (parameters of one
    group, step count, device and dtype). The noise of a bucket: without ``noise_source``,
    one ``normal_`` of the global torch RNG per parameter into one buffer, scaled, then
    added: the numbers and operations of :meth:`reference_step` (the per-parameter update
    of before), so the result equals it bit for bit; with a :class:`NoiseStream`, ONE draw
    split over the parameters and the scale applied inside the addition (one pass less;
    equal to the reference within rounding given the same numbers).
    """

    def __init__(self, params, lr: float, *, num_data: int = 1, temperature: float = 1.0,
                 friction: float = 0.1, noise: bool = True, precondition: bool = False,
                 alpha: float = 0.99, eps: float = 1e-5, total_steps: int = 1,
                 cycles: int | None = None, explore: float = 0.0,
                 noise_source: NoiseStream | None = None):
        defaults = dict(lr=float(lr), num_data=int(num_data), temperature=float(temperature),
                        friction=float(friction), noise=bool(noise),
                        precondition=bool(precondition), alpha=float(alpha), eps=float(eps),
                        total_steps=int(total_steps), cycles=cycles, explore=float(explore))
        super().__init__(params, defaults)
        self.noise_source = noise_source

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

    def _standard_normal(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """``n`` i.i.d. ``N(0, 1)`` numbers of ``noise_source`` (flat, ``like``'s dtype and
        device)."""
        return self.noise_source.standard_normal(n, like.dtype, like.device)

    def _fused(self, ps: list[torch.Tensor], group: dict, k: int) -> None:
        """Drift ``G grad``, noise ``sqrt(G) xi`` (one draw split over ``ps``), update."""
        states = [self.state[p] for p in ps]
        for st in states:
            st["step"] = k + 1
        eta, noisy = self._schedule(group, k)
        grads = [p.grad for p in ps]
        scales = [self._preconditioner(g, group, st) for g, st in zip(grads, states,
                                                                      strict=True)] \
            if group["precondition"] else None
        drifts = grads if scales is None else torch._foreach_mul(grads, scales)
        xis, std = None, None
        if noisy:
            xis = self._draw(ps)
            if scales is not None:
                torch._foreach_mul_(xis, torch._foreach_sqrt(scales))
            std = self.noise_std(eta, group)
            if self.noise_source is None:  # scaled as before: the old runs bit for bit
                torch._foreach_mul_(xis, std)
                std = None
        self._apply(ps, drifts, xis, eta, std, group, states)

    def _draw(self, ps: list[torch.Tensor]) -> list[torch.Tensor]:
        """``xi`` per parameter, views of one flat buffer: one draw of ``noise_source``, or
        (none) one ``normal_`` of the global RNG per parameter, in order (the numbers
        ``randn_like(p)`` gave the per-parameter samplers)."""
        sizes = [p.numel() for p in ps]
        if self.noise_source is not None:
            flat = self._standard_normal(sum(sizes), ps[0])
        else:
            flat = torch.empty(sum(sizes), dtype=ps[0].dtype, device=ps[0].device)
        xis = [x.view_as(p) for x, p in zip(flat.split(sizes), ps, strict=True)]
        if self.noise_source is None:
            for x in xis:
                x.normal_()
        return xis

    @staticmethod
    def _add_noise(targets: list[torch.Tensor], xis: list[torch.Tensor],
                   std: float | None) -> None:
        """``targets += std xi`` (one rounding), or ``targets += xi`` (``std`` None:
        ``xi`` already scaled)."""
        if std is None:
            torch._foreach_add_(targets, xis)
        else:
            torch._foreach_add_(targets, xis, alpha=std)

    def _apply(self, ps, drifts, xis, eta, std, group, states) -> None:
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

    def _apply(self, ps, drifts, xis, eta, std, group, states) -> None:
        """``theta += -eta drift``, then ``theta += std xi``."""
        torch._foreach_add_(ps, drifts, alpha=-eta)
        if xis is not None:
            self._add_noise(ps, xis, std)

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

    def _apply(self, ps, drifts, xis, eta, std, group, states) -> None:
        """``v = (1 - a) v - eta drift + std xi``, ``theta += v``."""
        vs = []
        for p, st in zip(ps, states, strict=True):
            if "momentum" not in st:
                st["momentum"] = torch.zeros_like(p)
            vs.append(st["momentum"])
        torch._foreach_mul_(vs, 1.0 - group["friction"])
        torch._foreach_add_(vs, drifts, alpha=-eta)
        if xis is not None:
            self._add_noise(vs, xis, std)
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
