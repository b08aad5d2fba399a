"""Layer 1: randomised ESDs by element permutation (WeightWatcher's ``randomize=True``).

Permuting the elements of ``W`` keeps their distribution and destroys their correlations,
so the ESD of the permuted matrix is what ``W`` would show without learned structure.
A spike that survives the permutation is a *correlation trap* (a few huge elements).
WeightWatcher 0.7.7's columns, reproduced here:

* ``max_rand_eval``: largest eigenvalue over ``r`` permutations (``r = 5`` when the
  layer has fewer than 100 eigenvalues, else 1), whose pooled ESD also gets the MP fit
  (:func:`~bayes_spectral.spectra.marchenko_pastur.mp_fit`): ``rand_sigma_mp``,
  ``rand_num_spikes`` (= ``num_traps``), ``rand_mp_softrank``, ``rand_bulk_min/max``,
  ``rand_W_scale``;
* from one more permutation ``lambda^r``: ``ww_softrank = max lambda^r / max lambda``,
  ``ww_maxdist = max lambda - max lambda^r`` and ``rand_distance``, the Jensen-Shannon
  distance between the two ascending eigenvalue *vectors* read as distributions over the
  index (:func:`esd_distance`).

Conv kernels: each kernel slice ``W[:, :, i, j]`` is permuted on its own (as
WeightWatcher does), in the order replica-major, slice-minor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .marchenko_pastur import mp_fit
from .spectrum import ConvMode, SpectrumMethod, as_matrices, esd

__all__ = ["shuffle_elements", "randomized_esd", "esd_distance", "randomized_diagnostics"]


def shuffle_elements(mats: torch.Tensor, generator: torch.Generator | None = None,
                     perms: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Each matrix of the stack ``(S, out, in)`` with its elements permuted (row-major
    flat index); ``perms``: the permutations to use, consumed from the front (for
    reproducing another program's draws), else ``torch.randperm(..., generator=generator)``."""
    S, n, m = mats.shape
    out = torch.empty_like(mats)
    for s in range(S):
        if perms is not None:
            if not perms:
                raise ValueError("shuffle_elements: ran out of the permutations given")
            p = perms.pop(0).to(device=mats.device, dtype=torch.long)
            if p.numel() != n * m:
                raise ValueError(f"shuffle_elements: permutation of {p.numel()} elements for "
                                 f"a {n}x{m} matrix")
        else:
            p = torch.randperm(n * m, generator=generator, device="cpu").to(mats.device)
        out[s] = mats[s].reshape(-1)[p].reshape(n, m)
    return out


def randomized_esd(weight: torch.Tensor, num_replicas: int = 1, conv: ConvMode = "pool",
                   method: SpectrumMethod = "svd", generator: torch.Generator | None = None,
                   perms: list[torch.Tensor] | None = None, name: str | None = None
                   ) -> torch.Tensor:
    """Ascending ESD pooled over ``num_replicas`` element permutations of ``weight``."""
    mats = as_matrices(weight, conv=conv, name=name)
    parts = [esd(shuffle_elements(mats, generator, perms), batch=True, name=name,
                 method=method).reshape(-1) for _ in range(num_replicas)]
    return torch.sort(torch.cat(parts)).values


def esd_distance(evals: torch.Tensor, rand_evals: torch.Tensor) -> torch.Tensor:
    """WeightWatcher's ``rand_distance``: with ``p = lambda / sum lambda``, ``q`` likewise
    and ``m = (lambda + lambda^r)/2`` normalised the same way,
    ``sqrt((KL(p || m) + KL(q || m)) / 2)`` (natural log; vectors of equal length)."""
    if evals.shape != rand_evals.shape:
        raise ValueError(f"esd_distance: shapes {tuple(evals.shape)} and "
                         f"{tuple(rand_evals.shape)} differ")
    p = evals / evals.sum()
    q = rand_evals / rand_evals.sum()
    mid = (evals + rand_evals) / 2
    mid = mid / mid.sum()

    def kl(a):
        return torch.where(a > 0, a * torch.log(a / mid), torch.zeros_like(a)).sum()

    return torch.sqrt(((kl(p) + kl(q)) / 2).clamp_min(0.0))


def randomized_diagnostics(weight: torch.Tensor, evals: torch.Tensor,
                           q: float | None = None, m: int | None = None,
                           conv: ConvMode = "pool", method: SpectrumMethod = "svd",
                           generator: torch.Generator | None = None,
                           perms: Sequence[torch.Tensor] | None = None,
                           name: str | None = None) -> dict[str, float]:
    """WeightWatcher's randomised-ESD columns (module docstring) for ``weight`` with ESD
    ``evals`` (ascending). ``q = N/M`` and ``m = M`` of one matrix slice by default."""
    mats = as_matrices(weight, conv=conv, name=name)
    big, small = max(mats.shape[-2:]), min(mats.shape[-2:])
    q = big / small if q is None else q
    m = small if m is None else m
    pool = list(perms) if perms is not None else None
    replicas = 5 if evals.numel() < 100 else 1
    kw = dict(conv=conv, method=method, generator=generator, perms=pool, name=name)
    rand = randomized_esd(weight, replicas, **kw)
    one = randomized_esd(weight, 1, **kw)
    lam_max, one_max = float(evals.max()), float(one.max())
    fit = mp_fit(rand, q, m, name=name)
    out = {"max_rand_eval": float(rand.max()),
           "rand_distance": float(esd_distance(evals.to(one.dtype), one)),
           "ww_softrank": one_max / lam_max, "ww_maxdist": lam_max - one_max,
           "num_traps": fit.num_spikes}
    out.update(fit.to_dict(prefix="rand_"))
    out["rand_num_spikes"] = out.pop("rand_num_spikes")
    return out
