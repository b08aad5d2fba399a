"""Layer 6: checks of the apps' settings (seeds, device, counts, rates), each a
``ValueError`` naming the setting and the value, raised before anything is trained or written.

Seeds are integers in ``[0, 2**32 - 1]`` (the range every seeded generator here accepts
without folding: NumPy's legacy seeding reduces larger ones modulo ``2**32``, so seed
``2**32`` would repeat seed 0's run); a list of seeds holds each one once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

__all__ = ["MAX_SEED", "PRIOR_METHODS", "SAMPLERS", "check_batch_size", "check_device",
           "check_positive", "check_positive_int", "check_seed", "check_seeds"]

MAX_SEED = 2**32 - 1
#: the SG-MCMC methods of ``bs.fit`` that ``compare`` can run per prior
SAMPLERS = ("sgld", "sghmc")
#: every inference method ``CompareConfig.methods`` may name (``map`` always runs)
PRIOR_METHODS = ("map", "svi", *SAMPLERS)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int in ``[0, MAX_SEED]``; ``ValueError`` naming it otherwise."""
    if not _is_int(seed):
        raise ValueError(f"{name} must be an integer, got {seed!r}")
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} {seed} is out of range: seeds are integers in "
                         f"[0, 2**32 - 1 = {MAX_SEED}]")
    return int(seed)


def check_seeds(seeds: Sequence) -> tuple[int, ...]:
    """Every seed valid (:func:`check_seed`) and none repeated (a repeat would count one
    run twice in the mean and sd over seeds)."""
    out = tuple(check_seed(s) for s in seeds)
    repeated = sorted({s for s in out if out.count(s) > 1})
    if repeated:
        raise ValueError(f"seeds must be distinct: duplicate seed(s) {repeated} in {list(out)}")
    return out


def check_positive_int(value, name: str) -> int:
    """``value`` as an int >= 1; ``ValueError`` naming ``name`` otherwise."""
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_batch_size(value, name: str) -> int | None:
    """A batch size: a positive integer, or ``None`` / ``"full"`` (every training point,
    returned as ``None``); ``ValueError`` naming ``name`` otherwise."""
    if value is None or (isinstance(value, str) and value.strip().lower() == "full"):
        return None
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer or 'full' (every training "
                         f"point), got {value!r}")
    return int(value)


def check_positive(value, name: str) -> float:
    """``value`` as a finite float > 0; ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
            math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(value)


def check_device(name) -> torch.device:
    """A device this machine can train on: ``cpu``, ``cuda[:i]`` when CUDA is available
    with that many devices, ``mps`` when available; ``ValueError`` naming it otherwise."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise ValueError(f"device {name!r} is not a device name (try cpu or cuda)") from err
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: CUDA is not available on this machine "
                             "(torch built without CUDA or no GPU); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {name!r}: only {count} CUDA device(s) here")
        return device
    if device.type == "mps" and torch.backends.mps.is_available():
        return device
    raise ValueError(f"device {name!r} cannot train here (use cpu"
                     + (" or cuda)" if torch.cuda.is_available() else ")"))
