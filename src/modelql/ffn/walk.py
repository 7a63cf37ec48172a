"""The walk FFN: each layer's FFN as a sum over features read from feature-major rows.

    out = Σ_f act(g_f·x) · (u_f·x) · d_f            (gated)
    out = Σ_f act(u_f·x + b_f) · d_f + b_down        (non-gated; up rows play the gate's role)

With every feature this is the dense FFN (computed as matmuls, algorithms §7.2). Sparse mode
keeps only the K features with the largest |gate score| per token, which is what makes a
feature-level view of the FFN ("which features fired") an exact account of what it computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F

from ..models.spec import ModelSpec
from .base import Hooks, activation, run_hook

DENSE_FRACTION = 0.8


@dataclass
class FeatureRows:
    """One layer's FFN in feature-major form: row f of each matrix belongs to feature f."""

    gate: torch.Tensor  # [F, H] (non-gated: the up rows)
    up: torch.Tensor | None  # [F, H] (None for non-gated FFNs)
    down_t: torch.Tensor  # [F, H], row f = column f of down_proj
    gate_bias: torch.Tensor | None = None  # [F] (non-gated: the up bias)
    down_bias: torch.Tensor | None = None  # [H]

    @classmethod
    def from_weights(cls, spec: ModelSpec, weights: Mapping[str, torch.Tensor], layer: int) -> FeatureRows:
        p = f"layers.{layer}."
        down_t = weights[p + "down.weight"].t().contiguous()
        if spec.gated_ffn:
            return cls(weights[p + "gate.weight"], weights[p + "up.weight"], down_t,
                       None, weights.get(p + "down.bias"))
        return cls(weights[p + "up.weight"], None, down_t, weights.get(p + "up.bias"), weights.get(p + "down.bias"))

    @property
    def num_features(self) -> int:
        return self.gate.shape[0]


class WalkFfn:
    """An `FfnBackend` over `FeatureRows` per layer, full or sparse top-K per layer.

    `k` is None (all features), an int for every layer, or a {layer: K} map (layers not named
    use all features). K ≥ 80% of a layer's features takes the dense-equivalent path.
    """

    def __init__(self, spec: ModelSpec, rows: list[FeatureRows], k: int | Mapping[int, int] | None = None):
        self.spec = spec
        self.rows = rows
        self.act = activation(spec.activation)
        self.k = k

    @classmethod
    def from_model(cls, model, k: int | Mapping[int, int] | None = None) -> WalkFfn:
        """Feature-major rows from a loaded model's weights (down is transposed once, here)."""
        rows = [FeatureRows.from_weights(model.spec, model.weights, i) for i in range(model.spec.num_layers)]
        return cls(model.spec, rows, k)

    def k_for(self, layer: int) -> int | None:
        if self.k is None:
            return None
        k = self.k.get(layer) if isinstance(self.k, Mapping) else self.k
        if k is None or k >= DENSE_FRACTION * self.rows[layer].num_features:
            return None
        return max(1, int(k))

    def activations(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(gate scores [.., F], up scores [.., F] or None) of every feature for input x."""
        r = self.rows[layer]
        g = F.linear(x, r.gate, r.gate_bias)
        return g, (F.linear(x, r.up) if r.up is not None else None)

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        r = self.rows[layer]
        k = self.k_for(layer)
        if k is None:
            g, u = self.activations(layer, x)
            h = self.act(g) * u if u is not None else self.act(g)
            h = run_hook(hooks, f"blocks.{layer}.mlp.hook_post", h)
            out = h @ r.down_t
        else:
            out = self._sparse(layer, x, k, hooks)
        return out + r.down_bias if r.down_bias is not None else out

    def _sparse(self, layer: int, x: torch.Tensor, k: int, hooks: Hooks | None) -> torch.Tensor:
        r = self.rows[layer]
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        g = F.linear(flat, r.gate, r.gate_bias)
        idx = g.abs().topk(k, dim=-1).indices  # [N, K]
        g_sel = g.gather(-1, idx)
        if r.up is not None:
            up_sel = torch.bmm(r.up[idx], flat[:, :, None])[..., 0]
            a = self.act(g_sel) * up_sel
        else:
            a = self.act(g_sel)
        name = f"blocks.{layer}.mlp.hook_post"
        if hooks is not None and name in hooks:
            dense = torch.zeros_like(g).scatter(-1, idx, a)
            a = run_hook(hooks, name, dense).gather(-1, idx)
        # a weighted sum of down rows, read in place (no [N, K, H] gather)
        out = F.embedding_bag(idx, r.down_t, per_sample_weights=a.to(r.down_t.dtype), mode="sum")
        return out.reshape(shape)
