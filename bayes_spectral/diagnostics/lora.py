"""Layer 5: a LoRA adapter folder (PEFT layout) as the weight updates it applies.

``adapter_config.json`` + ``adapter_model.safetensors`` (or ``adapter_model.bin``): each
adapted module ``M`` stores ``M.lora_A.weight`` ``A`` (r x in) and ``M.lora_B.weight`` ``B``
(out x r) (embeddings: ``lora_embedding_A`` (r x vocab), ``lora_embedding_B`` (dim x r)).
The source yields ``M.weight = delta W = (B A) * scaling`` with ``scaling = lora_alpha / r``
(``lora_alpha / sqrt(r)`` under ``use_rslora``; per-module ``rank_pattern`` /
``alpha_pattern`` honoured), transposed under ``fan_in_fan_out`` (GPT-2's ``Conv1D``) and for
embeddings, so the delta has the base weight's layout and naming (the ``base_model.model.``
prefix removed): ``analyze`` splits a ``c_attn`` delta into Q, K, V like the weight itself.
The product is computed in the adapter's dtype (half precision: float32), one module at a time.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from .._io import UnreadableFileError
from .checkpoint_files import (
    SafetensorsSource,
    TensorInfo,
    TensorSource,
    _read_json,
    _safetensors_infos,
    _torch_source,
)

__all__ = ["LoraSource", "lora_scaling"]

_PREFIX = "base_model.model."
_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<emb>embedding_)?(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?"
                  r"(?:\.weight)?")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's per-module override: the first key ``k`` with ``module`` matching
    ``(.*\\.)?k`` (``re.fullmatch``)."""
    for key, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def lora_scaling(config: dict, module: str) -> float:
    """``lora_alpha / r`` of ``module`` (``/ sqrt(r)`` with ``use_rslora``)."""
    r = _pattern_value(config.get("rank_pattern"), module, config.get("r"))
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r))
    if not r or r <= 0:
        raise ValueError(f"adapter_config.json: rank r={r!r} of {module!r} is not positive")
    return float(alpha) / (math.sqrt(r) if config.get("use_rslora") else float(r))


class LoraSource(TensorSource):
    """``{module}.weight`` -> the delta ``(B A) * scaling`` of every adapted module."""

    def __init__(self, folder: Path):
        config = _read_json(folder / "adapter_config.json")
        st = folder / "adapter_model.safetensors"
        if st.is_file():
            self.raw: TensorSource = SafetensorsSource(folder, _safetensors_infos([st], None))
        elif (folder / "adapter_model.bin").is_file():
            self.raw = _torch_source([folder / "adapter_model.bin"], folder, None)
        else:
            raise UnreadableFileError(f"{folder}: adapter_config.json without "
                                      "adapter_model.safetensors or adapter_model.bin")
        self.pairs: dict[str, tuple[str, str, bool]] = {}
        infos: dict[str, TensorInfo] = {}
        left_out = self._pair(config, infos)
        super().__init__(folder, infos, config)
        self.left_out = left_out

    def _pair(self, config: dict, infos: dict) -> list[tuple[str, str]]:
        """Match ``lora_A`` / ``lora_B`` keys per module; the rest is left out."""
        found: dict[str, dict[str, str]] = {}
        left_out = []
        for key in self.raw.infos:
            m = _KEY.fullmatch(key)
            if not m:
                left_out.append((key, "not a LoRA factor (lora_A / lora_B)"))
                continue
            module = m["module"].removeprefix(_PREFIX)
            found.setdefault(module, {})[m["ab"]] = key
            found[module]["emb"] = "1" if m["emb"] else ""
        for module, keys in found.items():
            if "A" not in keys or "B" not in keys:
                raise UnreadableFileError(f"{self.raw.where(next(iter(keys.values())))}: "
                                          f"LoRA module {module!r} lacks lora_A or lora_B")
            a, b = self.raw.infos[keys["A"]], self.raw.infos[keys["B"]]
            transpose = bool(keys["emb"]) or bool(config.get("fan_in_fan_out"))
            shape = (b.shape[0], a.shape[1])
            name = f"{module}.weight"
            infos[name] = TensorInfo(shape[::-1] if transpose else shape, a.dtype, a.file)
            self.pairs[name] = (keys["A"], keys["B"], transpose)
        return left_out

    def _read(self, name: str) -> torch.Tensor:
        key_a, key_b, transpose = self.pairs[name]
        a, b = self.raw._read(key_a), self.raw._read(key_b)
        if a.element_size() < 4:
            a, b = a.float(), b.float()
        delta = (b @ a.to(b.dtype)) * lora_scaling(self.config, name.removesuffix(".weight"))
        return delta.T if transpose else delta

    def where(self, name: str) -> str:
        return self.raw.where(self.pairs[name][0]) if name in self.pairs else str(self.path)

    def fingerprint(self) -> dict:
        return {"adapter": self.raw.fingerprint(), "config": self.config}

    def close(self) -> None:
        self.raw.close()
