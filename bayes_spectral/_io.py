"""Atomic file writes, the one safe reader, and a folder lock.

Writes go to a temporary file in the target's folder, then ``os.replace``: a reader (or a
resumed run) sees either the old file or the complete new one, never a partial write,
whatever the writer (torch.save, netCDF, CSV, PNG, text) and wherever it is stopped. The
temporary name keeps the target's suffix (``.results-x1y2.tmp.csv``), so writers that infer
the format from the name (``savefig``, ``to_netcdf``) work unchanged.

Files read back (runs, state dicts) go through :func:`load_tensors`: ``torch.load`` with
``weights_only=True`` (tensors and plain data only; unpickling never runs code), every
failure an :class:`UnreadableFileError` naming the file.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["FolderLockedError", "UnreadableFileError", "atomic_path", "check_writable_dir",
           "folder_lock", "load_tensors", "write_atomic", "write_text_atomic"]


class UnreadableFileError(ValueError):
    """A file is missing, corrupt, truncated or holds something other than tensors and
    plain data (the command line exits 3); the message starts with the file's path."""


class FolderLockedError(RuntimeError):
    """Another process holds the lock of a folder (the command line exits 2)."""


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o644) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same suffix); when the block succeeds, fsync
    it, set ``mode`` and ``os.replace`` it onto ``path`` (then fsync the folder); on any
    error or interruption remove it, leaving ``path`` as it was."""
    path = Path(path)
    folder = path.resolve().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=f".tmp{path.suffix}",
                               dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on folders
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_atomic(path: str | os.PathLike, writer: Callable[[str], Any]) -> Path:
    """``writer(tmp)`` writes the file's content to a temporary path, which then replaces
    ``path`` atomically (:func:`atomic_path`); e.g. ``write_atomic(p, df.to_csv)``."""
    with atomic_path(path) as tmp:
        writer(tmp)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
    return Path(path)


def load_tensors(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain data only (a pickle that
    would build any other object is refused, never run); :class:`UnreadableFileError`
    naming ``path`` for a missing, empty, corrupt or unsafe file."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UnreadableFileError(f"{path}: no such file" if not path.exists()
                                  else f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise UnreadableFileError(f"{path}: empty file (0 bytes)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises pickle, zip, runtime and value errors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise UnreadableFileError(
            f"{path}: cannot be loaded safely with torch.load(weights_only=True): {reason}"
        ) from err


def check_writable_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create the folder ``path`` if needed and check a file can be written in it;
    ``ValueError`` naming ``what`` and the path otherwise (a file, or an unwritable place)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        reason = os.strerror(err.errno) if err.errno else str(err)
        if err.errno == errno.ENOTDIR:
            reason = "a parent is a file, not a folder"
        raise ValueError(f"{what} {path}: not writable ({reason})") from err
    return path


#: lock files this process holds (so a nested ``folder_lock`` of the same folder passes)
_HELD: set[str] = set()


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = ".lock",
                what: str = "run") -> Iterator[Path]:
    """Hold an exclusive ``fcntl.flock`` on ``folder/name`` for the block;
    :class:`FolderLockedError` naming ``what`` and the lock file at once if another process
    (or another open of the file) holds it.
    The lock is released when the block ends or the process dies (the file stays)."""
    import fcntl

    lock = Path(folder) / name
    key = str(lock.resolve())
    if key in _HELD:  # this process holds it already (re-entrant)
        yield lock
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            raise FolderLockedError(
                f"another {what} is using {folder} (it holds the lock {lock}); wait for it "
                "to finish or use another folder") from err
        _HELD.add(key)
        try:
            yield lock
        finally:
            _HELD.discard(key)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
