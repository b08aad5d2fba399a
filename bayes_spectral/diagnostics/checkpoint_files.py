"""Layer 5: checkpoints as they are published, read one tensor at a time.

A :class:`TensorSource` lists a checkpoint's tensors (name -> :class:`TensorInfo`: shape,
dtype, file) from headers only, and loads one tensor on request, so ``analyze`` holds the
largest matrix and its decomposition, never the model. Sources (:func:`open_checkpoint`):

* ``.safetensors`` file, or a folder of shards (``model.safetensors.index.json`` or every
  ``*.safetensors``): the header (8-byte length + JSON) is read and checked here (every
  tensor's byte range inside the file: a truncated shard is named with its first cut
  tensor), tensors memory-mapped by ``safetensors.safe_open``;
* ``.bin`` / ``.pt`` / ``.pth`` state dicts (a folder of them, ``pytorch_model.bin.index.json``):
  ``torch.load(weights_only=True, mmap=True)`` (never unpickles objects);
* a LoRA adapter folder (:mod:`bayes_spectral.diagnostics.lora`); a fine-tune against a
  base (:class:`DeltaSource`: ``W - W_base``).

Every failure is an :class:`~bayes_spectral._io.UnreadableFileError` (a ``ValueError``)
naming the file and, where one is at fault, the tensor; a tensor holding NaN/Inf raises
:class:`NonFiniteTensorError` naming both when loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from .._checks import check_tensor_storage
from .._io import UnreadableFileError, load_tensors

__all__ = ["CheckpointMismatchError", "DeltaSource", "MappingSource", "NonFiniteTensorError",
           "TensorInfo", "TensorSource", "as_source", "open_checkpoint"]

_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
              "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
              "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
              "F8_E5M2": getattr(torch, "float8_e5m2", None)}
_MAX_HEADER = 100 * 2**20
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


class CheckpointMismatchError(ValueError):
    """A base checkpoint does not fit the one analysed (a tensor of another shape)."""


class NonFiniteTensorError(ValueError):
    """A checkpoint tensor holds NaN or Inf (the command line exits 5)."""


class TensorInfo(NamedTuple):
    """A stored tensor, known from the header: ``shape``, ``dtype`` and its ``file``."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path | None


class TensorSource:
    """Names -> :class:`TensorInfo` (``infos``, checkpoint order); :meth:`load` reads one
    tensor (checked finite for floating dtypes); ``config``: ``config.json`` if any;
    ``left_out``: ``(name, reason)`` of stored things that are no tensor to analyse."""

    def __init__(self, path: Path | None, infos: dict[str, TensorInfo], config: dict | None = None):
        self.path, self.infos, self.config = path, infos, config or {}
        self.left_out: list[tuple[str, str]] = []

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def where(self, name: str) -> str:
        """The file holding ``name`` (or the source's path) for messages."""
        info = self.infos.get(name)
        return str(info.file if info is not None and info.file else self.path or "<memory>")

    def load(self, name: str) -> torch.Tensor:
        """Tensor ``name``; :class:`NonFiniteTensorError` naming file and tensor on NaN/Inf."""
        t = self._read(name)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
            raise NonFiniteTensorError(f"{self.where(name)}: tensor {name!r} holds {what} "
                                       "values")
        return t

    def edge_bytes(self, name: str) -> bytes:
        """Bytes of the first and last row of ``name`` (a cheap test of equal values)."""
        t = self._read(name)
        return _bytes(t[:1]) + _bytes(t[-1:])

    def fingerprint(self) -> dict:
        """What identifies the checkpoint for a resumed scan: its files and their sizes."""
        files = sorted({str(i.file) for i in self.infos.values() if i.file is not None})
        return {"path": str(self.path), "files": {f: os.path.getsize(f) for f in files}}

    def close(self) -> None:
        """Release open files (memory maps)."""


# --- safetensors ------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensors of a ``.safetensors`` file from its header (8-byte little-endian length, JSON
    ``{name: {dtype, shape, data_offsets}}``), checking each byte range lies in the file.

    :raises UnreadableFileError: missing/empty file, unreadable header, unknown dtype, a
        tensor whose bytes end past the end of the file (truncated), naming the tensor.
    """
    if not path.is_file():
        raise UnreadableFileError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise UnreadableFileError(f"{path}: not a valid safetensors file (empty or "
                                      f"{len(head)} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER):
            raise UnreadableFileError(f"{path}: not a valid safetensors file (header length "
                                      f"{n} bytes, the file has {size})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UnreadableFileError(f"{path}: not a valid safetensors file (unreadable "
                                      f"JSON header: {err})") from err
    if not isinstance(header, dict):
        raise UnreadableFileError(f"{path}: not a valid safetensors file (header is not a map)")
    return {name: _st_info(path, name, spec, size - 8 - n)
            for name, spec in header.items() if name != "__metadata__"}


def _st_info(path: Path, name: str, spec, data_size: int) -> TensorInfo:
    """One header entry as :class:`TensorInfo`, its byte range checked."""
    try:
        dtype = _ST_DTYPES[spec["dtype"]]
        shape = tuple(int(s) for s in spec["shape"])
        begin, end = (int(x) for x in spec["data_offsets"])
    except (KeyError, TypeError, ValueError) as err:
        raise UnreadableFileError(f"{path}: tensor {name!r} has an unreadable header entry "
                                  f"{spec!r}") from err
    if dtype is None:
        raise UnreadableFileError(f"{path}: tensor {name!r} has dtype {spec['dtype']}, which "
                                  "this torch cannot read")
    need = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if end > data_size:
        raise UnreadableFileError(f"{path}: tensor {name!r} is truncated (its bytes end at "
                                  f"{end}, the file holds {data_size} bytes of data)")
    if end - begin != need or begin < 0:
        raise UnreadableFileError(f"{path}: tensor {name!r} has {end - begin} bytes for "
                                  f"shape {shape} {dtype} ({need} needed)")
    return TensorInfo(shape, dtype, path)


class SafetensorsSource(TensorSource):
    """One or more ``.safetensors`` files. Each read maps the file (``safe_open``), copies
    the one tensor out and unmaps it, so pages of tensors already analysed do not stay
    resident (held maps would count the whole checkpoint in the process's RSS)."""

    @contextlib.contextmanager
    def _handle(self, file: Path, name: str):
        """A ``safe_open`` handle of ``file`` for the block; errors name file and tensor."""
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as handle:
                yield handle
        except UnreadableFileError:
            raise
        except Exception as err:  # safetensors raises its own error types
            raise UnreadableFileError(f"{file}: tensor {name!r} cannot be read "
                                      f"({_first_line(err)})") from err

    def _read(self, name: str) -> torch.Tensor:
        with self._handle(self.infos[name].file, name) as handle:
            return handle.get_tensor(name)

    def edge_bytes(self, name: str) -> bytes:
        n = self.infos[name].shape[0]
        with self._handle(self.infos[name].file, name) as handle:
            sl = handle.get_slice(name)
            return _bytes(sl[0:1]) + _bytes(sl[n - 1:n])


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UnreadableFileError(f"{path}: unreadable JSON ({_first_line(err)})") from err
    if not isinstance(obj, dict):
        raise UnreadableFileError(f"{path}: expected a JSON object")
    return obj


def _index_files(index: Path) -> dict[str, Path]:
    """``weight_map`` of a shard index: tensor -> shard path; a missing shard is named with
    the first tensor the index puts in it."""
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UnreadableFileError(f"{index}: no 'weight_map' object")
    out = {str(k): index.parent / str(v) for k, v in weight_map.items()}
    for name, shard in out.items():
        if not shard.is_file():
            raise UnreadableFileError(f"{shard}: no such file (the index {index.name} puts "
                                      f"tensor {name!r} there)")
    return out


def natural_key(name: str) -> tuple:
    """Sort key comparing digit runs as numbers (``h.2`` before ``h.10``)."""
    return tuple(int(p) if i % 2 else p for i, p in enumerate(re.split(r"(\d+)", name)))


def _safetensors_infos(files: list[Path], index: dict[str, Path] | None) -> dict[str, TensorInfo]:
    """All tensors of the shards in natural name order (safetensors stores them sorted by
    name, so a model's own order is lost); with an index, every tensor it names must be in
    the shard it names."""
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in infos:
                raise UnreadableFileError(f"{f}: tensor {name!r} is also in {infos[name].file}")
            infos[name] = info
    for name, shard in (index or {}).items():
        if name not in infos or infos[name].file != shard:
            raise UnreadableFileError(f"{shard}: has no tensor {name!r} (the index names it)")
    return {n: infos[n] for n in sorted(infos, key=natural_key)}


# --- torch state dicts ------------------------------------------------------------------


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``, memory-mapped where the format allows; a plain
    state dict or one under ``state_dict`` / ``model`` / ``model_state_dict``."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # legacy (non-zip) files cannot be mapped; errors named below
        obj = load_tensors(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UnreadableFileError(f"{path}: expected a state_dict (a dict of tensors)")
    for name, t in obj.items():
        try:
            check_tensor_storage(t, f"tensor {name!r}")
        except (TypeError, ValueError) as err:
            raise UnreadableFileError(f"{path}: {err}") from err
    return obj


class MappingSource(TensorSource):
    """Tensors already in memory (a state dict, a module's, a mapped ``.bin`` file)."""

    def __init__(self, state: Mapping[str, torch.Tensor], path: Path | None = None,
                 files: Mapping[str, Path] | None = None, config: dict | None = None):
        infos = {k: TensorInfo(tuple(v.shape), v.dtype, (files or {}).get(k, path))
                 for k, v in state.items()}
        super().__init__(path, infos, config)
        self.state = state

    def _read(self, name: str) -> torch.Tensor:
        return self.state[name].detach()


def _torch_source(files: list[Path], root: Path, config: dict | None) -> MappingSource:
    state: dict[str, torch.Tensor] = {}
    where: dict[str, Path] = {}
    for f in files:
        for k, v in _torch_state(f).items():
            state[k], where[k] = v, f
    return MappingSource(state, root, where, config)


# --- opening a path ---------------------------------------------------------------------


def open_checkpoint(path: str | os.PathLike) -> TensorSource:
    """The :class:`TensorSource` of a checkpoint file or folder (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        return _open_folder(path)
    if not path.exists():
        raise UnreadableFileError(f"{path}: no such file or folder")
    config = _config(path.parent)
    if path.suffix == ".safetensors":
        return SafetensorsSource(path, _safetensors_infos([path], None), config)
    return _torch_source([path], path, config)


def _config(folder: Path) -> dict:
    cfg = folder / "config.json"
    return _read_json(cfg) if cfg.is_file() else {}


def _open_folder(folder: Path) -> TensorSource:
    if (folder / "adapter_config.json").is_file():
        from .lora import LoraSource

        return LoraSource(folder)
    config = _config(folder)
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            where = _index_files(index)
            files = list(dict.fromkeys(where.values()))
            if index_name.startswith("model.safetensors"):
                return SafetensorsSource(folder, _safetensors_infos(files, where), config)
            return _torch_source(files, folder, config)
    shards = sorted(folder.glob("*.safetensors"))
    if shards:
        return SafetensorsSource(folder, _safetensors_infos(shards, None), config)
    pts = sorted(p for p in folder.iterdir() if p.suffix in _TORCH_SUFFIXES and p.is_file())
    if pts:
        return _torch_source(pts, folder, config)
    raise UnreadableFileError(f"{folder}: no checkpoint in the folder (no *.safetensors, "
                              "*.bin, *.pt, *.pth or adapter_config.json)")


def as_source(obj) -> TensorSource:
    """A path, an ``nn.Module`` (its state dict) or a state dict as a :class:`TensorSource`."""
    if isinstance(obj, TensorSource):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return open_checkpoint(obj)
    if isinstance(obj, nn.Module):
        return MappingSource(obj.state_dict())
    if isinstance(obj, Mapping):
        return MappingSource(obj)
    raise TypeError(f"expected a checkpoint path, an nn.Module or a state_dict, got "
                    f"{type(obj).__name__}")


# --- fine-tune deltas -------------------------------------------------------------------


class DeltaSource(TensorSource):
    """``W - W_base`` for every tensor of ``tuned``; tensors ``base`` lacks are left out,
    a shape or dtype mismatch is refused by name. The difference is taken in the stored
    dtype (half precision: in float32)."""

    def __init__(self, tuned: TensorSource, base: TensorSource):
        infos = {}
        left_out = list(tuned.left_out)
        for name, info in tuned.infos.items():
            ref = base.infos.get(name)
            if ref is None:
                left_out.append((name, "not in base="))
                continue
            if ref.shape != info.shape:
                raise CheckpointMismatchError(f"base=: tensor {name!r} has shape {ref.shape} in "
                                 f"{base.where(name)}, {info.shape} in {tuned.where(name)}")
            infos[name] = info
        super().__init__(tuned.path, infos, tuned.config)
        self.left_out, self.tuned, self.base = left_out, tuned, base

    def _read(self, name: str) -> torch.Tensor:
        w, b = self.tuned._read(name), self.base._read(name)
        if not w.is_floating_point():
            return w
        if w.element_size() < 4:
            w, b = w.float(), b.float()
        return w - b.to(w.dtype)

    def where(self, name: str) -> str:
        return self.tuned.where(name)

    def fingerprint(self) -> dict:
        return {"tuned": self.tuned.fingerprint(), "base": self.base.fingerprint()}

    def close(self) -> None:
        self.tuned.close()
        self.base.close()


# --- tied tensors -----------------------------------------------------------------------


def _bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


_HEAD = re.compile(r"(.*\.)?(lm_head|embed_out|output|head|classifier)\.weight")


def tie_groups(source: TensorSource, names: list[str]) -> dict[str, str]:
    """``{name: first name}`` of tensors holding the same values as an earlier one (same
    shape, dtype, and bytes: first/last rows compared first, then a BLAKE2 hash of the
    whole tensor), as safetensors files store tied weights (``wte`` / ``lm_head``) twice.
    Output heads (``lm_head``, ``embed_out``, ...) come after the others, so a head tied
    to the input embedding is counted under the embedding's name, as a model lists it."""
    names = sorted(names, key=lambda n: bool(_HEAD.fullmatch(n)))
    by_shape: dict[tuple, list[str]] = {}
    for n in names:
        info = source.infos[n]
        by_shape.setdefault((info.shape, info.dtype), []).append(n)
    tied: dict[str, str] = {}
    for group in (g for g in by_shape.values() if len(g) > 1):
        probes: dict[bytes, list[str]] = {}
        for n in group:
            probes.setdefault(source.edge_bytes(n), []).append(n)
        for same in (g for g in probes.values() if len(g) > 1):
            first: dict[str, str] = {}
            for n in same:
                digest = hashlib.blake2b(_bytes(source._read(n)), digest_size=32).hexdigest()
                tied[n] = first.setdefault(digest, n)
    return {n: f for n, f in tied.items() if n != f}
