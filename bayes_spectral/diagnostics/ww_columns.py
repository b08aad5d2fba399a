"""Layer 5: WeightWatcher's optional diagnostics as extra ``analyze`` columns.

Options (keyword arguments of :func:`bayes_spectral.analyze`; WeightWatcher 0.7.7's
names, values and column names):

* ``mp_fit=True``: Marchenko-Pastur bulk fit (``spectra/marchenko_pastur.py``): columns
  ``sigma_mp``, ``num_spikes``, ``bulk_min``, ``bulk_max`` (the edges lambda_-/+, in
  eigenvalue units), ``mp_softrank``, ``W_scale``.
* ``randomize=True`` or ``randomize=<seed>`` (``True`` is seed 0): ESD of the
  element-permuted weight (``spectra/randomize.py``): ``max_rand_eval``, ``rand_distance``,
  ``ww_softrank``, ``ww_maxdist``, ``num_traps`` (spikes of the randomised ESD: correlation
  traps), ``rand_num_spikes``, ``rand_sigma_mp``, ``rand_mp_softrank``, ``rand_bulk_min``,
  ``rand_bulk_max``, ``rand_W_scale``. Each layer's permutations come from a generator
  seeded by ``(seed, layer name)``, so a layer's numbers do not depend on the others.
* ``fit="PL"`` (default) | ``"TPL"`` | ``"E_TPL"``: truncated power law
  (``spectra/tpl.py``; ``alpha`` is the TPL exponent, new column ``Lambda``; ``sigma`` is
  NaN); ``E_TPL`` is TPL with the ``xmin_peak`` search range.
* ``fix_fingers=None | "xmin_peak" | "clip_xmax"`` (``spectra/fingers.py``); ``clip_xmax``
  adds ``num_fingers`` and ``raw_alpha`` (the unclipped alpha).
* ``max_evals=<int>``: rows with more eigenvalues are left out (listed in
  ``attrs["skipped"]`` and ``attrs["left_out"]``), as ``min_evals`` leaves out smaller ones.

With any ``fit``/``fix_fingers`` option, ``alpha``, ``xmin``, ``ks_distance``,
``num_tail`` (eigenvalues ``>= xmin``), ``sigma``, ``alpha_weighted`` and
``log_alpha_norm`` are those of the chosen fit. Every table gets ``warning``:
``"over-trained"`` when ``alpha < 2``, ``"under-trained"`` when ``alpha > 6``, else ``""``.
"""

from __future__ import annotations

import math
import zlib

import torch

from ..select import LeftOut, WeightRow
from ..spectra.fingers import fit_clipped_powerlaw, xmin_peak_range
from ..spectra.marchenko_pastur import mp_fit
from ..spectra.powerlaw import fit_powerlaw
from ..spectra.randomize import randomized_diagnostics
from ..spectra.spectrum import ConvMode, SpectrumMethod, as_matrices, esd
from ..spectra.tpl import fit_truncated_powerlaw

__all__ = ["check_ww_options", "split_ww_options", "ww_settings", "apply_max_evals", "ww_columns",
           "training_warning", "OVER_TRAINED_ALPHA", "UNDER_TRAINED_ALPHA"]

OVER_TRAINED_ALPHA = 2.0
UNDER_TRAINED_ALPHA = 6.0
_OPTIONS = ("mp_fit", "randomize", "fit", "fix_fingers", "max_evals")
_DEFAULTS = {"mp_fit": False, "randomize": False, "fit": "PL", "fix_fingers": None,
             "max_evals": None}
_FITS = ("PL", "TPL", "E_TPL")
_FINGERS = (None, False, "xmin_peak", "clip_xmax")


def ww_settings(fit_kwargs: dict) -> dict:
    """Every option of this module by name, defaults filled in and equal meanings spelled
    one way (``randomize=True`` is seed 0, ``fix_fingers=False`` is ``None``): a resume
    folder's record."""
    opts = {**_DEFAULTS, **split_ww_options(fit_kwargs)[0]}
    if opts["randomize"] is not False:
        opts["randomize"] = int(opts["randomize"])
    opts["fix_fingers"] = opts["fix_fingers"] or None
    return opts


def split_ww_options(fit_kwargs: dict) -> tuple[dict, dict]:
    """``(options of this module, the other keyword arguments)``."""
    opts = {k: v for k, v in fit_kwargs.items() if k in _OPTIONS}
    return opts, {k: v for k, v in fit_kwargs.items() if k not in _OPTIONS}


def check_ww_options(fit_kwargs: dict, min_evals: int) -> None:
    """ValueError/TypeError naming a bad option value (before any layer is analysed)."""
    opts, _ = split_ww_options(fit_kwargs)
    fit = opts.get("fit", "PL")
    if fit not in _FITS:
        raise ValueError(f"analyze(): fit must be one of {_FITS}, got {fit!r}")
    fingers = opts.get("fix_fingers")
    if fingers not in _FINGERS:
        raise ValueError(f"analyze(): fix_fingers must be None, 'xmin_peak' or 'clip_xmax', "
                         f"got {fingers!r}")
    if fit != "PL" and fingers == "clip_xmax":
        raise ValueError(f"analyze(): fix_fingers='clip_xmax' refits a plain power law; it "
                         f"cannot be combined with fit={fit!r}")
    rnd = opts.get("randomize", False)
    if not isinstance(rnd, (bool, int)) or (not isinstance(rnd, bool) and rnd < 0):
        raise TypeError(f"analyze(): randomize must be a bool or a seed >= 0, got {rnd!r}")
    top = opts.get("max_evals")
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or top < 1
                            or top < min_evals):
        raise ValueError(f"analyze(): max_evals must be an int >= min_evals={min_evals}, "
                         f"got {top!r}")


def apply_max_evals(kept: list[WeightRow], skipped: list[str], left_out: list[LeftOut],
                    conv: ConvMode, fit_kwargs: dict):
    """Rows with more than ``max_evals`` eigenvalues moved from ``kept`` to ``skipped``
    and ``left_out`` (unchanged without ``max_evals``)."""
    top = fit_kwargs.get("max_evals")
    if top is None:
        return kept, skipped, left_out
    small = [r for r in kept if r.num_evals(conv) <= top]
    big = [r for r in kept if r.num_evals(conv) > top]
    return (small, skipped + [r.name for r in big],
            left_out + [LeftOut(r.name, f"{r.num_evals(conv)} eigenvalues "
                                        f"(> max_evals={top})") for r in big])


def training_warning(alpha: float) -> str:
    """WeightWatcher's ``warning``: over-trained below 2, under-trained above 6."""
    if alpha < OVER_TRAINED_ALPHA:
        return "over-trained"
    if alpha > UNDER_TRAINED_ALPHA:
        return "under-trained"
    return ""


def ww_columns(w: torch.Tensor, metrics: dict, opts: dict, *, conv: ConvMode,
               method: SpectrumMethod, name: str, evals: torch.Tensor | None = None) -> dict:
    """The extra columns of one weight ``w`` (module docstring); ``metrics`` are its
    default metrics (their fit-dependent entries are replaced when a fit option is on);
    ``evals``: ``w``'s ESD when the caller has it (else computed here)."""
    out: dict = {}
    fit, fingers = opts.get("fit", "PL"), opts.get("fix_fingers") or None
    rnd = opts.get("randomize", False)
    if opts.get("mp_fit") or rnd is not False or fit != "PL" or fingers:
        if evals is None:
            evals = esd(w, conv=conv, name=name, method=method)
        big, small = _aspect(w, conv, name)
        if fit != "PL" or fingers:
            out.update(_refit(evals, fit, fingers, name))
        if opts.get("mp_fit"):
            out.update(mp_fit(evals, big / small, small, name=name).to_dict())
        if rnd is not False:
            gen = torch.Generator().manual_seed(_seed(int(rnd), name))
            out.update(randomized_diagnostics(w, evals, big / small, small, conv=conv,
                                              method=method, generator=gen, name=name))
    alpha = out.get("alpha", metrics["alpha"])
    out["warning"] = training_warning(alpha)
    return out


def _aspect(w: torch.Tensor, conv: ConvMode, name: str) -> tuple[int, int]:
    """``(N, M)`` of one matrix slice, ``N >= M``."""
    shape = as_matrices(w, conv=conv, name=name).shape[-2:]
    return max(shape), min(shape)


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1)


def _refit(evals: torch.Tensor, fit: str, fingers, name: str) -> dict:
    """alpha and the tail columns of the fit asked for, with the alpha-dependent norms."""
    extra: dict = {}
    if fit in ("TPL", "E_TPL"):
        rng = xmin_peak_range(evals) if fit == "E_TPL" or fingers == "xmin_peak" else None
        t = fit_truncated_powerlaw(evals, xmin_range=rng, name=name)
        alpha, xmin, ks, sigma = float(t.alpha), float(t.xmin), float(t.ks_distance), math.nan
        extra["Lambda"] = float(t.Lambda)
    elif fingers == "xmin_peak":
        f = fit_powerlaw(evals, xmin_range=xmin_peak_range(evals), name=name)
        alpha, xmin, ks, sigma = float(f.alpha), float(f.xmin), float(f.ks_distance), \
            float(f.sigma)
    else:
        f, num, raw = fit_clipped_powerlaw(evals, name=name)
        alpha, xmin, ks, sigma = float(f.alpha), float(f.xmin), float(f.ks_distance), \
            float(f.sigma)
        extra.update(num_fingers=num, raw_alpha=raw)
    lam_max = float(evals.max())
    positive = evals[evals > 0]
    log_alpha_norm = float(torch.logsumexp(alpha * torch.log(positive), 0)) / math.log(10)
    return {"alpha": alpha, "xmin": xmin, "ks_distance": ks, "sigma": sigma,
            "num_tail": int((evals >= xmin).sum()),
            "alpha_weighted": alpha * math.log10(lam_max), "log_alpha_norm": log_alpha_norm,
            **extra}
