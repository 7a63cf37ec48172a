"""The mixture-of-experts FFN: a router picks `top_k` experts per token; only those run.

Routing is the one every supported family uses (`MoeSpec`): router logits → softmax in float32
over all experts → top-k → optionally renormalise the k weights → cast to the compute dtype.
Each expert is a gated FFN whose gate and up rows are fused into one [2F, H] matrix (the
canonical `experts.{e}.gate/up.weight` become views of it), so an expert costs two reads.

A token reads the router and its k experts' weights and nothing else. A batch of tokens is
grouped by expert: each chosen expert runs once over the rows routed to it, and the weighted
results are scattered back (`index_add_`), so a step over B tokens reads at most
min(E, B·k) experts instead of E.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CapabilityError
from ..linear import linear
from ..models.spec import ModelSpec
from .base import Hooks, activation, rms_norm, run_hook


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] float32, expert ids [N, k]) from router logits [N, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def routing_hooks(hooks: Hooks, layer: int, ids: torch.Tensor, weights: torch.Tensor,
                  lead: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `mlp.hook_expert_ids` / `hook_expert_weights` on the routing of rows [N, k], shown in the
    input's leading shape ([B, T, k], as every other hook sees its tensor); [N, k] back."""
    n = ids.shape[0]
    ids = run_hook(hooks, f"blocks.{layer}.mlp.hook_expert_ids", ids.reshape(*lead, -1)).reshape(n, -1)
    weights = run_hook(hooks, f"blocks.{layer}.mlp.hook_expert_weights", weights.reshape(*lead, -1)).reshape(n, -1)
    return ids, weights


def build_moe_layer_edits(ffn: MoeFfn, layer: int, slots: dict[int, object],
                          deltas: list[object]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Edited copies of the experts an overlay touches at `layer`: {expert: (fused in, down)}.

    Slots and deltas address the vindex's features, expert e's feature j being `e·F + j`
    (`Vindex.expert_of`); the algebra is the compiler's (`vindex.compile`): vector overrides,
    then `+ U Vᵀ` on the experts' concatenated down columns, then tombstoned columns zeroed —
    so the overlay and the compiled checkpoint compute the same thing. Neuron edits are appended
    to every routed expert (not the shared one), as COMPILE grows them: the layer then adds the
    neurons' output times the sum of the chosen experts' weights (1 where the family
    renormalises them), whichever experts a token picks."""
    size = ffn.moe.expert_size
    blocks = ffn.moe.num_experts + (1 if ffn.moe.shared_size else 0)
    edited: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def block(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if e not in edited:
            w_in, w_down = ffn.expert_weights(layer, e)
            edited[e] = (w_in.clone(), w_down.clone())
        return edited[e]

    tombs = []
    for f, s in sorted(slots.items()):
        e, j = divmod(int(f), size)
        if not 0 <= e < blocks:
            continue
        if s.tombstone:
            tombs.append((e, j))
            continue
        w_in, w_down = block(e)
        n = w_down.shape[1]
        if s.gate is not None:
            w_in[j] = torch.from_numpy(np.asarray(s.gate, dtype=np.float32)).to(w_in.dtype)
        if s.up is not None:
            w_in[n + j] = torch.from_numpy(np.asarray(s.up, dtype=np.float32)).to(w_in.dtype)
        if s.down is not None:
            w_down[:, j] = torch.from_numpy(np.asarray(s.down, dtype=np.float32)).to(w_down.dtype)
    for d in deltas:
        if d.v is None:
            continue  # neurons: appended below, after every edit of the base features
        u = torch.as_tensor(np.asarray(d.u, dtype=np.float32)).double()
        v = torch.as_tensor(np.asarray(d.v, dtype=np.float32)).double()
        for e in range(blocks):
            part = v[e * size:(e + 1) * size]
            if part.numel() and bool(part.abs().sum() > 0):
                w_down = block(e)[1]
                w_down.add_((u @ part.t()).to(w_down.dtype))
    for e, j in tombs:
        block(e)[1][:, j] = 0.0
    neurons = [d for d in deltas if d.v is None]
    if neurons:
        gate, up, down = (torch.cat([torch.as_tensor(np.asarray(getattr(d, name), dtype=np.float32)) for d in neurons],
                                    dim=1 if name == "u" else 0) for name in ("gate", "up", "u"))
        for e in sorted(ffn.held - {ffn.moe.num_experts}):  # an expert shard: the experts it holds
            w_in, w_down = block(e)
            half = w_in.shape[0] // 2
            edited[e] = (torch.cat([w_in[:half], gate.to(w_in.dtype), w_in[half:], up.to(w_in.dtype)]),
                         torch.cat([w_down, down.to(w_down.dtype)], dim=1))
    return edited


def find_moe(ffn) -> MoeFfn | None:
    """The `MoeFfn` under an FFN backend's overlay and edit wrappers, or None (a dense model)."""
    while ffn is not None and not isinstance(ffn, MoeFfn):
        ffn = getattr(ffn, "moe_ffn", None) or getattr(ffn, "base", None)
    return ffn


class PatchedMoeFfn:
    """An `FfnBackend`: `MoeFfn` with the experts an overlay edits replaced by edited copies
    (`source.layer_edits(layer)` returns `build_moe_layer_edits`'s dict, or None)."""

    def __init__(self, ffn: MoeFfn, source):
        self.moe_ffn, self.source, self.act = ffn, source, ffn.act

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moe_ffn.route(layer, x)

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        return self.moe_ffn.forward(layer, x, hooks, overrides=self.source.layer_edits(layer))


class MoeFfn:
    """Router + experts (+ a sigmoid-gated shared expert) per layer, driven by `spec.moe`.

    `layers` limits it to those layers, as for `DenseFfn`."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], layers: Iterable[int] | None = None,
                 experts: Iterable[int] | None = None):
        if spec.moe is None:
            raise ValueError(f"{spec.family} is not a mixture-of-experts model")
        self.spec, self.moe = spec, spec.moe
        self.act = activation(spec.activation)
        owned = set(range(spec.num_layers) if layers is None else layers)
        blocks = self.moe.num_experts + (1 if self.moe.shared_size else 0)
        #: the expert ids whose weights this instance holds (an expert shard's `--experts`; the shared
        #: expert is id `num_experts`); the router is always held, so routing works everywhere
        self.held = frozenset(range(blocks) if experts is None else (e for e in experts if 0 <= e < blocks))
        self.router: list[torch.Tensor | None] = []
        self.w_in: list[list[torch.Tensor | None] | None] = []
        self.w_down: list[list[torch.Tensor | None] | None] = []
        self.shared_in: list[torch.Tensor | None] = []
        self.shared_down: list[torch.Tensor | None] = []
        self.shared_gate: list[torch.Tensor | None] = []
        self.router_scale: list[torch.Tensor | None] = []  # Gemma 4 (`MoeSpec.beside_dense`)
        self.expert_scale: list[torch.Tensor | None] = []
        self.pre_norm: list[torch.Tensor | None] = []  # Gemma 4: the experts' own input norm
        stores = (self.router, self.w_in, self.w_down, self.shared_in, self.shared_down, self.shared_gate,
                  self.router_scale, self.expert_scale, self.pre_norm)
        n = self.moe.num_experts
        for i in range(spec.num_layers):
            if i not in owned:
                for store in stores:
                    store.append(None)
                continue
            p = f"layers.{i}."
            self.router.append(weights[p + "router.weight"])
            self.router_scale.append(weights.get(p + "router.scale"))
            self.expert_scale.append(weights.get(p + "router.expert_scale"))
            self.pre_norm.append(weights.get(p + "moe_norm.weight"))
            self.w_in.append([self._fuse(weights, f"{p}experts.{e}.") if e in self.held else None for e in range(n)])
            self.w_down.append([weights[f"{p}experts.{e}.down.weight"] if e in self.held else None for e in range(n)])
            self.shared_gate.append(weights.get(p + "shared_gate.weight") if self.moe.shared_size else None)
            if self.moe.shared_size and n in self.held:
                self.shared_in.append(self._fuse(weights, p + "shared."))
                self.shared_down.append(weights[p + "shared.down.weight"])
            else:
                self.shared_in.append(None)
                self.shared_down.append(None)

    @staticmethod
    def _fuse(weights: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
        gate, up = weights[prefix + "gate.weight"], weights[prefix + "up.weight"]
        fused = torch.cat([gate, up])
        weights[prefix + "gate.weight"], weights[prefix + "up.weight"] = fused[: gate.shape[0]], fused[gate.shape[0]:]
        return fused

    def _expert(self, x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, w_in).chunk(2, dim=-1)
        return linear(self.act(gate) * up, w_down)

    def route(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [N, k] float32, expert ids [N, k]) for router inputs x [N, H].

        Gemma 4 routes from the residual through a weightless RMS norm, `router.scale` and
        1/sqrt(H), and scales the chosen weights per expert after renormalising."""
        if self.moe.beside_dense:
            xf = x.float()
            xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.spec.norm_eps)
            x = xf.to(x.dtype) * self.router_scale[layer] * self.spec.hidden_size**-0.5
        weights, ids = route(linear(x, self.router[layer]), self.moe.top_k, self.moe.renormalize)
        if self.moe.beside_dense:
            weights = weights * self.expert_scale[layer][ids].float()
        return weights, ids

    def num_features(self, layer: int) -> int:
        """Features of the layer in the vindex's layout: every expert's, then the shared expert's."""
        return self.moe.expert_size * self.moe.num_experts + self.moe.shared_size

    def _forward_features(self, layer: int, flat: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                          hooks: Hooks, overrides: dict | None, lead: tuple[int, ...] = ()) -> torch.Tensor:
        """The layer as one wide FFN over all experts' features (feature e·F + j = expert e's j):
        activations [N, E·F (+ shared)] hold each routed expert's act(gate)·up times its routing
        weight (the shared expert's times its sigmoid gate), zero for experts not chosen, so that
        out = Σ_f a_f · d_f exactly. `mlp.hook_post` sees (and may replace) them: DESCRIBE, TRACE,
        explain and feature ablation read a MoE layer like a dense one."""
        size, n = self.moe.expert_size, self.moe.num_experts
        blocks = n + (1 if self.moe.shared_size else 0)
        weight = lambda e: (overrides or {}).get(e) or self.expert_weights(layer, e)  # noqa: E731
        acts = torch.zeros(flat.shape[0], self.num_features(layer), dtype=flat.dtype)
        extra = torch.zeros_like(flat)  # appended neurons (edits): not features, added after the hook
        for e in torch.unique(ids).tolist():
            rows, slot = (ids == e).nonzero(as_tuple=True)
            w_in, w_down = weight(e)
            gate, up = linear(flat[rows], w_in).chunk(2, dim=-1)
            a = self.act(gate) * up * weights[rows, slot, None]
            acts[rows, e * size:(e + 1) * size] = a[:, :size]
            if a.shape[1] > size:
                extra.index_add_(0, rows, F.linear(a[:, size:], w_down[:, size:]))
        if blocks > n:
            gate, up = linear(flat, weight(n)[0]).chunk(2, dim=-1)
            a = self.act(gate) * up
            if self.shared_gate[layer] is not None:
                a = torch.sigmoid(linear(flat, self.shared_gate[layer])) * a
            acts[:, n * size:] = a
        # the hook sees [..., F] in the input's leading shape ([B, T, F]), as a dense layer's
        acts = run_hook(hooks, f"blocks.{layer}.mlp.hook_post", acts.reshape(*lead, acts.shape[-1]) if lead else acts)
        acts = acts.reshape(flat.shape[0], -1)
        out = extra
        for e in range(blocks):
            part = acts[:, e * size:(e + 1) * size] if e < n else acts[:, n * size:]
            if e == n or bool(part.any()):
                w_down = weight(e)[1]
                out = out + (F.linear(part, w_down[:, :size]) if e < n and w_down.shape[1] > size else linear(part, w_down))
        return out

    def expert_weights(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fused gate+up [2F, H], down [H, F]) of an expert; `num_experts` is the shared expert
        (the vindex numbers its features after the routed experts', as LARQL does)."""
        blocks = self.moe.num_experts + (1 if self.moe.shared_size else 0)
        if not 0 <= expert < blocks:
            raise ValueError(f"layer {layer} has no expert {expert}")
        if expert not in self.held or self.router[layer] is None:
            raise CapabilityError(f"expert {expert} of layer {layer} is not held here (this holds experts "
                                  f"{_ranges(sorted(self.held))} of its layers)")
        if expert == self.moe.num_experts:
            return self.shared_in[layer], self.shared_down[layer]
        return self.w_in[layer][expert], self.w_down[layer][expert]

    def shared_weight(self, layer: int, x: torch.Tensor) -> torch.Tensor | None:
        """The shared expert's weight per row of x [N, H] (its sigmoid gate, or 1), or None without one."""
        if not self.moe.shared_size:
            return None
        if self.shared_gate[layer] is None:
            return torch.ones(x.shape[0], dtype=torch.float32)
        return torch.sigmoid(linear(x, self.shared_gate[layer])).float().reshape(-1)

    def expert_input(self, layer: int, h: torch.Tensor) -> torch.Tensor:
        """What the experts read from the post-attention residual h: Gemma 4 normalises it with the
        experts' own norm (`moe_norm`); the other families' experts read the FFN norm's output, which
        is what callers hand them, so h passes unchanged."""
        w = self.pre_norm[layer]
        return h if w is None else rms_norm(h, w, self.spec.norm_eps, self.spec.norm_weight_offset)

    def weighted_sum(self, layer: int, x: torch.Tensor, ids: list[int], weights: list[float],
                     overrides: dict | None = None) -> torch.Tensor:
        """Σ_k weights[k] · expert ids[k] over rows x [N, H]: LARQL's layer-batch sum (no routing)."""
        out = torch.zeros_like(x)
        for e, w in zip(ids, weights):
            if w == 0.0:
                continue
            w_in, w_down = (overrides or {}).get(e) or self.expert_weights(layer, e)
            out = out + float(w) * self._expert(x, w_in, w_down)
        return out

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None,
                route_input: torch.Tensor | None = None,
                overrides: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Experts' output for FFN input x [..., H]; the router reads `route_input` (same shape;
        default x), which differs from x only in Gemma 4 (the un-normalised residual).
        `overrides` replaces experts' (fused in, down) weights (an edit overlay: `PatchedMoeFfn`)."""
        if hooks and any(f"blocks.{layer}.mlp.{h}" in hooks for h in ("hook_pre", "hook_pre_linear")):
            raise CapabilityError(f"layer {layer} is a mixture of experts: hook its features' activations "
                                  "(mlp.hook_post, one column per expert feature), not their pre-activations")
        if len(self.held) < self.moe.num_experts + (1 if self.moe.shared_size else 0):
            raise CapabilityError(f"this holds experts {_ranges(sorted(self.held))} only: a whole MoE layer needs "
                                  "every expert (ask the expert routes for a subset)")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.route(layer, flat if route_input is None else route_input.reshape(flat.shape))
        if hooks:
            ids, weights = routing_hooks(hooks, layer, ids, weights, tuple(shape[:-1]))
        weights = weights.to(x.dtype)
        if hooks and f"blocks.{layer}.mlp.hook_post" in hooks:
            return self._forward_features(layer, flat, weights, ids, hooks, overrides, tuple(shape[:-1])).reshape(shape)
        w_in, w_down = self.w_in[layer], self.w_down[layer]
        shared_in, shared_down = self.shared_in[layer], self.shared_down[layer]
        if overrides:
            w_in, w_down = list(w_in), list(w_down)
            for e, (wi, wd) in overrides.items():
                if e == self.moe.num_experts:
                    shared_in, shared_down = wi, wd
                else:
                    w_in[e], w_down[e] = wi, wd
        if flat.shape[0] == 1:
            out = torch.zeros_like(flat)
            for j, e in enumerate(ids[0].tolist()):
                out = out + weights[0, j] * self._expert(flat, w_in[e], w_down[e])
        else:
            out = torch.zeros_like(flat)
            for e in torch.unique(ids).tolist():
                rows, slot = (ids == e).nonzero(as_tuple=True)
                y = self._expert(flat[rows], w_in[e], w_down[e]) * weights[rows, slot, None]
                out.index_add_(0, rows, y)
        if shared_in is not None:
            s = self._expert(flat, shared_in, shared_down)
            if self.shared_gate[layer] is not None:
                s = torch.sigmoid(linear(flat, self.shared_gate[layer])) * s
            out = out + s
        return out.reshape(shape)


def _ranges(xs: list[int]) -> str:
    out, start = [], None
    for a, b in zip(xs, xs[1:] + [None]):
        start = a if start is None else start
        if b != a + 1:
            out.append(f"{start}" if start == a else f"{start}-{a}")
            start = None
    return ", ".join(out) or "none"
