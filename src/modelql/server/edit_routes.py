"""The editing API: POST /v1/insert, /v1/patches/apply, /v1/edges/match, GET /v1/patches,
DELETE /v1/patches/{name}. Edits run on the engine's worker thread (they run the model)."""

from __future__ import annotations

import math
import time
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .body import JsonRoute
from .errors import HttpError, ServiceUnavailable
from .knowledge_base import ERRORS, _ERR, _ms, _scope, _source, _st, _text, _vindex, check_layer, editing, session_id

router = APIRouter(tags=["knowledge"], route_class=JsonRoute)

# -- /v1/insert, /v1/patches (the editing API) ----------------------------------------------------------


class FactBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    entity: str
    relation: str
    target: str


class InsertRequest(BaseModel):
    """LARQL's one fact (`entity`, `relation`, `target`), or modelql's `facts`: several facts
    inserted as one batch (MEMIT solves them together)."""

    model_config = ConfigDict(extra="ignore", json_schema_extra={"anyOf": [
        {"required": ["entity", "relation", "target"]}, {"required": ["facts"]}]})
    entity: str | None = None
    relation: str | None = None
    target: str | None = None
    facts: list[FactBody] | None = Field(default=None, min_length=1, max_length=1000)
    layer: int | None = None
    confidence: float | None = None
    alpha: float | None = None
    mode: Literal["knn", "compose", "memit", "constellation"] | None = Field(
        None, description="default: knn for one fact (LARQL's fast insert), memit for modelql's `facts` batch")


LARQL_DEFAULT_ALPHA = 0.25  # what LARQL's /v1/insert reports as `alpha` when the request gives none


class PatchApplyRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str | None = None
    patch: dict[str, Any] | None = None
    name: str | None = None


RECORDING_NAME = "(unsaved edits)"


async def _mutate(request: Request, route: str, fn):
    """Run `fn(patch_session)` on the engine's worker thread (edits run the model and must not
    interleave with decode steps), then serve generation from the overlay-aware model."""
    st = _st(request)
    _vindex(request, route)
    editing()
    src = _source(request)
    sid = session_id(request.headers)
    if st.engine is None:
        raise ServiceUnavailable("model is still loading", headers={"Retry-After": "1"})

    def run(model):
        import torch

        ps = src.client_session(sid, model) if sid is not None else src.session(model)
        with torch.enable_grad():  # the worker thread runs with autograd off; MEMIT optimises through the model
            out = fn(ps)
        if sid is None and ps.has_weights and st.config.inference:
            st.engine.model = ps.model()  # chat/completions see global edits (PatchedFfn reads the overlay live)
        if sid is not None and isinstance(out, dict):
            out["session"] = sid
        return out

    return await st.engine.run(run)


def _active(ps) -> int:
    return len(ps.applied) + bool(ps.recording is not None and ps.recording.ops)


@router.post("/v1/insert", responses=ERRORS)
async def insert(body: InsertRequest, request: Request):
    if body.mode == "constellation":
        raise HttpError(400, "mode 'constellation' (LARQL's legacy server insert) is not supported: "
                             "use knn, compose or memit")
    single = (body.entity, body.relation, body.target)
    if body.facts is None:
        if None in single:
            raise HttpError(400, "must provide 'entity', 'relation' and 'target' (or 'facts': a list of them)")
        facts = [single]
    elif single != (None, None, None):
        raise HttpError(400, "give either 'entity', 'relation', 'target' or 'facts', not both")
    else:
        facts = [(f.entity, f.relation, f.target) for f in body.facts]
    for i, fact in enumerate(facts):
        for name, value in zip(("entity", "relation", "target"), fact):
            _text(value, name if body.facts is None else f"facts[{i}].{name}")
    for name in ("confidence", "alpha"):
        v = getattr(body, name)
        if v is not None and not math.isfinite(v):
            raise HttpError(400, f"{name} must be a finite number")
    check_layer(body.layer, _vindex(request, "/v1/insert").num_layers)
    t0 = time.perf_counter()
    mode = body.mode or ("knn" if body.facts is None else "memit")

    def run(ps):
        edit, _ = editing()
        rs = edit.insert_many(ps, facts, layer=body.layer, confidence=body.confidence, alpha=body.alpha,
                              mode=mode)
        if body.facts is None:
            out = rs[0].to_json()
            if out.get("alpha") is None:  # LARQL always reports a number (modes without alpha: the request's)
                out["alpha"] = body.alpha if body.alpha is not None else LARQL_DEFAULT_ALPHA
        else:  # modelql batch: the shared fields once, then every fact's own
            out = {**rs[0].to_json(), "inserted": len(rs), "facts": [r.to_json() for r in rs]}
            for name in ("entity", "relation", "target", "feature"):
                out.pop(name, None)
        out["knn_total"] = len(ps.knn_entries())  # modelql: the overlay's KNN facts after this insert
        return out

    res = await _mutate(request, "/v1/insert", run)
    res.setdefault("session", None)
    res["latency_ms"] = _ms(t0)
    return res


@router.post("/v1/patches/apply", responses={
    **ERRORS, 403: {"description": "no --patch-dir: only inline patches", **_ERR},
    404: {"description": "no such patch in --patch-dir", **_ERR}, 413: {"description": "patch too large", **_ERR}})
async def patches_apply(body: PatchApplyRequest, request: Request):
    """`url`: a `.vlp` name inside the server's `--patch-dir` (`patch_files`); `patch`: an inline patch."""
    from . import patch_files

    if body.url is None and body.patch is None:
        raise HttpError(400, "must provide 'url' or 'patch' in request body")
    data = where = None
    if body.patch is None:
        where = _text(body.url, "url")
        path = patch_files.resolve(_st(request).config.patch_dir, where)
        data = await run_in_threadpool(patch_files.read, path, where, _st(request).config.max_patch_bytes)

    def run(ps):
        if data is not None:
            ap = ps.apply(ps.validate(data, where=where), name=body.name or where)
        else:
            ap = ps.apply(ps.validate(body.patch), name=body.name)
        return {"applied": ap.name, "operations": len(ap.patch.operations), "active_patches": _active(ps)}

    return await _mutate(request, "/v1/patches/apply", run)


class WhereCondition(BaseModel):
    model_config = ConfigDict(extra="ignore")
    field: str
    op: str = "="
    value: str | int | float | list[str | int | float]


class EdgesMatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    where: list[WhereCondition]


@router.post("/v1/edges/match", responses=ERRORS)
async def edges_match(body: EdgesMatchRequest, request: Request):
    """modelql extension: what `DELETE FROM EDGES WHERE …` / `UPDATE EDGES … WHERE …` would select
    in this session's overlay (`knowledge.edit.match`, the function local LQL runs), with the
    metadata UPDATE keeps, so a remote LQL session builds the same `.vlp` ops and applies them
    inline. Reads only; runs on the worker thread like the edits it precedes."""
    if not body.where:
        raise HttpError(400, "where must be non-empty")
    conds = [(c.field, c.op, c.value) for c in body.where]

    def run(ps):
        import dataclasses

        from ..knowledge.mutations import recorded_overlap

        edit, _ = editing()
        m = edit.match(ps, conds)
        rec = ps.recording.ops if ps.recording is not None else ()
        return dataclasses.replace(m, recorded=recorded_overlap(m, rec)).to_json()

    return await _mutate(request, "/v1/edges/match", run)


@router.get("/v1/patches", responses=ERRORS)
async def patches_list(request: Request):
    _vindex(request, "/v1/patches")
    scope = _scope(request)
    ps = scope.ps
    rows = []
    if ps is not None:
        rows = [{"name": ap.name, "operations": len(ap.patch.operations), "base_model": ap.patch.base_model}
                for ap in ps.applied]
        if ps.recording is not None and ps.recording.ops:
            rows.append({"name": RECORDING_NAME, "operations": len(ps.recording.ops), "base_model": ps.base_model_id})
    out: dict[str, Any] = {"patches": rows}
    if scope.sid is not None:
        out["session"] = scope.sid
    return out


@router.delete("/v1/patches/{name}", responses={**ERRORS, 404: {"description": "no such patch", **_ERR}})
async def patches_remove(name: str, request: Request):
    _vindex(request, "/v1/patches/{name}")
    ps = _scope(request).ps
    if ps is None or (name != RECORDING_NAME and ps.find(name) is None) or \
            (name == RECORDING_NAME and not (ps.recording and ps.recording.ops)):
        raise HttpError(404, f"patch '{name}' not found")

    def run(ps):
        if name == RECORDING_NAME:
            ps.discard_recording()
        else:
            ps.remove(name)
        return {"removed": name, "active_patches": _active(ps)}

    return await _mutate(request, "/v1/patches/{name}", run)


