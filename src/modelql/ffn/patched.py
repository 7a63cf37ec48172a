"""The overlay-aware FFN (algorithms §7.2): the dense FFN with a patch overlay's edits applied.

    FFN_L(x) = Σ_{f ∉ T_L} act(ĝ_f·x) · (û_f·x) · d̂_f  +  U_L (V_Lᵀ h)

computed as the dense matmuls plus small corrections, so an edit costs almost nothing:

* features whose gate or up vector is overridden get their pre-activations recomputed from the
  override rows (substituted into the dense result before the activation hooks run);
* tombstoned features are zeroed after the activation (they contribute nothing);
* overridden down vectors add `h[idx] @ (d̂ − d)` to the output;
* weight-level edits (`down_delta`, MEMIT) add the low-rank `(h @ V) @ Uᵀ`, with `h` the FFN
  activations: exactly `(W_down + U Vᵀ) h`;
* neuron edits (`down_delta` with gate/up rows) add `(act(x·Gᵀ) ⊙ x·Upᵀ) @ Dᵀ`: extra neurons,
  kept out of `hook_post` (the layer's own features).

Layers without edits take the dense path unchanged, so with an empty overlay the logits are
bit-identical to `DenseFfn`. The edits come from a provider's `layer_edits(layer)` (a
`modelql.vindex.overlay.PatchSession`), read on every call, so the FFN sees overlay changes
immediately (the provider caches the tensors per overlay epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.spec import ModelSpec
from .base import Hooks, run_hook
from .dense import DenseFfn


@dataclass
class LayerEdits:
    """One layer's edits as tensors in the model dtype."""

    pre_idx: torch.Tensor | None = None  # [k] features whose gate/up pre-activations are recomputed
    gate: torch.Tensor | None = None  # [k, H] effective gate rows (non-gated: up rows)
    up: torch.Tensor | None = None  # [k, H] effective up rows (gated only)
    tomb_idx: torch.Tensor | None = None  # [t] tombstoned features
    down_idx: torch.Tensor | None = None  # [d] features with a down override
    down_diff: torch.Tensor | None = None  # [d, H] d̂_f − d_f
    U: torch.Tensor | None = None  # [H, R]
    V: torch.Tensor | None = None  # [F, R]
    n_gate: torch.Tensor | None = None  # [N, H] added neurons' gate rows
    n_up: torch.Tensor | None = None  # [N, H]
    n_down: torch.Tensor | None = None  # [H, N]


class EditSource(Protocol):
    def layer_edits(self, layer: int) -> LayerEdits | None: ...


def build_layer_edits(spec: ModelSpec, dense: DenseFfn, layer: int, slots: Mapping[int, object],
                      deltas: Sequence[object]) -> LayerEdits:
    """Tensors for `PatchedFfn` from overlay slots (`gate`/`up`/`down`/`tombstone` attributes,
    numpy f32 vectors) and deltas (`u` [H, r], `v` [F, r])."""
    w_in = dense.w_in[layer]
    w_down = dense.w_down[layer]
    dtype = w_in.dtype
    nf = w_down.shape[1]
    e = LayerEdits()
    live = {f: s for f, s in slots.items() if not s.tombstone and 0 <= f < nf}
    pre = sorted(f for f, s in live.items() if s.gate is not None or (spec.gated_ffn and s.up is not None))
    if pre:
        e.pre_idx = torch.tensor(pre, dtype=torch.long)
        gate_rows, up_rows = [], []
        for f in pre:
            s = live[f]
            gate_rows.append(torch.from_numpy(s.gate).to(dtype) if s.gate is not None else w_in[f])
            if spec.gated_ffn:
                up_rows.append(torch.from_numpy(s.up).to(dtype) if s.up is not None else w_in[nf + f])
        e.gate = torch.stack(gate_rows)
        e.up = torch.stack(up_rows) if spec.gated_ffn else None
    tomb = sorted(f for f, s in slots.items() if s.tombstone and 0 <= f < nf)
    if tomb:
        e.tomb_idx = torch.tensor(tomb, dtype=torch.long)
    down = sorted(f for f, s in live.items() if s.down is not None)
    if down:
        e.down_idx = torch.tensor(down, dtype=torch.long)
        new = torch.stack([torch.from_numpy(np.asarray(live[f].down, dtype=np.float32)) for f in down])
        e.down_diff = (new - w_down[:, e.down_idx].t().float()).to(dtype)
    low_rank = [d for d in deltas if d.v is not None]
    if low_rank:
        e.U = torch.from_numpy(np.concatenate([np.asarray(d.u, dtype=np.float32) for d in low_rank], axis=1)).to(dtype)
        e.V = torch.from_numpy(np.concatenate([np.asarray(d.v, dtype=np.float32) for d in low_rank], axis=1)).to(dtype)
    neurons = [d for d in deltas if d.v is None]
    if neurons:
        def cat(name: str, axis: int) -> torch.Tensor:
            return torch.from_numpy(np.concatenate([np.asarray(getattr(d, name), dtype=np.float32) for d in neurons],
                                                   axis=axis)).to(dtype)

        e.n_gate, e.n_up, e.n_down = cat("gate", 0), cat("up", 0), cat("u", 1)
    return e


class PatchedFfn:
    """An `FfnBackend`: `DenseFfn` plus the edits `source.layer_edits(layer)` returns."""

    def __init__(self, spec: ModelSpec, dense: DenseFfn, source: EditSource):
        self.spec = spec
        self.dense = dense
        self.source = source
        self.act = dense.act

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        e = self.source.layer_edits(layer)
        if e is None:
            return self.dense.forward(layer, x, hooks)
        d = self.dense
        h = F.linear(x, d.w_in[layer], d.b_in[layer])
        if self.spec.gated_ffn:
            gate, up = h.chunk(2, dim=-1)
            if e.pre_idx is not None:
                gate = gate.clone()
                up = up.clone()
                gate[..., e.pre_idx] = F.linear(x, e.gate)
                up[..., e.pre_idx] = F.linear(x, e.up)
            gate = run_hook(hooks, f"blocks.{layer}.mlp.hook_pre", gate)
            up = run_hook(hooks, f"blocks.{layer}.mlp.hook_pre_linear", up)
            a = self.act(gate) * up
        else:
            if e.pre_idx is not None:
                h = h.clone()
                b = d.b_in[layer]
                h[..., e.pre_idx] = F.linear(x, e.gate, b[e.pre_idx] if b is not None else None)
            a = self.act(run_hook(hooks, f"blocks.{layer}.mlp.hook_pre", h))
        if e.tomb_idx is not None:
            a = a.index_fill(-1, e.tomb_idx, 0.0)
        a = run_hook(hooks, f"blocks.{layer}.mlp.hook_post", a)
        out = F.linear(a, d.w_down[layer], d.b_down[layer])
        if e.down_idx is not None:
            out = out + a[..., e.down_idx] @ e.down_diff
        if e.U is not None:
            out = out + (a @ e.V) @ e.U.t()
        if e.n_gate is not None:
            out = out + (self.act(F.linear(x, e.n_gate)) * F.linear(x, e.n_up)) @ e.n_down.t()
        return out
