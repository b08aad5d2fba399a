"""Layer 4: lazy priors (``fit(..., prior_every=k)``): the prior term every k-th step, times k.

:class:`LazyPriorModel` wraps a :class:`~bayes_spectral.bnn.network.BayesianNetwork` for
``SVI``: on training step ``t`` (1-based, ``TrainingRun.step``, saved in checkpoints) with
``(t - 1) % k == 0`` every weight-prior site (``model.prior_sites``: weights or singular
values; not the noise, not spike-and-slab indicators) has its log-density scaled by ``k``
(``msg["scale"] *= k``); on the other steps its distribution is
``fn.mask(False)`` (a ``MaskedDistribution`` whose ``log_prob`` is a zero tensor without
evaluating the law: no spectral work). Over ``k`` steps at fixed weights the summed prior
gradient is ``k`` times the exact one (``tests/bnn/test_lazy_prior.py``). The bias and the
effect of Adam's normalisation are those of
:class:`~bayes_spectral.penalties.Regularizer`'s ``every``. ``prior_every=1`` does not wrap
the model at all (bit for bit today's run).
"""

from __future__ import annotations

import numbers

from pyro.poutine.messenger import Messenger

__all__ = ["LazyPrior", "LazyPriorModel", "check_every"]


def check_every(every, what: str = "prior_every") -> int:
    """``every`` as an int, or a ``ValueError`` (not an integer >= 1)."""
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"{what} must be an integer >= 1 (apply the prior every k-th step, "
                         f"scaled by k), got {every!r}")
    return int(every)


class LazyPrior(Messenger):
    """Scale the named sites' log-density by ``every`` on due steps, mask it otherwise;
    ``step`` (1-based) is set by the training loop before each step."""

    def __init__(self, sites, every: int) -> None:
        super().__init__()
        self.sites = frozenset(sites)
        self.every = check_every(every)
        self.step = 1

    @property
    def due(self) -> bool:
        return (self.step - 1) % self.every == 0

    def _pyro_sample(self, msg) -> None:
        if msg["name"] not in self.sites or msg["is_observed"]:
            return
        if self.due:
            msg["scale"] = msg["scale"] * self.every
        else:
            msg["fn"] = msg["fn"].mask(False)


class LazyPriorModel:
    """``model`` under a :class:`LazyPrior` of its weight-prior sites (the callable given to
    ``SVI``; ``model`` itself is unchanged for prediction and validation)."""

    def __init__(self, model, every: int) -> None:
        self.model = model
        self.lazy = LazyPrior(model.prior_sites.values(), every)

    def set_step(self, step: int) -> None:
        self.lazy.step = int(step)

    def __call__(self, *args, **kwargs):
        with self.lazy:
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str):
        if name in ("model", "lazy"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)  # prior_sites etc. for the NaN guard's messages
