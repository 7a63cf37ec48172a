"""`FfnBackend`: the seam through which the runtime computes each layer's FFN.

The runtime hands a backend the *normalised* FFN input of a layer (`x_L`, the capture point of
algorithms §7.3) and adds what it returns to the residual (after the family's post-FFN norm, if
any). Dense weights, vindex walks, patched overlays and remote shards all plug in here.
"""

from __future__ import annotations

from typing import Callable, Mapping, Protocol

import torch
import torch.nn.functional as F

Hook = Callable[[torch.Tensor, str], "torch.Tensor | None"]
Hooks = Mapping[str, Hook]


class FfnBackend(Protocol):
    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        """FFN output for normalised input x [..., H]; the same shape back."""
        ...


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise nonlinearity a `ModelSpec.activation` names."""
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unknown activation {name!r}")


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor:
    """RMS norm in float32 times `offset + w` (Gemma's norms store w - 1: offset 1)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (xf * (offset + w.float())).to(x.dtype)
    return w * xf.to(x.dtype)


def run_hook(hooks: Hooks | None, name: str, t: torch.Tensor) -> torch.Tensor:
    """Call the hook registered under `name`, if any; a returned tensor replaces `t`."""
    if hooks is None:
        return t
    fn = hooks.get(name)
    if fn is None:
        return t
    out = fn(t, name)
    return t if out is None else out


class RoutedFfn:
    """Per-layer choice of backend: e.g. dense below a boundary and walk above, or one shard per range."""

    def __init__(self, backends: list[FfnBackend]):
        self.backends = backends

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        return self.backends[layer].forward(layer, x, hooks)
