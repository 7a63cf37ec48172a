"""A weight-level edit as data: low-rank down_proj deltas or new FFN neurons, and the FFN backend
that adds them.

Kept apart from the solvers (`memit`, `memit_subject`) so the overlay, COMPILE and both solvers
share one representation without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..ffn.base import FfnBackend, Hooks
from ..ffn.moe import find_moe


@dataclass(frozen=True)
class EditRequest:
    entity: str
    relation: str
    target: str


@dataclass(frozen=True)
class DownDelta:
    """A rank-r weight-level edit of one layer's FFN, in one of two forms:

    * on the layer's own activations h: ΔW_down = u @ v.T (u [H, r], v [F, r]);
    * r new neurons (`gate`, `up` [r, H], v None) whose down columns are u:
      ΔFFN(x) = u @ (act(gate·x) ⊙ up·x). A neuron whose gate is negative on every generic
      token adds nothing there (SiLU(-9) ≈ -1e-3), which a linear ΔW cannot do.
    """

    layer: int
    u: torch.Tensor
    v: torch.Tensor | None
    facts: tuple[EditRequest, ...] = ()
    gate: torch.Tensor | None = None
    up: torch.Tensor | None = None

    @property
    def neurons(self) -> bool:
        return self.gate is not None

    def dense(self) -> torch.Tensor:
        if self.v is None:
            raise ValueError("a neuron edit has no dense down_proj form")
        return self.u @ self.v.T

    def apply(self, x: torch.Tensor, h: torch.Tensor, act, scale: torch.Tensor | None = None) -> torch.Tensor:
        """This edit's output for FFN input `x` and activations `h`; neurons' times `scale` [..., 1]
        when given (in a mixture-of-experts layer: the chosen experts' summed weights, since every
        routed expert carries the neurons)."""
        if self.v is None:
            a = act(x @ self.gate.to(x.dtype).T) * (x @ self.up.to(x.dtype).T)
            return (a if scale is None else a * scale.to(x.dtype)) @ self.u.to(x.dtype).T
        return (h @ self.v.to(h.dtype)) @ self.u.to(h.dtype).T


class DeltaFfn:
    """An FFN backend adding low-rank down_proj deltas on top of another backend."""

    def __init__(self, base: FfnBackend, deltas: Sequence[DownDelta] = ()):
        self.base = base
        self.act = getattr(base, "act", None)  # the family's activation, for neuron edits
        self.by_layer: dict[int, list[DownDelta]] = {}
        for d in deltas:
            self.add(d)

    def add(self, delta: DownDelta) -> None:
        self.by_layer.setdefault(delta.layer, []).append(delta)

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        deltas = self.by_layer.get(layer)
        if not deltas:
            return self.base.forward(layer, x, hooks)
        name = f"blocks.{layer}.mlp.hook_post"
        seen: dict[str, torch.Tensor] = {}
        inner = hooks.get(name) if hooks else None

        def capture(t: torch.Tensor, n: str):
            out = inner(t, n) if inner else None
            seen["h"] = t if out is None else out
            return out

        y = self.base.forward(layer, x, {**(hooks or {}), name: capture})
        h = seen["h"]
        scale = routed_weight(self.base, layer, x) if any(d.neurons for d in deltas) else None
        for d in deltas:
            y = y + d.apply(x, h, self.act, scale)
        return y


def routed_weight(ffn: FfnBackend, layer: int, x: torch.Tensor) -> torch.Tensor | None:
    """Per row of x [..., H], the summed routing weight of the experts a MoE layer picks
    ([..., 1]), which scales neurons appended to every expert; None for a dense layer."""
    moe = find_moe(ffn)
    if moe is None:
        return None
    weights, _ids = moe.route(layer, x.reshape(-1, x.shape[-1]))
    return weights.sum(-1).reshape(*x.shape[:-1], 1)
