"""Weight sources: where a model's tensors come from, in HF names and layouts.

A `WeightSource` exposes the HF `config.json` dict and the checkpoint's tensors under their HF
names. Safetensors directories (single file or sharded) are one source; GGUF files are another
(`modelql.models.gguf`), which translates llama.cpp names back to HF names, so everything
downstream (spec, canonical mapping, extraction) sees one vocabulary.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ModelFormatError, ModelNotFoundError

_PREFIXES = ("", "language_model.", "model.language_model.", "language_model.model.")


class WeightSource(Protocol):
    """A checkpoint: its HF config and its tensors by HF name."""

    path: Path
    config: dict

    def names(self) -> list[str]: ...

    def get(self, name: str) -> torch.Tensor: ...


def read_json(path: Path, what: str) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path.parent} has no {path.name} ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None


def _check_safetensors(path: Path) -> None:
    """Reject a truncated file up front: safetensors' own error for it is a panic message."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelFormatError(f"{path.name} is truncated ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise ModelFormatError(f"{path.name} is truncated: header needs {n} bytes, file has {size}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ModelFormatError(f"{path.name} has a corrupt safetensors header") from None
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ModelFormatError(f"{path.name} is truncated: tensors need {8 + n + end} bytes, file has {size}")


class SafetensorsSource:
    """A HF model directory: config.json plus model.safetensors or its sharded index (mmap'd)."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        if not self.path.exists():
            raise ModelNotFoundError(f"model path {self.path} does not exist")
        if not self.path.is_dir():
            raise ModelFormatError(f"{self.path} is not a model directory")
        if not (self.path / "config.json").exists():
            raise ModelFormatError(f"{self.path} has no config.json: not a HF model directory")
        self.config = read_json(self.path / "config.json", "the model config")
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, "the shard index").get("weight_map", {})
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise ModelFormatError(f"{self.path} has no *.safetensors weights")
        self._where: dict[str, object] = {}
        self._handles = []
        for name in files:
            file = self.path / name
            if not file.exists():
                raise ModelFormatError(f"{self.path} is missing shard {name}")
            _check_safetensors(file)
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as exc:  # safetensors raises its own untyped errors
                raise ModelFormatError(f"{name}: cannot read safetensors ({exc})") from None
            self._handles.append(handle)
            for key in handle.keys():
                self._where[key] = handle

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._where[name].get_tensor(name)
        except KeyError:
            raise ModelFormatError(f"{self.path.name}: tensor {name} not found") from None


def _apply(t: torch.Tensor, transform: str) -> torch.Tensor:
    for step in transform.split(","):
        if step == "id":
            continue
        if step == "t":
            t = t.t()
        elif step.startswith("index:"):  # one expert of a stacked [E, ...] tensor
            t = t[int(step[6:])]
        elif step.startswith("split:"):
            part, _, sizes = step[6:].partition("@")
            index, _, count = part.partition("/")
            if sizes:
                widths = [int(s) for s in sizes.split("+")]
            else:
                widths = [t.shape[0] // int(count)] * int(count)
            start = sum(widths[: int(index)])
            t = t[start : start + widths[int(index)]]
        else:
            raise ValueError(f"unknown tensor transform {step!r}")
    return t


def resolve_prefix(names: list[str], expected: str) -> str:
    """The name prefix this checkpoint puts in front of the text model's HF names."""
    available = set(names)
    for prefix in _PREFIXES:
        if prefix + expected in available:
            return prefix
    for prefix in _PREFIXES:
        stripped = expected.removeprefix("model.")
        if prefix + stripped in available:
            return prefix + "\0model."  # marks: drop the leading "model."
    return ""


def _hf_key(prefix: str, hf_name: str) -> str:
    if "\0" in prefix:
        head, _, drop = prefix.partition("\0")
        return head + hf_name.removeprefix(drop)
    return prefix + hf_name


def tensor_map(spec, name: str):
    """A canonical name's `TensorMap` and its checkpoint name (layer index filled in)."""
    if name.startswith("layers."):
        _, idx, rest = name.split(".", 2)
        tm = spec.layer_map[rest]
        return tm, tm.hf_name.format(i=int(idx))
    tm = spec.global_map[name]
    return tm, tm.hf_name


def canonical_tensor(source: WeightSource, spec, name: str, prefix: str) -> torch.Tensor | None:
    """One canonical tensor (see `ModelSpec.layer_map`), or None if optional and absent."""
    tm, hf = tensor_map(spec, name)
    key = _hf_key(prefix, hf)
    try:
        tensor = source.get(key)
    except ModelFormatError:
        if tm.optional:
            return None
        raise ModelFormatError(f"{source.path.name}: weight {key} is missing for {spec.family}") from None
    return _apply(tensor, tm.transform)


def load_canonical(
    source: WeightSource, spec, dtype: torch.dtype, layers: range | None = None
) -> dict[str, torch.Tensor]:
    """All canonical tensors of `spec` converted to `dtype` (contiguous, owned copies)."""
    names = source.names()
    prefix = resolve_prefix(names, next(iter(spec.global_map.values())).hf_name)
    wanted = [n for n in spec.global_map] + [
        f"layers.{i}.{n}" for i in (layers or range(spec.num_layers)) for n in spec.layer_map
    ]
    out: dict[str, torch.Tensor] = {}
    for name in wanted:
        t = canonical_tensor(source, spec, name, prefix)
        if t is not None:
            out[name] = t.to(dtype).contiguous()
    return out
