"""`linear(x, w, b)`: the forward pass's matmuls, through oneDNN with prepacked weights on CPU.

Why: for the few-row inputs of decoding (one row per sequence in the batch), torch's default f32
GEMM on CPU runs far below the machine's peak (measured on the project's machines: a batch of 8
rows through a 8192×1024 matrix took ~2.2× longer than oneDNN's inner product with the weight
reordered once into its blocked layout, and one row ~1.5× longer). Continuous batching only pays if
a step of B sequences costs much less than B steps of one.

The packed copy is made on first use and cached per weight tensor; it is rebuilt when the weight
changes in place (`Tensor._version`: edits that write into the model's weights) and dropped with
the weight. Anything else — autograd (edit optimisation), other dtypes, a torch without oneDNN —
uses `F.linear` (as do weights made in inference mode, which keep no version counter).
f32 and bf16 are packed; bf16 results may differ from `F.linear` in the last bit (accumulation order).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

_PACK_HINT = 16  # oneDNN picks the blocked layout for this many rows; any row count works
PACK_BUDGET = 4 << 30  # bytes of packed copies at most (they double the weights' memory); the rest: F.linear


def _available() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available()) and hasattr(torch.ops.mkldnn, "_linear_pointwise") \
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    except (AttributeError, RuntimeError):
        return False


ENABLED = _available()
#: bf16 too: torch's default bf16 GEMV here reads weights at ~1/4 of oneDNN's packed speed (bench/decode.py)
_PACKED_DTYPES = (torch.float32, torch.bfloat16)
_packed: dict[int, tuple[weakref.ref, int, torch.Tensor, int]] = {}
_packed_bytes = [0]


def _forget(key: int) -> None:
    hit = _packed.pop(key, None)
    if hit is not None:
        _packed_bytes[0] -= hit[3]


def _pack(w: torch.Tensor) -> torch.Tensor | None:
    """The packed copy of `w` (made or refreshed now), or None when over the memory budget."""
    key = id(w)
    hit = _packed.get(key)
    if hit is not None and hit[0]() is w:
        if hit[1] == w._version:
            return hit[2]
        _forget(key)
    size = w.numel() * w.element_size()
    if _packed_bytes[0] + size > PACK_BUDGET:
        return None
    packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), _PACK_HINT)
    ref = weakref.ref(w, lambda _r, key=key: _forget(key))
    _packed[key] = (ref, w._version, packed, size)
    _packed_bytes[0] += size
    return packed


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, w, b)` (x [..., in], w [out, in]) — oneDNN with a prepacked weight when it can."""
    if (not ENABLED or x.dtype not in _PACKED_DTYPES or w.dtype != x.dtype or x.device.type != "cpu"
            or w.is_inference() or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
        return F.linear(x, w, b)
    packed = _pack(w)
    if packed is None:
        return F.linear(x, w, b)
    lead = x.shape[:-1]
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]).contiguous(), packed, b, "none", [], "")
    return out.reshape(*lead, w.shape[0])
