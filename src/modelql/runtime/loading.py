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
    from ..vindex.blocks import BlockSource, is_block_vindex

    if p.is_dir() and is_block_vindex(p):
        return BlockSource(p)
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


def _quant_mode(source: WeightSource, spec, torch_dtype: torch.dtype, quantize: str | None) -> tuple[str | None, str]:
    """The low-bit mode to load with ("gguf", "int8", "int4", or None for float weights) and the kernels'
    activations ("float32", "int16" or "int8": `quantized.ACTIVATIONS`).

    `quantize` is WEIGHTS[:ACTIVATIONS]. WEIGHTS "auto" (the default) keeps a GGUF file's quantized matrices
    low-bit when the kernels cover the model and the compute dtype is float32 (asking for bfloat16 means
    float weights); "none" always dequantizes; "int8" / "int4" quantize float weights at load (and are an
    error when impossible). ":int8" multiplies with int8 activations: faster, less exact; ":int16" with two
    int8 passes: float32's precision for practical purposes, faster decoding, slower prefill."""
    from .quantized import ACTIVATIONS, QUANTIZE_MODES, gguf_is_quantized, why_not

    mode, _, act = (quantize or "auto").partition(":")
    activations = act or "float32"
    if mode not in QUANTIZE_MODES or act not in ("", *ACTIVATIONS):
        raise ModelFormatError(f"unsupported quantize mode {quantize!r} (use {', '.join(QUANTIZE_MODES)}, "
                               f"optionally followed by :{' or :'.join(ACTIVATIONS)} for the kernels' activations)")
    if mode == "none":
        return None, activations
    is_gguf = getattr(source, "packed", None) is not None
    if mode == "auto":
        if not is_gguf or torch_dtype != torch.float32 or not gguf_is_quantized(source):
            return None, activations
        return ("gguf" if why_not(spec, source, "gguf") is None else None), activations
    if torch_dtype != torch.float32:
        raise ModelFormatError(f"--quantize {mode} computes in float32 activations: drop --dtype")
    reason = why_not(spec, source, mode)
    if reason is not None:
        raise CapabilityError(f"cannot quantize {source.path.name} to {mode}: {reason}")
    return mode, activations


def load_model(path: str | Path | None = None, dtype: str | torch.dtype = "float32",
               quantize: str | None = None) -> Model:
    """Load a model; `quantize` ("auto", "none", "int8", "int4", each optionally ":int8" or ":int16") picks low-bit
    weights and the kernels' activations (see `_quant_mode`)."""
    source = open_source(path)
    spec = spec_from_config(source.config)
    torch_dtype = resolve_dtype(dtype)
    _check_ffn_present(source, spec)
    mode, activations = _quant_mode(source, spec, torch_dtype, quantize)
    tokenizer = _tokenizer(source)
    if mode is not None:
        from .quantized import load_quantized

        quant = load_quantized(source, spec, mode, activations=activations)
        return Model(spec, None, torch_dtype, tokenizer=tokenizer, path=source.path, quant=quant)
    weights = load_canonical(source, spec, torch_dtype)
    return Model(spec, weights, torch_dtype, tokenizer=tokenizer, path=source.path)


def _tokenizer(source: WeightSource):
    load_tok = getattr(source, "tokenizer", None)
    if load_tok is not None:
        return load_tok()
    if (source.path / "tokenizer.json").exists():
        from ..tokenizer import Tokenizer

        return Tokenizer.load(source.path)
    return None
