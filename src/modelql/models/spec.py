"""`ModelSpec`: every difference between model families, as data.

The forward pass in `modelql.runtime` reads only this record; it never asks "is this Gemma?".
Adding a family means writing one `_family_*` function in `families.py` that fills a spec from
a HF config dict, not editing the forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

NormKind = Literal["rms", "layer"]
Activation = Literal["silu", "gelu_tanh", "gelu", "relu"]


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding parameters for one kind of layer (global or sliding)."""

    theta: float = 10000.0
    kind: str = "default"  # default | linear | llama3 | longrope | yarn | proportional
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class TensorMap:
    """Where one canonical tensor lives in the HF checkpoint and how to reshape it.

    `transform` is "id" (same layout), "t" (transpose: GPT-2 Conv1D stores [in, out]), or
    "split:i/n" / "split:i@a+b+c" (slice i of a tensor fused along dim 0, in n equal parts or
    parts of the given sizes: Phi-3's qkv_proj and gate_up_proj), or "index:e" (entry e of a tensor
    stacked along dim 0: one expert of Gemma 4's [E, ...] expert weights); steps chain with ",".
    An optional map may be absent. A `buffer` is stored in the checkpoint but is no trained
    parameter in transformers (Gemma 4's `layer_scalar`): `modelql info` leaves it out of the count.
    """

    hf_name: str
    transform: str = "id"
    optional: bool = False
    buffer: bool = False


@dataclass(frozen=True)
class MoeSpec:
    """A mixture-of-experts FFN: a linear router picks `top_k` of `num_experts` gated FFNs per token.

    Every supported family routes the same way — softmax over all experts (float32), then top-k —
    and differs only in data: whether the k weights are renormalised to sum to 1 (Mixtral always;
    Qwen-MoE and OLMoE by their `norm_topk_prob`), and whether a shared expert runs on every token
    (Qwen2-MoE, its output scaled by a sigmoid gate). Canonical weights per layer: `router.weight`
    [E, H]; `experts.{e}.gate/up/down.weight`; `shared.gate/up/down.weight`, `shared_gate.weight` [1, H].
    """

    num_experts: int
    top_k: int
    expert_size: int
    renormalize: bool
    shared_size: int = 0
    shared_gate: bool = False
    #: Gemma 4: the experts run beside the dense FFN (each branch post-normed, then summed); the
    #: router reads the residual through a weightless RMS norm times `router.scale` / sqrt(H), and
    #: the renormalised top-k weights are multiplied by `router.per_expert_scale`
    beside_dense: bool = False


@dataclass(frozen=True)
class ModelSpec:
    """A model's architecture: topology, per-family numerics, and the weight name map."""

    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position: int

    norm: NormKind = "rms"
    norm_eps: float = 1e-6
    norm_weight_offset: float = 0.0
    norm_in_float32: bool = True
    embed_scale: float = 1.0
    learned_positions: bool = False

    pre_norms: bool = True  # False: no norm before attention/FFN (OLMo 2 normalises their outputs instead)
    qk_norm: bool = False
    qk_norm_per_head: bool = True  # False: q/k norms span the whole projection (OLMo 2)
    post_attn_norm: bool = False
    post_ffn_norm: bool = False
    attn_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False

    activation: Activation = "silu"
    gated_ffn: bool = True
    moe: MoeSpec | None = None  # set: every layer's FFN is a mixture of experts (`ffn.moe.MoeFfn`)

    query_scale: float = 1.0
    attn_softcap: float | None = None
    final_softcap: float | None = None
    logits_scale: float = 1.0
    residual_scale: float = 1.0  # attention and FFN outputs are scaled by it before joining the residual (Granite)

    rope: RopeSpec | None = field(default_factory=RopeSpec)
    rope_local: RopeSpec | None = None
    sliding_window: int | None = None
    layer_sliding: tuple[bool, ...] = ()
    layer_rope: tuple[bool, ...] = ()  # per layer: False = no positional rotation (SmolLM3's NoPE layers)

    # Gemma 4 (empty / zero: every layer alike)
    layer_head_dim: tuple[int, ...] = ()  # per layer: head width (full-attention layers are wider)
    layer_kv_heads: tuple[int, ...] = ()
    layer_kv_source: tuple[int, ...] = ()  # per layer: the layer whose cached keys/values it attends over
    layer_k_eq_v: tuple[bool, ...] = ()  # per layer: values are the keys' projection (no v weight)
    v_norm: bool = False  # values pass a weightless per-head RMS norm
    layer_scalar: bool = False  # each block's output is multiplied by its `layer_scalar` weight
    per_layer_input: int = 0  # width of the per-layer token embeddings added after each block (PLE)

    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    global_map: dict[str, TensorMap] = field(default_factory=dict)
    layer_map: dict[str, TensorMap] = field(default_factory=dict)
    torch_dtype: str | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_sliding) and self.layer_sliding[layer]

    def window(self, layer: int) -> int | None:
        """Attention window of a layer in tokens (a query sees itself and window-1 earlier keys)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def rope_for(self, layer: int) -> RopeSpec | None:
        if self.layer_rope and not self.layer_rope[layer]:
            return None
        if self.is_sliding(layer) and self.rope_local is not None:
            return self.rope_local
        return self.rope

    def head_dim_at(self, layer: int) -> int:
        return self.layer_head_dim[layer] if self.layer_head_dim else self.head_dim

    def kv_heads_at(self, layer: int) -> int:
        return self.layer_kv_heads[layer] if self.layer_kv_heads else self.num_kv_heads

    def kv_source(self, layer: int) -> int:
        return self.layer_kv_source[layer] if self.layer_kv_source else layer

    def k_eq_v(self, layer: int) -> bool:
        return bool(self.layer_k_eq_v) and self.layer_k_eq_v[layer]

    @property
    def experts_are_features(self) -> bool:
        """Whether a layer's vindex features are its experts' (Mixtral-style MoE). Gemma 4's experts
        run beside a dense FFN: its features are the dense FFN's, as LARQL's hybrid-MoE vindex."""
        return self.moe is not None and not self.moe.beside_dense

    @property
    def uniform_attention(self) -> bool:
        """Every layer has the same head shapes and its own keys/values (all but Gemma 4)."""
        return not (self.layer_head_dim or self.layer_kv_heads or self.layer_kv_source or self.layer_k_eq_v)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def hf_names(self) -> list[tuple[str, TensorMap]]:
        """Every (canonical name, map) pair for this model, layers expanded."""
        out = list(self.global_map.items())
        for i in range(self.num_layers):
            for name, tm in self.layer_map.items():
                out.append(
                    (f"layers.{i}.{name}", TensorMap(tm.hf_name.format(i=i), tm.transform, tm.optional, tm.buffer))
                )
        return out

    def num_parameters(self) -> int:
        """Parameter count from the topology (tied embeddings counted once)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        ffn = (3 if self.gated_ffn else 2) * h * f
        if self.moe is not None:
            m = self.moe
            ffn = 3 * h * (m.num_experts * m.expert_size + m.shared_size) + h * (m.num_experts + int(m.shared_gate))
        norms = (2 * int(self.pre_norms) + 2 * int(self.post_attn_norm)) * h
        per_layer = attn + ffn + norms
        emb = v * h * (1 if self.tie_embeddings else 2)
        pos = self.max_position * h if self.learned_positions else 0
        return per_layer * self.num_layers + emb + pos + h
