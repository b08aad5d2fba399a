"""Reference models of the papers bayes-spectral builds on (installed as bayes_spectral.models).

Each module has a ``Config`` dataclass (``Config.small()`` runs in seconds, the default is
the full-size run) and ``run(config, out_dir=None) -> pandas.DataFrame``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ._common import load_or_run  # the notebooks' full-size path: reuse results/ tables

__all__ = ["REFERENCE_MODELS", "get_model", "load_or_run"]

#: name -> (module, paper)
REFERENCE_MODELS = {
    "low_rank_weight_decay": "Chen et al. 2024: weight decay induces low-rank ReLU layers",
    "diagonal_weight_norm": "Chou et al. 2024: weight normalisation and sparse implicit bias",
    "deep_matrix_factorization": "Gatmiry et al. 2023: flatness ~ nuclear norm in deep linear "
                                 "matrix sensing",
    "heavy_tailed": "Xiao et al. 2023: heavy-tailed spectral regularisers and priors (MLP, CNN)",
    "spectral_norm": "Yoshida & Miyato 2017: spectral norm regularisation and the "
                     "generalisation gap over batch sizes",
    "heavy_tailed_posterior": "Xiao et al. 2023, Bayesian reading: SGHMC posteriors under the "
                              "power-law / Frechet priors vs a Gaussian prior",
}


def get_model(name: str) -> ModuleType:
    """Import the reference model ``name`` (a key of ``REFERENCE_MODELS``)."""
    if name not in REFERENCE_MODELS:
        raise ValueError(f"unknown reference model {name!r}; available: {sorted(REFERENCE_MODELS)}")
    return importlib.import_module(f"{__name__}.{name}")
