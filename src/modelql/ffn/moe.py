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

import torch

from ..errors import CapabilityError
from ..linear import linear
from ..models.spec import ModelSpec
from .base import Hooks, activation, run_hook

_FEATURE_HOOKS = ("hook_pre", "hook_pre_linear", "hook_post")


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [N, k] float32, expert ids [N, k]) from router logits [N, E]."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class MoeFfn:
    """Router + experts (+ a sigmoid-gated shared expert) per layer, driven by `spec.moe`.

    `layers` limits it to those layers, as for `DenseFfn`."""

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], layers: Iterable[int] | None = None):
        if spec.moe is None:
            raise ValueError(f"{spec.family} is not a mixture-of-experts model")
        self.spec, self.moe = spec, spec.moe
        self.act = activation(spec.activation)
        owned = set(range(spec.num_layers) if layers is None else layers)
        self.router: list[torch.Tensor | None] = []
        self.w_in: list[list[torch.Tensor] | None] = []
        self.w_down: list[list[torch.Tensor] | None] = []
        self.shared_in: list[torch.Tensor | None] = []
        self.shared_down: list[torch.Tensor | None] = []
        self.shared_gate: list[torch.Tensor | None] = []
        self.router_scale: list[torch.Tensor | None] = []  # Gemma 4 (`MoeSpec.beside_dense`)
        self.expert_scale: list[torch.Tensor | None] = []
        stores = (self.router, self.w_in, self.w_down, self.shared_in, self.shared_down, self.shared_gate,
                  self.router_scale, self.expert_scale)
        for i in range(spec.num_layers):
            if i not in owned:
                for store in stores:
                    store.append(None)
                continue
            p = f"layers.{i}."
            self.router.append(weights[p + "router.weight"])
            self.router_scale.append(weights.get(p + "router.scale"))
            self.expert_scale.append(weights.get(p + "router.expert_scale"))
            self.w_in.append([self._fuse(weights, f"{p}experts.{e}.") for e in range(self.moe.num_experts)])
            self.w_down.append([weights[f"{p}experts.{e}.down.weight"] for e in range(self.moe.num_experts)])
            if self.moe.shared_size:
                self.shared_in.append(self._fuse(weights, p + "shared."))
                self.shared_down.append(weights[p + "shared.down.weight"])
                self.shared_gate.append(weights.get(p + "shared_gate.weight"))
            else:
                self.shared_in.append(None)
                self.shared_down.append(None)
                self.shared_gate.append(None)

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

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None,
                route_input: torch.Tensor | None = None) -> torch.Tensor:
        """Experts' output for FFN input x [..., H]; the router reads `route_input` (same shape;
        default x), which differs from x only in Gemma 4 (the un-normalised residual)."""
        if hooks and any(f"blocks.{layer}.mlp.{h}" in hooks for h in _FEATURE_HOOKS):
            raise CapabilityError(f"layer {layer} is a mixture of experts: its FFN features are per expert, "
                                  "and feature hooks (ablate/steer features) do not reach them yet")
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = self.route(layer, flat if route_input is None else route_input.reshape(flat.shape))
        if hooks:
            ids = run_hook(hooks, f"blocks.{layer}.mlp.hook_expert_ids", ids)
            weights = run_hook(hooks, f"blocks.{layer}.mlp.hook_expert_weights", weights)
        weights = weights.to(x.dtype)
        w_in, w_down = self.w_in[layer], self.w_down[layer]
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
        if self.shared_in[layer] is not None:
            s = self._expert(flat, self.shared_in[layer], self.shared_down[layer])
            if self.shared_gate[layer] is not None:
                s = torch.sigmoid(linear(flat, self.shared_gate[layer])) * s
            out = out + s
        return out.reshape(shape)
