"""Resolve a model reference (directory, vindex, GGUF file, or nothing) and load it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CapabilityError, ModelFormatError, ModelNotFoundError
from ..models.families import spec_from_config
from ..models.source import SafetensorsSource, WeightSource, load_canonical
from .model import DTYPES, Model


def default_model_dir() -> Path:
    from ..defaults import DEFAULT_MODEL_DIR

    return DEFAULT_MODEL_DIR


def open_source(path: str | Path | None) -> WeightSource:
    """The weight source behind a model reference; None means the embedded default model."""
    p = Path(path) if path is not None else default_model_dir()
    if not p.exists():
        raise ModelNotFoundError(f"model path {p} does not exist")
    if p.is_file() and p.suffix.lower() == ".gguf":
        from ..models.gguf import GgufSource

        return GgufSource(p)
    if p.is_dir() and (p / "index.json").exists() and not (p / "config.json").exists():
        raise ModelFormatError(f"{p} is a browse-only vindex: it has no model weights")
    return SafetensorsSource(p)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ModelFormatError(f"unsupported dtype {dtype!r} (use float32 or bfloat16)") from None


def _check_ffn_present(source: WeightSource, spec) -> None:
    """A client slice (attention only) says what it is instead of naming a missing tensor."""
    from ..models.source import _hf_key, resolve_prefix

    down = spec.layer_map.get("down.weight")
    if down is None or not isinstance(source, SafetensorsSource):
        return
    names = set(source.names())
    prefix = resolve_prefix(list(names), next(iter(spec.global_map.values())).hf_name)
    if _hf_key(prefix, down.hf_name.format(i=0)) not in names:
        raise CapabilityError(f"{source.path.name} has no FFN weights (a client slice?): run its FFN on remote "
                              "shards with --ffn URL")


def load_model(path: str | Path | None = None, dtype: str | torch.dtype = "float32") -> Model:
    source = open_source(path)
    spec = spec_from_config(source.config)
    torch_dtype = resolve_dtype(dtype)
    _check_ffn_present(source, spec)
    weights = load_canonical(source, spec, torch_dtype)
    tokenizer = None
    load_tok = getattr(source, "tokenizer", None)
    if load_tok is not None:
        tokenizer = load_tok()
    elif (source.path / "tokenizer.json").exists():
        from ..tokenizer import Tokenizer

        tokenizer = Tokenizer.load(source.path)
    return Model(spec, weights, torch_dtype, tokenizer=tokenizer, path=source.path)
