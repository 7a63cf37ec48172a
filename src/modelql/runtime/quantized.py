"""Loading a model with its weights kept low-bit: GGUF blocks as stored, or HF weights quantized at load.

`QuantState` is what a quantized `Model` holds instead of float matrices: the onnxruntime graph
(`OrtDecoder`, owning the packed weights), the small float tensors (norms, biases), a row reader
for the token embeddings (GGUF rows are dequantized from the memory-mapped file per lookup, so the
table is never materialized), and a way back to float weights for the torch path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import CapabilityError
from ..models.quant import Packed, fuse, pack_float
from ..models.source import WeightSource, canonical_tensor, resolve_prefix, tensor_map
from ..models.spec import ModelSpec
from .ort_decode import OrtDecoder, WeightInfo, supports

QUANTIZE_MODES = ("auto", "none", "int8", "int4")
#: what the low-bit kernels multiply the weights with, as (onnxruntime accuracy level, passes): float32
#: activations (level 1: the exact product with the stored weights), int8 (level 4: activations rounded
#: per block of 32, the fastest, but ~5% logit error on SmolLM2, whose activations have large outliers) or
#: int16 (the int8 kernel on the rounding and on its rest, `ort_decode._Builder._two_pass`: logits within
#: ~3e-4 of float32, the same greedy tokens in bench/decode.py, and decoding 1.7–2.5× faster than float32 on
#: this project's AVX2 CPUs, whose float kernel is slow; prefill runs every row twice, ~1.9× slower)
ACTIVATIONS = {"float32": (1, 1), "int16": (4, 2), "int8": (4, 1)}


@dataclass
class QuantState:
    decoder: OrtDecoder
    embed_rows: Callable[[torch.Tensor], torch.Tensor]
    source: WeightSource
    mode: str  # "gguf" (the file's own blocks), "int8" or "int4"
    activations: str = "float32"
    make_unembed: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None
    _unembed: Callable[[torch.Tensor], torch.Tensor] | None = None

    def unembed(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm → lm_head (float32 logits) of residuals h [..., H], on the low-bit head."""
        if self._unembed is None:
            self._unembed = self.make_unembed()
        return self._unembed(h)

    @property
    def info(self) -> list[WeightInfo]:
        return self.decoder.info


def ort_available() -> bool:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def gguf_is_quantized(source) -> bool:
    """Whether a block source's (GGUF file, quantized vindex) matrices are stored low-bit (so loading them
    as float would multiply memory)."""
    return bool(set(source.storage_types(matrices=True)) - {"F32", "F16", "BF16"})


def why_not(spec: ModelSpec, source: WeightSource, mode: str) -> str | None:
    """None when `mode` can keep this model's weights low-bit, else the reason (for messages and info)."""
    if not ort_available():
        return "onnxruntime is not installed (pip install onnxruntime onnx)"
    reason = supports(spec)
    if reason is not None:
        return f"the quantized kernels do not cover {spec.family} models ({reason})"
    if spec.hidden_size % 32 or spec.intermediate_size % 32 or spec.q_size % 32:
        return "matrix widths are not multiples of 32"
    return None


def _matrix(source: WeightSource, spec: ModelSpec, name: str, prefix: str, mode: str) -> Packed:
    """One canonical matrix packed for the kernel: the GGUF's own blocks, or requantized floats."""
    if mode == "gguf":
        tm, hf = tensor_map(spec, name)
        if tm.transform == "id":
            packed = source.packed(prefix + hf)
            if packed is not None:
                return packed
        w = canonical_tensor(source, spec, name, prefix)
        return pack_float(w.float().numpy(), 8, "F32")
    w = canonical_tensor(source, spec, name, prefix)
    src = str(w.dtype).removeprefix("torch.").upper()
    return pack_float(w.float().numpy(), 8 if mode == "int8" else 4, src)


def load_quantized(source: WeightSource, spec: ModelSpec, mode: str, threads: int | None = None,
                   activations: str = "float32") -> QuantState:
    """Pack every matmul weight (fused q|k|v and gate|up per layer, lm_head) and build the graph, a stage
    of layers at a time (`OrtDecoder`). `activations`: see `ACTIVATIONS`."""
    accuracy, passes = ACTIVATIONS[activations]
    reason = why_not(spec, source, mode)
    if reason is not None:
        raise CapabilityError(f"cannot keep {source.path.name} quantized: {reason}")
    prefix = resolve_prefix(source.names(), next(iter(spec.global_map.values())).hf_name)
    small: dict[str, torch.Tensor] = {}

    def vec(name: str) -> None:
        t = canonical_tensor(source, spec, name, prefix)
        if t is not None:
            small[name] = t.float().contiguous()

    for i in range(spec.num_layers):
        p = f"layers.{i}."
        vec(p + "attn_norm.weight")
        vec(p + "ffn_norm.weight")
        if spec.attn_bias:
            for n in "qkv":
                vec(p + n + ".bias")
            small[p + "qkv.bias"] = torch.cat([small.pop(p + n + ".bias") for n in "qkv"])
    vec("final_norm.weight")

    def layer_weights(i: int) -> dict[str, Packed]:
        p = f"layers.{i}."
        return {"qkv": fuse([_matrix(source, spec, p + n + ".weight", prefix, mode) for n in "qkv"]),
                "o": _matrix(source, spec, p + "o.weight", prefix, mode),
                "gate_up": fuse([_matrix(source, spec, p + n + ".weight", prefix, mode) for n in ("gate", "up")]),
                "down": _matrix(source, spec, p + "down.weight", prefix, mode)}

    head_name = "lm_head.weight" if not spec.tie_embeddings and "lm_head.weight" in spec.global_map else "embed.weight"
    threads = threads or torch.get_num_threads()
    # the packing reads the file's pages: let the kernel page them out again after each stage
    release = getattr(source, "release_pages", None)
    decoder = OrtDecoder(spec, layer_weights, lambda: _matrix(source, spec, head_name, prefix, mode), small,
                         threads, accuracy, after_stage=release, passes=passes)

    def make_unembed():
        from .ort_decode import OrtUnembed

        unembed = OrtUnembed(spec, _matrix(source, spec, head_name, prefix, mode), small["final_norm.weight"],
                             threads, accuracy, passes)
        if release is not None:
            release()
        return unembed

    state = QuantState(decoder, _embedding_reader(source, spec, prefix, mode), source, mode, activations,
                       make_unembed)
    if release is not None:
        release()
    return state


def _embedding_reader(source: WeightSource, spec: ModelSpec, prefix: str, mode: str):
    """ids → float32 rows: from the GGUF's blocks per lookup, or from a packed copy of the table."""
    hf = prefix + spec.global_map["embed.weight"].hf_name
    blocks = source.blocks(hf) if mode == "gguf" and hasattr(source, "blocks") else None
    if blocks is not None:
        from ..models.quant import dequantize_rows

        rows, qtype, (_, width) = blocks

        def block_rows(ids: torch.Tensor) -> torch.Tensor:
            flat = ids.reshape(-1).numpy()
            out = dequantize_rows(rows[flat], qtype, width)
            return torch.from_numpy(out).reshape(*ids.shape, width)

        return block_rows
    table = _matrix(source, spec, "embed.weight", prefix, mode if mode != "gguf" else "int8")

    def packed_rows(ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).numpy()
        return torch.from_numpy(table.dequantize(flat)).reshape(*ids.shape, table.k)

    return packed_rows
