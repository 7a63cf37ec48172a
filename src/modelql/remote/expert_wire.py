"""LARQL's binary expert wires (`larql_inference::ffn::moe_remote`), byte for byte. All little-endian.

* `/v1/expert/batch`, `application/x-larql-expert` (one residual per item):
  request  `[n u32][hidden u32]` + n × `[layer u32][expert_id u32][f32 × hidden]`;
  response `[n u32][hidden u32][latency_ms f32]` + n × `[layer u32][expert_id u32][f32 × hidden]`.
* `/v1/experts/layer-batch`, `application/x-larql-experts-layer` (one residual, K weighted experts):
  request  `[layer u32][hidden u32][K u32][f32 × hidden]` + K × `[expert_id u32][weight f32]`;
  response `[hidden u32][latency_ms f32][f32 × hidden]` (Σ weight · expert output).
  The `-f16` variant (`application/x-larql-experts-layer-f16`) carries the residual and the answer
  as IEEE half floats; the K weights stay f32.
* `/v1/experts/multi-layer-batch`, `application/x-larql-experts-multi-layer` (tasks of any layers):
  request  `[n u32]` + n × `[layer u32][hidden u32][K u32][f32 × hidden][u32 × K ids][f32 × K weights]`;
  response `[n u32]` + n × `[layer u32][hidden u32][f32 × hidden]` (the same content type back).
  The `-q8k` variant replaces each residual by the Q8_K row of the experts' normalised input
  (`[i8 × hidden][f32 × hidden/256][i16 × 8·hidden/256]`, `q8k_wire`).

A truncated or oversized frame raises `WireError` (HTTP 400), checked before any allocation.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import WireError
from .q8k_wire import BLOCK, SUBBLOCKS, Q8KActivation

MEDIA_EXPERT = "application/x-larql-expert"
MEDIA_LAYER = "application/x-larql-experts-layer"
MEDIA_LAYER_F16 = "application/x-larql-experts-layer-f16"
MEDIA_MULTI = "application/x-larql-experts-multi-layer"
MEDIA_MULTI_Q8K = "application/x-larql-experts-multi-layer-q8k"
MAX_ITEMS = 1 << 16
MAX_HIDDEN = 1 << 16

_U32 = struct.Struct("<I")
_F32 = struct.Struct("<f")


@dataclass
class ExpertTask:
    """One layer-batch task: Σ weights[k] · expert ids[k] of `layer` on `residual` (or, prenormed,
    the Q8_K row `q8k` of the experts' normalised input)."""

    layer: int
    residual: np.ndarray | None
    ids: list[int]
    weights: list[float]
    q8k: Q8KActivation | None = None


class _Reader:
    def __init__(self, raw: bytes, what: str):
        self.raw, self.pos, self.what = memoryview(raw), 0, what

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.raw):
            raise WireError(f"{self.what} request truncated ({len(self.raw)} bytes)")
        out = self.raw[self.pos:end]
        self.pos = end
        return out

    def u32(self) -> int:
        return _U32.unpack(self.take(4))[0]

    def array(self, dtype: str, n: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        return np.frombuffer(self.take(n * size), dtype=dtype).astype(dtype.replace("<", "="), copy=True)

    def count(self, n: int, limit: int, name: str) -> int:
        if n > limit:
            raise WireError(f"{self.what}: {name} {n} exceeds the limit of {limit}")
        return n


# -- /v1/expert/batch (binary) ------------------------------------------------------------------

def encode_expert_request(items: list[tuple[int, int, np.ndarray]]) -> bytes:
    hidden = len(items[0][2]) if items else 0
    out = [_U32.pack(len(items)), _U32.pack(hidden)]
    for layer, expert, residual in items:
        out += [_U32.pack(layer), _U32.pack(expert), np.asarray(residual, "<f4").tobytes()]
    return b"".join(out)


def decode_expert_request(raw: bytes) -> list[tuple[int, int, np.ndarray]]:
    r = _Reader(raw, "binary expert")
    n = r.count(r.u32(), MAX_ITEMS, "item count")
    hidden = r.count(r.u32(), MAX_HIDDEN, "hidden size")
    if len(raw) < 8 + n * (8 + 4 * hidden):
        raise WireError(f"binary expert request truncated ({len(raw)} bytes for {n} items of {hidden})")
    return [(r.u32(), r.u32(), r.array("<f4", hidden)) for _ in range(n)]


def encode_expert_response(results: list[tuple[int, int, np.ndarray]], latency_ms: float) -> bytes:
    hidden = len(results[0][2]) if results else 0
    out = [_U32.pack(len(results)), _U32.pack(hidden), _F32.pack(latency_ms)]
    for layer, expert, output in results:
        out += [_U32.pack(layer), _U32.pack(expert), np.asarray(output, "<f4").tobytes()]
    return b"".join(out)


def decode_expert_response(raw: bytes) -> list[tuple[int, int, np.ndarray]]:
    r = _Reader(raw, "binary expert response")
    n, hidden = r.u32(), r.u32()
    r.take(4)
    if len(raw) < 12 + n * (8 + 4 * hidden):
        raise WireError("binary expert response truncated")
    return [(r.u32(), r.u32(), r.array("<f4", hidden)) for _ in range(n)]


# -- /v1/experts/layer-batch[-f16] ---------------------------------------------------------------

def encode_layer_request(task: ExpertTask, f16: bool = False) -> bytes:
    res = np.asarray(task.residual, "<f2" if f16 else "<f4")
    routing = np.empty(len(task.ids), dtype=[("id", "<u4"), ("w", "<f4")])
    routing["id"], routing["w"] = task.ids, task.weights
    return b"".join([_U32.pack(task.layer), _U32.pack(res.size), _U32.pack(len(task.ids)), res.tobytes(),
                     routing.tobytes()])


def decode_layer_request(raw: bytes, f16: bool = False) -> ExpertTask:
    r = _Reader(raw, "layer-batch-f16" if f16 else "layer-batch")
    layer, hidden, k = r.u32(), r.count(r.u32(), MAX_HIDDEN, "hidden size"), r.count(r.u32(), MAX_ITEMS, "K")
    residual = r.array("<f2" if f16 else "<f4", hidden).astype(np.float32)
    routing = np.frombuffer(r.take(8 * k), dtype=[("id", "<u4"), ("w", "<f4")])
    return ExpertTask(layer, residual, [int(e) for e in routing["id"]], [float(w) for w in routing["w"]])


def encode_layer_response(out: np.ndarray, latency_ms: float, f16: bool = False) -> bytes:
    v = np.asarray(out, "<f2" if f16 else "<f4")
    return _U32.pack(v.size) + _F32.pack(latency_ms) + v.tobytes()


def decode_layer_response(raw: bytes, f16: bool = False) -> np.ndarray:
    r = _Reader(raw, "layer-batch response")
    hidden = r.u32()
    r.take(4)
    return r.array("<f2" if f16 else "<f4", hidden).astype(np.float32)


# -- /v1/experts/multi-layer-batch[-q8k] ---------------------------------------------------------

def encode_multi_request(tasks: list[ExpertTask]) -> bytes:
    out = [_U32.pack(len(tasks))]
    for t in tasks:
        if t.q8k is not None:
            hidden = t.q8k.qs.size
            body = [t.q8k.qs.astype("i1").tobytes(), t.q8k.d.astype("<f4").tobytes(),
                    t.q8k.sums.astype("<i2").tobytes()]
        else:
            res = np.asarray(t.residual, "<f4")
            hidden, body = res.size, [res.tobytes()]
        out += [_U32.pack(t.layer), _U32.pack(hidden), _U32.pack(len(t.ids)), *body,
                np.asarray(t.ids, "<u4").tobytes(), np.asarray(t.weights, "<f4").tobytes()]
    return b"".join(out)


def decode_multi_request(raw: bytes, q8k: bool = False) -> list[ExpertTask]:
    r = _Reader(raw, "multi-layer-batch-q8k" if q8k else "multi-layer-batch")
    n = r.count(r.u32(), MAX_ITEMS, "task count")
    tasks = []
    for _ in range(n):
        layer, hidden, k = r.u32(), r.count(r.u32(), MAX_HIDDEN, "hidden size"), r.count(r.u32(), MAX_ITEMS, "K")
        residual = act = None
        if q8k:
            if hidden % BLOCK:
                raise WireError(f"multi-layer-batch-q8k: hidden {hidden} is not a multiple of {BLOCK}")
            nb = hidden // BLOCK
            act = Q8KActivation(r.array("i1", hidden), r.array("<f4", nb), r.array("<i2", nb * SUBBLOCKS))
        else:
            residual = r.array("<f4", hidden)
        ids = [int(e) for e in r.array("<u4", k)]
        weights = [float(w) for w in r.array("<f4", k)]
        tasks.append(ExpertTask(layer, residual, ids, weights, act))
    return tasks


def encode_multi_response(results: list[tuple[int, np.ndarray]]) -> bytes:
    out = [_U32.pack(len(results))]
    for layer, h in results:
        v = np.asarray(h, "<f4")
        out += [_U32.pack(layer), _U32.pack(v.size), v.tobytes()]
    return b"".join(out)


def decode_multi_response(raw: bytes) -> list[tuple[int, np.ndarray]]:
    r = _Reader(raw, "multi-layer-batch response")
    n = r.count(r.u32(), MAX_ITEMS, "result count")
    out = []
    for _ in range(n):
        layer, hidden = r.u32(), r.count(r.u32(), MAX_HIDDEN, "hidden size")
        out.append((layer, r.array("<f4", hidden)))
    return out
