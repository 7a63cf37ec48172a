"""`POST /v1/walk-ffn` (server-api.md §5): the FFN of the requested layers for a client's rows;
`POST /v1/walk-ffn-q8k`: the same FFN for rows the client normalised and quantised to Q8_K
(LARQL's protocol, `q8k_wire`).

A thin edge: body → `wire.FfnRequest` (binary frame or JSON) → `wire.validate` against the served
model and the shard's `--layers` → `ffn_outputs` (the served model's FFN backend: dense, or the
overlay-aware `PatchedFfn` once patches exist; a session's own overlay with `X-Session-Id`) →
the response in the request's form, binary values in the dtype negotiated from `Accept`.
Every malformed input is a 400 `{"error": ...}`, never a 500. Features-only JSON requests
(`full_output: false`) answer the gate KNN of the first row from the served vindex.
"""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..server.body import OFFLOAD_BYTES, BodyError, JsonRoute, read_json
from ..server.errors import ServiceUnavailable
from . import q8k_wire, wire

router = APIRouter(tags=["remote ffn"], route_class=JsonRoute)

_BINARY_TYPES = (wire.MEDIA_F32, wire.MEDIA_F16, wire.MEDIA_I8)


def ffn_outputs(model, layers: Sequence[int], rows: np.ndarray) -> list[np.ndarray]:
    """`FFN_L(rows)` for each layer: the raw FFN output (no post-FFN norm, no residual add)."""
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(rows, dtype=np.float32)).to(model.dtype)
        return [model.ffn.forward(layer, x).float().numpy().reshape(-1) for layer in layers]


def _parse(raw: bytes, binary: bool) -> wire.FfnRequest:
    if binary:
        return wire.decode_request(raw)
    try:
        data = read_json(raw or b"null")
    except BodyError as exc:
        raise wire.WireError(f"We could not parse the JSON body of your request: {exc.msg}") from None
    return wire.parse_json_request(data)


def owned_layers(st, model) -> tuple[int, int] | None:
    owned = st.config.owned_layers
    return owned if owned is not None else getattr(model, "owned", None)


def _model_for(request: Request, model):
    """The session's overlay-aware model for `X-Session-Id`, else the served one."""
    if request.headers.get("x-session-id") is None:
        return model
    from ..server.knowledge_routes import _scope

    return _scope(request).model(model)


def _features(request: Request, req: wire.FfnRequest, hidden: int):
    from ..server.knowledge_routes import _scope

    view = _scope(request).view()
    q = torch.from_numpy(req.residual[:hidden].copy())
    out = [[(h.feature, h.score) for h in view.gate_knn(layer, q, k=max(1, req.top_k))] for layer in req.layers]
    for layer, hits in zip(req.layers, out):
        if not all(np.isfinite(s) for _f, s in hits):
            raise _overflow(layer)
    return out


def _overflow(layer: int) -> wire.WireError:
    return wire.WireError(f"the FFN of layer {layer} overflows float32 on this residual (non-finite output): "
                          f"its values are too large for this model")


@router.post("/v1/walk-ffn", responses={
    400: {"description": "malformed request, unknown or unowned layer"},
    503: {"description": "not served in this mode, or still loading"}},
    openapi_extra={"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"type": "object"}},
        wire.MEDIA_F32: {"schema": {"type": "string", "format": "binary"}}}}})
async def walk_ffn(request: Request):
    t0 = time.perf_counter()
    st = request.app.state.modelql
    reason = st.config.unavailable_reason("/v1/walk-ffn", "walk_ffn")
    if reason:
        raise ServiceUnavailable(reason)
    model = st.require_model()
    raw = await request.body()
    binary = request.headers.get("content-type", "").split(";")[0].strip().lower() in _BINARY_TYPES
    offload = len(raw) >= OFFLOAD_BYTES  # a large frame is parsed and computed off the event loop
    req = await run_in_threadpool(_parse, raw, binary) if offload else _parse(raw, binary)
    spec = model.spec
    hidden = spec.hidden_size
    wire.validate(req, hidden, spec.num_layers, owned_layers(st, model))
    if not req.full_output:
        hits = await run_in_threadpool(_features, request, req, hidden)
        return JSONResponse(wire.json_features(req.layers, hits, (time.perf_counter() - t0) * 1e3))
    target = _model_for(request, model)
    if st.config.ffn_only and not offload:  # a small frame on a shard: skip the thread hop (~1 ms of work)
        outs = ffn_outputs(target, req.layers, req.rows(hidden))
    else:  # keep the event loop free (health checks, other clients, the streams of a full server)
        outs = await run_in_threadpool(ffn_outputs, target, req.layers, req.rows(hidden))
    for layer, out in zip(req.layers, outs):
        if not np.isfinite(out).all():
            raise _overflow(layer)
    results = [wire.FfnResult(layer, req.seq_len, out) for layer, out in zip(req.layers, outs)]
    latency = (time.perf_counter() - t0) * 1e3
    if not binary:
        return JSONResponse(wire.json_response(results, latency))
    cfg = st.config
    dtype = wire.negotiate(request.headers.get("accept"), getattr(cfg, "i8_wire", False),
                           getattr(cfg, "f16_wire", True))
    return Response(wire.encode_response(results, latency, dtype, hidden), media_type=wire.MEDIA[dtype])


def _q8k_outputs(model, entries: list[q8k_wire.Q8KEntry]) -> list[np.ndarray]:
    """Each entry's raw FFN output; consecutive entries of one layer run as one batch."""
    outs: list[np.ndarray] = []
    i = 0
    while i < len(entries):
        j = i
        while j < len(entries) and entries[j].layer == entries[i].layer:
            j += 1
        rows = np.stack([e.act.dequantize() for e in entries[i:j]])
        (flat,) = ffn_outputs(model, [entries[i].layer], rows)
        outs.extend(flat.reshape(j - i, -1))
        i = j
    return outs


def _q8k_validate(entries: list[q8k_wire.Q8KEntry], hidden: int, num_layers: int,
                  owned: tuple[int, int] | None) -> None:
    for e in entries:
        if not 0 <= e.layer < num_layers:
            raise wire.WireError(f"layer {e.layer} out of range (num_layers = {num_layers})")
        if owned is not None and not owned[0] <= e.layer <= owned[1]:
            raise wire.WireError(f"layer {e.layer} not served by this shard (owned: {owned[0]}–{owned[1]})")
        if e.act.n_blocks * q8k_wire.BLOCK != hidden:
            raise wire.WireError(
                f"layer {e.layer}: {e.act.n_blocks} Q8_K blocks carry {e.act.n_blocks * q8k_wire.BLOCK} values, "
                f"this model's hidden size is {hidden}"
                + ("" if hidden % q8k_wire.BLOCK == 0 else
                   f" (not a multiple of {q8k_wire.BLOCK}: use /v1/walk-ffn)"))
        if not np.isfinite(e.act.d).all():
            raise wire.WireError(f"layer {e.layer}: Q8_K scales must be finite numbers")


@router.post("/v1/walk-ffn-q8k", responses={
    200: {"description": "per entry, the raw FFN output (f32)",
          "content": {q8k_wire.MEDIA_Q8K: {"schema": {"type": "string", "format": "binary"}}}},
    400: {"description": "malformed frame, unknown or unowned layer, block count not the hidden size"},
    503: {"description": "not served in this mode, or still loading"}},
    openapi_extra={"requestBody": {"required": True, "content": {
        q8k_wire.MEDIA_Q8K: {"schema": {"type": "string", "format": "binary"}}}}})
async def walk_ffn_q8k(request: Request):
    """LARQL's Q8K-prenormed FFN batch: rows already normalised for the FFN and quantised to Q8_K."""
    st = request.app.state.modelql
    reason = st.config.unavailable_reason("/v1/walk-ffn-q8k", "walk_ffn")
    if reason:
        raise ServiceUnavailable(reason)
    model = st.require_model()
    raw = await request.body()
    entries = await run_in_threadpool(q8k_wire.decode_request, raw) if len(raw) >= OFFLOAD_BYTES \
        else q8k_wire.decode_request(raw)
    spec = model.spec
    _q8k_validate(entries, spec.hidden_size, spec.num_layers, owned_layers(st, model))
    outs = await run_in_threadpool(_q8k_outputs, _model_for(request, model), entries) if entries else []
    for e, out in zip(entries, outs):
        if not np.isfinite(out).all():
            raise _overflow(e.layer)
    body = q8k_wire.encode_response([(e.layer, out) for e, out in zip(entries, outs)])
    return Response(body, media_type=q8k_wire.MEDIA_Q8K)
