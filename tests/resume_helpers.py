"""Scaffolding shared by the bit-exact resume tests: interrupt a ``bs.fit`` run after a
given epoch, as a crash would, so the next run resumes from its checkpoint folder.

Imported as ``from resume_helpers import ...`` (``tests/`` is on ``sys.path``: pytest
inserts the folder of ``tests/conftest.py``), like ``weightwatcher_numerics``.
"""

from __future__ import annotations

from collections.abc import Callable


class Interrupt(Exception):
    """Raised by :func:`stop_after` to stop a fit between epochs."""


def stop_after(epoch: int) -> Callable[[dict], None]:
    """A ``bs.fit`` callback raising :class:`Interrupt` once ``info["epoch"] == epoch``."""

    def callback(info: dict) -> None:
        if info["epoch"] == epoch:
            raise Interrupt

    return callback


def stop_at_call(n: int) -> Callable[[dict], None]:
    """A ``bs.fit`` callback raising :class:`Interrupt` at its ``n``-th call (epochs of all
    sampler chains counted together: a chain's ``info["epoch"]`` restarts)."""
    calls = [0]

    def callback(info: dict) -> None:
        calls[0] += 1
        if calls[0] == n:
            raise Interrupt

    return callback
