"""``bayes_spectral.distributed``: the public data-parallel names, and ``python -m
bayes_spectral.distributed`` (the demo in :mod:`bayes_spectral.apps.ddp_demo`).

The machinery lives in :mod:`bayes_spectral.bnn.distributed` (layer 4); this module only
re-exports it, so users' scripts keep ``bayes_spectral.distributed.init()`` and ``launch``.
"""

from .apps.ddp_demo import main
from .bnn.distributed import (
    DEFAULT_TIMEOUT,
    DataParallelELBO,
    DataScale,
    DistributedError,
    GlobalBatchShards,
    PriorSplit,
    device,
    init,
    is_distributed,
    launch,
    likelihood_factor,
    split_prior_sites,
)

__all__ = ["DEFAULT_TIMEOUT", "DataParallelELBO", "DataScale", "DistributedError",
           "GlobalBatchShards", "PriorSplit", "device", "init", "is_distributed", "launch",
           "likelihood_factor", "main", "split_prior_sites"]

if __name__ == "__main__":
    raise SystemExit(main())
