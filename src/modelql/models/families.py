"""HF `config.json` → `ModelSpec`, one small function per family.

Each function states its family's differences as field values; the shared reading of topology
and RoPE lives in `_base`. Both config generations are read: transformers 4 (`rope_theta`,
`rope_scaling`, `rope_local_base_freq`) and transformers 5 (`rope_parameters`, per layer type).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

from ..errors import ModelFormatError, UnsupportedModelError
from .spec import ModelSpec, MoeSpec, RopeSpec, TensorMap

_LLAMA_LAYER = {
    "attn_norm.weight": TensorMap("model.layers.{i}.input_layernorm.weight"),
    "q.weight": TensorMap("model.layers.{i}.self_attn.q_proj.weight"),
    "k.weight": TensorMap("model.layers.{i}.self_attn.k_proj.weight"),
    "v.weight": TensorMap("model.layers.{i}.self_attn.v_proj.weight"),
    "o.weight": TensorMap("model.layers.{i}.self_attn.o_proj.weight"),
    "ffn_norm.weight": TensorMap("model.layers.{i}.post_attention_layernorm.weight"),
    "gate.weight": TensorMap("model.layers.{i}.mlp.gate_proj.weight"),
    "up.weight": TensorMap("model.layers.{i}.mlp.up_proj.weight"),
    "down.weight": TensorMap("model.layers.{i}.mlp.down_proj.weight"),
}
_LLAMA_GLOBAL = {
    "embed.weight": TensorMap("model.embed_tokens.weight"),
    "final_norm.weight": TensorMap("model.norm.weight"),
    "lm_head.weight": TensorMap("lm_head.weight"),
}
_QKV_BIAS = {
    "q.bias": TensorMap("model.layers.{i}.self_attn.q_proj.bias"),
    "k.bias": TensorMap("model.layers.{i}.self_attn.k_proj.bias"),
    "v.bias": TensorMap("model.layers.{i}.self_attn.v_proj.bias"),
}
_QK_NORM = {
    "q_norm.weight": TensorMap("model.layers.{i}.self_attn.q_norm.weight"),
    "k_norm.weight": TensorMap("model.layers.{i}.self_attn.k_norm.weight"),
}
_GEMMA2_NORMS = {
    "post_attn_norm.weight": TensorMap("model.layers.{i}.post_attention_layernorm.weight"),
    "ffn_norm.weight": TensorMap("model.layers.{i}.pre_feedforward_layernorm.weight"),
    "post_ffn_norm.weight": TensorMap("model.layers.{i}.post_feedforward_layernorm.weight"),
}


def _get(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _require(cfg: dict, *keys: str) -> Any:
    value = _get(cfg, *keys)
    if value is None:
        raise ModelFormatError(f"config.json is missing {' / '.join(keys)}")
    return value


def _rope(params: dict | None, fallback_theta: float, partial: float, max_pos: int) -> RopeSpec:
    params = params or {}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "su":
        kind = "longrope"
    if kind not in ("default", "linear", "llama3", "longrope", "yarn", "dynamic", "proportional"):
        raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported")
    if kind == "dynamic":
        # Dynamic NTK only changes frequencies beyond the trained length, which is rejected anyway.
        kind = "default"
    orig = params.get("original_max_position_embeddings")
    return RopeSpec(
        theta=float(params.get("rope_theta", fallback_theta)),
        kind=kind,
        factor=float(params.get("factor", 1.0) or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position=int(orig) if orig else None,
        short_factor=tuple(params["short_factor"]) if params.get("short_factor") else None,
        long_factor=tuple(params["long_factor"]) if params.get("long_factor") else None,
        attention_factor=params.get("attention_factor"),
        beta_fast=float(params.get("beta_fast", 32.0)),
        beta_slow=float(params.get("beta_slow", 1.0)),
        partial_rotary_factor=float(params.get("partial_rotary_factor", partial)),
    )


def _ropes(cfg: dict, max_pos: int) -> tuple[RopeSpec, RopeSpec | None]:
    """(global rope, sliding-layer rope or None) from either config generation."""
    partial = float(_get(cfg, "partial_rotary_factor", default=1.0))
    theta = float(_get(cfg, "rope_theta", default=10000.0))
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and "full_attention" in params:
        glob = _rope(params["full_attention"], theta, partial, max_pos)
        local = params.get("sliding_attention")
        return glob, (_rope(local, theta, partial, max_pos) if local else None)
    glob = _rope(params if isinstance(params, dict) else cfg.get("rope_scaling"), theta, partial, max_pos)
    local_theta = cfg.get("rope_local_base_freq")
    local = RopeSpec(theta=float(local_theta), partial_rotary_factor=partial) if local_theta else None
    return glob, local


def _eos(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _layer_sliding(cfg: dict, n: int, default: Callable[[int], bool]) -> tuple[bool, ...]:
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == n:
        return tuple(t == "sliding_attention" for t in types)
    return tuple(default(i) for i in range(n))


def _base(cfg: dict) -> ModelSpec:
    """Topology shared by every RoPE family (Llama naming)."""
    n = int(_require(cfg, "num_hidden_layers"))
    h = int(_require(cfg, "hidden_size"))
    heads = int(_require(cfg, "num_attention_heads"))
    head_dim = int(_get(cfg, "head_dim", default=h // heads))
    max_pos = int(_get(cfg, "max_position_embeddings", default=4096))
    glob, local = _ropes(cfg, max_pos)
    tie = bool(cfg.get("tie_word_embeddings", False))
    global_map = dict(_LLAMA_GLOBAL)
    if tie:
        del global_map["lm_head.weight"]
    return ModelSpec(
        family=str(cfg["model_type"]).removesuffix("_text"),
        model_type=str(cfg["model_type"]),
        num_layers=n,
        hidden_size=h,
        intermediate_size=int(_require(cfg, "intermediate_size")),
        num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=head_dim,
        vocab_size=int(_require(cfg, "vocab_size")),
        max_position=max_pos,
        norm_eps=float(_get(cfg, "rms_norm_eps", "layer_norm_eps", default=1e-6)),
        query_scale=head_dim**-0.5,
        rope=glob,
        rope_local=local,
        tie_embeddings=tie,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"),
        global_map=global_map,
        layer_map=dict(_LLAMA_LAYER),
        torch_dtype=_get(cfg, "torch_dtype", "dtype"),
        config=cfg,
    )


def _act(cfg: dict, default: str) -> str:
    name = _get(cfg, "hidden_activation", "hidden_act", "activation_function", default=default)
    table = {
        "silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
        "gelu_fast": "gelu_tanh", "gelu": "gelu", "relu": "relu",
    }
    if name not in table:
        raise UnsupportedModelError(f"activation {name!r} is not supported")
    return table[name]


def _llama(cfg: dict) -> ModelSpec:
    spec = _base(cfg)
    layer_map = dict(spec.layer_map)
    bias = bool(cfg.get("attention_bias", False))
    if bias:
        layer_map.update(_QKV_BIAS)
        layer_map["o.bias"] = TensorMap("model.layers.{i}.self_attn.o_proj.bias")
    if cfg.get("mlp_bias"):
        raise UnsupportedModelError("llama with mlp_bias=true is not supported")
    return replace(spec, activation=_act(cfg, "silu"), attn_bias=bias, out_bias=bias, layer_map=layer_map)


def _windowed(cfg: dict, spec: ModelSpec, enabled: bool) -> ModelSpec:
    window = cfg.get("sliding_window")
    if not window or not enabled:
        return spec
    return replace(
        spec,
        sliding_window=int(window),
        layer_sliding=_layer_sliding(cfg, spec.num_layers, lambda i: True),
    )


def _mistral(cfg: dict) -> ModelSpec:
    return _windowed(cfg, _llama(cfg), True)


def _qwen2(cfg: dict) -> ModelSpec:
    spec = _base(cfg)
    layer_map = {**spec.layer_map, **_QKV_BIAS}
    spec = replace(spec, activation=_act(cfg, "silu"), attn_bias=True, layer_map=layer_map)
    enabled = bool(cfg.get("use_sliding_window", False))
    if enabled and not cfg.get("layer_types"):
        start = int(cfg.get("max_window_layers", 0))
        return replace(
            spec,
            sliding_window=int(cfg["sliding_window"]),
            layer_sliding=tuple(i >= start for i in range(spec.num_layers)),
        )
    return _windowed(cfg, spec, enabled)


def _qwen3(cfg: dict) -> ModelSpec:
    spec = _base(cfg)
    layer_map = {**spec.layer_map, **_QK_NORM}
    bias = bool(cfg.get("attention_bias", False))
    if bias:
        layer_map.update(_QKV_BIAS)
        layer_map["o.bias"] = TensorMap("model.layers.{i}.self_attn.o_proj.bias")
    spec = replace(
        spec, activation=_act(cfg, "silu"), qk_norm=True, attn_bias=bias, out_bias=bias,
        layer_map=layer_map,
    )
    return _windowed(cfg, spec, bool(cfg.get("use_sliding_window", False)))


def _gemma(cfg: dict) -> ModelSpec:
    spec = _base(cfg)
    return replace(
        spec,
        activation=_act(cfg, "gelu_tanh") if cfg.get("hidden_activation") else "gelu_tanh",
        norm_weight_offset=1.0,
        embed_scale=math.sqrt(spec.hidden_size),
    )


def _gemma2(cfg: dict) -> ModelSpec:
    spec = _gemma(cfg)
    scalar = float(_get(cfg, "query_pre_attn_scalar", default=spec.head_dim))
    spec = replace(
        spec,
        post_attn_norm=True,
        post_ffn_norm=True,
        layer_map={**spec.layer_map, **_GEMMA2_NORMS},
        query_scale=scalar**-0.5,
        attn_softcap=cfg.get("attn_logit_softcapping"),
        final_softcap=cfg.get("final_logit_softcapping"),
    )
    if cfg.get("sliding_window"):
        spec = replace(
            spec,
            sliding_window=int(cfg["sliding_window"]),
            layer_sliding=_layer_sliding(cfg, spec.num_layers, lambda i: i % 2 == 0),
        )
    return spec


def _gemma3(cfg: dict) -> ModelSpec:
    spec = _gemma2(cfg)
    pattern = int(_get(cfg, "sliding_window_pattern", "_sliding_window_pattern", default=6))
    sliding = _layer_sliding(cfg, spec.num_layers, lambda i: (i + 1) % pattern != 0)
    local = spec.rope_local or RopeSpec(theta=10000.0)
    return replace(
        spec,
        qk_norm=True,
        layer_map={**spec.layer_map, **_QK_NORM},
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        layer_sliding=sliding if cfg.get("sliding_window") else (),
        rope_local=local,
    )


def _per_layer(cfg: dict, layer: int, key: str, full: bool, global_key: str) -> int | None:
    """A Gemma 4 per-layer override: `per_layer_config` (transformers' serialised form) or the
    `global_*` keys of the hub configs (full-attention layers only)."""
    table = cfg.get("per_layer_config") or {}
    entry = table.get(str(layer), table.get(layer)) if isinstance(table, dict) else None
    if isinstance(entry, dict) and entry.get(key) is not None:
        return int(entry[key])
    return int(cfg[global_key]) if full and cfg.get(global_key) is not None else None


_GEMMA4_PLE_LAYER = {
    "ple_gate.weight": TensorMap("model.layers.{i}.per_layer_input_gate.weight"),
    "ple_proj.weight": TensorMap("model.layers.{i}.per_layer_projection.weight"),
    "ple_norm.weight": TensorMap("model.layers.{i}.post_per_layer_input_norm.weight"),
}
_GEMMA4_PLE_GLOBAL = {
    "ple_embed.weight": TensorMap("model.embed_tokens_per_layer.weight"),
    "ple_model_proj.weight": TensorMap("model.per_layer_model_projection.weight"),
    "ple_proj_norm.weight": TensorMap("model.per_layer_projection_norm.weight"),
}


def _gemma4(cfg: dict) -> ModelSpec:
    """Gemma 4 text: per-head q/k norms and a weightless v norm, no query scaling (the norms set
    the scale), wider heads (and fewer kv heads, values = keys) on full-attention layers, the last
    `num_kv_shared_layers` layers attending over an earlier layer's cache, proportional RoPE on
    full layers, per-layer token embeddings (PLE), a scalar per block, and optionally experts
    running beside the dense FFN. Norm weights are used as stored (no Gemma `1 +`)."""
    if cfg.get("use_bidirectional_attention") == "all":
        raise UnsupportedModelError("gemma4 with bidirectional attention is not a causal language model")
    spec = _base(cfg)
    n = spec.num_layers
    types = cfg.get("layer_types")
    if not (isinstance(types, list) and len(types) == n):
        raise ModelFormatError("gemma4 config.json needs layer_types, one per layer")
    full = [t == "full_attention" for t in types]
    head = [(_per_layer(cfg, i, "head_dim", full[i], "global_head_dim") or spec.head_dim) for i in range(n)]
    k_eq_v = [bool(cfg.get("attention_k_eq_v")) and full[i] for i in range(n)]
    kv_heads = [(_per_layer(cfg, i, "num_key_value_heads", k_eq_v[i], "num_global_key_value_heads")
                 or spec.num_kv_heads) for i in range(n)]
    shared = int(cfg.get("num_kv_shared_layers") or 0)
    first = n - shared
    source = list(range(n))
    for i in range(first, n):
        producers = [j for j in range(first) if types[j] == types[i]]
        if not producers:
            raise ModelFormatError(f"gemma4 layer {i} shares keys/values, but no earlier layer is {types[i]}")
        source[i] = producers[-1]
    layer_map = {**spec.layer_map, **_GEMMA2_NORMS, **_QK_NORM}
    for name in ("k.weight", "v.weight", "k_norm.weight"):
        layer_map[name] = replace(layer_map[name], optional=True)
    layer_map["layer_scalar"] = TensorMap("model.layers.{i}.layer_scalar", buffer=True)
    global_map = dict(spec.global_map)
    ple = int(cfg.get("hidden_size_per_layer_input") or 0)
    if ple:
        layer_map.update(_GEMMA4_PLE_LAYER)
        global_map.update(_GEMMA4_PLE_GLOBAL)
    spec = replace(
        spec,
        activation=_act(cfg, "gelu_tanh"),
        embed_scale=math.sqrt(spec.hidden_size),
        qk_norm=True,
        v_norm=True,
        post_attn_norm=True,
        post_ffn_norm=True,
        query_scale=1.0,
        final_softcap=cfg.get("final_logit_softcapping"),
        sliding_window=int(cfg["sliding_window"]) if cfg.get("sliding_window") else None,
        layer_sliding=tuple(not f for f in full) if cfg.get("sliding_window") else (),
        layer_head_dim=tuple(head),
        layer_kv_heads=tuple(kv_heads),
        layer_kv_source=tuple(source) if shared else (),
        layer_k_eq_v=tuple(k_eq_v) if any(k_eq_v) else (),
        layer_scalar=True,
        per_layer_input=ple,
        global_map=global_map,
        layer_map=layer_map,
    )
    if cfg.get("enable_moe_block"):
        spec = _gemma4_moe(cfg, spec)
    return spec


def _gemma4_moe(cfg: dict, spec: ModelSpec) -> ModelSpec:
    """Experts beside the dense FFN; expert weights are stacked [E, ...] in the checkpoint."""
    experts = int(_require(cfg, "num_experts"))
    size = int(_require(cfg, "moe_intermediate_size"))
    p = "model.layers.{i}."
    layer_map = dict(spec.layer_map)
    layer_map["router.weight"] = TensorMap(p + "router.proj.weight")
    layer_map["router.scale"] = TensorMap(p + "router.scale")
    layer_map["router.expert_scale"] = TensorMap(p + "router.per_expert_scale")
    for e in range(experts):
        layer_map[f"experts.{e}.gate.weight"] = TensorMap(p + "experts.gate_up_proj", f"index:{e},split:0/2")
        layer_map[f"experts.{e}.up.weight"] = TensorMap(p + "experts.gate_up_proj", f"index:{e},split:1/2")
        layer_map[f"experts.{e}.down.weight"] = TensorMap(p + "experts.down_proj", f"index:{e}")
    layer_map["moe_norm.weight"] = TensorMap(p + "pre_feedforward_layernorm_2.weight")
    layer_map["post_dense_norm.weight"] = TensorMap(p + "post_feedforward_layernorm_1.weight")
    layer_map["post_moe_norm.weight"] = TensorMap(p + "post_feedforward_layernorm_2.weight")
    moe = MoeSpec(num_experts=experts, top_k=int(_require(cfg, "top_k_experts")), expert_size=size,
                  renormalize=True, beside_dense=True)
    return replace(spec, moe=moe, layer_map=layer_map)


def _phi3(cfg: dict) -> ModelSpec:
    spec = _base(cfg)
    q, kv, f = spec.q_size, spec.kv_size, spec.intermediate_size
    layer_map = dict(spec.layer_map)
    fused = "model.layers.{i}.self_attn.qkv_proj.weight"
    layer_map["q.weight"] = TensorMap(fused, f"split:0@{q}+{kv}+{kv}")
    layer_map["k.weight"] = TensorMap(fused, f"split:1@{q}+{kv}+{kv}")
    layer_map["v.weight"] = TensorMap(fused, f"split:2@{q}+{kv}+{kv}")
    gate_up = "model.layers.{i}.mlp.gate_up_proj.weight"
    layer_map["gate.weight"] = TensorMap(gate_up, f"split:0@{f}+{f}")
    layer_map["up.weight"] = TensorMap(gate_up, f"split:1@{f}+{f}")
    spec = replace(spec, activation=_act(cfg, "silu"), layer_map=layer_map)
    return _windowed(cfg, spec, True)


def _gpt2(cfg: dict) -> ModelSpec:
    h = int(_require(cfg, "n_embd", "hidden_size"))
    heads = int(_require(cfg, "n_head", "num_attention_heads"))
    n = int(_require(cfg, "n_layer", "num_hidden_layers"))
    inner = int(_get(cfg, "n_inner", default=4 * h))
    if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
        raise UnsupportedModelError("gpt2 with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn is not supported")
    p = "transformer.h.{i}."
    split = lambda i: f"t,split:{i}/3"  # noqa: E731
    layer_map = {
        "attn_norm.weight": TensorMap(p + "ln_1.weight"),
        "attn_norm.bias": TensorMap(p + "ln_1.bias"),
        "q.weight": TensorMap(p + "attn.c_attn.weight", split(0)),
        "k.weight": TensorMap(p + "attn.c_attn.weight", split(1)),
        "v.weight": TensorMap(p + "attn.c_attn.weight", split(2)),
        "q.bias": TensorMap(p + "attn.c_attn.bias", "split:0/3"),
        "k.bias": TensorMap(p + "attn.c_attn.bias", "split:1/3"),
        "v.bias": TensorMap(p + "attn.c_attn.bias", "split:2/3"),
        "o.weight": TensorMap(p + "attn.c_proj.weight", "t"),
        "o.bias": TensorMap(p + "attn.c_proj.bias"),
        "ffn_norm.weight": TensorMap(p + "ln_2.weight"),
        "ffn_norm.bias": TensorMap(p + "ln_2.bias"),
        "up.weight": TensorMap(p + "mlp.c_fc.weight", "t"),
        "up.bias": TensorMap(p + "mlp.c_fc.bias"),
        "down.weight": TensorMap(p + "mlp.c_proj.weight", "t"),
        "down.bias": TensorMap(p + "mlp.c_proj.bias"),
    }
    tie = bool(cfg.get("tie_word_embeddings", True))
    global_map = {
        "embed.weight": TensorMap("transformer.wte.weight"),
        "pos_embed.weight": TensorMap("transformer.wpe.weight"),
        "final_norm.weight": TensorMap("transformer.ln_f.weight"),
        "final_norm.bias": TensorMap("transformer.ln_f.bias"),
    }
    if not tie:
        global_map["lm_head.weight"] = TensorMap("lm_head.weight")
    return ModelSpec(
        family="gpt2",
        model_type="gpt2",
        num_layers=n,
        hidden_size=h,
        intermediate_size=inner,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=h // heads,
        vocab_size=int(_require(cfg, "vocab_size")),
        max_position=int(_get(cfg, "n_positions", "max_position_embeddings", default=1024)),
        norm="layer",
        norm_eps=float(_get(cfg, "layer_norm_epsilon", default=1e-5)),
        learned_positions=True,
        attn_bias=True,
        out_bias=True,
        mlp_bias=True,
        activation=_act(cfg, "gelu_new"),
        gated_ffn=False,
        query_scale=(h // heads) ** -0.5 if cfg.get("scale_attn_weights", True) else 1.0,
        rope=None,
        tie_embeddings=tie,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos(cfg),
        pad_token_id=cfg.get("pad_token_id"),
        global_map=global_map,
        layer_map=layer_map,
        torch_dtype=_get(cfg, "torch_dtype", "dtype"),
        config=cfg,
    )


def _olmo2(cfg: dict) -> ModelSpec:
    """Norms on the outputs of attention and FFN instead of their inputs; q/k norms over the whole projection."""
    spec = _llama(cfg)
    layer_map = {k: v for k, v in spec.layer_map.items() if k not in ("attn_norm.weight", "ffn_norm.weight")}
    layer_map.update(_QK_NORM)
    layer_map["post_attn_norm.weight"] = TensorMap("model.layers.{i}.post_attention_layernorm.weight")
    layer_map["post_ffn_norm.weight"] = TensorMap("model.layers.{i}.post_feedforward_layernorm.weight")
    spec = replace(spec, pre_norms=False, qk_norm=True, qk_norm_per_head=False, post_attn_norm=True,
                   post_ffn_norm=True, layer_map=layer_map)
    return _windowed(cfg, spec, bool(cfg.get("layer_types")))


def _granite(cfg: dict) -> ModelSpec:
    """Llama with four scalars: embedding, attention (replaces 1/sqrt(head_dim)), residual branch, logits."""
    spec = _llama(cfg)
    return replace(
        spec,
        embed_scale=float(_get(cfg, "embedding_multiplier", default=1.0)),
        query_scale=float(_get(cfg, "attention_multiplier", default=spec.head_dim**-0.5)),
        residual_scale=float(_get(cfg, "residual_multiplier", default=1.0)),
        logits_scale=float(_get(cfg, "logits_scaling", default=1.0)),
    )


def _smollm3(cfg: dict) -> ModelSpec:
    """Llama where `no_rope_layers[i] == 0` marks a layer that attends without rotary positions."""
    spec = _llama(cfg)
    flags = cfg.get("no_rope_layers")
    if isinstance(flags, list) and len(flags) == spec.num_layers:
        spec = replace(spec, layer_rope=tuple(bool(f) for f in flags))
    return _windowed(cfg, spec, bool(cfg.get("use_sliding_window", False)))


_DENSE_FFN = ("gate.weight", "up.weight", "down.weight")


def _with_moe(cfg: dict, spec: ModelSpec, block: str, proj: tuple[str, str, str], renormalize: bool,
              shared: bool = False) -> ModelSpec:
    """Replace the dense FFN maps with a router and experts under `model.layers.{i}.<block>`.

    `proj` names an expert's gate, up and down projections in the checkpoint (Mixtral: w1, w3, w2)."""
    if cfg.get("mlp_only_layers") or int(cfg.get("decoder_sparse_step", 1) or 1) != 1:
        raise UnsupportedModelError(f"{spec.model_type} with dense layers between MoE layers "
                                    "(mlp_only_layers / decoder_sparse_step) is not supported")
    experts = int(_require(cfg, "num_local_experts", "num_experts"))
    top_k = int(_require(cfg, "num_experts_per_tok"))
    size = int(_get(cfg, "moe_intermediate_size", "intermediate_size"))
    p = f"model.layers.{{i}}.{block}."
    layer_map = {k: v for k, v in spec.layer_map.items() if k not in _DENSE_FFN}
    layer_map["router.weight"] = TensorMap(p + "gate.weight")
    for e in range(experts):
        for canon, hf in zip(_DENSE_FFN, proj):
            layer_map[f"experts.{e}.{canon}"] = TensorMap(f"{p}experts.{e}.{hf}.weight")
    shared_size = int(cfg.get("shared_expert_intermediate_size") or 0) if shared else 0
    if shared_size:
        for canon, hf in zip(_DENSE_FFN, ("gate_proj", "up_proj", "down_proj")):
            layer_map[f"shared.{canon}"] = TensorMap(f"{p}shared_expert.{hf}.weight")
        layer_map["shared_gate.weight"] = TensorMap(p + "shared_expert_gate.weight")
    moe = MoeSpec(num_experts=experts, top_k=top_k, expert_size=size, renormalize=renormalize,
                  shared_size=shared_size, shared_gate=bool(shared_size))
    return replace(spec, moe=moe, intermediate_size=size, layer_map=layer_map)


def _mixtral(cfg: dict) -> ModelSpec:
    """Mistral attention; softmax → top-k → renormalise, always."""
    return _with_moe(cfg, _mistral(cfg), "block_sparse_moe", ("w1", "w3", "w2"), renormalize=True)


_QWEN_PROJ = ("gate_proj", "up_proj", "down_proj")


def _qwen2_moe(cfg: dict) -> ModelSpec:
    return _with_moe(cfg, _qwen2(cfg), "mlp", _QWEN_PROJ, bool(cfg.get("norm_topk_prob", False)), shared=True)


def _qwen3_moe(cfg: dict) -> ModelSpec:
    return _with_moe(cfg, _qwen3(cfg), "mlp", _QWEN_PROJ, bool(cfg.get("norm_topk_prob", False)))


def _olmoe(cfg: dict) -> ModelSpec:
    """Llama pre-norms with OLMo's whole-projection q/k norms; top-k weights not renormalised by default."""
    if cfg.get("clip_qkv") is not None:
        raise UnsupportedModelError("olmoe with clip_qkv is not supported")
    spec = _llama(cfg)
    spec = replace(spec, qk_norm=True, qk_norm_per_head=False, layer_map={**spec.layer_map, **_QK_NORM})
    return _with_moe(cfg, spec, "mlp", _QWEN_PROJ, bool(cfg.get("norm_topk_prob", False)))


FAMILIES: dict[str, Callable[[dict], ModelSpec]] = {
    "llama": _llama,
    "mistral": _mistral,
    "qwen2": _qwen2,
    "qwen3": _qwen3,
    "gemma": _gemma,
    "gemma2": _gemma2,
    "gemma3": _gemma3,
    "gemma3_text": _gemma3,
    "gemma4": _gemma4,
    "gemma4_text": _gemma4,
    "phi3": _phi3,
    "gpt2": _gpt2,
    "olmo2": _olmo2,
    "olmo3": _olmo2,
    "granite": _granite,
    "smollm3": _smollm3,
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
}


def spec_from_config(config: dict) -> ModelSpec:
    """Build the spec of the text model a HF config describes (top level or `text_config`)."""
    cfg = config
    if isinstance(config.get("text_config"), dict):
        cfg = {**config["text_config"]}
        cfg.setdefault("model_type", f"{config.get('model_type', '')}_text")
        for key in ("tie_word_embeddings", "torch_dtype", "dtype", "eos_token_id", "bos_token_id"):
            if key in config and key not in cfg:
                cfg[key] = config[key]
    model_type = cfg.get("model_type")
    if model_type is None:
        raise ModelFormatError("config.json has no model_type")
    builder = FAMILIES.get(model_type)
    if builder is None:
        known = ", ".join(sorted(k for k in FAMILIES if not k.endswith("_text")))
        raise UnsupportedModelError(f"unsupported model_type {model_type!r} (supported: {known})")
    return builder(cfg)
