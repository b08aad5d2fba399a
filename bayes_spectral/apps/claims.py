"""The README's claims table, rendered from the reference models' claim summaries.

Each ``bayes-spectral reproduce NAME --out DIR`` writes ``DIR/NAME_summary.json`` (keys
``model, paper, status, claim, measurement, rows``; each row ``comparison, metric,
baseline, sign, num_seeds, mean_method, mean_baseline, mean_diff, sd_diff, t, p_value,
ci_low, ci_high, boot_low, boot_high, verdict, would_change``; written by
``bayes_spectral.models._verdicts``). :func:`load_summaries` reads every such file under a
folder (recursively); :func:`render_claims` renders

* one line per paper: claim, our measurement, seeds, the headline comparison (the
  summary's first row: paired mean difference, 95% t interval, ``ttest_rel`` p), the paper's
  verdict (``reproduced`` when every row is, ``not reproduced`` when none is, else
  ``partly (k/n rows reproduced)``) and what would change the headline verdict;
* with ``detail=True``, a second table with every row.

Numbers are printed with :func:`fmt` (3 significant digits; ``-`` for a missing value).
"""

from __future__ import annotations

import json
import math
import pathlib

__all__ = ["load_summaries", "render_claims", "paper_verdict", "fmt", "SUMMARY_SUFFIX"]

SUMMARY_SUFFIX = "_summary.json"
_KEYS = ("model", "paper", "status", "claim", "measurement", "rows")
_ROW_KEYS = ("comparison", "metric", "baseline", "num_seeds", "mean_diff", "ci_low", "ci_high",
             "p_value", "verdict", "would_change")


def fmt(x) -> str:
    """``x`` with 3 significant digits (``-`` for None / NaN)."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.3g}"


def load_summaries(folder) -> list[dict]:
    """Every ``*_summary.json`` under ``folder`` (sorted by paper, then path), checked."""
    folder = pathlib.Path(folder)
    if not folder.is_dir():
        raise ValueError(f"claims: {folder} is not a folder")
    out = []
    for path in sorted(folder.rglob(f"*{SUMMARY_SUFFIX}")):
        try:
            summary = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"claims: cannot read {path}: {err}") from err
        missing = [k for k in _KEYS if k not in summary]
        missing += sorted({k for r in summary.get("rows", []) for k in _ROW_KEYS if k not in r})
        if missing or not summary.get("rows"):
            raise ValueError(f"claims: {path} is not a claim summary (missing {missing or 'rows'})")
        out.append((summary["paper"], str(path), summary))
    if not out:
        raise ValueError(f"claims: no *{SUMMARY_SUFFIX} under {folder}; run "
                         "`bayes-spectral reproduce NAME --out DIR` first")
    return [s for *_, s in sorted(out, key=lambda t: t[:2])]


def paper_verdict(rows: list[dict]) -> str:
    """From the rows' verdicts: ``reproduced`` (all), ``partly (k/n rows reproduced)``,
    ``not reproduced (c/n rows contradicted)`` (none reproduced, some contradicted), else
    ``not resolved``."""
    n = len(rows)
    k = sum(r["verdict"] == "reproduced" for r in rows)
    c = sum(r["verdict"] == "contradicted" for r in rows)
    if k == n:
        return "reproduced"
    if k:
        return f"partly ({k}/{n} rows reproduced)"
    return f"not reproduced ({c}/{n} rows contradicted)" if c else "not resolved"


def _paper(s: dict) -> str:
    return s["paper"] if s["status"] == "published" else f"{s['paper']} ({s['status']})"


def _test(r: dict) -> str:
    return (f"{r['comparison']}, {r['metric']} vs {r['baseline']}: {fmt(r['mean_diff'])} "
            f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}], p = {fmt(r['p_value'])}")


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_claims(summaries: list[dict], detail: bool = False) -> str:
    """Markdown claims table (module docstring), one line per summary."""
    head = ("| paper | claim | our measurement | seeds | paired difference vs baseline "
            "[95% t interval], ttest_rel p | verdict | what would change the verdict |")
    lines = [head, "|---|---|---|---|---|---|---|"]
    for s in summaries:
        r = s["rows"][0]
        seeds = sorted({x["num_seeds"] for x in s["rows"]})
        lines.append("| " + " | ".join(_cell(c) for c in (
            _paper(s), s["claim"], s["measurement"], "/".join(map(str, seeds)), _test(r),
            paper_verdict(s["rows"]), r["would_change"])) + " |")
    if detail:
        lines += ["", "| paper | comparison | metric | baseline | seeds | mean diff | 95% t "
                  "interval | p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for s in summaries:
            for r in s["rows"]:
                lines.append("| " + " | ".join(_cell(c) for c in (
                    s["paper"], r["comparison"], r["metric"], r["baseline"], r["num_seeds"],
                    fmt(r["mean_diff"]), f"[{fmt(r['ci_low'])}, {fmt(r['ci_high'])}]",
                    fmt(r["p_value"]), r["verdict"])) + " |")
    return "\n".join(lines) + "\n"
