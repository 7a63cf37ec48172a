"""A weight-level edit as data: low-rank down_proj deltas, and the FFN backend that adds them.

Kept apart from the solvers (`memit`, `memit_subject`) so the overlay, COMPILE and both solvers
share one representation without importing each other."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..ffn.base import FfnBackend, Hooks


@dataclass(frozen=True)
class EditRequest:
    entity: str
    relation: str
    target: str


@dataclass(frozen=True)
class DownDelta:
    """A low-rank update of one layer's down_proj: ΔW = u @ v.T (u [H, r], v [F, r])."""

    layer: int
    u: torch.Tensor
    v: torch.Tensor
    facts: tuple[EditRequest, ...] = ()

    def dense(self) -> torch.Tensor:
        return self.u @ self.v.T


class DeltaFfn:
    """An FFN backend adding low-rank down_proj deltas on top of another backend."""

    def __init__(self, base: FfnBackend, deltas: Sequence[DownDelta] = ()):
        self.base = base
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
        for d in deltas:
            y = y + (h @ d.v.to(h.dtype)) @ d.u.to(h.dtype).T
        return y
