"""Layer 5: the running side of a long ``analyze`` scan: resume files, progress, threads.

* :class:`ResumeStore`: a folder holding ``settings.json`` (what shapes the rows: the
  checkpoint's files and sizes, ``conv``, ``min_evals``, ...) and one ``rows/NNNNN.json``
  per finished matrix (its metrics and ESD), each written atomically
  (:mod:`bayes_spectral._io`), so a scan killed at any point resumes from the last
  finished matrix; a scan under other settings is refused naming the settings that differ.
* :func:`default_threads`: torch's intra-op threads for the scan, ``min(torch's threads,
  cores this process may use - other runnable threads)`` (at least 1), read from the
  instantaneous run queue (``/proc/loadavg``'s running count), so a loaded machine is not
  oversubscribed (torch's OpenMP threads spin at barriers and collapse when the cores are
  shared); :func:`torch_threads` sets it for a block and restores the caller's.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .._io import UnreadableFileError, write_text_atomic

__all__ = ["ResumeMismatchError", "ResumeStore", "default_threads", "progress",
           "torch_threads"]


class ResumeMismatchError(ValueError):
    """A resume folder was written under other settings (the command line exits 2)."""


def _jsonable(obj):
    """Settings as plain JSON (tuples as lists, dtypes and paths as strings)."""
    return json.loads(json.dumps(obj, default=str))


class ResumeStore:
    """Finished rows of one scan under ``folder`` (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike, settings: dict):
        self.folder = Path(folder)
        self.settings = _jsonable(settings)
        self.rows: dict[str, dict] = {}
        self._check_settings()
        self._load_rows()

    def _check_settings(self) -> None:
        path = self.folder / "settings.json"
        if not path.is_file():
            write_text_atomic(path, json.dumps(self.settings, indent=1))
            return
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise UnreadableFileError(f"{path}: unreadable resume settings ({err})") from err
        differ = sorted(k for k in set(old) | set(self.settings)
                        if old.get(k) != self.settings.get(k))
        if differ:
            shown = "; ".join(f"{k}: was {_short(old.get(k))}, now {_short(self.settings.get(k))}"
                              for k in differ)
            raise ResumeMismatchError(f"resume folder {self.folder} holds a scan under other "
                                      f"settings ({shown}); use another folder or start afresh "
                                      "(command line: --no-resume)")

    def _load_rows(self) -> None:
        for path in sorted((self.folder / "rows").glob("*.json")):
            try:
                row = json.loads(path.read_text(encoding="utf-8"))
                self.rows[row["name"]] = row
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise UnreadableFileError(f"{path}: unreadable resume row ({err})") from err

    def get(self, name: str) -> tuple[dict[str, float], np.ndarray] | None:
        """``(metrics, esd)`` of a finished row, or ``None``."""
        row = self.rows.get(name)
        if row is None:
            return None
        metrics = {k: (float("nan") if v is None else v) for k, v in row["metrics"].items()}
        return metrics, np.asarray(row["esd"], dtype=np.float64)

    def save(self, position: int, name: str, metrics: dict[str, float],
             spectrum: np.ndarray) -> None:
        """Write row ``name`` (atomic), ``NaN`` as ``null``."""
        clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in metrics.items()}
        row = {"name": name, "metrics": clean, "esd": [float(x) for x in spectrum]}
        write_text_atomic(self.folder / "rows" / f"{position:05d}.json", json.dumps(row))
        self.rows[name] = row


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def _running_others() -> float:
    """Other runnable threads now: the median of a few reads of ``/proc/loadavg``'s
    running count, less this reading thread (``os.getloadavg`` where there is no /proc)."""
    try:
        counts = []
        for _ in range(5):
            with open("/proc/loadavg", encoding="ascii") as fh:
                counts.append(int(fh.read().split()[3].split("/")[0]) - 1)
            time.sleep(0.002)
        return float(statistics.median(counts))
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def default_threads() -> int:
    """``max(1, min(torch.get_num_threads(), cores - other runnable threads))``."""
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else (os.cpu_count() or 1))
    free = int(cores - _running_others() + 0.5)
    return max(1, min(torch.get_num_threads(), free))


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` torch threads (``None``: :func:`default_threads`)."""
    before = torch.get_num_threads()
    n = default_threads() if n is None else int(n)
    if n < 1:
        raise ValueError(f"threads={n}: need at least 1")
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def progress(items: Iterable, total: int, enabled: bool | None, what: str = "analyze"):
    """``items`` under a tqdm bar on stderr (``enabled=None``: when stderr is a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=what, unit="matrix", leave=False, file=sys.stderr)
