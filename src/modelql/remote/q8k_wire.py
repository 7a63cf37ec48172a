"""The `/v1/walk-ffn-q8k` wire (LARQL's Q8K-prenormed dense-FFN batch protocol), byte for byte.

The client applies the FFN input norm itself and quantises each row to Q8_K (llama.cpp's
activation format: blocks of 256 values, one f32 scale each, symmetric int8 in [-127, 127], plus
the int16 sum of every 32-value sub-block), so a row travels in H·(1 + 4/256 + 16/256) bytes
instead of 4·H. The server dequantises (`d · q`) and answers the raw FFN output of each entry in
f32. Only models whose hidden size is a multiple of 256 can use it (LARQL's client falls back to
`/v1/walk-ffn` otherwise).

    request   [n u32] n × {[layer u32][n_blocks u32][qs i8 × 256·n_blocks][d f32 × n_blocks]
                           [sums i16 × 8·n_blocks]}
    response  [n u32] n × {[layer u32][count u32][f32 × count]}

All little-endian; Content-Type `application/x-larql-ffn-q8k-batch` both ways. Entries answer in
request order; an entry is one position, so a prefill of S rows is S entries of the same layer
(LARQL sends one entry per layer). Malformed input raises `WireError` (HTTP 400).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import WireError

MEDIA_Q8K = "application/x-larql-ffn-q8k-batch"
BLOCK = 256
SUBBLOCKS = 8
SUBBLOCK = BLOCK // SUBBLOCKS
#: Entries per request: LARQL sends one per layer; a prefill sends one per position and layer.
MAX_ENTRIES = 1 << 16

_U32 = struct.Struct("<I")
_HEAD = struct.Struct("<II")


@dataclass
class Q8KActivation:
    """One row in Q8_K: `qs` int8 [n_blocks·256], `d` f32 [n_blocks], `sums` int16 [n_blocks·8]."""

    qs: np.ndarray
    d: np.ndarray
    sums: np.ndarray

    @property
    def n_blocks(self) -> int:
        return int(self.d.size)

    def dequantize(self) -> np.ndarray:
        """`x ≈ d[b] · qs[b·256 + i]` as float32 (LARQL's server reconstruction)."""
        return (self.qs.reshape(-1, BLOCK).astype(np.float32) * self.d[:, None]).reshape(-1)


@dataclass
class Q8KEntry:
    layer: int
    act: Q8KActivation


def quantize(x: np.ndarray) -> Q8KActivation:
    """LARQL's `quantize_x_to_q8k`: per block of 256, d = amax/127, q = round(x/d) (half away from
    zero, in f32) clamped to ±127; per sub-block of 32 the sum of q. `len(x)` must be a multiple of 256."""
    v = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if v.size % BLOCK:
        raise WireError(f"Q8_K needs a multiple of {BLOCK} values, got {v.size}")
    blocks = v.reshape(-1, BLOCK)
    amax = np.abs(blocks).max(axis=1) if blocks.size else np.zeros(0, np.float32)
    d = np.where(amax > 0, amax / np.float32(127.0), np.float32(0.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    scaled = blocks * inv[:, None]
    whole = np.trunc(scaled)
    rounded = whole + np.sign(scaled) * (np.abs(scaled - whole) >= 0.5)  # Rust's f32::round, exactly
    q = np.clip(rounded, -127, 127).astype(np.int8)
    sums = q.reshape(-1, SUBBLOCKS, SUBBLOCK).astype(np.int32).sum(axis=2).astype(np.int16)
    return Q8KActivation(q.reshape(-1), d, sums.reshape(-1))


def encode_request(entries: Sequence[tuple[int, Q8KActivation]]) -> bytes:
    """LARQL's `encode_q8k_batch_request`."""
    parts = [_U32.pack(len(entries))]
    for layer, act in entries:
        parts.append(_HEAD.pack(int(layer), act.n_blocks))
        parts.append(np.ascontiguousarray(act.qs, dtype=np.int8).tobytes())
        parts.append(np.ascontiguousarray(act.d, dtype="<f4").tobytes())
        parts.append(np.ascontiguousarray(act.sums, dtype="<i2").tobytes())
    return b"".join(parts)


def decode_request(body: bytes) -> list[Q8KEntry]:
    """LARQL's `decode_q8k_batch_request` (same error cases), stricter on two points: trailing bytes
    and an entry count over `MAX_ENTRIES` are refused."""
    view = memoryview(body)
    if len(view) < 4:
        raise WireError(f"q8k batch request too short: {len(view)} bytes")
    (n,) = _U32.unpack_from(view, 0)
    if n > MAX_ENTRIES:
        raise WireError(f"q8k batch request: {n} entries (limit {MAX_ENTRIES})")
    pos, out = 4, []
    for i in range(n):
        if len(view) < pos + 8:
            raise WireError(f"q8k batch request: truncated entry header {i}")
        layer, nb = _HEAD.unpack_from(view, pos)
        pos += 8
        size = nb * (BLOCK + 4 + 2 * SUBBLOCKS)
        if len(view) < pos + size:
            raise WireError(f"q8k batch request: entry {i} (layer {layer}) truncated: {nb} blocks need "
                            f"{size} bytes, {len(view) - pos} left")
        qs = np.frombuffer(view, np.int8, nb * BLOCK, pos).copy()
        pos += nb * BLOCK
        d = np.frombuffer(view, "<f4", nb, pos).astype(np.float32)
        pos += 4 * nb
        sums = np.frombuffer(view, "<i2", nb * SUBBLOCKS, pos).astype(np.int16)
        pos += 2 * SUBBLOCKS * nb
        out.append(Q8KEntry(int(layer), Q8KActivation(qs, d, sums)))
    if pos != len(view):
        raise WireError(f"q8k batch request: {len(view) - pos} trailing bytes after {n} entries")
    return out


def encode_response(entries: Sequence[tuple[int, np.ndarray]]) -> bytes:
    """LARQL's `encode_q8k_batch_response`."""
    parts = [_U32.pack(len(entries))]
    for layer, values in entries:
        v = np.ascontiguousarray(values, dtype="<f4").reshape(-1)
        parts.append(_HEAD.pack(int(layer), v.size))
        parts.append(v.tobytes())
    return b"".join(parts)


def decode_response(body: bytes) -> list[tuple[int, np.ndarray]]:
    """The entries of a response in order (LARQL's decoder keys them by layer; order keeps repeated
    layers, i.e. several positions, apart). Trailing bytes are refused."""
    view = memoryview(body)
    if len(view) < 4:
        raise WireError(f"q8k batch response too short: {len(view)} bytes")
    (n,) = _U32.unpack_from(view, 0)
    pos, out = 4, []
    for i in range(n):
        if len(view) < pos + 8:
            raise WireError(f"q8k batch response: truncated entry header {i}")
        layer, count = _HEAD.unpack_from(view, pos)
        pos += 8
        if len(view) < pos + 4 * count:
            raise WireError(f"q8k batch response: truncated output for layer {layer}: need {4 * count} bytes, "
                            f"have {len(view) - pos}")
        out.append((int(layer), np.frombuffer(view, "<f4", count, pos).astype(np.float32)))
        pos += 4 * count
    if pos != len(view):
        raise WireError(f"q8k batch response: {len(view) - pos} trailing bytes")
    return out


__all__ = ["BLOCK", "MEDIA_Q8K", "Q8KActivation", "Q8KEntry", "decode_request", "decode_response",
           "encode_request", "encode_response", "quantize"]
