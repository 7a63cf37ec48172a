"""`POST /v1/walk-ffn` (server-api.md §5): the FFN of the requested layers for a client's rows.

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
from . import wire

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
