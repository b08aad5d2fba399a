"""Paired verdicts with their uncertainty, and the claim summary each reference model writes.

A claim row compares a method with the baseline the paper compares it with, seed by seed:
``d_s = metric(method, s) - metric(baseline, s)`` over the ``n`` seeds run for both. With
``sign = +1`` when the paper claims the method's metric is larger (``-1``: smaller):

* paired t-test ``scipy.stats.ttest_rel(method, baseline)`` (two-sided ``p``), and the
  t interval ``mean(d) +- t_{n-1, (1+c)/2} sd(d) / sqrt(n)``;
* a percentile bootstrap interval of ``mean(d)`` (``num_boot`` resamples of the seeds,
  fixed ``seed``);
* verdict: ``"reproduced"`` when the t interval lies on the claimed side of 0,
  ``"contradicted"`` when on the other side, else ``"not resolved"`` (``"one seed"`` with
  ``n < 2``). ``would_change`` says what would change it: the interval's margin from 0, or
  the number of seeds ``n* = ceil((t sd / mean(d))^2)`` at which today's mean and sd
  would exclude 0, plus the model's own note on the regime.

The summary file ``<out>/<name>_summary.json`` (:func:`write_summary`) holds ``model,
paper, status, claim, measurement, rows`` (:data:`SUMMARY_KEYS`); ``rows`` are the dicts of
:func:`claim_row`. :mod:`bayes_spectral.apps.claims` renders the README table from them.
"""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np

from bayes_spectral._io import write_text_atomic

__all__ = ["paired_difference", "claim_row", "make_summary", "describe", "write_summary",
           "SUMMARY_KEYS"]

SUMMARY_KEYS = ("model", "paper", "status", "claim", "measurement", "rows")
_NAN = float("nan")


def paired_difference(method, baseline, *, confidence: float = 0.95, num_boot: int = 2000,
                      seed: int = 0) -> dict:
    """Statistics of ``d = method - baseline`` (paired by position; module docstring).

    Keys: ``num_seeds, mean_method, mean_baseline, mean_diff, sd_diff, t, p_value, ci_low,
    ci_high, boot_low, boot_high, t_crit`` (NaN where ``n < 2``; ``t, p_value`` NaN when
    ``sd(d) = 0``, where the t interval is the point ``mean(d)``).
    """
    from scipy import stats

    a, b = np.asarray(method, dtype=float), np.asarray(baseline, dtype=float)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference: need two equal-length 1-D samples, got "
                         f"{a.shape} and {b.shape}")
    d, n = a - b, a.size
    out = {"num_seeds": int(n), "mean_method": float(a.mean()),
           "mean_baseline": float(b.mean()), "mean_diff": float(d.mean()), "sd_diff": _NAN,
           "t": _NAN, "p_value": _NAN, "ci_low": _NAN, "ci_high": _NAN, "boot_low": _NAN,
           "boot_high": _NAN, "t_crit": _NAN}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    t_crit = float(stats.t.ppf(0.5 + confidence / 2, n - 1))
    half = t_crit * sd / math.sqrt(n)
    out.update(sd_diff=sd, t_crit=t_crit, ci_low=out["mean_diff"] - half,
               ci_high=out["mean_diff"] + half)
    if sd > 0:
        res = stats.ttest_rel(a, b)
        out.update(t=float(res.statistic), p_value=float(res.pvalue))
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(num_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boot, [0.5 - confidence / 2, 0.5 + confidence / 2])
    out.update(boot_low=float(lo), boot_high=float(hi))
    return out


def _verdict(st: dict, sign: int) -> str:
    if st["num_seeds"] < 2:
        return "one seed"
    lo, hi = sign * st["ci_low"], sign * st["ci_high"]
    lo, hi = min(lo, hi), max(lo, hi)
    return "reproduced" if lo > 0 else "contradicted" if hi < 0 else "not resolved"


def _would_change(st: dict, verdict: str, note: str) -> str:
    n = st["num_seeds"]
    if verdict == "one seed":
        text = "one seed: run >= 2 seeds for a paired test"
    elif verdict == "not resolved":
        m, sd = abs(st["mean_diff"]), st["sd_diff"]
        need = "no mean difference to resolve" if m == 0 else (
            f"today's mean {st['mean_diff']:+.3g} and sd {sd:.3g} would exclude 0 at about "
            f"{max(n + 1, math.ceil((st['t_crit'] * sd / m) ** 2))} seeds")
        text = f"interval [{st['ci_low']:.3g}, {st['ci_high']:.3g}] contains 0 at {n} seeds; {need}"
    else:
        margin = min(abs(st["ci_low"]), abs(st["ci_high"]))
        text = (f"interval [{st['ci_low']:.3g}, {st['ci_high']:.3g}] clears 0 by {margin:.3g}: "
                f"a mean shift of that size would make it unresolved")
    return f"{text}. {note}" if note else text


def claim_row(comparison: str, metric: str, baseline: str, method_values, baseline_values,
              *, sign: int = 1, note: str = "", **stats_kw) -> dict:
    """One claim row: :func:`paired_difference` plus ``comparison, metric, baseline, sign,
    verdict, would_change`` (``sign``: +1 the paper claims a larger metric, -1 smaller)."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign}")
    st = paired_difference(method_values, baseline_values, **stats_kw)
    verdict = _verdict(st, sign)
    return {"comparison": comparison, "metric": metric, "baseline": baseline, "sign": sign,
            **st, "verdict": verdict, "would_change": _would_change(st, verdict, note)}


def make_summary(model: str, paper: str, claim: str, measurement: str | None,
                 rows: list[dict], status: str = "published", setting: str = "") -> dict:
    """The summary dict (:data:`SUMMARY_KEYS`); ``status`` e.g. ``"withdrawn submission"``;
    ``measurement=None``: :func:`describe` of the rows; ``setting`` (optional) tells runs
    of one paper apart in the claims table (e.g. the architectures and estimator)."""
    if not rows:
        raise ValueError(f"{model}: a claim summary needs at least one row")
    return {"model": model, "paper": paper, "status": status, "claim": claim,
            "measurement": describe(rows) if measurement is None else measurement,
            "rows": rows, "setting": setting}


def describe(rows: list[dict], most: int = 4) -> str:
    """``"<comparison>: <metric> <mean method> vs <mean baseline>; ..."`` (first ``most``
    rows, then ``"+k more rows"``), 3 significant digits, with the seed count."""
    parts = [f"{r['comparison']}: {r['metric']} {r['mean_method']:.3g} vs "
             f"{r['mean_baseline']:.3g}" for r in rows[:most]]
    more = f"; +{len(rows) - most} more rows" if len(rows) > most else ""
    seeds = "/".join(str(n) for n in sorted({r["num_seeds"] for r in rows}))
    return "; ".join(parts) + more + f" ({seeds} seeds)"


def write_summary(out_dir, name: str, summary: dict) -> None:
    """Write ``<out_dir>/<name>_summary.json`` (atomic; NaN as null); no-op if None."""
    if out_dir is None:
        return
    path = pathlib.Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_null_nan(summary), indent=1, allow_nan=False)
    write_text_atomic(path / f"{name}_summary.json", text + "\n")


def _null_nan(obj):
    """NaN / Inf -> None and numpy scalars -> Python, recursively (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): _null_nan(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_null_nan(v) for v in obj]
    if isinstance(obj, (np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj
