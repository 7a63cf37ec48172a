"""The knowledge group (LARQL-compatible paths, field names, defaults and status codes; docs/api.md).

This module's router serves stats, warmup, walk, select, relations, infer and explain-infer and
includes the others: `describe_routes`, `edit_routes` (insert, patches), `embed_routes` (embed,
logits, tokens); what they share is `knowledge_base`.

Every route is a thin edge over `modelql.knowledge` — the same functions LQL calls: query or
body → arguments → `knowledge.describe / walk / select / relations / stats / infer /
explain_infer` → the rows' `to_json()` → the spec's shape (rounding and optional keys decided
here, nothing recomputed). Pydantic request models exist only at this edge.

Where the work runs:

* browse queries that read only the vindex (walk, select, relations, stats, embedding-mode
  describe) run in the thread pool (the vindex is thread-safe, decode steps keep flowing);
* anything that runs the model (residual-mode describe, infer, explain-infer, logits) runs on
  the engine's worker thread via `engine.run`, serialised with decode steps.

The vindex comes from a `VindexSource` (`app.state.knowledge`): a vindex path opens at once; a
model directory (the embedded default model included) gets its vindex from the checksum-keyed
extraction cache of `modelql.lql.default_vindex`, extracted on a background thread the first
time — browse routes answer 503 (`Retry-After`) naming the extraction until it is ready, while
chat, infer, embed and token routes work immediately. A GGUF file or a model without a vindex
answers browse routes with 503 naming the reason and the command that fixes it.

Describe thresholds: with `min_score` given, the reference's absolute signed gate score (LARQL
parity); without it, modelql's scale-free per-layer z threshold (algorithms §15.1 — the raw
5.0 cut-off finds nothing on models with small embedding norms, the embedded model included).
"""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..errors import ModelqlError
from .body import JsonRoute
from .errors import HttpError, ServiceUnavailable
from .knowledge_base import (ERRORS, MAX_LIMIT, MAX_TOP, VindexSource, _can_run_model, _ms, _model, _on_model,
                             _parse_layers, _r, _scope, _source, _st, _text, _vindex, attach, check_layer)

router = APIRouter(tags=["knowledge"], route_class=JsonRoute)

# -- /v1/stats, /v1/warmup -----------------------------------------------------------------------------

@router.get("/v1/stats", responses=ERRORS)
async def stats(request: Request):
    st = _st(request)
    cfg = st.config
    src = _source(request)
    vx = src.vindex
    model = st.model
    body: dict[str, Any]
    if vx is not None:
        from .. import knowledge

        s = await run_in_threadpool(knowledge.stats, vx)
        body = {"model": st.model_id, "family": s.family, "mode": cfg.mode, "layers": s.layers,
                "features": s.features, "features_per_layer": s.features_per_layer, "hidden_size": s.hidden_size,
                "vocab_size": s.vocab_size, "extract_level": s.extract_level, "dtype": s.dtype,
                "layer_bands": {k: list(v) for k, v in s.layer_bands.items()}, "knn_entries": s.knn_entries}
    elif model is not None:
        spec = model.spec
        inter = getattr(spec, "intermediate_size", 0) or 0
        body = {"model": st.model_id, "family": getattr(spec, "family", None) or getattr(spec, "model_type", None),
                "mode": cfg.mode, "layers": spec.num_layers, "features": spec.num_layers * inter,
                "features_per_layer": inter, "hidden_size": spec.hidden_size, "vocab_size": spec.vocab_size,
                "extract_level": None, "dtype": str(model.dtype).replace("torch.", ""), "layer_bands": None,
                "knn_entries": 0}
    else:
        raise ServiceUnavailable("model is still loading", headers={"Retry-After": "1"})
    # LARQL's meaning: which services this server answers (a full server answers walk-ffn and embed too)
    body["loaded"] = {"browse": vx is not None and not cfg.embed_only, "inference": _can_run_model(st),
                      "ffn_service": cfg.unavailable_reason("/v1/walk-ffn", "walk_ffn") is None,
                      "embed_service": cfg.unavailable_reason("/v1/embed", "embed") is None}
    body["owned_layers"] = list(cfg.owned_layers) if cfg.owned_layers else None
    ps = src.patches
    body["patches_active"] = 0 if ps is None else len(ps.applied) + bool(ps.recording and ps.recording.ops)
    if ps is not None:
        body["knn_entries"] = len(ps.knn_entries())
    if src.loading:
        body["vindex_status"] = "extracting"
    return body


class WarmupRequest(BaseModel):
    """LARQL's `layers`, `skip_weights`, `warmup_hnsw`, and modelql's `editing`."""

    model_config = ConfigDict(extra="ignore")
    layers: list[int] | None = Field(None, max_length=MAX_LIMIT, description="layers to prefetch (default: all)")
    skip_weights: bool = False
    warmup_hnsw: bool = Field(False, description="LARQL's HNSW index: modelql's gate KNN is exact (no index)")
    editing: bool = Field(False, description="modelql: also compute the statistics weight-level (MEMIT) inserts "
                                             "need, once per model (else the first such insert pays for them)")


@router.post("/v1/warmup", responses=ERRORS)
async def warmup(request: Request, body: WarmupRequest | None = None):
    """LARQL's response (`model`, `weights_loaded`, `layers_prefetched`, the `*_ms` timings, ...); the
    model's weights are loaded when the server starts, so `weights_load_ms` is 0."""
    t0 = time.perf_counter()
    body = body or WarmupRequest()
    vx = _vindex(request, "/v1/warmup")
    st = _st(request)
    if body.layers is not None:
        for layer in body.layers:
            check_layer(layer, vx.num_layers)
    warmed = await run_in_threadpool(vx.warm, body.layers)
    prefetch_ms = int((time.perf_counter() - t0) * 1e3)
    out: dict[str, Any] = {"model": st.model_id, "weights_loaded": not body.skip_weights and st.model is not None,
                           "weights_load_ms": 0, "layers_prefetched": len(warmed), "prefetch_ms": prefetch_ms,
                           "experts_prefetched": 0, "expert_prefetch_ms": 0, "hnsw_built": False,
                           "hnsw_warmup_ms": 0, "status": "ok"}
    if body.editing:
        st = _st(request)
        if not _can_run_model(st):
            raise ServiceUnavailable("editing statistics need the model's weights: this server runs without inference")
        from ..knowledge import memit

        await _on_model(st, memit.prepare_statistics)
        out["edit_statistics"] = "ready"
    out["total_ms"] = int((time.perf_counter() - t0) * 1e3)
    out["latency_ms"] = _ms(t0)
    return out


# -- /v1/walk ---------------------------------------------------------------------------------------------

@router.get("/v1/walk", responses=ERRORS)
async def walk(request: Request, prompt: str = Query(...), top: int = Query(5, ge=1, le=MAX_TOP),
               layers: str | None = Query(None, description="a-b or l1,l2,... (intersected with loaded layers)")):
    from .. import knowledge

    vx = _vindex(request, "/v1/walk")
    _text(prompt, "prompt")
    want = _parse_layers(layers)
    res = await run_in_threadpool(lambda: knowledge.walk(vx, prompt, top=top, layers=want))
    hits = []
    for h in res.to_json()["hits"]:
        row = {"layer": h["layer"], "feature": h["feature"], "gate_score": _r(h["gate_score"], 1), "target": h["target"]}
        if h["relation"]:
            row["relation"] = h["relation"]
        hits.append(row)
    return {"prompt": res.prompt, "hits": hits, "latency_ms": _r(res.latency_ms, 1)}


# -- /v1/select ------------------------------------------------------------------------------------------

class SelectRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    entity: str | None = None
    relation: str | None = None
    layer: int | None = None
    limit: int = Field(20, ge=0, le=MAX_LIMIT)
    min_confidence: float | None = None
    order_by: Literal["gate_score", "confidence", "c_score", "layer"] | None = None
    order: Literal["desc", "asc"] = "desc"
    features: list[int] | None = Field(None, max_length=MAX_LIMIT,
                                       description="modelql: only these feature ids (LARQL ignores it)")
    expert: int | None = Field(None, ge=0, description="modelql: a MoE vindex's features of this expert only")


def _like_value(text: str) -> str:
    return "%" + text.replace("%", "") + "%"


def select_conditions(body: SelectRequest) -> list:
    """The request as `knowledge.select` WHERE conditions (a metadata scan: substring matches)."""
    from ..knowledge.rows import Condition

    conds = []
    if body.entity:
        conds.append(Condition("entity", "LIKE", _like_value(body.entity)))
    if body.relation:
        conds.append(Condition("relation", "LIKE", _like_value(body.relation)))
    if body.layer is not None:
        conds.append(Condition("layer", "=", body.layer))
    if body.features is not None:
        conds.append(Condition("feature", "IN", list(body.features)))
    if body.expert is not None:
        conds.append(Condition("expert", "=", body.expert))
    if body.min_confidence is not None:
        if not math.isfinite(body.min_confidence):
            raise HttpError(400, "min_confidence must be a finite number")
        conds.append(Condition("confidence", ">=", body.min_confidence))
    return conds


@router.post("/v1/select", responses=ERRORS)
async def select(body: SelectRequest, request: Request):
    from .. import knowledge

    vx = _vindex(request, "/v1/select")
    check_layer(body.layer, vx.num_layers)
    for name in ("entity", "relation"):
        if getattr(body, name) is not None:
            _text(getattr(body, name), name)
    conds = select_conditions(body)
    res = await run_in_threadpool(lambda: knowledge.select(
        vx, "edges", conds, order_by=body.order_by, descending=body.order == "desc", limit=body.limit))
    edges = []
    for r in res.to_json()["rows"]:
        row = {"layer": r["layer"], "feature": r["feature"], "target": r["token"], "c_score": _r(r["c_score"], 4)}
        if r["relation"]:
            row["relation"] = r["relation"]
        if r.get("expert") is not None:
            row["expert"] = r["expert"]
        row["top_tokens"] = r["top_tokens"][:5]
        edges.append(row)
    return {"edges": edges, "total": res.total, "latency_ms": _r(res.latency_ms, 1)}


# -- /v1/relations -------------------------------------------------------------------------------------

RELATIONS_TOP = 50


@router.get("/v1/relations", responses=ERRORS)
async def relations(request: Request):
    from .. import knowledge

    vx = _vindex(request, "/v1/relations")
    res = await run_in_threadpool(lambda: knowledge.relations(vx, top=RELATIONS_TOP))
    j = res.to_json()
    rows = [{"name": r["name"], "count": r["count"], "max_score": _r(r["max_score"], 4), "min_layer": r["min_layer"],
             "max_layer": r["max_layer"], "examples": r["examples"]} for r in j["relations"]]
    probe = [{"name": r["name"], "count": r["count"]} for r in j["probe_relations"]]
    return {"relations": rows, "probe_relations": probe, "probe_count": j["probe_count"], "total": j["total"],
            "latency_ms": _r(j["latency_ms"], 1)}


# -- /v1/infer, /v1/explain-infer -----------------------------------------------------------------------

class InferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    top: int = Field(5, ge=1, le=MAX_TOP)
    mode: Literal["walk", "dense", "compare"] = "walk"


class ExplainInferRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    top: int = Field(5, ge=1, le=MAX_TOP)
    per_layer: int = Field(3, ge=1, le=MAX_TOP)
    band: Literal["syntax", "knowledge", "output", "all"] = "all"
    relations_only: bool = False
    with_attention: bool = False


def _preds(preds) -> list[dict]:
    return [{"token": p.token, "probability": _r(p.prob, 4)} for p in preds]


def _override(res) -> dict | None:
    o = res.override
    if o is None:
        return None
    return {"token": o.target, "cosine": _r(o.cosine, 4), "layer": o.layer, "source": "knn_override",
            "stage": "post_logits", "materialized": False,
            "model_top1": {"token": o.model_top1.token, "probability": _r(o.model_top1.prob, 4)}}


def _prompt(prompt: str) -> str:
    _text(prompt, "prompt")
    if not prompt.strip():
        raise HttpError(400, "empty prompt")
    return prompt


@router.post("/v1/infer", responses=ERRORS)
async def infer(body: InferRequest, request: Request):
    from ..knowledge.infer import infer as k_infer

    st = _st(request)
    model = _model(request, "/v1/infer", "generate")
    prompt = _prompt(body.prompt)
    _check_length(model, prompt)
    t0 = time.perf_counter()
    scope = _scope(request)
    knn = scope.knn()
    res = await _on_model(st, lambda m: k_infer(scope.model(m), prompt, top=body.top, mode=body.mode, knn=knn))
    out: dict[str, Any] = {"prompt": prompt}
    if res.dense is not None:
        out.update(walk=_preds(res.predictions), walk_ms=_r(res.elapsed_ms, 1), dense=_preds(res.dense),
                   dense_ms=_r(res.dense_ms, 1))
    else:
        out.update(predictions=_preds(res.predictions), mode=res.mode)
    out["latency_ms"] = _ms(t0)
    ov = _override(res)
    if ov is not None:
        out["knn_override"] = ov
    return out


def _check_length(model, prompt: str) -> None:
    n = len(model.tokenizer.encode(prompt))
    if n >= model.spec.max_position:
        raise HttpError(400, f"the prompt has {n} tokens; the context window is {model.spec.max_position}")


@router.post("/v1/explain-infer", responses=ERRORS)
async def explain_infer(body: ExplainInferRequest, request: Request):
    from ..knowledge.infer import explain_infer as k_explain
    from ..knowledge.infer import infer as k_infer

    st = _st(request)
    model = _model(request, "/v1/explain-infer", "generate")
    vx = _vindex(request, "/v1/explain-infer")
    prompt = _prompt(body.prompt)
    _check_length(model, prompt)
    band = None if body.band == "all" else body.band
    scope = _scope(request)
    knn = scope.knn()
    t0 = time.perf_counter()

    def run(m):
        m = scope.model(m)
        preds = k_infer(m, prompt, top=body.top, mode="walk", knn=knn).predictions
        ex = k_explain(m, prompt, vindex=vx, band=band, top=body.per_layer, relations_only=body.relations_only,
                       with_attention=body.with_attention, knn=knn)
        return preds, ex

    preds, ex = await _on_model(st, run)
    by_layer: dict[int, list] = {}
    for f in ex.trace:
        by_layer.setdefault(f.layer, []).append(
            {"feature": f.feature, "gate_score": _r(f.gate, 1), "top_token": f.top_token,
             "top_tokens": list(f.top_tokens[:3]), "relation": f.relation})
    attn = {a.layer: a for a in ex.attention}
    trace = []
    for layer in sorted(set(by_layer) | (set(attn) if body.with_attention else set())):
        entry: dict[str, Any] = {"layer": layer, "features": by_layer.get(layer, [])}
        a = attn.get(layer)
        if a is not None:
            entry["attention"] = [{"token": a.attended_token, "weight": _r(a.attention_weight, 3)}]
            entry["lens"] = {"token": a.lens_token, "probability": _r(a.lens_prob, 4)}
        if entry["features"] or a is not None:
            trace.append(entry)
    out: dict[str, Any] = {"prompt": prompt, "predictions": _preds(preds), "trace": trace, "latency_ms": _ms(t0)}
    ov = _override(ex)
    if ov is not None:
        out["knn_override"] = ov
    return out


# -- the other knowledge routers ------------------------------------------------------------------------

from . import describe_routes, edit_routes, embed_routes  # noqa: E402
from .describe_routes import describe_args, describe_json, run_describe  # noqa: E402,F401
from .edit_routes import RECORDING_NAME  # noqa: E402,F401
from .embed_routes import embed_rows, logits_top  # noqa: E402,F401

router.include_router(describe_routes.router)
router.include_router(edit_routes.router)
router.include_router(embed_routes.router)

__all__ = ["router", "VindexSource", "attach", "describe_args", "describe_json", "run_describe", "embed_rows",
           "logits_top", "ModelqlError"]
