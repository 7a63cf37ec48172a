"""The `/v1/walk-ffn` wire (server-api.md §5): one module for every byte of it.

Requests are always f32; responses are f32, f16 or i8 (negotiated by `Accept`, §5.3), in the
single-layer or the batch frame (marker 0xFFFFFFFF). Everything here is pure: bytes ⇄ typed
records, numpy arrays inside. Any malformed input raises `WireError` (HTTP 400 with the message),
never anything else — the decoder is fuzzed to hold to that.

    request  single  [layer u32][seq_len u32][flags u32][top_k u32][f32 × seq_len·H]
    request  batch   [0xFFFFFFFF][n u32][layer u32 × n][seq_len u32][flags u32][top_k u32][f32 × N]
    response single  [layer u32][seq_len u32][latency_ms f32][values]
    response batch   [0xFFFFFFFF][n u32][latency_ms f32] n × {[layer u32][seq_len u32][count u32][values]}

values: f32 × N; f16 × N (IEEE binary16); i8: per position `[scale f32][zero_point f32 = 0][q i8 × H]`.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from ..errors import WireError

MEDIA_F32 = "application/x-larql-ffn"
MEDIA_F16 = "application/x-larql-ffn-f16"
MEDIA_I8 = "application/x-larql-ffn-i8"
MEDIA = {"f32": MEDIA_F32, "f16": MEDIA_F16, "i8": MEDIA_I8}
DTYPE_OF_MEDIA = {v: k for k, v in MEDIA.items()}
WIRE_DTYPES = ("f32", "f16", "i8")
BATCH_MARKER = 0xFFFFFFFF
DEFAULT_TOP_K = 8092
FLAG_FULL_OUTPUT = 1
MAX_LAYERS_PER_FRAME = 1 << 16

_U32 = struct.Struct("<I")
_REQ_TAIL = struct.Struct("<III")  # seq_len, flags, top_k
_RESP_HEAD = struct.Struct("<IIf")  # layer | marker, seq_len | n, latency_ms
_ENTRY_HEAD = struct.Struct("<III")  # layer, seq_len, count
_I8_BLOCK_HEAD = struct.Struct("<ff")  # scale, zero_point


@dataclass
class FfnRequest:
    """One walk-ffn request, JSON or binary: layers in request order, rows `[seq_len, H]` flattened."""

    layers: list[int]
    residual: np.ndarray  # float32, flat, seq_len·H (full output) or H (features only)
    seq_len: int = 1
    full_output: bool = True
    top_k: int = DEFAULT_TOP_K
    batch: bool = False  # the request named a list of layers (batch frame / "layers")
    model_id: str | None = None

    def rows(self, hidden_size: int) -> np.ndarray:
        """The residual as [rows, H] (rows = seq_len with full output, else 1)."""
        return self.residual.reshape(-1, hidden_size)


@dataclass
class FfnResult:
    layer: int
    seq_len: int
    output: np.ndarray  # float32, flat, seq_len·H


@dataclass
class FfnResponse:
    results: list[FfnResult]
    latency_ms: float = 0.0
    dtype: str = "f32"
    nbytes: int = field(default=0, compare=False)  # body size on the wire (decoded responses)


# -- validation shared by both forms --------------------------------------------------------------

def validate(req: FfnRequest, hidden_size: int, num_layers: int, owned: tuple[int, int] | None = None) -> None:
    """The §5.1 checks, in the reference's order; raises `WireError` with the spec's messages."""
    if not req.layers:
        raise WireError("empty layer list")
    if req.full_output and req.seq_len == 0:
        raise WireError("seq_len must be >= 1")
    expected = req.seq_len * hidden_size if req.full_output else hidden_size
    if req.residual.size != expected:
        raise WireError(f"residual has {req.residual.size} elements, expected {expected} "
                        f"(seq_len={req.seq_len if req.full_output else 1} * hidden_size={hidden_size})")
    for layer in req.layers:
        if not 0 <= layer < num_layers:
            raise WireError(f"layer {layer} out of range (num_layers = {num_layers})")
        if owned is not None and not owned[0] <= layer <= owned[1]:
            raise WireError(f"layer {layer} not served by this shard (owned: {owned[0]}–{owned[1]})")
    if not np.isfinite(req.residual).all():
        raise WireError("residual must contain only finite numbers")


# -- requests --------------------------------------------------------------------------------------

def _f32(a: np.ndarray | Sequence[float]) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(a, dtype="<f4")).reshape(-1)


def encode_request(layers: Sequence[int] | int, residual: np.ndarray, *, seq_len: int | None = None,
                   top_k: int = DEFAULT_TOP_K, batch: bool | None = None) -> bytes:
    """A binary request (always full output). `residual` is [seq_len, H] or flat with `seq_len` given;
    a single int layer (or `batch=False`) gives the single frame."""
    if isinstance(layers, int):
        layers = [layers]
    layers = [int(x) for x in layers]
    if not layers:
        raise WireError("empty layer list")
    arr = np.asarray(residual)
    if seq_len is None:
        seq_len = arr.shape[0] if arr.ndim == 2 else 1
    data = _f32(arr).tobytes()
    tail = _REQ_TAIL.pack(seq_len, FLAG_FULL_OUTPUT, top_k)
    if batch is None:
        batch = len(layers) > 1
    if not batch:
        if len(layers) != 1:
            raise WireError("a single frame carries exactly one layer")
        if layers[0] == BATCH_MARKER:
            raise WireError(f"layer {layers[0]} cannot be sent in a single frame")
        return _U32.pack(layers[0]) + tail + data
    return struct.pack(f"<II{len(layers)}I", BATCH_MARKER, len(layers), *layers) + tail + data


def decode_request(body: bytes) -> FfnRequest:
    """Parse a binary request frame (structure only: `validate` checks it against the model)."""
    if len(body) < 16:
        raise WireError("binary: body too short (need ≥ 16 bytes)")
    (first,) = _U32.unpack_from(body, 0)
    if first == BATCH_MARKER:
        (n,) = _U32.unpack_from(body, 4)
        if n > MAX_LAYERS_PER_FRAME:
            raise WireError(f"binary batch: {n} layers in one frame (limit {MAX_LAYERS_PER_FRAME})")
        end = 8 + 4 * n
        if len(body) < end:
            raise WireError(f"binary batch: body too short for {n} layer indices")
        layers = list(struct.unpack_from(f"<{n}I", body, 8))
        batch = True
    else:
        layers, end, batch = [first], 4, False
    if len(body) < end + 12:
        raise WireError("binary: truncated fixed header (seq_len/flags/top_k)")
    seq_len, flags, top_k = _REQ_TAIL.unpack_from(body, end)
    if not flags & FLAG_FULL_OUTPUT:
        raise WireError("binary wire format requires full_output = true")
    payload = memoryview(body)[end + 12:]
    if len(payload) % 4:
        raise WireError("binary: residual byte length is not a multiple of 4")
    residual = np.frombuffer(payload, dtype="<f4").astype(np.float32)
    return FfnRequest(layers, residual, seq_len, True, top_k, batch)


def parse_json_request(data: Any) -> FfnRequest:
    """The JSON form (§5.1) as an `FfnRequest`; shape errors raise `WireError`."""
    if not isinstance(data, dict):
        raise WireError("the request body must be a JSON object (Content-Type: application/json)")
    layer, layers = data.get("layer"), data.get("layers")
    if layers is not None:
        if not isinstance(layers, list) or not all(_is_int(x) for x in layers):
            raise WireError("invalid value for 'layers': expected a list of integers")
        if not layers:
            raise WireError("empty layer list")
        names, batch = [int(x) for x in layers], len(layers) > 1
    elif layer is not None:
        if not _is_int(layer):
            raise WireError("invalid value for 'layer': expected an integer")
        names, batch = [int(layer)], False
    else:
        raise WireError("must provide 'layer' or 'layers'")
    residual = data.get("residual")
    if residual is None:
        raise WireError("missing required parameter: 'residual'")
    if not isinstance(residual, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                 for x in residual):
        raise WireError("invalid value for 'residual': expected a list of numbers")
    seq_len = data.get("seq_len", 1)
    top_k = data.get("top_k", DEFAULT_TOP_K)
    full = data.get("full_output", False)
    if not _is_int(seq_len) or seq_len < 0:
        raise WireError("invalid value for 'seq_len': expected a non-negative integer")
    if not _is_int(top_k) or top_k < 0:
        raise WireError("invalid value for 'top_k': expected a non-negative integer")
    if not isinstance(full, bool):
        raise WireError("invalid value for 'full_output': expected a boolean")
    mid = data.get("model_id")
    with np.errstate(over="ignore"):
        arr = np.asarray(residual, dtype=np.float64).astype(np.float32)
    return FfnRequest(names, arr, int(seq_len), full, int(top_k), batch, mid if isinstance(mid, str) else None)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**32


# -- response dtype negotiation ----------------------------------------------------------------------

def negotiate(accept: str | None, i8_enabled: bool = False, f16_enabled: bool = True) -> str:
    """§5.3: i8 if asked and enabled, else f16 if asked and not disabled, else f32."""
    a = (accept or "").lower()
    if MEDIA_I8 in a and i8_enabled:
        return "i8"
    if MEDIA_F16 in a and f16_enabled:
        return "f16"
    return "f32"


def accept_header(dtype: str) -> str:
    """What a client sends to ask for `dtype` (and accept the narrower fallbacks)."""
    if dtype == "i8":
        return f"{MEDIA_I8}, {MEDIA_F16}, {MEDIA_F32}"
    if dtype == "f16":
        return f"{MEDIA_F16}, {MEDIA_F32}"
    if dtype == "f32":
        return MEDIA_F32
    raise WireError(f"unknown wire dtype {dtype!r} (use f32, f16 or i8)")


# -- value arrays ----------------------------------------------------------------------------------

def quantize_i8(values: np.ndarray, hidden_size: int) -> bytes:
    """Per position: `[scale f32][0.0 f32][q i8 × H]`, scale = max|x|/127 (1.0 if all zero)."""
    x = np.asarray(values, dtype=np.float32).reshape(-1, hidden_size)
    peak = np.abs(x).max(axis=1) if x.size else np.zeros(x.shape[0], np.float32)
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        v = x / scale[:, None]
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127)
    q = np.nan_to_num(q, nan=0.0).astype(np.int8)
    rows = np.empty((x.shape[0], 8 + hidden_size), dtype=np.uint8)
    rows[:, :4] = scale.astype("<f4").view(np.uint8).reshape(-1, 4)
    rows[:, 4:8] = 0
    rows[:, 8:] = q.view(np.uint8)
    return rows.tobytes()


def dequantize_i8(buf: memoryview | bytes, positions: int, hidden_size: int) -> np.ndarray:
    rows = np.frombuffer(buf, dtype=np.uint8).reshape(positions, 8 + hidden_size)
    scale = rows[:, :4].copy().view("<f4").reshape(-1)
    zero = rows[:, 4:8].copy().view("<f4").reshape(-1)
    q = rows[:, 8:].view(np.int8).astype(np.float32)
    return ((q - zero[:, None]) * scale[:, None]).reshape(-1)


def encode_values(values: np.ndarray, dtype: str, hidden_size: int) -> bytes:
    if dtype == "f32":
        return _f32(values).tobytes()
    if dtype == "f16":
        with np.errstate(over="ignore"):
            return np.asarray(values, dtype=np.float32).astype("<f2").tobytes()
    if dtype == "i8":
        return quantize_i8(values, hidden_size)
    raise WireError(f"unknown wire dtype {dtype!r} (use f32, f16 or i8)")


def values_nbytes(count: int, dtype: str, hidden_size: int) -> int:
    if dtype == "f32":
        return 4 * count
    if dtype == "f16":
        return 2 * count
    return (count // hidden_size) * (8 + hidden_size)


def decode_values(buf: memoryview | bytes, count: int, dtype: str, hidden_size: int) -> np.ndarray:
    if dtype == "f32":
        return np.frombuffer(buf, dtype="<f4").astype(np.float32)
    if dtype == "f16":
        return np.frombuffer(buf, dtype="<f2").astype(np.float32)
    return dequantize_i8(buf, count // hidden_size, hidden_size)


# -- responses ---------------------------------------------------------------------------------------

def encode_response(results: Sequence[FfnResult], latency_ms: float, dtype: str, hidden_size: int) -> bytes:
    """One result ⇒ the single frame; several ⇒ the batch frame (results in request order)."""
    if len(results) == 1:
        r = results[0]
        return _RESP_HEAD.pack(r.layer, r.seq_len, latency_ms) + encode_values(r.output, dtype, hidden_size)
    parts = [_RESP_HEAD.pack(BATCH_MARKER, len(results), latency_ms)]
    for r in results:
        parts.append(_ENTRY_HEAD.pack(r.layer, r.seq_len, int(r.output.size)))
        parts.append(encode_values(r.output, dtype, hidden_size))
    return b"".join(parts)


def decode_response(body: bytes, dtype: str, hidden_size: int) -> FfnResponse:
    """Parse a binary response of `dtype` for a model of width `hidden_size`; `WireError` if malformed."""
    if dtype not in WIRE_DTYPES:
        raise WireError(f"unknown wire dtype {dtype!r} (use f32, f16 or i8)")
    if hidden_size < 1:
        raise WireError("hidden_size must be >= 1")
    view = memoryview(body)
    if len(view) < 12:
        raise WireError(f"binary response: {len(view)} bytes, need ≥ 12")
    first, second, latency = _RESP_HEAD.unpack_from(view, 0)
    if first != BATCH_MARKER:
        count = second * hidden_size
        size = values_nbytes(count, dtype, hidden_size)
        if len(view) - 12 != size:
            raise WireError(f"binary response: layer {first} with seq_len {second} needs {size} value bytes "
                            f"({dtype}, hidden_size {hidden_size}), got {len(view) - 12}")
        out = decode_values(view[12:], count, dtype, hidden_size)
        return FfnResponse([FfnResult(first, second, out)], float(latency), dtype, len(view))
    results, pos = [], 12
    for i in range(second):
        if len(view) < pos + 12:
            raise WireError(f"binary response: truncated header of result {i} of {second}")
        layer, seq_len, count = _ENTRY_HEAD.unpack_from(view, pos)
        pos += 12
        if count != seq_len * hidden_size:
            raise WireError(f"binary response: result {i} (layer {layer}) has count {count}, expected "
                            f"seq_len {seq_len} × hidden_size {hidden_size}")
        size = values_nbytes(count, dtype, hidden_size)
        if len(view) < pos + size:
            raise WireError(f"binary response: result {i} (layer {layer}) truncated")
        results.append(FfnResult(layer, seq_len, decode_values(view[pos:pos + size], count, dtype, hidden_size)))
        pos += size
    if pos != len(view):
        raise WireError(f"binary response: {len(view) - pos} trailing bytes")
    return FfnResponse(results, float(latency), dtype, len(view))


def json_response(results: Sequence[FfnResult], latency_ms: float) -> dict[str, Any]:
    """The JSON full-output form (§5.1): single for one result, else `results` + `seq_len`."""
    lat = round(latency_ms, 1)
    if len(results) == 1:
        r = results[0]
        return {"layer": r.layer, "output": r.output.tolist(), "seq_len": r.seq_len, "latency_ms": lat}
    return {"results": [{"layer": r.layer, "output": r.output.tolist(), "seq_len": r.seq_len} for r in results],
            "seq_len": results[0].seq_len, "latency_ms": lat}


def json_features(layers: Sequence[int], hits: Sequence[Sequence[tuple[int, float]]], latency_ms: float
                  ) -> dict[str, Any]:
    """The JSON features-only form: per layer the gate-KNN feature ids and scores (2 dp)."""
    def one(layer, h):
        return {"layer": layer, "features": [f for f, _ in h],
                "scores": [round(s, 2) if math.isfinite(s) else None for _, s in h]}

    lat = round(latency_ms, 1)
    if len(layers) == 1:
        return {**one(layers[0], hits[0]), "latency_ms": lat}
    return {"results": [one(l, h) for l, h in zip(layers, hits)], "latency_ms": lat}


__all__ = ["BATCH_MARKER", "FfnRequest", "FfnResponse", "FfnResult", "MEDIA", "MEDIA_F16", "MEDIA_F32", "MEDIA_I8",
           "WIRE_DTYPES", "WireError", "accept_header", "decode_request", "decode_response", "encode_request",
           "encode_response", "json_features", "json_response", "negotiate", "parse_json_request", "validate"]
