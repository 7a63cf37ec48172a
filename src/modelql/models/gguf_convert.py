"""HF model directory → GGUF file, the way llama.cpp's `convert_hf_to_gguf.py` writes it.

`convert(model_dir, out, out_type)` writes `general.architecture` and the `{arch}.*`
hyper-parameters llama.cpp reads, the tokenizer metadata (`modelql.models.gguf_tokenizer`), and
the tensors under llama.cpp's names (`gguf.get_tensor_name_map`, llama.cpp's own table) with its
transforms: Q/K rows permuted for the `llama` architecture (Llama, Mistral), Gemma norm weights
stored as `w + 1`, GPT-2 Conv1D weights transposed (and its tied `output.weight` written as a copy
of `token_embd`), Llama-3 RoPE scaling as the `rope_freqs` tensor, a mixture of experts' per-expert
matrices stacked into one [E, rows, cols] tensor per projection (`ffn_{gate,up,down}_exps`) with the
`expert_*` metadata. Types: `f32`; `f16` and `q8_0`
keep 1-D tensors, norms and position embeddings in F32 as llama.cpp does (a tensor whose rows are
not a multiple of 32 falls back to F16 under q8_0).

A few keys llama.cpp does not read for these architectures are added so that `GgufSource` gets
the HF config back exactly (see `modelql.models.gguf`): `attention.scale` and
`attention.sliding_window_pattern` (Gemma 2/3), `rope.freq_base_swa` (Gemma 3),
`attention.sliding_window` for Mistral and windowed Qwen.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from ..errors import ModelFormatError, UnsupportedModelError
from ..fsutil import atomic_path

if TYPE_CHECKING:  # heavy modules are imported inside the functions: `modelql --help` stays fast
    import numpy as np

log = logging.getLogger(__name__)

OUT_TYPES = ("f32", "f16", "q8_0")
GGUF_ARCH = {
    "llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
    "gemma2": "gemma2", "gemma3": "gemma3", "gemma3_text": "gemma3", "phi3": "phi3", "gpt2": "gpt2",
    "mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe", "olmoe": "olmoe",
}


@dataclass
class ConvertResult:
    path: Path
    arch: str
    out_type: str
    tensors: int
    bytes: int
    types: dict[str, int]


def _llama3_rope_factors(rope: dict, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for Llama-3 scaling (LlamaModel.generate_extra_tensors)."""
    import numpy as np
    import torch

    base = float(rope.get("rope_theta", 10000.0))
    freqs = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _rope_params(cfg: dict) -> tuple[dict, dict | None]:
    """(global, sliding) RoPE parameter dicts with rope_theta filled in, from either config generation."""
    params = cfg.get("rope_parameters")
    theta = cfg.get("rope_theta", 10000.0)
    if isinstance(params, dict) and "full_attention" in params:
        glob = dict(params["full_attention"])
        local = dict(params.get("sliding_attention") or {}) or None
    else:
        glob = dict(params if isinstance(params, dict) else (cfg.get("rope_scaling") or {}))
        local = {"rope_theta": cfg["rope_local_base_freq"]} if cfg.get("rope_local_base_freq") else None
    glob.setdefault("rope_theta", theta)
    if "type" in glob and "rope_type" not in glob:
        glob["rope_type"] = glob["type"]
    return glob, local


def _write_hparams(w, arch: str, cfg: dict, spec, n_vocab: int) -> list[tuple[str, np.ndarray]]:
    """The `{arch}.*` metadata; returns extra tensors (rope_freqs / rope_factors)."""
    import gguf
    import numpy as np

    extra: list[tuple[str, np.ndarray]] = []
    w.add_block_count(spec.num_layers)
    w.add_context_length(spec.max_position)
    w.add_embedding_length(spec.hidden_size)
    w.add_feed_forward_length(spec.intermediate_size)
    w.add_head_count(spec.num_heads)
    if arch == "gpt2":
        w.add_layer_norm_eps(spec.norm_eps)
        return extra
    w.add_head_count_kv(spec.num_kv_heads)
    w.add_layer_norm_rms_eps(spec.norm_eps)
    glob, local = _rope_params(cfg)
    w.add_rope_freq_base(float(glob["rope_theta"]))
    kind = (glob.get("rope_type") or "default").lower()
    if kind == "linear" and glob.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(glob["factor"]))
    elif kind == "yarn" and glob.get("factor"):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(glob["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(glob["original_max_position_embeddings"]))
        if glob.get("attention_factor") is not None:
            w.add_rope_scaling_yarn_attn_factor(float(glob["attention_factor"]))
        if glob.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(glob["beta_fast"]))
        if glob.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(glob["beta_slow"]))
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind == "llama3":
        extra.append(("rope_freqs.weight", _llama3_rope_factors(glob, spec.head_dim)))
    elif kind not in ("default", "dynamic"):
        raise UnsupportedModelError(f"RoPE scaling {kind!r} cannot be written to GGUF")
    if cfg.get("head_dim") is not None or arch in ("gemma", "gemma2", "gemma3"):
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)

    if spec.moe is not None:
        m = spec.moe
        w.add_expert_count(m.num_experts)
        w.add_expert_used_count(m.top_k)
        w.add_expert_feed_forward_length(m.expert_size)
        w.add_expert_weights_norm(m.renormalize)
        if m.shared_size:
            w.add_expert_shared_feed_forward_length(m.shared_size)
    if arch == "llama":
        w.add_vocab_size(n_vocab)
        w.add_rope_dimension_count(spec.head_dim)
        if spec.sliding_window:
            w.add_sliding_window(spec.sliding_window)
    elif arch in ("qwen2", "qwen3", "qwen2moe", "qwen3moe"):
        if spec.sliding_window:
            w.add_sliding_window(spec.sliding_window)
            w.add_sliding_window_pattern(list(spec.layer_sliding))
    elif arch == "phi3":
        rope_dims = int(spec.rope.partial_rotary_factor * spec.hidden_size) // spec.num_heads
        orig = cfg.get("original_max_position_embeddings") or glob.get("original_max_position_embeddings") \
            or spec.max_position
        w.add_rope_scaling_orig_ctx_len(int(orig))
        w.add_rope_dimension_count(rope_dims)
        w.add_sliding_window(int(cfg.get("sliding_window") or 0))
        if kind in ("su", "longrope"):
            long_f, short_f = glob.get("long_factor"), glob.get("short_factor")
            if long_f is None or short_f is None:
                raise ModelFormatError("longrope scaling needs long_factor and short_factor")
            scale = spec.max_position / int(orig)
            attn = 1.0 if scale <= 1.0 else math.sqrt(1 + math.log(scale) / math.log(int(orig)))
            w.add_rope_scaling_attn_factors(attn)
            extra.append(("rope_factors_long.weight", np.asarray(long_f, dtype=np.float32)))
            extra.append(("rope_factors_short.weight", np.asarray(short_f, dtype=np.float32)))
    elif arch in ("gemma2", "gemma3"):
        w.add_attention_scale(float(spec.query_scale))
        if spec.attn_softcap:
            w.add_attn_logit_softcapping(float(spec.attn_softcap))
        if spec.final_softcap:
            w.add_final_logit_softcapping(float(spec.final_softcap))
        if spec.sliding_window:
            w.add_sliding_window(spec.sliding_window)
            w.add_sliding_window_pattern(list(spec.layer_sliding))
        if arch == "gemma3":
            theta_swa = (local or {}).get("rope_theta") or (spec.rope_local.theta if spec.rope_local else 10000.0)
            w.add_rope_freq_base_swa(float(theta_swa))
    return extra


def _qtype(name: str, data: np.ndarray, out_type: str):
    """llama.cpp's choice: 1-D tensors, norms and position embeddings stay F32."""
    from gguf import GGMLQuantizationType as Q

    if out_type == "f32" or data.ndim <= 1 or name.endswith("_norm.weight") or name.startswith("position_embd."):
        return Q.F32
    if out_type == "f16":
        return Q.F16
    return Q.Q8_0 if data.shape[-1] % 32 == 0 else Q.F16


_EXPERT = re.compile(r"(?P<block>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+)\.weight$")


def _hf_tensors(source, spec, cfg: dict, arch: str):
    """(gguf name, float32 numpy array) for every text-model tensor, llama.cpp's transforms applied."""
    import gguf
    import numpy as np
    import torch

    from .gguf import permute_qk
    from .source import resolve_prefix

    names = source.names()
    embed_key = next(iter(spec.global_map.values())).hf_name
    prefix = resolve_prefix(names, embed_key)
    head, _, drop = prefix.partition("\0")
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    tmap = gguf.get_tensor_name_map(arch_enum, spec.num_layers)
    gemma = arch in ("gemma", "gemma2", "gemma3")
    pending: dict[str, dict[int, np.ndarray]] = {}  # stacked expert tensor → experts read so far
    experts = spec.moe.num_experts if spec.moe is not None else 0
    for key in names:
        if not key.startswith(head):
            continue
        name = key[len(head):]
        if drop:
            name = drop + name
        if arch == "gpt2" and name.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        if name == "lm_head.weight" and spec.tie_embeddings:
            continue
        expert = _EXPERT.match(name) if experts else None
        if expert is not None:  # llama.cpp stores a layer's experts stacked: [E, rows, cols]
            stacked = f"{expert['block']}.{expert['proj']}.weight"
            got = pending.setdefault(stacked, {})
            got[int(expert["e"])] = source.get(key).to(torch.float32).numpy()
            if len(got) == experts:
                new = tmap.get_name(stacked, try_suffixes=(".weight",))
                if new is None:
                    raise UnsupportedModelError(f"tensor {stacked} has no GGUF name for architecture {arch}")
                yield new, np.stack([got[e] for e in range(experts)])
                del pending[stacked]
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            if gemma and name.startswith(("vision_tower.", "multi_modal_projector.")):
                continue
            raise UnsupportedModelError(f"tensor {name} has no GGUF name for architecture {arch}")
        t = source.get(key).to(torch.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute_qk(t, spec.num_heads)
        elif arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute_qk(t, spec.num_kv_heads)
        if gemma and name.endswith("norm.weight"):
            t = t + 1
        if arch == "gpt2" and name.endswith((".c_attn.weight", ".c_proj.weight", ".c_fc.weight")):
            t = t.t()
        data = t.contiguous().numpy()
        yield new, data
        if arch == "gpt2" and new == "token_embd.weight" and spec.tie_embeddings:
            yield "output.weight", data  # llama.cpp: GPT-2's output is a copy of wte


def convert(model_dir: str | Path, out: str | Path, out_type: str = "f16") -> ConvertResult:
    """Write the HF model in `model_dir` as a GGUF file `out` of type f32, f16 or q8_0."""
    import gguf
    import numpy as np
    from gguf import GGMLQuantizationType as Q

    from .families import spec_from_config
    from .gguf_tokenizer import vocab_metadata
    from .source import SafetensorsSource

    if out_type not in OUT_TYPES:
        raise UnsupportedModelError(f"unsupported GGUF type {out_type!r} (use {', '.join(OUT_TYPES)})")
    model_dir = Path(model_dir)
    source = SafetensorsSource(model_dir)
    spec = spec_from_config(source.config)
    cfg = spec.config
    arch = GGUF_ARCH.get(spec.model_type)
    if arch is None:
        raise UnsupportedModelError(f"model_type {spec.model_type!r} cannot be written to GGUF")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)

    w = gguf.GGUFWriter(path=None, arch=arch)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[out_type]
    w.add_name(model_dir.resolve().name)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_file_type(ftype)
    extra = _write_hparams(w, arch, cfg, spec, spec.vocab_size)
    vocab_metadata(model_dir, spec.vocab_size).write(w)

    types: dict[str, int] = {}
    count = 0
    tensors = list(_hf_tensors(source, spec, cfg, arch)) + extra
    for name, data in tensors:
        qtype = _qtype(name, data, out_type)
        if qtype == Q.F32:
            w.add_tensor(name, data.astype(np.float32, copy=False))
        elif qtype == Q.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
        count += 1
    with atomic_path(out) as tmp:
        w.write_header_to_file(path=tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return ConvertResult(path=out, arch=arch, out_type=out_type, tensors=count, bytes=out.stat().st_size, types=types)


def convert_command(
    model_dir: Annotated[str, typer.Argument(metavar="MODEL_DIR", show_default=False,
                                             help="HF model directory (config.json + *.safetensors + tokenizer)")],
    output: Annotated[str, typer.Option("--output", "-o", show_default=False, help="the GGUF file to write")],
    out_type: Annotated[str, typer.Option("--type", "-t", help="tensor type: f32, f16 or q8_0")] = "f16",
) -> None:
    """`modelql convert MODEL_DIR -o OUT.gguf [--type f32|f16|q8_0]`: one summary line on success."""
    result = convert(model_dir, output, out_type.lower())
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(result.types.items()))
    print(f"wrote {result.path} ({result.arch}, {result.out_type}: {result.tensors} tensors, {kinds}; "
          f"{result.bytes / 2**20:.1f} MiB)")
