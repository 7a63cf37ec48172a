"""GET /v1/describe: LARQL's parameters and defaults (min_score 5.0, edges by score, one per
lower-cased target), modelql's adaptive threshold and LQL variant on request; ETags per overlay epoch."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from .body import JsonRoute
from .errors import HttpError, ServiceUnavailable
from .knowledge_base import (ERRORS, MAX_LIMIT, DESCRIBE_CACHE, Scope, _can_run_model, _on_model, _r, _scope, _st,
                             _text, _vindex, check_layer)

router = APIRouter(tags=["knowledge"], route_class=JsonRoute)

# -- /v1/describe ---------------------------------------------------------------------------------------

def describe_args(band: str, limit: int, min_score: float | None, mode: str | None,
                  relations_only: bool = False) -> dict[str, Any]:
    """`knowledge.describe` keyword arguments of a `/v1/describe` query (the server variant, A§5):
    K = limit, light token filter, probe labels only; `min_score` absent ⇒ adaptive threshold."""
    b = (band or "knowledge").lower()
    return dict(band=None if b == "all" else b, k=limit, threshold=min_score, mode=mode or "auto",
                token_filter="light", probe_only=True, relations_only=relations_only)


LARQL_MIN_SCORE = 5.0


def describe_threshold(min_score: str | None, variant: str) -> float | None:
    """`min_score` → `knowledge.describe`'s threshold: absent = LARQL's 5.0 (variant=server) or the
    adaptive threshold (variant=lql); `adaptive` = None (modelql's scale-free per-layer z)."""
    if min_score is None:
        return LARQL_MIN_SCORE if variant == "server" else None
    if min_score.strip().lower() == "adaptive":
        return None
    try:
        value = float(min_score)
    except ValueError:
        raise HttpError(400, f"invalid value for 'min_score': {min_score!r} (a number, or 'adaptive')",
                        code="invalid_value", param="min_score") from None
    if not math.isfinite(value):
        raise HttpError(400, "min_score must be a finite number", code="invalid_value", param="min_score")
    return value


def larql_edges(edges: list[dict]) -> list[dict]:
    """LARQL's edge order: by gate score, highest first, one edge per target (compared lower-cased,
    the highest-scoring kept) — labelled or not."""
    seen: set[str] = set()
    out = []
    for e in sorted(edges, key=lambda e: -float(e["gate"])):
        key = str(e["target"]).strip().lower()
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
    return out


def describe_json(result, limit: int | None, verbose: bool, bands: bool = False,
                  larql_order: bool = False) -> dict[str, Any]:
    """The spec's `/v1/describe` body from a `DescribeResult` (its rows' `to_json()`); `bands`
    (variant=lql) adds each edge's section so a remote LQL DESCRIBE renders as a local one;
    `larql_order` sorts and dedupes as LARQL does (`larql_edges`)."""
    edges = []
    rows = result.to_json()["edges"]
    if larql_order:
        rows = larql_edges(rows)
    for e in rows[:limit]:
        row: dict[str, Any] = {"target": e["target"], "gate_score": _r(e["gate"], 1), "layer": e["layer"]}
        if e["relation"]:
            row["relation"] = e["relation"]
            if e["source"]:
                row["source"] = e["source"]
        if e["also"]:
            row["also"] = e["also"][:3]
        if verbose:
            row.update(layer_min=e["layer_min"], layer_max=e["layer_max"], count=e["count"])
        if bands:
            row["band"] = e["band"]
            for k in ("confidence", "confident", "patch"):  # calibrated claims, overlay facts
                if e.get(k) is not None:
                    row[k] = _r(e[k], 4) if k == "confidence" else e[k]
            if e.get("decoded"):  # a relation probe's decoded answer (the claims DESCRIBE calibrates)
                row["decoded"] = True
        edges.append(row)
    body = {"entity": result.entity, "model": result.model, "edges": edges,
            "mode": result.mode, "unit": result.unit, "threshold": result.threshold, "found": result.found,
            "max_gate": _r(result.max_gate, 4), "signal": result.signal,
            "bands": {k: list(v) for k, v in result.bands.items()}, "total": len(result.edges),
            "latency_ms": _r(result.latency_ms, 1)}
    for k in ("known", "note", "suggestion"):
        if getattr(result, k, None) is not None:
            body[k] = getattr(result, k)
    return body


def _mode_for(st, mode: str | None) -> str:
    m = (mode or "auto").lower()
    if m not in ("auto", "embedding", "residual"):
        raise HttpError(400, f"unknown mode {mode!r} (use auto, embedding or residual)")
    if not _can_run_model(st):
        if m == "residual":
            reason = st.config.unavailable_reason("residual describe", "generate") or "model is still loading"
            raise ServiceUnavailable(reason)
        return "embedding"
    return m


async def run_describe(st, vx, entity: str, scope: Scope | None = None, **kw):
    """`knowledge.describe` on the right thread: residual mode runs the served model."""
    from .. import knowledge
    from ..knowledge.describe import resolve_mode

    if resolve_mode(vx, kw.get("mode")) == "residual":
        pick = scope.model if scope is not None else (lambda m: m)
        return await _on_model(st, lambda m: knowledge.describe(vx, entity, model=pick(m), **kw))
    return await run_in_threadpool(lambda: knowledge.describe(vx, entity, **kw))


def _etag(body: dict, epoch: int) -> str:
    stable = {k: v for k, v in body.items() if k != "latency_ms"}
    h = hashlib.sha256(json.dumps(stable, sort_keys=True).encode() + f"|{epoch}".encode()).hexdigest()[:32]
    return f'"{h}"'


@router.get("/v1/describe", responses={**ERRORS, 304: {"description": "not modified (If-None-Match)"}})
async def describe(request: Request,
                   entity: str = Query(..., description="the entity to describe"),
                   band: Literal["syntax", "knowledge", "output", "all"] = "knowledge",
                   verbose: bool = False,
                   limit: int = Query(20, ge=1, le=MAX_LIMIT),
                   min_score: str | None = Query(None, description="absolute gate threshold; default 5.0 (LARQL); "
                                                 "`adaptive` (modelql): the scale-free per-layer z threshold "
                                                 "(the default of variant=lql)"),
                   mode: Literal["auto", "embedding", "residual"] = "auto",
                   relations_only: bool = False,
                   layer: int | None = Query(None, description="modelql: scan only this layer (LQL AT LAYER)"),
                   variant: Literal["server", "lql"] = Query(
                       "server", description="modelql: `lql` = LQL DESCRIBE semantics (per-layer K 20, content "
                                             "tokens, cluster labels as fallback, every edge with its band; "
                                             "`limit` caps the edges returned) — what USE REMOTE sends")):
    st = _st(request)
    vx = _vindex(request, "/v1/describe")
    if not entity.strip():
        raise HttpError(400, "missing entity")
    _text(entity, "entity")
    threshold = describe_threshold(min_score, variant)
    scope = _scope(request)
    if variant == "lql":
        b = band.lower()
        kw = dict(band=None if b == "all" else b, threshold=threshold, mode=_mode_for(st, mode),
                  relations_only=relations_only)
    else:
        kw = describe_args(band, limit, threshold, _mode_for(st, mode), relations_only)
    if layer is not None:
        check_layer(layer, vx.num_layers)
        kw["layer"] = layer
    result = await run_describe(st, vx, entity, scope=scope, knn_entries=scope.knn(), **kw)
    body = describe_json(result, limit, verbose, bands=variant == "lql", larql_order=variant == "server")
    tag = _etag(body, scope.epoch)
    headers = {"ETag": tag, "Cache-Control": "no-cache" if scope.patched or scope.sid else DESCRIBE_CACHE}
    inm = request.headers.get("if-none-match")
    if inm is not None and (inm.strip() == "*" or tag in [t.strip() for t in inm.split(",")]):
        return Response(status_code=304, headers=headers)
    return JSONResponse(body, headers=headers)


