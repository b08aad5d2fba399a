"""Layer 4: data as users have it, as epochs of mini-batches for :func:`~bayes_spectral.fit`.

:func:`as_source` reads ``data`` given as

* a pair ``(x, y)`` or a :class:`~bayes_spectral.data.Split` (its training part), numpy
  arrays converted with ``torch.as_tensor``;
* a ``torch.utils.data.Dataset``: a ``TensorDataset(*xs, y)`` (``x = xs[0]``, or the tuple
  ``xs`` when there are several) or any map-style dataset of ``(x, y)`` items;
* a ``DataLoader`` or any re-iterable of ``(x, y)`` batches (a batch ``[*xs, y]`` of more
  than two entries, as a ``TensorDataset`` of several inputs gives, reads ``x = tuple(xs)``).

The inputs ``x`` are a tensor (any dtype: token ids stay integer), a tuple of tensors (the
network is called as ``net(*x)``) or a dict of tensors (``net(**x)``); :func:`call_net`.
Floating-point tensors are cast to the fit's ``dtype``, others keep theirs (:func:`inputs_to`).

Epochs. Pairs, Splits and datasets are cut by ``fit`` into batches of ``batch_size``: each
epoch draws ``perm = torch.randperm(n)`` from the global torch RNG (``shuffle=True``) or takes
the rows in order; a dataset's items are collated with ``default_collate``, so a
``TensorDataset`` gives the same batches as its tensors. A loader gives its own batches in its
own order (``batch_size`` is then unused); its ``torch.Generator`` states (``generator=``,
its sampler's) are :meth:`DataSource.state_dict` for the checkpoint, and shuffling with the
global RNG is covered by the RNG states the checkpoint already holds.

``num_data`` (:attr:`DataSource.num_data`): ``len(dataset)`` for a dataset and
``len(loader.dataset)`` for a loader over one; ``None`` for a pair or Split (the model's
``num_data`` applies as given) and for an iterable of unknown length.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, TensorDataset, default_collate

from ..data import as_xy

__all__ = ["DataSource", "LoaderSource", "TensorSource", "as_source", "call_net", "first_leaf",
           "inputs_to", "leaves", "num_rows", "take_rows", "targets_to"]

Inputs = Any  # a tensor, a tuple/list of tensors or a dict of tensors


# ----------------------------------------------------------------------------- inputs


def leaves(x: Inputs) -> list[torch.Tensor]:
    """The tensors of ``x`` (a tensor, a tuple/list or a dict of tensors), in order."""
    if isinstance(x, Mapping):
        return list(x.values())
    if isinstance(x, (tuple, list)):
        return list(x)
    return [x]


def map_inputs(x: Inputs, fn) -> Inputs:
    """``fn`` applied to every tensor of ``x``, the structure kept."""
    if isinstance(x, Mapping):
        return {k: fn(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(fn(v) for v in x)
    return fn(x)


def first_leaf(x: Inputs) -> torch.Tensor:
    """The first tensor of ``x`` (its device is the batch's device)."""
    found = leaves(x)
    if not found:
        raise ValueError("the inputs x hold no tensor")
    return found[0]


def num_rows(x: Inputs) -> int:
    """Rows of the batch: the first dimension of the first tensor of ``x`` (0 for a scalar)."""
    t = first_leaf(x)
    return int(t.shape[0]) if t.dim() else 0


def take_rows(x: Inputs, idx) -> Inputs:
    """Rows ``idx`` (an index tensor or a slice) of every tensor of ``x``."""
    return map_inputs(x, lambda t: t[idx])


def inputs_to(x: Inputs, device: torch.device, dtype: torch.dtype) -> Inputs:
    """``x`` on ``device``; floating-point tensors cast to ``dtype``, others (token ids,
    masks) keep their dtype."""
    return map_inputs(x, lambda t: t.to(device=device, dtype=dtype if t.is_floating_point()
                                        else t.dtype))


def targets_to(y: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """``y`` on ``device``; floating-point targets cast to ``dtype``, integer labels kept."""
    return y.to(device=device, dtype=dtype if y.is_floating_point() else y.dtype)


def call_net(net: torch.nn.Module, x: Inputs):
    """``net(*x)`` for a tuple/list, ``net(**x)`` for a dict, ``net(x)`` for a tensor."""
    if isinstance(x, Mapping):
        return net(**x)
    if isinstance(x, (tuple, list)):
        return net(*x)
    return net(x)


def _tensor(v, what: str) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, np.ndarray):
        if v.dtype == object:
            raise TypeError(f"{what}: numpy arrays of Python objects cannot be used")
        return torch.as_tensor(v)
    raise TypeError(f"{what}: expected a torch tensor or a numpy array, got {type(v).__name__}")


def as_inputs(x, what: str = "data") -> Inputs:
    """``x`` with numpy arrays converted: a tensor, a tuple of tensors or a dict of them."""
    if isinstance(x, Mapping):
        return {str(k): _tensor(v, f"{what}: x[{k!r}]") for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return tuple(_tensor(v, f"{what}: x[{i}]") for i, v in enumerate(x))
    return _tensor(x, f"{what}: x")


def split_batch(batch, what: str = "data") -> tuple[Inputs, torch.Tensor]:
    """``(x, y)`` of one batch: a pair, or ``[*xs, y]`` read as ``x = tuple(xs)``."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        x = batch[0] if len(batch) == 2 else tuple(batch[:-1])
        return as_inputs(x, what), _tensor(batch[-1], f"{what}: y")
    raise TypeError(f"{what}: every batch must be a pair (x, y) (or [*xs, y]), got "
                    f"{type(batch).__name__}" + (f" of length {len(batch)}"
                                                  if isinstance(batch, (tuple, list)) else ""))


def _concat(parts: list[Inputs]) -> Inputs:
    first = parts[0]
    if isinstance(first, Mapping):
        return {k: torch.cat([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return tuple(torch.cat([p[i] for p in parts]) for i in range(len(first)))
    return torch.cat(parts)


class _KeptRng:
    """Restores the global RNGs and the given generators on exit (a look that draws nothing)."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __enter__(self):
        self.states = ([g.get_state() for g in self.generators], torch.get_rng_state(),
                       random.getstate(), np.random.get_state())  # noqa: NPY002
        return self

    def __exit__(self, *exc) -> None:
        gens, torch_state, py_state, np_state = self.states
        for g, s in zip(self.generators, gens, strict=True):
            g.set_state(s)
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002


# ----------------------------------------------------------------------------- sources


class DataSource:
    """Epochs of ``(x, y, rows)`` batches on a device; see the module docstring.

    ``num_data``: the dataset's length where known (``None`` for a pair/Split and for an
    iterable of unknown length); ``needs_num_data``: the model's ``num_data=None`` is then
    replaced by ``num_data`` (a dataset or a loader), or refused when that is unknown.
    """

    num_data: int | None = None
    needs_num_data: bool = True
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> DataSource:
        """Batches are moved to ``device`` (floating point cast to ``dtype``)."""
        self.device, self.dtype = torch.device(device), dtype
        return self

    def epoch(self) -> Iterator[tuple[Inputs, torch.Tensor, int]]:
        """One pass: ``(x, y, rows)`` per batch, on the device."""
        raise NotImplementedError

    def first_batch(self) -> tuple[Inputs, torch.Tensor]:
        """The first batch as it comes (before :meth:`to`), drawing nothing from the RNGs."""
        raise NotImplementedError

    def rows_to_check(self) -> tuple[Inputs, torch.Tensor]:
        """What ``fit`` checks before training: all rows of tensors, else the first batch."""
        return self.first_batch()

    def setup_batch(self) -> tuple[Inputs, torch.Tensor]:
        """:meth:`first_batch` moved to the device (sets up the guide's parameters)."""
        x, y, _ = _moved(self, *self.first_batch())
        return x, y

    def materialize(self) -> tuple[Inputs, torch.Tensor]:
        """All rows as one ``(x, y)`` (full-batch methods, validation), as they come."""
        raise NotImplementedError

    def state_dict(self) -> list[torch.Tensor]:
        """States of the source's own ``torch.Generator`` objects (for the checkpoint)."""
        return [g.get_state() for g in self._generators()]

    def load_state_dict(self, state: list[torch.Tensor]) -> None:
        """Restore :meth:`state_dict` (CPU byte tensors, whatever the checkpoint's device)."""
        gens = self._generators()
        if len(state) != len(gens):
            raise ValueError(f"the checkpoint holds {len(state)} data generator state(s), the "
                             f"data has {len(gens)}: resume with the same kind of data")
        for g, s in zip(gens, state, strict=True):
            g.set_state(s.cpu())

    def _generators(self) -> list[torch.Generator]:
        return []


class TensorSource(DataSource):
    """Rows of tensors ``x`` (structure kept) and ``y``, cut into ``batch_size`` batches."""

    def __init__(self, x: Inputs, y: torch.Tensor, batch_size: int, shuffle: bool = True,
                 num_data: int | None = None):
        self.x, self.y = x, y
        self.n = num_rows(x)
        self.batch_size, self.shuffle = min(int(batch_size), self.n), bool(shuffle)
        self.num_data, self.needs_num_data = num_data, num_data is not None

    def to(self, device: torch.device, dtype: torch.dtype) -> TensorSource:
        super().to(device, dtype)
        self.x = inputs_to(self.x, self.device, dtype)
        self.y = targets_to(self.y, self.device, dtype)
        return self

    def order(self) -> torch.Tensor:
        """This epoch's row order: ``torch.randperm(n)`` (global RNG) or ``arange(n)``."""
        perm = torch.randperm(self.n) if self.shuffle else torch.arange(self.n)
        return perm.to(self.device)

    def epoch(self) -> Iterator[tuple[Inputs, torch.Tensor, int]]:
        perm, bs = self.order(), self.batch_size
        for i in range(0, self.n, bs):
            idx = perm[i:i + bs]
            yield take_rows(self.x, idx), self.y[idx], int(idx.shape[0])

    def first_batch(self) -> tuple[Inputs, torch.Tensor]:
        return take_rows(self.x, slice(0, self.batch_size)), self.y[:self.batch_size]

    def materialize(self) -> tuple[Inputs, torch.Tensor]:
        return self.x, self.y

    def rows_to_check(self) -> tuple[Inputs, torch.Tensor]:
        return self.x, self.y


class DatasetSource(TensorSource):
    """A map-style dataset of ``(x, y)`` items: index batches as :class:`TensorSource`,
    items collated with ``default_collate``."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = True):
        self.dataset = dataset
        self.n = len(dataset)  # type: ignore[arg-type]
        if self.n < 1:
            raise ValueError("data: the dataset is empty")
        self.batch_size, self.shuffle = min(int(batch_size), self.n), bool(shuffle)
        self.num_data, self.needs_num_data = self.n, True

    def to(self, device: torch.device, dtype: torch.dtype) -> DatasetSource:
        return DataSource.to(self, device, dtype)  # type: ignore[return-value]

    def _rows(self, idx) -> tuple[Inputs, torch.Tensor]:
        return split_batch(default_collate([self.dataset[int(i)] for i in idx]))

    def order(self) -> torch.Tensor:
        return torch.randperm(self.n) if self.shuffle else torch.arange(self.n)

    def epoch(self) -> Iterator[tuple[Inputs, torch.Tensor, int]]:
        perm, bs = self.order(), self.batch_size
        for i in range(0, self.n, bs):
            x, y = self._rows(perm[i:i + bs])
            yield _moved(self, x, y)

    def first_batch(self) -> tuple[Inputs, torch.Tensor]:
        return self._rows(range(self.batch_size))

    def rows_to_check(self) -> tuple[Inputs, torch.Tensor]:
        return self.first_batch()

    def materialize(self) -> tuple[Inputs, torch.Tensor]:
        return self._rows(range(self.n))


def _moved(source: DataSource, x: Inputs, y: torch.Tensor):
    dtype = source.dtype if source.dtype is not None else torch.get_default_dtype()
    return inputs_to(x, source.device, dtype), targets_to(y, source.device, dtype), num_rows(x)


class LoaderSource(DataSource):
    """A ``DataLoader`` or any re-iterable of ``(x, y)`` batches, in its own order."""

    def __init__(self, loader, what: str = "data"):
        self.loader, self.what = loader, what
        dataset = getattr(loader, "dataset", None)
        self.num_data = _length(dataset) if dataset is not None else None

    def _generators(self) -> list[torch.Generator]:
        found: dict[int, torch.Generator] = {}
        sampler = getattr(self.loader, "sampler", None)
        inner = getattr(getattr(self.loader, "batch_sampler", None), "sampler", None)
        for owner in (self.loader, sampler, inner):
            g = getattr(owner, "generator", None)
            if isinstance(g, torch.Generator):
                found.setdefault(id(g), g)
        return list(found.values())

    def epoch(self) -> Iterator[tuple[Inputs, torch.Tensor, int]]:
        for batch in self.loader:
            yield _moved(self, *split_batch(batch, self.what))

    def first_batch(self) -> tuple[Inputs, torch.Tensor]:
        with _KeptRng(self._generators()):
            for batch in self.loader:
                return split_batch(batch, self.what)
        raise ValueError(f"{self.what}: the loader gives no batch")

    def materialize(self) -> tuple[Inputs, torch.Tensor]:
        with _KeptRng(self._generators()):
            pairs = [split_batch(b, self.what) for b in self.loader]
        if not pairs:
            raise ValueError(f"{self.what}: the loader gives no batch")
        return _concat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])


def _length(obj) -> int | None:
    try:
        return int(len(obj))
    except TypeError:
        return None


def _is_pair(data) -> bool:
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[1], (torch.Tensor, np.ndarray)))


def _iterable_source(data, what: str) -> LoaderSource:
    if isinstance(data, IterableDataset):
        raise TypeError(f"{what}: an IterableDataset yields single examples; wrap it in a "
                        "DataLoader(dataset, batch_size=...) to give batches")
    if iter(data) is data:
        raise TypeError(f"{what}: a one-shot iterator ({type(data).__name__}) cannot give "
                        "several epochs; pass a DataLoader or a re-iterable of (x, y) batches")
    return LoaderSource(data, what)


def as_source(data, what: str = "data", *, batch_size: int = 128,
              shuffle: bool = True) -> DataSource:
    """The :class:`DataSource` of ``data`` (module docstring); ``TypeError`` naming ``what``
    for anything else (a one-shot iterator included: every epoch needs a new pass). A
    tuple/list is a pair ``(x, y)`` when it has two entries and the second is a tensor or an
    array; otherwise a list of batches."""
    if isinstance(data, TensorDataset):
        t = [_tensor(v, f"{what}: TensorDataset tensor") for v in data.tensors]
        if len(t) < 2:
            raise TypeError(f"{what}: a TensorDataset needs inputs and targets (>= 2 tensors), "
                            f"got {len(t)}")
        x = t[0] if len(t) == 2 else tuple(t[:-1])
        return TensorSource(x, t[-1], batch_size, shuffle, num_data=len(data))
    if hasattr(data, "x_train") or _is_pair(data):
        x, y = as_xy(data, what)
        return TensorSource(as_inputs(x, what), _tensor(y, f"{what}: y"), batch_size, shuffle)
    if isinstance(data, (torch.Tensor, np.ndarray, Mapping, str)):
        raise _unknown(data, what)
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset) and \
            _length(data) is not None:
        return DatasetSource(data, batch_size, shuffle)
    if hasattr(data, "__iter__"):
        if isinstance(data, (tuple, list)) and not data:
            raise ValueError(f"{what}: an empty list of batches")
        return _iterable_source(data, what)
    raise _unknown(data, what)


def _unknown(data, what: str) -> TypeError:
    return TypeError(f"{what} must be a pair (x, y), a bayes_spectral.data.Split, a torch "
                     "Dataset, a DataLoader or a re-iterable of (x, y) batches, got "
                     f"{type(data).__name__}")
