"""The dense FFN: the model's own weights, as matmuls."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

from ..models.spec import ModelSpec
from ..linear import linear
from .base import Hooks, activation, run_hook


class DenseFfn:
    """`down(act(gate·x) ⊙ up·x)` (gated) or `down(act(up·x + b)) + b` (GPT-2 style).

    Gate and up rows are fused into one [2F, H] matrix so a decode step reads them in one
    pass; the canonical per-tensor weights in `Model.weights` are views into it.

    `layers` limits it to those layers (an FFN shard owning a layer range): the others hold None
    and are never called.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], layers: Iterable[int] | None = None):
        self.spec = spec
        self.act = activation(spec.activation)
        self.w_in: list[torch.Tensor] = []
        self.b_in: list[torch.Tensor | None] = []
        self.w_down: list[torch.Tensor] = []
        self.b_down: list[torch.Tensor | None] = []
        owned = set(range(spec.num_layers) if layers is None else layers)
        for i in range(spec.num_layers):
            if i not in owned:
                for store in (self.w_in, self.b_in, self.w_down, self.b_down):
                    store.append(None)
                continue
            p = f"layers.{i}."
            if spec.gated_ffn:
                fused = torch.cat([weights[p + "gate.weight"], weights[p + "up.weight"]])
                f = weights[p + "gate.weight"].shape[0]  # per layer: Gemma 4 doubles some
                weights[p + "gate.weight"], weights[p + "up.weight"] = fused[:f], fused[f:]
            else:
                fused = weights[p + "up.weight"]
            self.w_in.append(fused)
            self.b_in.append(weights.get(p + "up.bias"))
            self.w_down.append(weights[p + "down.weight"])
            self.b_down.append(weights.get(p + "down.bias"))

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        h = linear(x, self.w_in[layer], self.b_in[layer])
        if self.spec.gated_ffn:
            gate, up = h.chunk(2, dim=-1)
            gate = run_hook(hooks, f"blocks.{layer}.mlp.hook_pre", gate)
            up = run_hook(hooks, f"blocks.{layer}.mlp.hook_pre_linear", up)
            h = self.act(gate) * up
        else:
            h = self.act(run_hook(hooks, f"blocks.{layer}.mlp.hook_pre", h))
        h = run_hook(hooks, f"blocks.{layer}.mlp.hook_post", h)
        return linear(h, self.w_down[layer], self.b_down[layer])
