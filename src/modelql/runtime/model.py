"""The forward pass: embed → blocks (attention with KV cache, FFN through a backend) → logits.

One function per step, driven only by `ModelSpec` fields, so the whole pass reads in one
sitting. Hook points use TransformerLens names and cost one dict lookup when unused:

    hook_embed, hook_pos_embed, blocks.{i}.hook_resid_pre, blocks.{i}.ln1.hook_normalized,
    blocks.{i}.attn.hook_q / hook_k / hook_v (after RoPE) / hook_z (per-head output),
    blocks.{i}.hook_attn_out, blocks.{i}.hook_resid_mid, blocks.{i}.ln2.hook_normalized (the FFN
    input x_L), blocks.{i}.mlp.hook_pre / hook_pre_linear / hook_post, blocks.{i}.hook_mlp_out,
    blocks.{i}.hook_resid_post, ln_final.hook_normalized

A hook is `fn(tensor, name) -> tensor | None`; returning a tensor replaces the activation.
`hook_attn_out` and `hook_mlp_out` are exactly what is added to the residual stream (after a
family's post-norms), so the residual is their running sum — except in Gemma 4, whose blocks
then add per-layer token embeddings and scale the result (`layer_scalar`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import CapabilityError, ContextLengthError
from ..ffn.base import FfnBackend, Hooks, activation, rms_norm, run_hook
from ..ffn.dense import DenseFfn
from ..models.spec import ModelSpec, RopeSpec
from ..linear import linear
from .rope import apply_rotary, inverse_frequencies

DTYPES = {"float32": torch.float32, "f32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def kv_shape(spec: ModelSpec, layer: int, capacity: int) -> tuple[int, int, int]:
    """[kv_heads, capacity, head_dim] of a layer's cache; empty for a layer that attends over
    another layer's keys and values (Gemma 4's shared-KV layers)."""
    own = spec.kv_source(layer) == layer
    return (spec.kv_heads_at(layer), capacity if own else 0, spec.head_dim_at(layer))


@dataclass
class KVCache:
    """One sequence's keys and values per layer, [kv_heads, capacity, head_dim], grown by doubling.
    Placed in a `KVBlock`, its tensors are views of the block's slot `slot`."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    length: int = 0
    block: KVBlock | None = field(default=None, repr=False, compare=False)
    slot: int = -1

    def reserve(self, spec: ModelSpec, dtype: torch.dtype, needed: int) -> None:
        if self.block is not None:
            self.block.reserve(needed)
            return
        capacity = self.k[0].shape[1] if self.k else 0
        if needed <= capacity:
            return
        new_cap = max(needed, 2 * capacity, 64)
        for store in (self.k, self.v):
            for i in range(spec.num_layers):
                grown = torch.zeros(kv_shape(spec, i, new_cap), dtype=dtype)
                if i < len(store):
                    grown[:, : self.length] = store[i][:, : self.length]
                    store[i] = grown
                else:
                    store.append(grown)

    def truncate(self, length: int) -> None:
        """Forget positions ≥ length (the stored tensors are reused)."""
        self.length = min(self.length, length)

    def copy(self) -> KVCache:
        return KVCache([t.clone() for t in self.k], [t.clone() for t in self.v], self.length)


class KVBlock:
    """The caches of a decode batch in one tensor per layer, [slots, kv_heads, capacity, head_dim].

    When the sequences of a decode step sit in slots 0..B-1 in batch order, attention writes their
    new keys with one indexed store and reads all of them as one view: one fused attention call
    per layer for the batch instead of one per sequence (`Model.attention`). The server's engine
    keeps its running sequences packed that way (`place`, `move`); otherwise attention falls back
    to the per-sequence path, with the same results.
    """

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, slots: int, capacity: int = 256):
        self.spec, self.dtype, self.slots = spec, dtype, slots
        self.capacity = min(max(1, capacity), spec.max_position)
        self.k = [torch.zeros((slots, *kv_shape(spec, i, self.capacity)), dtype=dtype) for i in range(spec.num_layers)]
        self.v = [torch.zeros((slots, *kv_shape(spec, i, self.capacity)), dtype=dtype) for i in range(spec.num_layers)]
        self.members: list[KVCache | None] = [None] * slots

    def _bind(self, cache: KVCache, slot: int) -> None:
        cache.k = [t[slot] for t in self.k]
        cache.v = [t[slot] for t in self.v]
        cache.block, cache.slot = self, slot
        self.members[slot] = cache

    def reserve(self, needed: int) -> None:
        """Grow every slot (doubling) so it holds `needed` positions; members see the new storage."""
        if needed <= self.capacity:
            return
        cap = min(max(needed, 2 * self.capacity), max(needed, self.spec.max_position))
        for store in (self.k, self.v):
            for i, old in enumerate(store):
                if old.shape[2] == 0:  # a shared-KV layer's empty cache
                    continue
                grown = old.new_zeros((old.shape[0], old.shape[1], cap, old.shape[3]))
                grown[:, :, : self.capacity] = old
                store[i] = grown
        self.capacity = cap
        for slot, cache in enumerate(self.members):
            if cache is not None:
                self._bind(cache, slot)

    def place(self, cache: KVCache, slot: int) -> None:
        """Copy a sequence's cache into `slot`; from now on the cache is a view of the block."""
        n = cache.length
        self.reserve(n + 1)
        for i in range(self.spec.num_layers):
            self.k[i][slot, :, :n] = cache.k[i][:, :n]
            self.v[i][slot, :, :n] = cache.v[i][:, :n]
        self._bind(cache, slot)

    def move(self, src: int, dst: int) -> None:
        """Move the cache in slot `src` to slot `dst` (packing a batch after sequences leave)."""
        cache = self.members[src]
        if cache is None:
            raise ValueError(f"slot {src} is empty")
        n = cache.length
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :n] = t[src, :, :n]
        self.members[src] = None
        self._bind(cache, dst)

    def release(self, slot: int) -> None:
        self.members[slot] = None

    def pack(self, caches: list[KVCache]) -> None:
        """Hold `caches` in slots 0..B-1 in their order (what `packed` asks of a batched decode step): new
        ones are placed, the others moved down, the other slots released. Safe while the caches already
        here keep their relative order and new ones come after them (sequences leave anywhere, join at
        the end): each move then goes to a slot no remaining cache still occupies."""
        for i, cache in enumerate(caches):
            if cache.block is not self:
                self.place(cache, i)
            elif cache.slot != i:
                self.move(cache.slot, i)
        for slot in range(len(caches), self.slots):
            self.release(slot)

    def packed(self, caches: list[KVCache]) -> bool:
        """Whether `caches` are this block's slots 0..B-1, in order."""
        return all(c.block is self and c.slot == i for i, c in enumerate(caches))


#: A packed pass attends in one fused call while its queries × keys (over all caches) stay under this.
PACKED_FUSED_SCORES = 1 << 15


class Model:
    """A loaded model: spec, canonical weights in the compute dtype, FFN backend, tokenizer."""

    #: attributes a quantized model builds only when something asks for float weights (`_materialize`)
    _FLOAT_ATTRS = frozenset({"weights", "dense_ffn", "ffn", "moe_ffn", "embed", "lm_head", "qkv_w", "qkv_b",
                              "qkv_sizes"})

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor] | None, dtype: torch.dtype,
                 tokenizer=None, path: Path | None = None, ffn: FfnBackend | None = None, quant=None):
        self.spec = spec
        self.dtype = dtype
        self.tokenizer = tokenizer
        self.path = path
        self._inv_freq: dict[tuple[RopeSpec, bool, int], tuple[torch.Tensor, float]] = {}
        #: a `runtime.quantized.QuantState` while the weights are low-bit (None: float weights)
        self.quant = quant
        if quant is None:
            self._init_float(weights, ffn)

    def _init_float(self, weights: dict[str, torch.Tensor], ffn: FfnBackend | None) -> None:
        self.weights = weights
        self._fuse_qkv()
        # a remote-FFN client loads no FFN weights: then the given backend is the only FFN
        has_ffn = all(f"layers.{i}.down.weight" in weights for i in range(self.spec.num_layers))
        self.moe_ffn = None
        if self.spec.moe is not None and not self.spec.moe.beside_dense:
            # no dense FFN: features, edits and walks are per expert (not built yet)
            from ..ffn.moe import MoeFfn

            self.dense_ffn = None
            self.ffn = ffn or MoeFfn(self.spec, weights)
        else:
            self.dense_ffn = DenseFfn(self.spec, weights) if has_ffn or ffn is None else None
            self.ffn = ffn or self.dense_ffn
            if self.spec.moe is not None:  # Gemma 4: experts beside the dense FFN
                from ..ffn.moe import MoeFfn

                self.moe_ffn = getattr(ffn, "experts", None) or MoeFfn(self.spec, weights)  # remote: RemoteExperts
        self.embed = weights["embed.weight"]
        self.lm_head = weights.get("lm_head.weight", self.embed)
        self.act = activation(self.spec.activation)

    def __getattr__(self, name: str):
        # only reached for attributes not set: a quantized model's float weights, built on first use
        if name in Model._FLOAT_ATTRS and self.__dict__.get("quant") is not None:
            self._materialize()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _materialize(self) -> None:
        """Switch a quantized model to float weights for the torch path (hooks, TRACE, walk and patched
        FFNs, edits, vindex extraction): dequantized from the source once; the low-bit graph is
        dropped, so edits made to the float weights are what every later forward pass uses."""
        from ..models.source import load_canonical

        quant = self.quant
        # outside inference mode even when first reached inside it: edits take gradients through these
        with torch.inference_mode(False):
            weights = load_canonical(quant.source, self.spec, self.dtype)
            ffn = self.__dict__.pop("ffn", None)
            self.quant = None
            self._init_float(weights, ffn)

    @property
    def quantized(self) -> bool:
        return self.quant is not None

    def _fuse_qkv(self) -> None:
        """One [q+2kv, H] matrix per layer; the canonical q/k/v weights become views of it.

        A layer whose values are its keys has no v rows; one that attends over another layer's
        cache (Gemma 4) has only q rows."""
        from ..errors import ModelFormatError

        self.qkv_w, self.qkv_b, self.qkv_sizes = [], [], []
        for i in range(self.spec.num_layers):
            p = f"layers.{i}."
            names = "q"
            if self.spec.kv_source(i) == i:
                names = "qk" if self.spec.k_eq_v(i) else "qkv"
            missing = [n for n in names if p + n + ".weight" not in self.weights]
            if missing:
                raise ModelFormatError(f"layer {i} has no {'/'.join(missing)} projection weights")
            parts = [self.weights[p + n + ".weight"] for n in names]
            fused = torch.cat(parts)
            sizes = [t.shape[0] for t in parts]
            views = fused.split(sizes)
            for n, view in zip(names, views):
                self.weights[p + n + ".weight"] = view
            self.qkv_w.append(fused)
            self.qkv_sizes.append(sizes)
            if self.spec.attn_bias:
                b = torch.cat([self.weights[p + n + ".bias"] for n in names])
                for n, view in zip(names, b.split(sizes)):
                    self.weights[p + n + ".bias"] = view
                self.qkv_b.append(b)
            else:
                self.qkv_b.append(None)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path | None = None, dtype: str | torch.dtype = "float32",
             quantize: str | None = None) -> Model:
        """Load a HF model directory, a vindex with weights, or a GGUF file (None: the default model).
        A quantized GGUF keeps its low-bit weights by default (`quantize`: auto | none | int8 | int4)."""
        from .loading import load_model

        return load_model(path, dtype, quantize)

    def new_cache(self) -> KVCache:
        return KVCache()

    # -- numerics ---------------------------------------------------------------------------

    def norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
        w = self.weights[name + ".weight"]
        spec = self.spec
        if spec.norm == "layer":
            return F.layer_norm(x, (x.shape[-1],), w, self.weights.get(name + ".bias"), spec.norm_eps)
        return rms_norm(x, w, spec.norm_eps, spec.norm_weight_offset)

    def rms(self, x: torch.Tensor) -> torch.Tensor:
        """RMS norm without a weight (Gemma 4's value norm)."""
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)).to(x.dtype)

    def _rope(self, layer: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        rope = self.spec.rope_for(layer)
        if rope is None:
            return None
        long = rope.kind == "longrope" and int(positions.max()) + 1 > (rope.original_max_position or 0)
        head_dim = self.spec.head_dim_at(layer)
        key = (rope, long, head_dim)
        if key not in self._inv_freq:
            seq = (rope.original_max_position or 0) + 1 if long else 1
            self._inv_freq[key] = inverse_frequencies(rope, head_dim, self.spec.max_position, seq)
        inv, scale = self._inv_freq[key]
        freqs = positions.float()[..., None] * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(self.dtype), (emb.sin() * scale).to(self.dtype)

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
        """Causal (optionally windowed, optionally soft-capped) attention of q [nh, T, hd]
        at absolute positions start.. over keys k, v [nkv, S, hd] at positions 0..S-1."""
        spec = self.spec
        t, s = q.shape[1], k.shape[1]
        window = spec.window(layer)
        first = 0
        if window is not None and t == 1:
            first = max(0, s - window)
            k, v = k[:, first:], v[:, first:]
        mask = None
        if t > 1 or (window is not None and first == 0 and s > window):
            qpos = torch.arange(start, start + t)[:, None]
            kpos = torch.arange(first, s)[None, :]
            mask = kpos <= qpos
            if window is not None:
                mask = mask & (kpos > qpos - window)
        if spec.attn_softcap is None:
            # 4-D inputs select the fused CPU flash kernel; 3-D ones fall back to the unfused math path,
            # whose small parallel bmm/softmax calls are slow (and very slow on a busy machine)
            return F.scaled_dot_product_attention(
                q[None], k[None], v[None], attn_mask=mask, scale=spec.query_scale,
                enable_gqa=k.shape[0] != q.shape[0],
            )[0]
        rep = q.shape[0] // k.shape[0]
        k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
        scores = (q @ k.transpose(-1, -2)) * spec.query_scale
        scores = torch.tanh(scores / spec.attn_softcap) * spec.attn_softcap
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v

    def _attend_block(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: KVBlock,
                      positions: torch.Tensor) -> torch.Tensor:
        """A decode step (q, k, v [B, heads, 1, hd]) of sequences packed in block slots 0..B-1 at
        `positions` [B]: one store of the new keys/values, one masked attention over the block's
        view (keys past a row's own position are masked, as is the window of a sliding layer)."""
        spec = self.spec
        b = q.shape[0]
        rows = torch.arange(b)
        src = spec.kv_source(layer)
        if src == layer:
            block.k[layer][rows, :, positions] = k[:, :, 0]
            block.v[layer][rows, :, positions] = v[:, :, 0]
        longest = int(positions.max()) + 1
        kpos = torch.arange(longest)[None, :]
        mask = kpos <= positions[:, None]
        window = spec.window(layer)
        if window is not None:
            mask = mask & (kpos > positions[:, None] - window)
        keys, values = block.k[src][:b, :, :longest], block.v[src][:b, :, :longest]
        return F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask[:, None, None, :],
            scale=spec.query_scale, enable_gqa=keys.shape[1] != q.shape[1])

    def _packed_mask(self, layer: int, caches: list[KVCache], packed: list[tuple[int, int]],
                     rotations: dict) -> torch.Tensor | None:
        """The block mask [N, S] of a packed pass's fused attention — query j of sequence i sees
        keys 0..its position of cache i only (and its window, on a sliding layer) in the
        concatenation of every cache's keys — or None when the sequences attend one by one: a
        soft-capped layer, or a pass whose N × S scores exceed `PACKED_FUSED_SCORES` (the fused
        call computes every query against every cache: a labelling batch of 96 prompts would do
        ~96× the work). One mask per window size per pass (computed at its first layer).
        Why fuse: DESCRIBE's first pass runs ≈ 9 short tails, and a call per tail per layer was
        ≈ 10 % of the pass."""
        spec = self.spec
        if spec.attn_softcap is not None:
            return None
        window = spec.window(layer)
        key = ("packed_mask", window)
        if key in rotations:
            return rotations[key]
        starts = [c.length for c in caches]
        ends = [s + n for s, (_o, n) in zip(starts, packed)]
        total_q, total_k = sum(n for _o, n in packed), sum(ends)
        mask = None
        if total_q * total_k <= PACKED_FUSED_SCORES:
            qpos = torch.cat([s + torch.arange(n) for s, (_o, n) in zip(starts, packed)])
            qseq = torch.cat([torch.full((n,), i) for i, (_o, n) in enumerate(packed)])
            kpos = torch.cat([torch.arange(e) for e in ends])
            kseq = torch.cat([torch.full((e,), i) for i, e in enumerate(ends)])
            mask = (qseq[:, None] == kseq[None, :]) & (kpos[None, :] <= qpos[:, None])
            if window is not None:
                mask = mask & (kpos[None, :] > qpos[:, None] - window)
        rotations[key] = mask
        return mask

    def attention(self, layer: int, x: torch.Tensor, caches: list[KVCache], hooks: Hooks | None,
                  rotations: dict | None = None) -> torch.Tensor:
        """Self-attention of x [B, T, H]; appends this step's keys/values to each sequence's cache.

        `rotations` (one dict per forward call) shares each RoPE kind's cos/sin across layers."""
        spec = self.spec
        b, t, _ = x.shape
        p = f"layers.{layer}."
        hd, nkv, src = spec.head_dim_at(layer), spec.kv_heads_at(layer), spec.kv_source(layer)
        own = src == layer  # False: attend over layer `src`'s cached keys/values (Gemma 4)
        parts = linear(x, self.qkv_w[layer], self.qkv_b[layer]).split(self.qkv_sizes[layer], dim=-1)
        q, k, v = parts[0], None, None
        if own:
            k = parts[1]
            v = parts[2] if len(parts) == 3 else k
        if spec.qk_norm and not spec.qk_norm_per_head:
            q, k = self.norm(q, p + "q_norm"), self.norm(k, p + "k_norm")
        q = q.view(b, t, spec.num_heads, hd).transpose(1, 2)
        if own:
            k = k.view(b, t, nkv, hd).transpose(1, 2)
            v = v.view(b, t, nkv, hd).transpose(1, 2)
        if spec.qk_norm and spec.qk_norm_per_head:
            q = self.norm(q, p + "q_norm")
            if own:
                k = self.norm(k, p + "k_norm")
        if own and spec.v_norm:
            v = self.rms(v)
        starts = [c.length for c in caches]
        packed = rotations.get("packed") if rotations is not None else None  # [(offset, length)] per cache
        kind = (spec.rope_for(layer), hd)
        if rotations is not None and kind in rotations:
            rot = rotations[kind]
        else:
            positions = (rotations["packed_positions"] if packed is not None
                         else torch.tensor(starts)[:, None] + torch.arange(t)[None, :])
            rot = self._rope(layer, positions)
            if rotations is not None:
                rotations[kind] = rot
        if rot is not None:
            cos, sin = rot[0][:, None], rot[1][:, None]
            q = apply_rotary(q, cos, sin)
            if own:
                k = apply_rotary(k, cos, sin)
        a = f"blocks.{layer}.attn."
        if hooks:
            q = run_hook(hooks, a + "hook_q", q)
            if own:
                k, v = run_hook(hooks, a + "hook_k", k), run_hook(hooks, a + "hook_v", v)
        block = rotations.get("block") if rotations is not None else None
        if block is not None:
            z = self._attend_block(layer, q, k, v, block, rotations["positions"])
        elif packed is not None:  # one row holding every sequence: each attends over its own cache
            if own:
                for i, cache in enumerate(caches):
                    o, n = packed[i]
                    cache.k[layer][:, starts[i]:starts[i] + n] = k[0, :, o:o + n]
                    cache.v[layer][:, starts[i]:starts[i] + n] = v[0, :, o:o + n]
            mask = self._packed_mask(layer, caches, packed, rotations)
            if mask is not None:  # one call over every cache's keys, each query masked to its own
                ends = [s_ + n for s_, (_o, n) in zip(starts, packed)]
                keys = torch.cat([c.k[src][:, :e] for c, e in zip(caches, ends)], dim=1)
                values = torch.cat([c.v[src][:, :e] for c, e in zip(caches, ends)], dim=1)
                z = F.scaled_dot_product_attention(q, keys[None], values[None], attn_mask=mask,
                                                   scale=spec.query_scale, enable_gqa=keys.shape[0] != q.shape[1])
            else:
                outs = []
                for i, cache in enumerate(caches):
                    o, n = packed[i]
                    end = starts[i] + n
                    outs.append(self._attend(layer, q[0, :, o:o + n], cache.k[src][:, :end], cache.v[src][:, :end],
                                             starts[i]))
                z = torch.cat(outs, dim=1)[None]
        else:
            outs = []
            for i, cache in enumerate(caches):
                end = starts[i] + t
                if own:
                    cache.k[layer][:, starts[i] : end] = k[i]
                    cache.v[layer][:, starts[i] : end] = v[i]
                outs.append(self._attend(layer, q[i], cache.k[src][:, :end], cache.v[src][:, :end], starts[i]))
            z = outs[0][None] if b == 1 else torch.stack(outs)
        if hooks:
            z = run_hook(hooks, a + "hook_z", z)
        z = z.transpose(1, 2).reshape(b, t, spec.num_heads * hd)
        return linear(z, self.weights[p + "o.weight"], self.weights.get(p + "o.bias"))

    def block(self, layer: int, h: torch.Tensor, caches: list[KVCache], hooks: Hooks | None,
              rotations: dict | None = None) -> torch.Tensor:
        spec, p, n = self.spec, f"layers.{layer}.", f"blocks.{layer}."
        h = run_hook(hooks, n + "hook_resid_pre", h)
        x = run_hook(hooks, n + "ln1.hook_normalized", self.norm(h, p + "attn_norm") if spec.pre_norms else h)
        a = self.attention(layer, x, caches, hooks, rotations)
        if spec.post_attn_norm:
            a = self.norm(a, p + "post_attn_norm")
        if spec.residual_scale != 1.0:
            a = a * spec.residual_scale
        h = h + run_hook(hooks, n + "hook_attn_out", a)
        h = run_hook(hooks, n + "hook_resid_mid", h)
        x = run_hook(hooks, n + "ln2.hook_normalized", self.norm(h, p + "ffn_norm") if spec.pre_norms else h)
        m = self.ffn.forward(layer, x, hooks)
        if self.moe_ffn is not None:  # Gemma 4: experts beside the dense FFN, routed from the residual
            routing = {k: v for k, v in hooks.items() if "hook_expert" in k} if hooks else None  # features: the dense FFN's
            experts = self.moe_ffn.forward(layer, self.norm(h, p + "moe_norm"), routing, route_input=h)
            m = self.norm(m, p + "post_dense_norm") + self.norm(experts, p + "post_moe_norm")
        if spec.post_ffn_norm:
            m = self.norm(m, p + "post_ffn_norm")
        if spec.residual_scale != 1.0:
            m = m * spec.residual_scale
        h = h + run_hook(hooks, n + "hook_mlp_out", m)
        if spec.per_layer_input:
            if rotations is None or "ple" not in rotations:
                raise CapabilityError(f"{spec.family} needs its per-layer token embeddings: run it through "
                                      "Model.forward, not block by block")
            g = self.act(linear(h, self.weights[p + "ple_gate.weight"])) * rotations["ple"][:, :, layer]
            h = h + self.norm(linear(g, self.weights[p + "ple_proj.weight"]), p + "ple_norm")
        if spec.layer_scalar:
            h = h * self.weights[p + "layer_scalar"]
        return run_hook(hooks, n + "hook_resid_post", h)

    def per_layer_inputs(self, ids: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Gemma 4's per-layer embeddings [B, T, L, P]: a token table and a projection of the
        embedded input, each normalised and averaged (÷√2), one slice fed to each block."""
        spec = self.spec
        n, width = spec.num_layers, spec.per_layer_input
        tok = F.embedding(ids, self.weights["ple_embed.weight"]) * torch.tensor(width**0.5, dtype=self.dtype)
        proj = linear(h, self.weights["ple_model_proj.weight"]) * spec.hidden_size**-0.5
        proj = self.norm(proj.reshape(*ids.shape, n, width), "ple_proj_norm")
        return (proj + tok.reshape(*ids.shape, n, width)) * 2**-0.5

    def _quant_forward(self, ids: torch.Tensor, caches: list[KVCache], logits: str) -> torch.Tensor | None:
        """The low-bit graph (`runtime.ort_decode`), or None when it cannot run this call (then the
        torch path runs on float weights). Rows not packed in one `KVBlock` run one at a time."""
        decoder = self.quant.decoder
        b, t = ids.shape
        if max(c.length for c in caches) + t > decoder.positions:
            return None
        h = self.quant.embed_rows(ids)
        if self.spec.embed_scale != 1.0:
            h = h * self.spec.embed_scale
        start = 0 if logits == "all" else t - 1
        block = caches[0].block
        if b > 1 and not (t == 1 and block is not None and block.packed(caches)):
            outs = [self._quant_forward(ids[i:i + 1], [c], logits) for i, c in enumerate(caches)]
            return torch.cat(outs)
        if b > 1:
            ks = [block.k[i][:b] for i in range(self.spec.num_layers)]
            vs = [block.v[i][:b] for i in range(self.spec.num_layers)]
        else:
            ks = [k[None] for k in caches[0].k]
            vs = [v[None] for v in caches[0].v]
        out, hidden = decoder.forward(h, ks, vs, [c.length for c in caches], start)
        for c in caches:
            c.length += t
        if logits == "none":
            return hidden
        if self.spec.logits_scale != 1.0:
            out = out / self.spec.logits_scale
        if self.spec.final_softcap is not None:
            out = torch.tanh(out / self.spec.final_softcap) * self.spec.final_softcap
        return out[:, -1] if logits == "last" else out

    def embed_tokens(self, ids: torch.Tensor, starts: list[int], hooks: Hooks | None = None) -> torch.Tensor:
        h = F.embedding(ids, self.embed)
        if self.spec.embed_scale != 1.0:
            h = h * torch.tensor(self.spec.embed_scale, dtype=self.dtype)
        h = run_hook(hooks, "hook_embed", h)
        if self.spec.learned_positions:
            pos = torch.tensor(starts)[:, None] + torch.arange(ids.shape[1])[None, :]
            h = h + run_hook(hooks, "hook_pos_embed", F.embedding(pos, self.weights["pos_embed.weight"]))
        return h

    def unembed(self, h: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        """Final norm → logits (float32), with the family's scaling and soft-cap."""
        if self.quant is not None and not hooks:
            logits = self.quant.unembed(h)
        else:
            x = run_hook(hooks, "ln_final.hook_normalized", self.norm(h, "final_norm"))
            logits = linear(x, self.lm_head).float()
        if self.spec.logits_scale != 1.0:
            logits = logits / self.spec.logits_scale
        if self.spec.final_softcap is not None:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return logits

    def forward(self, ids: torch.Tensor | list[int], caches: list[KVCache] | KVCache | None = None,
                hooks: Hooks | None = None, logits: str = "all", grad: bool = False) -> torch.Tensor:
        """Run new tokens ids [B, T] (or [T]) after what each cache holds.

        `grad=True` keeps autograd on (for optimising edit vectors through hooks); otherwise the
        pass runs in inference mode.

        Returns float32 logits [B, T, V] (`logits="all"`), [B, V] for the last position
        (`"last"`), or the final residual [B, T, H] (`"none"`). Caches advance by T.
        """
        with torch.inference_mode(not grad):
            return self._forward(ids, caches, hooks, logits)

    def forward_packed(self, seqs: list[list[int]], caches: list[KVCache], hooks: Hooks | None = None
                       ) -> tuple[torch.Tensor, list[int]]:
        """Run sequences of different lengths, each after what its own cache holds, as ONE row
        without padding: the final residual [N, H] of all their tokens in order, and each
        sequence's offset in it. Hooks see [1, N, ...]. Why: a batch padded to its longest
        sequence runs the padding through every layer (DESCRIBE's probe tails are 1–9 tokens)."""
        if len(seqs) != len(caches) or not seqs or any(len(q) == 0 for q in seqs):
            raise ValueError("forward_packed needs one non-empty sequence per cache")
        if self.spec.per_layer_input or self.spec.learned_positions:
            raise CapabilityError(f"{self.spec.family}: packed sequences are not supported")
        offsets, at = [], 0
        for q in seqs:
            offsets.append(at)
            at += len(q)
        with torch.inference_mode():
            ids = torch.tensor([[t for q in seqs for t in q]], dtype=torch.long)
            for c, q in zip(caches, seqs):
                if c.length + len(q) > self.spec.max_position:
                    raise ContextLengthError(
                        f"{c.length + len(q)} tokens exceed the context window of {self.spec.max_position}")
                c.reserve(self.spec, self.dtype, c.length + len(q))
            h = self.embed_tokens(ids, [0], hooks)
            rotations: dict = {
                "packed": list(zip(offsets, [len(q) for q in seqs])),
                "packed_positions": torch.cat([c.length + torch.arange(len(q)) for c, q in zip(caches, seqs)])[None],
            }
            for layer in range(self.spec.num_layers):
                h = self.block(layer, h, caches, hooks, rotations)
            for c, q in zip(caches, seqs):
                c.length += len(q)
        return h[0], offsets

    def _forward(self, ids, caches, hooks, logits) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if caches is None:
            caches = [KVCache() for _ in range(ids.shape[0])]
        elif isinstance(caches, KVCache):
            caches = [caches]
        t = ids.shape[1]
        for c in caches:
            if c.length + t > self.spec.max_position:
                raise ContextLengthError(
                    f"{c.length + t} tokens exceed the context window of {self.spec.max_position}"
                )
            c.reserve(self.spec, self.dtype, c.length + t)
        if self.quant is not None and not hooks and "ffn" not in self.__dict__ and not torch.is_grad_enabled():
            out = self._quant_forward(ids, caches, logits)
            if out is not None:
                return out
        h = self.embed_tokens(ids, [c.length for c in caches], hooks)
        rotations: dict = {}  # cos/sin per RoPE kind (and the packed decode block, PLE), computed once per call
        if self.spec.per_layer_input:
            rotations["ple"] = self.per_layer_inputs(ids, h)
        block = caches[0].block
        if t == 1 and block is not None and self.spec.attn_softcap is None and block.packed(caches):
            rotations["block"] = block
            rotations["positions"] = torch.tensor([c.length for c in caches])
        for layer in range(self.spec.num_layers):
            h = self.block(layer, h, caches, hooks, rotations)
        for c in caches:
            c.length += t
        if logits == "none":
            return h
        if logits == "last":
            return self.unembed(h[:, -1], hooks)
        return self.unembed(h, hooks)
