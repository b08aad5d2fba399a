"""Layer 3: deterministic penalty baselines and MAP-as-regularisation.

Every penalty is a :class:`Penalty`: ``p(weight, name=None)`` or ``p(module)`` returns a
scalar tensor. Modules (one job each): ``norms`` (weight decay, L1, nuclear / Schatten-p,
stable rank), ``spectral_norm`` (Yoshida & Miyato), ``tail`` (weighted alpha and the
power-law / Frechet prior penalties, exact or tracked), ``hessian`` (Hutchinson and the
deep-linear closed form), ``schedules`` (decayed / thresholded wrappers) and
``regularizer`` (select layers of a model, log per-layer values, checkpoint the
penalties' state); ``state`` (that state as safetensors' tensors plus JSON); ``registry``
names penalty factories ``coef -> Penalty | None`` (``PENALTIES``; users register theirs).

MAP equivalence: the prior penalties are exactly ``-log p`` of the penalty measure of
``bayes_spectral.distributions.PowerLawSpectrum`` / ``FrechetTopEigenvalue`` (shared
formulas in :mod:`bayes_spectral.spectra.laws`). A Pyro model with the prior and a
likelihood over a subsampled plate of size ``B`` out of ``N`` has loss
``(N/B) * sum_batch CE + penalty``; dividing by ``N``, ``mean_batch CE + penalty / N``.
"""

from .base import Penalty
from .hessian import deep_linear_hessian_trace, hutchinson_trace
from .norms import L1, NuclearNorm, SchattenNorm, StableRank, WeightDecay
from .registry import BUILTIN_PENALTIES, PENALTIES
from .regularizer import Regularizer
from .schedules import Decayed, Thresholded
from .spectral_norm import SpectralNorm
from .state import flatten_state, unflatten_state
from .tail import FrechetPrior, PowerLawPrior, WeightedAlpha

__all__ = [
    "BUILTIN_PENALTIES",
    "Decayed",
    "FrechetPrior",
    "L1",
    "NuclearNorm",
    "PENALTIES",
    "Penalty",
    "PowerLawPrior",
    "Regularizer",
    "SchattenNorm",
    "SpectralNorm",
    "StableRank",
    "Thresholded",
    "WeightDecay",
    "WeightedAlpha",
    "deep_linear_hessian_trace",
    "flatten_state",
    "hutchinson_trace",
    "unflatten_state",
]
