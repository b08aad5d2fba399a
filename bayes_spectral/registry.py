"""Registries: the extension points where users add their own priors, penalties, guides,
likelihoods and datasets under a name.

One :class:`Registry` per kind of object, living in the layer that owns the objects
(``distributions.PRIORS``, ``penalties.PENALTIES``, ``bnn`` guides and likelihoods,
``data.DATASETS``). The CLI's ``choices=`` and ``compare`` read them, so a name registered
by a user's module (``bayes-spectral --plugin my_module ...``) is usable everywhere.

    >>> PRIORS = Registry("prior")
    >>> @PRIORS.register("my_prior")
    ... def my_prior(shape): ...
    >>> PRIORS.get("my_prior") is my_prior
    True
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry", "UnknownNameError"]


class UnknownNameError(KeyError, ValueError):
    """A name no registry entry has; a ``KeyError`` for lookups and a ``ValueError`` for
    argument checks (the CLI maps it to exit 2). Its message lists the known names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """Name -> object map for one ``kind`` (``"prior"``, ``"penalty"``, ...), in insertion
    order. ``register(name)(obj)`` adds (refusing a taken name unless ``replace=True``),
    ``get(name)`` looks up (the error lists the known names), ``names()`` lists."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, *, replace: bool = False) -> Callable[[T], T]:
        """Decorator (or call ``register(name)(obj)``) that adds ``obj`` under ``name``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} registry: a name must be a non-empty string, "
                             f"got {name!r}")

        def add(obj: T) -> T:
            if name in self._items and not replace and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered "
                                 "(pass replace=True to override it)")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        """The object registered under ``name``; :class:`UnknownNameError` naming the known
        ones."""
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {self.names()}") from None

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a user's entry, e.g. at the end of a test)."""
        self.get(name)
        del self._items[name]

    def names(self) -> list[str]:
        """Registered names, in registration order."""
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"
