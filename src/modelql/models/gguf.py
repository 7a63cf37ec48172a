"""GGUF files (llama.cpp's format) as a `WeightSource` in HF vocabulary.

`GgufSource(path)` memory-maps a GGUF file (header parsed here, bounds-checked; the `gguf` package
supplies the type tables and the dequantisers) and presents it the way a HF checkpoint looks, so the spec, the canonical-name mapping, the runtime and vindex
extraction need no GGUF knowledge:

* `.config` is a reconstructed HF `config.json` dict (model_type, sizes, heads, head_dim, norm
  epsilon, RoPE theta and scaling, sliding window and layer pattern, softcaps,
  query_pre_attn_scalar, tied embeddings, special token ids, ...) from the `{arch}.*` metadata.
* `.names()` / `.get(name)` give HF tensor names in HF layout, dequantised to float32 on demand,
  with llama.cpp's conversion undone: the Q/K row permutation of the `llama` architecture
  (llama.cpp interleaves rotary pairs), the `+1` Gemma norm weights are stored with, GPT-2's
  transposed Conv1D weights; Phi-3 keeps its fused `qkv_proj` / `gate_up_proj`.
* `.tokenizer()` rebuilds the tokenizer from `tokenizer.ggml.*` (`modelql.models.gguf_tokenizer`).

Supported architectures: llama (also Mistral and Mixtral), qwen2, qwen3, gemma, gemma2, gemma3, phi3,
gpt2, and the mixtures of experts qwen2moe, qwen3moe, olmoe: their experts are stored stacked
(`blk.N.ffn_{gate,up,down}_exps`, [E, rows, cols]) and read one expert at a time from its own bytes.
Supported tensor types: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K
(dequantised with `gguf.quants.dequantize`). Anything else is an `UnsupportedModelError`; a
truncated or corrupt file is a `ModelFormatError`.

Where llama.cpp's metadata cannot say something HF configs can, the reader follows llama.cpp's own
runtime defaults (Gemma 3's sliding pattern of 6 and local RoPE base 10000, Gemma's query scale
rule); files written by `modelql convert` add the standard keys llama.cpp ignores for these
architectures (`attention.sliding_window_pattern`, `attention.scale`, `rope.freq_base_swa`,
`llama.attention.sliding_window` for Mistral) so they round-trip exactly. Llama-3 RoPE scaling is
stored by llama.cpp only as the `rope_freqs` tensor of per-frequency divisors; the reader solves
it back into `rope_scaling = {"rope_type": "llama3", ...}` parameters giving the same divisors.
"""

from __future__ import annotations

import logging
import math
import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

log = logging.getLogger(__name__)

ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gpt2", "llama", "olmoe", "phi3", "qwen2", "qwen2moe", "qwen3",
                 "qwen3moe")
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                   "Q5_K", "Q6_K")

HF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM", "gpt2": "GPT2LMHeadModel",
    "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
}
_MOE_MODEL_TYPE = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe"}
#: llama.cpp's routing when the file has no `expert_weights_norm` key (Mixtral and Qwen3-MoE
#: renormalise the top-k weights, Qwen2-MoE and OLMoE do not)
_MOE_NORM_DEFAULT = {"llama": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
#: stacked expert tensors [E, ...] → (HF block, HF projection names) per model type
_EXPERT_LEAVES = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
_MOE_HF = {
    "mixtral": ("block_sparse_moe", ("w1", "w3", "w2")),
    "qwen2_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "olmoe": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
_SHARED_EXPERT = {"ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
                  "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}

_LAYER = {  # llama.cpp leaf name → HF module (Llama naming) under model.layers.{i}.
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GEMMA2_LAYER = {
    **_LAYER,
    "ffn_norm": "pre_feedforward_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_PHI3_LAYER = {**_LAYER, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_LAYER = {  # leaf → (HF module under transformer.h.{i}., weight is Conv1D [in, out])
    "attn_norm": ("ln_1", False),
    "attn_qkv": ("attn.c_attn", True),
    "attn_output": ("attn.c_proj", True),
    "ffn_norm": ("ln_2", False),
    "ffn_up": ("mlp.c_fc", True),
    "ffn_down": ("mlp.c_proj", True),
}
_GPT2_GLOBAL = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                "output_norm": "transformer.ln_f", "output": "lm_head"}


# --------------------------------------------------------------------------------------------
# reading the file
# --------------------------------------------------------------------------------------------


class _Truncated(Exception):
    pass


class _Corrupt(Exception):
    pass


_SCALARS = {  # GGUF value type → numpy little-endian dtype
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8",
}
_STRING, _ARRAY, _FLOAT32, _BOOL = 8, 9, 6, 7


@dataclass(frozen=True)
class GgufTensor:
    """One tensor's entry in the file: type, ggml dims (ne0 first), absolute data offset and size."""

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    dims: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """numpy / torch shape (ggml dims reversed): [out, in] for a weight matrix."""
        return tuple(reversed(self.dims))


class _Parser:
    """Reads GGUF v2/v3 metadata and tensor infos from a memory map, bounds-checked.

    (gguf's GGUFReader builds several numpy arrays per array element, which takes tens of seconds
    for a 128K-token vocabulary with its merges; this reads numeric arrays in one slice.)
    """

    def __init__(self, buf: memoryview):
        self.buf, self.pos, self.size = buf, 0, len(buf)

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > self.size:
            raise _Truncated(f"metadata needs byte {self.pos + n}, the file has {self.size}")
        view = self.buf[self.pos:self.pos + n]
        self.pos += n
        return view

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "little")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def string(self) -> str:
        return bytes(self.take(self.u64())).decode("utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype in _SCALARS:
            dtype = np.dtype(_SCALARS[vtype])
            v = np.frombuffer(self.take(dtype.itemsize), dtype=dtype)[0]
            if vtype == _FLOAT32:  # the shortest decimal that is this float32 (1e-06, not 9.99e-07)
                return float(str(v))
            return bool(v) if vtype == _BOOL else v.item()
        if vtype == _ARRAY:
            item, count = self.u32(), self.u64()
            if count > self.size - self.pos:
                raise _Corrupt(f"array of {count} items at byte {self.pos}")
            if item in _SCALARS:
                dtype = np.dtype(_SCALARS[item])
                values = np.frombuffer(self.take(count * dtype.itemsize), dtype=dtype)
                return [bool(v) for v in values] if item == _BOOL else values.tolist()
            return [self.value(item) for _ in range(count)]
        raise _Corrupt(f"unknown metadata value type {vtype} at byte {self.pos}")


def _parse(buf: memoryview, name: str) -> tuple[dict[str, Any], dict[str, GgufTensor]]:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    p = _Parser(buf)
    if bytes(p.take(4)) != b"GGUF":
        raise ModelFormatError(f"{name} is not a GGUF file (magic {bytes(buf[:4])!r})")
    version = p.u32()
    if version & 0xFFFF == 0 and version:
        raise UnsupportedModelError(f"{name} is a big-endian GGUF file, which is not supported")
    if version not in (2, 3):
        raise UnsupportedModelError(f"{name}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = p.u64(), p.u64()
    if n_tensors > p.size or n_kv > p.size:
        raise _Corrupt(f"{n_tensors} tensors, {n_kv} metadata entries")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = p.string()
        meta[key] = p.value(p.u32())
    infos = []
    for _ in range(n_tensors):
        tname = p.string()
        n_dims = p.u32()
        if n_dims > 8:
            raise _Corrupt(f"tensor {tname} has {n_dims} dimensions")
        dims = tuple(p.u64() for _ in range(n_dims))
        type_id, offset = p.u32(), p.u64()
        infos.append((tname, dims, type_id, offset))
    alignment = meta.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise _Corrupt(f"general.alignment {alignment!r}")
    data_start = -(-p.pos // alignment) * alignment
    tensors: dict[str, GgufTensor] = {}
    for tname, dims, type_id, offset in infos:
        try:
            qtype = GGMLQuantizationType(type_id)
        except ValueError:
            raise UnsupportedModelError(
                f"{name}: quantisation type id {type_id} (tensor {tname}) is not supported") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(dims, dtype=np.int64)) if dims else 1
        if dims and dims[0] % block:
            raise _Corrupt(f"tensor {tname} rows of {dims[0]} are not a multiple of the {qtype.name} block")
        nbytes = n // block * type_size
        start = data_start + offset
        if start + nbytes > p.size:
            raise _Truncated(f"tensor {tname} ends at byte {start + nbytes}, the file has {p.size}")
        tensors[tname] = GgufTensor(tname, qtype, dims, start, nbytes)
    return meta, tensors


def _open(path: Path) -> tuple[mmap.mmap, dict[str, Any], dict[str, GgufTensor]]:
    name = path.name
    size = path.stat().st_size
    if size < 24:
        raise ModelFormatError(f"{name} is truncated ({size} bytes): not a GGUF file")
    with path.open("rb") as fh:
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        meta, tensors = _parse(memoryview(mm), name)
    except _Truncated as exc:
        raise ModelFormatError(f"{name} is truncated: {exc}") from None
    except _Corrupt as exc:
        raise ModelFormatError(f"{name} is corrupt: {exc}") from None
    return mm, meta, tensors


# --------------------------------------------------------------------------------------------
# tensor layout transforms
# --------------------------------------------------------------------------------------------


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF → llama.cpp: interleave each head's two rotary halves (convert_hf_to_gguf `permute`)."""
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).transpose(1, 2).reshape(shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp → HF: the inverse of `permute_qk`."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)


def llama3_rope_from_factors(factors, theta: float, rotary_dim: int, orig: int) -> dict | None:
    """HF `rope_scaling` reproducing llama.cpp's `rope_freqs` divisors for Llama-3 scaling.

    Llama 3 divides each inverse frequency by 1 (short wavelengths), by `factor` (long ones), or
    by a smooth mix between, where the mix s = (orig/λ - low)/(high - low) is linear in 1/λ. The
    divisors fix `factor` and that line (exactly, given two smooth points; otherwise any line
    between the neighbouring frequencies classifies them the same way); `orig` is free, and
    `low`/`high` follow from it.
    """
    f = np.asarray(factors, dtype=np.float64)
    if f.size == 0 or np.allclose(f, 1.0):
        return None
    factor = float(f.max())
    if np.allclose(f, factor, rtol=1e-6):
        return {"rope_type": "linear", "factor": factor}
    exponents = np.arange(0, 2 * f.size, 2, dtype=np.float64) / rotary_dim
    x = (1.0 / theta**exponents) / (2 * math.pi)  # 1 / wavelength
    s = (1.0 / f - 1.0 / factor) / (1.0 - 1.0 / factor)
    eps = 1e-6
    smooth = (s > eps) & (s < 1 - eps)
    ones = x[s >= 1 - eps]  # unscaled: high frequencies
    fulls = x[s <= eps]  # fully scaled: low frequencies
    x_hi = float(ones.min()) if ones.size else None
    x_lo = float(fulls.max()) if fulls.size else None
    if smooth.sum() >= 2:
        a, c = np.polyfit(x[smooth], s[smooth], 1)
        b = -c
    elif smooth.sum() == 1:
        xp, sp = float(x[smooth][0]), float(s[smooth][0])
        slopes = []
        if x_hi is not None:
            slopes.append((1 - sp) / (x_hi - xp))
        if x_lo is not None:
            slopes.append(sp / (xp - x_lo))
        a = max(slopes) if slopes else 1.0 / xp
        b = a * xp - sp
    else:
        if x_hi is None or x_lo is None:
            return {"rope_type": "linear", "factor": factor}
        a = 1.0 / (x_hi - x_lo)
        b = a * x_lo
    if a <= 0 or b <= 0:
        raise ModelFormatError("rope_freqs does not describe Llama-3 RoPE scaling")
    width = orig / a
    low = b * width
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
            "high_freq_factor": float(low + width), "original_max_position_embeddings": int(orig)}


# --------------------------------------------------------------------------------------------
# the source
# --------------------------------------------------------------------------------------------


class GgufSource:
    """A GGUF file as a `WeightSource`: HF config, HF tensor names, HF layouts (float32)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelNotFoundError(f"model path {self.path} does not exist")
        if not self.path.is_file():
            raise ModelFormatError(f"{self.path} is not a GGUF file")
        self._mm, self.meta, self._tensors = _open(self.path)
        name = self.path.name
        arch = self.meta.get("general.architecture")
        if not isinstance(arch, str):
            raise ModelFormatError(f"{name} has no general.architecture")
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(
                f"{name}: GGUF architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
        self.arch = arch
        for t in self._tensors.values():
            if t.tensor_type.name not in SUPPORTED_TYPES:
                raise UnsupportedModelError(
                    f"{name}: quantisation type {t.tensor_type.name} (tensor {t.name}) is not supported "
                    f"(supported: {', '.join(SUPPORTED_TYPES)})")
        if "token_embd.weight" not in self._tensors:
            raise ModelFormatError(f"{name} has no token_embd.weight tensor")
        self.tied = "output.weight" not in self._tensors or self._duplicate_output()
        self.config = self._build_config()
        self._recipes = self._build_recipes()

    # -- WeightSource ---------------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._recipes)

    def get(self, name: str) -> torch.Tensor:
        recipe = self._recipes.get(name)
        if recipe is None:
            raise ModelFormatError(f"{self.path.name}: tensor {name} not found")
        return recipe()

    def tokenizer(self):
        """A `modelql.tokenizer.Tokenizer` rebuilt from the file's metadata (None: no vocabulary)."""
        from .gguf_tokenizer import build_tokenizer

        built = build_tokenizer(self.meta, self.arch)
        if built is None:
            return None
        from ..tokenizer import Tokenizer

        tok, config = built
        return Tokenizer(tok, config, path=self.path)

    def hf_files(self) -> dict[str, str]:
        """The HF metadata files this GGUF stands for: config.json, tokenizer.json, tokenizer_config.json."""
        import json

        from .gguf_tokenizer import build_tokenizer

        files = {"config.json": json.dumps(self.config, indent=2) + "\n"}
        built = build_tokenizer(self.meta, self.arch)
        if built is not None:
            tok, config = built
            files["tokenizer.json"] = tok.to_str()
            files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        return files

    # -- tensors --------------------------------------------------------------------------

    def tensor_type(self, gguf_name: str) -> str:
        return self._tensors[gguf_name].tensor_type.name

    def array(self, gguf_name: str) -> np.ndarray:
        """One GGUF tensor dequantised to float32, in its stored (llama.cpp) layout."""
        t = self._tensors.get(gguf_name)
        if t is None:
            raise ModelFormatError(f"{self.path.name}: tensor {gguf_name} not found")
        shape = t.shape
        raw = self._raw(t)
        return self._decode(raw, t.tensor_type, shape, gguf_name)

    def _decode(self, raw: np.ndarray, tensor_type, shape, gguf_name: str) -> np.ndarray:
        """float32 array of `shape` from a tensor's raw bytes (an owned copy, never a view of the mapping)."""
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import dequantize

        try:
            if tensor_type == Q.F32:
                out = raw.view("<f4").astype(np.float32)
            elif tensor_type == Q.F16:
                out = raw.view("<f2").astype(np.float32)
            else:
                out = dequantize(raw.reshape(*shape[:-1], -1), tensor_type)
            return out.reshape(shape)
        except Exception as exc:  # gguf raises assorted errors on malformed blocks
            raise ModelFormatError(f"{self.path.name}: cannot read tensor {gguf_name}: {exc}") from None

    def expert_array(self, gguf_name: str, expert: int) -> np.ndarray:
        """Expert `expert` of a stacked [E, rows, cols] GGUF tensor, dequantised from its own bytes
        only (each expert's blocks are contiguous)."""
        t = self._tensors[gguf_name]
        count, shape = t.shape[0], t.shape[1:]
        per = t.nbytes // count
        raw = np.frombuffer(self._mm, dtype=np.uint8, count=per, offset=t.offset + expert * per)
        return self._decode(raw, t.tensor_type, shape, gguf_name)

    def blocks(self, hf_name: str) -> tuple[np.ndarray, str, tuple[int, int]] | None:
        """The HF matrix `hf_name` as the file stores it: (raw blocks [N rows, bytes per row] in HF row
        order, GGML type name, (N, K)), or None when HF's layout is not a row permutation of the file's
        (a vector, a transposed GPT-2 weight, a Gemma norm, a fused Phi-3 matrix). Rows are a view of the
        mapping unless they had to be reordered (llama's rotary Q/K permutation, undone exactly: blocks
        never straddle rows)."""
        entry = self._sources.get(hf_name)
        if entry is None:
            return None
        gguf_name, steps = entry
        t = self._tensors[gguf_name]
        if len(t.dims) != 2 or any(s not in ("unpermute_q", "unpermute_k") for s in steps):
            return None
        n, k = t.shape
        raw = self._raw(t).reshape(n, -1)
        for step in steps:
            heads = self.config["num_attention_heads" if step == "unpermute_q" else "num_key_value_heads"]
            raw = raw[unpermute_qk(torch.arange(n), heads).numpy()]
        return raw, t.tensor_type.name, (n, k)

    def packed(self, hf_name: str):
        """The HF tensor `hf_name` in `MatMulNBits` layout (`modelql.models.quant.Packed`) made from the
        file's blocks without a float copy of the matrix, or None when it is not a quantisable matrix."""
        from .quant import pack_blocks

        return pack_blocks(self.blocks(hf_name), f"{self.path.name}: tensor {hf_name}")

    def release_pages(self) -> None:
        """Drop the file's pages from this process's resident set (they are re-read on demand)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._mm.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):
                pass

    def storage_types(self, matrices: bool = False) -> dict[str, int]:
        """GGUF tensor type → parameter count, over the whole file (`matrices`: 2-D and larger tensors only)."""
        out: dict[str, int] = {}
        for t in self._tensors.values():
            if matrices and len(t.dims) < 2:
                continue
            out[t.tensor_type.name] = out.get(t.tensor_type.name, 0) + int(np.prod(t.dims, dtype=np.int64))
        return out

    def _raw(self, t: GgufTensor) -> np.ndarray:
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.nbytes, offset=t.offset)

    def _duplicate_output(self) -> bool:
        """llama.cpp writes GPT-2's tied lm_head as a copy of token_embd: treat it as tied."""
        a, b = self._tensors["token_embd.weight"], self._tensors["output.weight"]
        return a.tensor_type == b.tensor_type and a.dims == b.dims and np.array_equal(self._raw(a), self._raw(b))

    def _build_recipes(self) -> dict[str, Callable[[], torch.Tensor]]:
        cfg = self.config
        arch = self.arch
        recipes: dict[str, Callable[[], torch.Tensor]] = {}
        self._sources: dict[str, tuple[str, tuple[str, ...]]] = {}  # HF name → (GGUF name, steps)
        hf = ""

        def load(gguf_name: str, *steps: str) -> Callable[[], torch.Tensor]:
            self._sources[hf] = (gguf_name, steps)

            def run() -> torch.Tensor:
                t = torch.from_numpy(self.array(gguf_name))
                for step in steps:
                    if step == "t":
                        t = t.t().contiguous()
                    elif step == "minus1":
                        t = t - 1.0
                    elif step == "unpermute_q":
                        t = unpermute_qk(t, cfg["num_attention_heads"])
                    elif step == "unpermute_k":
                        t = unpermute_qk(t, cfg["num_key_value_heads"])
                return t

            return run

        def pick(gguf_name: str, expert: int) -> Callable[[], torch.Tensor]:
            return lambda: torch.from_numpy(self.expert_array(gguf_name, expert))

        model_type = cfg.get("model_type")
        moe_block, moe_proj = _MOE_HF.get(model_type, ("mlp", ()))

        def concat(*gguf_names: str) -> Callable[[], torch.Tensor]:
            return lambda: torch.cat([torch.from_numpy(self.array(n)) for n in gguf_names])

        gemma = arch in ("gemma", "gemma2", "gemma3")
        for gname in self._tensors:
            stem, _, suffix = gname.rpartition(".")
            if suffix not in ("weight", "bias"):
                continue
            if stem.startswith("blk."):
                _, idx, leaf = stem.split(".", 2)
                if not idx.isdigit():
                    continue
                i = int(idx)
                if arch == "gpt2":
                    if leaf not in _GPT2_LAYER:
                        continue
                    module, conv1d = _GPT2_LAYER[leaf]
                    hf = f"transformer.h.{i}.{module}.{suffix}"
                    recipes[hf] = load(gname, "t") if conv1d and suffix == "weight" else load(gname)
                    continue
                if leaf in _EXPERT_LEAVES and moe_proj and suffix == "weight":
                    proj = moe_proj[_EXPERT_LEAVES.index(leaf)]
                    for e in range(self._tensors[gname].shape[0]):
                        recipes[f"model.layers.{i}.{moe_block}.experts.{e}.{proj}.weight"] = pick(gname, e)
                    continue
                if moe_proj and leaf in ("ffn_gate_inp", *_SHARED_EXPERT):
                    module = f"{moe_block}.gate" if leaf == "ffn_gate_inp" else _SHARED_EXPERT[leaf]
                    hf = f"model.layers.{i}.{module}.{suffix}"
                    recipes[hf] = load(gname)
                    continue
                table = _GEMMA2_LAYER if arch in ("gemma2", "gemma3") else _PHI3_LAYER if arch == "phi3" else _LAYER
                if leaf not in table:
                    continue
                hf = f"model.layers.{i}.{table[leaf]}.{suffix}"
                steps: list[str] = []
                if arch == "llama" and leaf in ("attn_q", "attn_k"):
                    steps.append("unpermute_q" if leaf == "attn_q" else "unpermute_k")
                if gemma and leaf.endswith("norm") and suffix == "weight":
                    steps.append("minus1")
                recipes[hf] = load(gname, *steps)
            else:
                table = _GPT2_GLOBAL if arch == "gpt2" else _GLOBAL
                if stem not in table or (stem == "output" and self.tied):
                    continue
                steps = ["minus1"] if gemma and stem == "output_norm" else []
                hf = f"{table[stem]}.{suffix}"
                recipes[hf] = load(gname, *steps)
        if arch == "phi3":  # some Phi-3 files store q, k, v separately: HF keeps them fused
            for i in range(cfg["num_hidden_layers"]):
                parts = [f"blk.{i}.attn_{x}.weight" for x in "qkv"]
                key = f"model.layers.{i}.self_attn.qkv_proj.weight"
                if key not in recipes and all(p in self._tensors for p in parts):
                    recipes[key] = concat(*parts)
                for x in "qkv":
                    recipes.pop(f"model.layers.{i}.self_attn.{x}_proj.weight", None)
        return recipes

    # -- config ---------------------------------------------------------------------------

    def _key(self, key: str, default: Any = None) -> Any:
        value = self.meta.get(f"{self.arch}.{key}")
        return default if value is None else value

    def _scalar(self, key: str, default: Any = None, required: bool = False) -> Any:
        value = self._key(key)
        if value is None:
            if required:
                raise ModelFormatError(f"{self.path.name} is missing the {self.arch}.{key} metadata")
            return default
        if isinstance(value, list):  # per-layer values: modelql needs them uniform
            if not value:
                return default
            if any(v != value[0] for v in value):
                raise UnsupportedModelError(f"{self.path.name}: per-layer {self.arch}.{key} values are not supported")
            value = value[0]
        return value

    def _shape(self, gguf_name: str) -> tuple[int, ...] | None:
        t = self._tensors.get(gguf_name)
        return None if t is None else t.shape

    def _layer_pattern(self, n_layer: int, default_period: int | None) -> list[bool] | None:
        """Per layer: True = sliding-window attention (llama.cpp's `sliding_window_pattern`)."""
        value = self._key("attention.sliding_window_pattern")
        if isinstance(value, list) and len(value) == n_layer:
            return [bool(v) for v in value]
        period = value if isinstance(value, int) else default_period
        if period is None:
            return None
        # llama.cpp's set_swa_pattern: layer il is SWA unless il % n == n - 1 (n = 0: all SWA)
        return [period == 0 or (i % period < period - 1) for i in range(n_layer)]

    def _rope_scaling(self, theta: float, head_dim: int, rotary_dim: int, ctx: int) -> dict | None:
        kind = self._key("rope.scaling.type")
        factor = self._key("rope.scaling.factor")
        if kind is None and self._key("rope.scale_linear") is not None:
            kind, factor = "linear", self._key("rope.scale_linear")
        if "rope_freqs.weight" in self._tensors:
            return llama3_rope_from_factors(self.array("rope_freqs.weight"), theta, rotary_dim, ctx)
        if kind in (None, "none") or not factor or float(factor) == 1.0 and kind == "linear":
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(factor)}
        if kind == "yarn":
            out: dict[str, Any] = {"rope_type": "yarn", "factor": float(factor)}
            orig = self._key("rope.scaling.original_context_length")
            if orig:
                out["original_max_position_embeddings"] = int(orig)
            for gguf_key, hf_key in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                                     ("rope.scaling.yarn_beta_slow", "beta_slow"),
                                     ("rope.scaling.yarn_attn_factor", "attention_factor")):
                if self._key(gguf_key) is not None:
                    out[hf_key] = float(self._key(gguf_key))
            return out
        if kind == "longrope":
            return None  # phi3: handled with its factor tensors
        raise UnsupportedModelError(f"{self.path.name}: RoPE scaling type {kind!r} is not supported")

    def _build_config(self) -> dict[str, Any]:
        arch, meta = self.arch, self.meta
        n_layer = int(self._scalar("block_count", required=True))
        n_embd = int(self._scalar("embedding_length", required=True))
        n_head = int(self._scalar("attention.head_count", required=True))
        n_kv = int(self._scalar("attention.head_count_kv", n_head))
        vocab = self._shape("token_embd.weight")[0]
        ctx = int(self._scalar("context_length", 2048))
        if arch == "gpt2":
            q_rows = None
        elif arch == "phi3" and "blk.0.attn_qkv.weight" in self._tensors:
            q_rows = self._shape("blk.0.attn_qkv.weight")[0] * n_head // (n_head + 2 * n_kv)
        else:
            shape = self._shape("blk.0.attn_q.weight")
            q_rows = shape[0] if shape else None
        head_dim = self._scalar("attention.key_length")
        if head_dim is None:
            head_dim = q_rows // n_head if q_rows else n_embd // n_head
        head_dim = int(head_dim)
        n_ff = self._scalar("feed_forward_length")
        if n_ff is None:
            down = self._shape("blk.0.ffn_down.weight")
            n_ff = down[1] if down else 4 * n_embd
        n_ff = int(n_ff)

        def token_id(key: str) -> int | None:
            v = meta.get(f"tokenizer.ggml.{key}")
            return int(v) if isinstance(v, int) else None

        eos = [i for i in (token_id("eos_token_id"), token_id("eot_token_id"), token_id("eom_token_id"))
               if i is not None]
        eos = list(dict.fromkeys(eos))
        cfg: dict[str, Any] = {
            "bos_token_id": token_id("bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": token_id("padding_token_id"),
            "tie_word_embeddings": self.tied,
            "torch_dtype": self._dtype_name(),
        }
        if arch == "gpt2":
            cfg.update({
                "architectures": [HF_ARCHITECTURES["gpt2"]], "model_type": "gpt2", "n_embd": n_embd,
                "n_layer": n_layer, "n_head": n_head, "n_positions": ctx, "n_ctx": ctx,
                "n_inner": None if n_ff == 4 * n_embd else n_ff, "vocab_size": vocab,
                "layer_norm_epsilon": float(self._scalar("attention.layer_norm_epsilon", 1e-5)),
                "activation_function": "gelu_new",
            })
            return cfg

        theta = float(self._scalar("rope.freq_base", 10000.0))
        rope_dims = int(self._scalar("rope.dimension_count", head_dim))
        model_type = {"gemma3": "gemma3_text", **_MOE_MODEL_TYPE}.get(arch, arch)
        window = self._scalar("attention.sliding_window")
        experts = int(self._scalar("expert_count", 0) or 0)
        if arch == "llama" and experts:
            model_type = "mixtral"
        elif arch == "llama" and window:
            model_type = "mistral"
        cfg.update({
            "architectures": [HF_ARCHITECTURES[model_type]],
            "model_type": model_type,
            "hidden_size": n_embd,
            "num_hidden_layers": n_layer,
            "num_attention_heads": n_head,
            "num_key_value_heads": n_kv,
            "head_dim": head_dim,
            "intermediate_size": n_ff,
            "vocab_size": vocab,
            "max_position_embeddings": ctx,
            "rms_norm_eps": float(self._scalar("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": theta,
        })
        scaling = self._rope_scaling(theta, head_dim, rope_dims, ctx)
        if scaling is not None:
            cfg["rope_scaling"] = scaling
        has_q_bias = "blk.0.attn_q.bias" in self._tensors
        if arch in ("llama", "qwen3", "qwen3moe", "olmoe"):
            cfg["attention_bias"] = has_q_bias
            cfg["mlp_bias"] = "blk.0.ffn_up.bias" in self._tensors
        if arch in ("llama", "qwen2", "qwen3", "phi3", "qwen2moe", "qwen3moe", "olmoe"):
            cfg["hidden_act"] = "silu"
        if model_type in ("mistral", "mixtral"):
            cfg["sliding_window"] = int(window) if window else None
        if experts:
            cfg.update(self._moe_config(arch, model_type, experts, n_ff))
        if arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
            cfg["use_sliding_window"] = bool(window)
            cfg["sliding_window"] = int(window) if window else None
            pattern = self._layer_pattern(n_layer, None) if window else None
            if pattern is not None:
                cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
            if window:
                cfg["max_window_layers"] = 0
        if arch == "phi3":
            cfg["sliding_window"] = int(window) if window else None
            if rope_dims != head_dim:
                cfg["partial_rotary_factor"] = rope_dims / head_dim
            if "rope_factors_long.weight" in self._tensors:
                orig = int(self._scalar("rope.scaling.original_context_length", ctx))
                cfg["rope_scaling"] = {
                    "type": "longrope", "rope_type": "longrope",
                    "long_factor": self.array("rope_factors_long.weight").astype(float).tolist(),
                    "short_factor": self.array("rope_factors_short.weight").astype(float).tolist()
                    if "rope_factors_short.weight" in self._tensors else None,
                    "original_max_position_embeddings": orig,
                }
                cfg["original_max_position_embeddings"] = orig
        if arch in ("gemma", "gemma2", "gemma3"):
            cfg["hidden_activation"] = "gelu_pytorch_tanh"
            cfg["hidden_act"] = "gelu_pytorch_tanh"
        if arch in ("gemma2", "gemma3"):
            scale = self._scalar("attention.scale")
            if scale:
                scalar = 1.0 / float(scale) ** 2
                scalar = int(round(scalar)) if abs(scalar - round(scalar)) < 1e-3 else scalar
            else:  # llama.cpp: the 27B models scale by n_embd / n_head, the others by head_dim
                scalar = n_embd // n_head if n_layer == {"gemma2": 46, "gemma3": 62}[arch] else head_dim
            cfg["query_pre_attn_scalar"] = scalar
        if arch == "gemma2":
            cfg["attn_logit_softcapping"] = float(self._scalar("attn_logit_softcapping", 50.0))
            cfg["final_logit_softcapping"] = float(self._scalar("final_logit_softcapping", 30.0))
            cfg["sliding_window"] = int(window) if window else 4096
            pattern = self._layer_pattern(n_layer, 2)
            cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
        if arch == "gemma3":
            softcap = self._scalar("final_logit_softcapping")
            cfg["final_logit_softcapping"] = float(softcap) if softcap else None
            cfg["attn_logit_softcapping"] = None
            cfg["rope_local_base_freq"] = float(self._scalar("rope.freq_base_swa", 10000.0))
            if window:
                cfg["sliding_window"] = int(window)
                pattern = self._layer_pattern(n_layer, 6)
                cfg["layer_types"] = ["sliding_attention" if p else "full_attention" for p in pattern]
            else:
                cfg["sliding_window"] = None
                cfg["layer_types"] = ["full_attention"] * n_layer
        return cfg

    def _moe_config(self, arch: str, model_type: str, experts: int, n_ff: int) -> dict[str, Any]:
        """The HF router/expert keys from llama.cpp's `expert_*` metadata."""
        used = int(self._scalar("expert_used_count", required=True))
        size = int(self._scalar("expert_feed_forward_length", 0) or 0)
        if not size:
            down = self._shape("blk.0.ffn_down_exps.weight")
            size = down[2] if down else n_ff
        norm = self._key("expert_weights_norm")
        out: dict[str, Any] = {"num_experts_per_tok": used}
        if model_type == "mixtral":
            out.update(num_local_experts=experts, intermediate_size=size)
            return out
        out.update(num_experts=experts, moe_intermediate_size=size, decoder_sparse_step=1, mlp_only_layers=[],
                   norm_topk_prob=bool(_MOE_NORM_DEFAULT[arch] if norm is None else norm))
        if arch == "qwen2moe":
            out["shared_expert_intermediate_size"] = int(self._scalar("expert_shared_feed_forward_length", 0) or 0)
        return out

    def _dtype_name(self) -> str:
        kinds = {t.tensor_type.name for t in self._tensors.values() if len(t.dims) >= 2}
        if kinds <= {"F32"}:
            return "float32"
        if "BF16" in kinds:
            return "bfloat16"
        if "F16" in kinds and kinds <= {"F16", "F32"}:
            return "float16"
        return "float32"  # quantised: dequantised values are exact in float32

    def __repr__(self) -> str:
        return f"GgufSource({str(self.path)!r}, arch={self.arch!r}, tensors={len(self._tensors)})"
