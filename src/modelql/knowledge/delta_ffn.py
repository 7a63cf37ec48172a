"""A weight-level edit as data: low-rank down_proj deltas or new FFN neurons, and the FFN backend
that adds them.

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

    def apply(self, x: torch.Tensor, h: torch.Tensor, act) -> torch.Tensor:
        """This edit's output for FFN input `x` and activations `h`."""
        if self.v is None:
            return act(x @ self.gate.to(x.dtype).T) * (x @ self.up.to(x.dtype).T) @ self.u.to(x.dtype).T
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
        for d in deltas:
            y = y + d.apply(x, h, self.act)
        return y
