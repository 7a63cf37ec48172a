"""The knowledge group (server-api.md §4, LARQL-compatible paths, field names and status codes).

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

import collections
import hashlib
import json
import math
import re
import struct
import threading
import time
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from ..errors import ModelqlError
from .errors import HttpError, ServiceUnavailable

router = APIRouter(tags=["knowledge"])

FFN_MEDIA = "application/x-larql-ffn"
MAX_TOP = 1000
MAX_LIMIT = 10_000
MAX_TOKEN_IDS = 65_536
DESCRIBE_CACHE = "public, max-age=86400"
EMBED_CACHE = "public, max-age=31536000, immutable"

_ERR = {"content": {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "string"}},
                                                    "required": ["error"]}}}}
ERRORS = {400: {"description": "bad parameter", **_ERR}, 503: {"description": "not served in this mode", **_ERR}}


def editing():
    """(`knowledge.edit`, `PatchSession`), imported on the first edit: they pull in the solvers."""
    from ..knowledge import edit
    from ..vindex.overlay import PatchSession

    return edit, PatchSession


# -- the vindex behind the browse routes -------------------------------------------------------------

class VindexSource:
    """The served vindex, or why there is none yet (loading) or at all (unavailable)."""

    def __init__(self, vindex=None, *, loading: str | None = None, reason: str | None = None):
        self.vindex = vindex
        self.loading = loading
        self.reason = reason
        self.error: str | None = None
        self.patches = None  # the global PatchSession (base ⊕ applied patches ⊕ inserts), once edited
        self.sessions: collections.OrderedDict[str, list] = collections.OrderedDict()  # id → [PatchSession, t]
        self.session_ttl = 3600.0
        self.max_sessions = 1024
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    @property
    def epoch(self) -> int:
        """Overlay epoch (describe ETags): 0 until the first edit."""
        return self.patches.epoch if self.patches is not None else 0

    @property
    def patched(self) -> bool:
        return self.patches is not None and not self.patches.empty

    def view(self):
        """What browse queries read: the overlay view once edits exist, else the base vindex."""
        vx = self.require()
        return self.patches.view if self.patched else vx

    def knn(self):
        """The overlay's KNN-store facts (None when there are none)."""
        if self.patches is None:
            return None
        return self.patches.knn_entries() or None

    def session(self, model):
        """The global patch session (created on the first edit, on the served model's weights)."""
        if self.patches is None:
            _, PatchSession = editing()
            self.patches = PatchSession(self.require(), model=model)
        return self.patches

    def client_session(self, sid: str, model=None):
        """The `X-Session-Id` overlay `sid` (base ⊕ the global patches when it started ⊕ its own
        edits); None if unknown and no `model` to create it with. Idle sessions expire after
        `session_ttl`; beyond `max_sessions` the least recently used is dropped."""
        now = time.monotonic()
        with self._lock:
            for key in [k for k, (_ps, t) in self.sessions.items() if now - t > self.session_ttl]:
                del self.sessions[key]
            entry = self.sessions.get(sid)
            if entry is not None:
                entry[1] = now
                self.sessions.move_to_end(sid)
                return entry[0]
        if model is None:
            return None
        ps = self.session(model).fork()
        with self._lock:
            self.sessions[sid] = [ps, now]
            while len(self.sessions) > self.max_sessions:
                self.sessions.popitem(last=False)
        return ps

    @classmethod
    def ready(cls, vindex) -> "VindexSource":
        return cls(vindex)

    @classmethod
    def unavailable(cls, reason: str) -> "VindexSource":
        return cls(reason=reason)

    @classmethod
    def open_path(cls, path: str | Path) -> "VindexSource":
        from ..vindex import Vindex

        return cls(Vindex.load(path))

    @classmethod
    def extract(cls, model_dir: str | Path, *, default: bool = False, start: bool = True) -> "VindexSource":
        """The cached vindex of an HF model directory, extracted on a background thread if needed."""
        from ..lql import default_vindex as dv

        model_dir = Path(model_dir)
        label = default
        try:
            target = dv.cached_path(model_dir, dv.DEFAULT_NAME if default else None, label=label)
        except OSError as exc:
            return cls.unavailable(f"cannot fingerprint {model_dir}: {exc}")
        src = cls(loading=f"the vindex of {model_dir.name} is being extracted into {target} (first use); "
                          f"retry shortly")

        def build() -> None:
            try:
                if default:
                    path = dv.default_vindex_path(progress=False) if model_dir == dv.default_model_dir() else \
                        dv.ensure_vindex(model_dir, name=dv.DEFAULT_NAME, model_id=dv.DEFAULT_NAME,
                                         progress=False, label=True)
                else:
                    path = dv.ensure_vindex(model_dir, progress=False)
                from ..vindex import Vindex

                src.vindex = Vindex.load(path)
            except Exception as exc:  # reported by every browse route
                src.error = f"vindex extraction of {model_dir.name} failed: {exc}"
            finally:
                src.loading = None

        src._thread = threading.Thread(target=build, name="modelql-vindex-extract", daemon=True)
        if start:
            src._thread.start()
        return src

    @classmethod
    def for_model_ref(cls, model_ref: str | Path | None) -> "VindexSource":
        """What `modelql serve MODEL_OR_VINDEX` browses: a vindex as given; a model directory's
        cached vindex (extracted once); the embedded model's labelled cached vindex."""
        from ..lql import default_vindex as dv

        if model_ref is None:
            if not dv.default_model_installed():
                return cls.unavailable("the embedded default model is not installed")
            return cls.extract(dv.default_model_dir(), default=True)
        p = Path(str(model_ref)).expanduser()
        if (p / "index.json").is_file():
            return cls.open_path(p)
        if (p / "config.json").is_file():
            default = p.resolve() == dv.default_model_dir().resolve()
            return cls.extract(p, default=default)
        return cls.unavailable(f"browse routes need a vindex and {model_ref} is not an HF model directory: run "
                               f"`modelql extract {model_ref} -o model.vindex` and serve the vindex")

    def wait(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.vindex is not None

    def require(self):
        if self.vindex is not None:
            return self.vindex
        if self.loading:
            raise ServiceUnavailable(self.loading, headers={"Retry-After": "5"})
        raise ServiceUnavailable(self.error or self.reason or "no vindex loaded")


def attach(app, source: VindexSource) -> None:
    """Give an app (built with `knowledge=[router, ...]`) its vindex source."""
    app.state.knowledge = source


# -- helpers ------------------------------------------------------------------------------------------

def _st(request: Request):
    return request.app.state.modelql


def _source(request: Request) -> VindexSource:
    src = getattr(request.app.state, "knowledge", None)
    return src if src is not None else VindexSource.unavailable("this server has no vindex")


def _check(st, route: str, group: str) -> None:
    reason = st.config.unavailable_reason(route, group)
    if reason:
        raise ServiceUnavailable(reason)


SESSION_RE = re.compile(r"[A-Za-z0-9._-]{1,128}")


def session_id(headers) -> str | None:
    """The `X-Session-Id` header (§2.3), validated; None without it."""
    sid = headers.get("x-session-id")
    if sid is None:
        return None
    if not SESSION_RE.fullmatch(sid):
        raise HttpError(400, "invalid X-Session-Id")
    return sid


class Scope:
    """The overlay one request sees: its session's, else the global one."""

    def __init__(self, src: VindexSource, sid: str | None):
        self.src = src
        self.sid = sid
        self.ps = src.client_session(sid) if sid is not None else None
        if self.ps is None:
            self.ps = src.patches

    @property
    def patched(self) -> bool:
        return self.ps is not None and not self.ps.empty

    def view(self):
        vx = self.src.require()
        return self.ps.view if self.patched else vx

    def knn(self):
        return (self.ps.knn_entries() or None) if self.ps is not None else None

    @property
    def epoch(self) -> int:
        return self.ps.epoch if self.ps is not None else 0

    def model(self, engine_model):
        """The model generation-side queries run: a session's overlay-aware model, else the
        engine's (which already reads the global overlay)."""
        if self.sid is not None and self.ps is not None and self.ps is not self.src.patches and self.ps.has_weights:
            return self.ps.model()
        return engine_model


def _scope(request) -> Scope:
    return Scope(_source(request), session_id(request.headers))


def _vindex(request: Request, route: str):
    st = _st(request)
    _check(st, route, "browse")
    return _scope(request).view()


def _model(request: Request, route: str, group: str):
    st = _st(request)
    _check(st, route, group)
    model = st.require_model()
    if model.tokenizer is None:
        raise ServiceUnavailable("the served model has no tokenizer")
    return model


def _r(x: float | None, nd: int) -> float | None:
    if x is None:
        return None
    x = float(x)
    return round(x, nd) if math.isfinite(x) else None


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 1)


def _text(value: str, name: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HttpError(400, f"'{name}' is not valid unicode") from None
    return value


def _parse_layers(text: str | None) -> list[int] | None:
    """`a-b` or `l1,l2,…` (None: all)."""
    if text is None or not text.strip():
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo or hi - lo > 100_000:
                    raise ValueError
                out += range(lo, hi + 1)
            else:
                out.append(int(part))
    except ValueError:
        raise HttpError(400, f"invalid layers {text!r}: expected a-b or l1,l2,...") from None
    return out


def _can_run_model(st) -> bool:
    return st.config.inference and st.engine is not None


async def _on_model(st, fn):
    """Run `fn(model)` on the engine's worker thread (serialised with decode steps)."""
    return await st.engine.run(fn)


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
    body["loaded"] = {"browse": vx is not None and not cfg.embed_only, "inference": _can_run_model(st),
                      "ffn_service": cfg.ffn_only, "embed_service": cfg.embed_only}
    body["owned_layers"] = list(cfg.owned_layers) if cfg.owned_layers else None
    ps = src.patches
    body["patches_active"] = 0 if ps is None else len(ps.applied) + bool(ps.recording and ps.recording.ops)
    if ps is not None:
        body["knn_entries"] = len(ps.knn_entries())
    if src.loading:
        body["vindex_status"] = "extracting"
    return body


class WarmupRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    editing: bool = Field(False, description="modelql: also compute the statistics weight-level (MEMIT) inserts "
                                             "need, once per model (else the first such insert pays for them)")


@router.post("/v1/warmup", responses=ERRORS)
async def warmup(request: Request, body: WarmupRequest | None = None):
    t0 = time.perf_counter()
    vx = _vindex(request, "/v1/warmup")
    await run_in_threadpool(vx.warm)
    out: dict[str, Any] = {"status": "ok"}
    if body is not None and body.editing:
        st = _st(request)
        if not _can_run_model(st):
            raise ServiceUnavailable("editing statistics need the model's weights: this server runs without inference")
        from ..knowledge import memit

        await _on_model(st, memit.prepare_statistics)
        out["edit_statistics"] = "ready"
    out["latency_ms"] = _ms(t0)
    return out


# -- /v1/describe ---------------------------------------------------------------------------------------

def describe_args(band: str, limit: int, min_score: float | None, mode: str | None,
                  relations_only: bool = False) -> dict[str, Any]:
    """`knowledge.describe` keyword arguments of a `/v1/describe` query (the server variant, A§5):
    K = limit, light token filter, probe labels only; `min_score` absent ⇒ adaptive threshold."""
    b = (band or "knowledge").lower()
    return dict(band=None if b == "all" else b, k=limit, threshold=min_score, mode=mode or "auto",
                token_filter="light", probe_only=True, relations_only=relations_only)


def describe_json(result, limit: int | None, verbose: bool, bands: bool = False) -> dict[str, Any]:
    """The spec's `/v1/describe` body from a `DescribeResult` (its rows' `to_json()`); `bands`
    (variant=lql) adds each edge's section so a remote LQL DESCRIBE renders as a local one."""
    edges = []
    for e in result.to_json()["edges"][:limit]:
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
        for k in ("confidence", "confident", "patch"):  # calibrated claims, overlay facts (browse18)
            if e.get(k) is not None:
                row[k] = _r(e[k], 4) if k == "confidence" else e[k]
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
                   min_score: float | None = Query(None, description="absolute signed gate threshold (LARQL: 5.0); "
                                                   "absent: modelql's adaptive per-layer z threshold"),
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
    if min_score is not None and not math.isfinite(min_score):
        raise HttpError(400, "min_score must be a finite number")
    scope = _scope(request)
    if variant == "lql":
        b = band.lower()
        kw = dict(band=None if b == "all" else b, threshold=min_score, mode=_mode_for(st, mode),
                  relations_only=relations_only)
    else:
        kw = describe_args(band, limit, min_score, _mode_for(st, mode), relations_only)
    if layer is not None:
        kw["layer"] = layer
    result = await run_describe(st, vx, entity, scope=scope, knn_entries=scope.knn(), **kw)
    body = describe_json(result, limit, verbose, bands=variant == "lql")
    tag = _etag(body, scope.epoch)
    headers = {"ETag": tag, "Cache-Control": "no-cache" if scope.patched or scope.sid else DESCRIBE_CACHE}
    inm = request.headers.get("if-none-match")
    if inm is not None and (inm.strip() == "*" or tag in [t.strip() for t in inm.split(",")]):
        return Response(status_code=304, headers=headers)
    return JSONResponse(body, headers=headers)


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
    if body.min_confidence is not None:
        if not math.isfinite(body.min_confidence):
            raise HttpError(400, "min_confidence must be a finite number")
        conds.append(Condition("confidence", ">=", body.min_confidence))
    return conds


@router.post("/v1/select", responses=ERRORS)
async def select(body: SelectRequest, request: Request):
    from .. import knowledge

    vx = _vindex(request, "/v1/select")
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


# -- /v1/insert, /v1/patches (the editing API) ----------------------------------------------------------


class FactBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    entity: str
    relation: str
    target: str


class InsertRequest(BaseModel):
    """LARQL's one fact (`entity`, `relation`, `target`), or modelql's `facts`: several facts
    inserted as one batch (MEMIT solves them together)."""

    model_config = ConfigDict(extra="ignore")
    entity: str | None = None
    relation: str | None = None
    target: str | None = None
    facts: list[FactBody] | None = Field(default=None, min_length=1, max_length=1000)
    layer: int | None = None
    confidence: float | None = None
    alpha: float | None = None
    mode: Literal["knn", "compose", "memit", "constellation"] | None = None


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
    t0 = time.perf_counter()

    def run(ps):
        edit, _ = editing()
        rs = edit.insert_many(ps, facts, layer=body.layer, confidence=body.confidence, alpha=body.alpha,
                              mode=body.mode)
        if body.facts is None:
            out = rs[0].to_json()
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


@router.post("/v1/patches/apply", responses={**ERRORS, 404: {"description": "patch file not found", **_ERR}})
async def patches_apply(body: PatchApplyRequest, request: Request):
    if body.url is None and body.patch is None:
        raise HttpError(400, "must provide 'url' or 'patch' in request body")
    path = None
    if body.patch is None:
        url = _text(body.url, "url")
        if "://" in url and not url.startswith("file://"):
            raise HttpError(400, f"only local patch files can be applied by this server, not {url!r}")
        path = Path(url[len("file://"):] if url.startswith("file://") else url).expanduser()
        if not path.is_file():
            raise HttpError(404, f"patch file not found: {url}")

    def run(ps):
        if path is not None:
            ap = ps.apply(ps.load(path), name=body.name or body.url, path=path)
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


# -- /v1/embed, /v1/embed/{token_id}, /v1/logits ---------------------------------------------------------

class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    token_ids: list[int]


def _check_ids(ids: list[int], vocab: int) -> None:
    if not ids:
        raise HttpError(400, "token_ids must be non-empty")
    if len(ids) > MAX_TOKEN_IDS:
        raise HttpError(400, f"at most {MAX_TOKEN_IDS} token ids per request")
    for t in ids:
        if not 0 <= t < vocab:
            raise HttpError(400, f"token_id {t} out of range (vocab={vocab})")


def embed_rows(model, ids: list[int]):
    """`s·E[id]` rows [n, H] float32 — the scaled embeddings the forward pass starts from (the same
    `embed_tokens` that `/v1/embeddings` static pooling averages)."""
    import torch

    with torch.inference_mode():
        return model.embed_tokens(torch.tensor([ids]), [0])[0].float()


def _is_binary(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == FFN_MEDIA


async def _json_body(request: Request, cls):
    raw = await request.body()
    try:
        data = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, f"We could not parse the JSON body of your request: {exc}") from None
    if not isinstance(data, dict):
        raise HttpError(400, "the request body must be a JSON object (Content-Type: application/json)")
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        if err.get("type") == "missing":
            raise HttpError(400, f"missing required parameter: '{loc}'") from None
        raise HttpError(400, f"invalid value for '{loc}': {err.get('msg', 'invalid value')}") from None


def _binary_schema(json_model) -> dict:
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_model.model_json_schema()},
        FFN_MEDIA: {"schema": {"type": "string", "format": "binary"}}}}}


@router.post("/v1/embed", responses=ERRORS, openapi_extra=_binary_schema(EmbedRequest))
async def embed(request: Request):
    t0 = time.perf_counter()
    model = _model(request, "/v1/embed", "embed")
    vocab = model.spec.vocab_size
    binary = _is_binary(request)
    if binary:
        raw = await request.body()
        if len(raw) < 4:
            raise HttpError(400, "binary: body too short (need ≥ 4 bytes)")
        (n,) = struct.unpack_from("<I", raw, 0)
        if len(raw) < 4 + 4 * n:
            raise HttpError(400, f"binary: truncated token list ({n} ids declared, {(len(raw) - 4) // 4} present)")
        ids = list(struct.unpack_from(f"<{n}I", raw, 4))
    else:
        ids = (await _json_body(request, EmbedRequest)).token_ids
    _check_ids(ids, vocab)
    rows = embed_rows(model, ids)
    H = int(rows.shape[1])
    if binary:
        payload = struct.pack("<II", len(ids), H) + rows.numpy().astype("<f4").tobytes()
        return Response(payload, media_type=FFN_MEDIA)
    return {"residual": rows.tolist(), "seq_len": len(ids), "hidden_size": H, "latency_ms": _ms(t0)}


@router.get("/v1/embed/{token_id}", responses={
    **ERRORS, 200: {"content": {"application/json": {}, FFN_MEDIA: {}}, "description": "H × f32 LE, or JSON"}})
async def embed_token(token_id: int, request: Request):
    model = _model(request, "/v1/embed/{token_id}", "embed")
    _check_ids([token_id], model.spec.vocab_size)
    row = embed_rows(model, [token_id])[0]
    headers = {"Cache-Control": EMBED_CACHE, "Vary": "Accept"}
    if "application/json" in request.headers.get("accept", ""):
        return JSONResponse({"token_id": token_id, "embedding": row.tolist(), "hidden_size": int(row.shape[0])},
                            headers=headers)
    return Response(row.numpy().astype("<f4").tobytes(), media_type=FFN_MEDIA, headers=headers)


class LogitsRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    residual: list[float]
    top_k: int = Field(5, ge=1, le=MAX_TOP)
    temperature: float = Field(1.0, gt=0, le=1e6)


def logits_top(model, residual: list[float], top_k: int, temperature: float) -> list[tuple[int, float]]:
    """`softmax(unembed(r) / T)` top-k: final norm, lm_head, the family's scaling and soft-cap
    (the model's own `unembed`, as the forward pass applies it)."""
    import torch

    with torch.inference_mode():
        r = torch.tensor(residual, dtype=model.dtype)[None]
        logits = model.unembed(r)[0].double() / temperature
        probs = torch.softmax(logits, -1)
        vals, idx = torch.topk(probs, min(top_k, probs.shape[-1]))
    return [(int(i), float(v)) for v, i in zip(vals, idx)]


@router.post("/v1/logits", responses=ERRORS, openapi_extra=_binary_schema(LogitsRequest))
async def logits(request: Request):
    t0 = time.perf_counter()
    st = _st(request)
    model = _model(request, "/v1/logits", "embed")
    H = model.spec.hidden_size
    if _is_binary(request):
        raw = await request.body()
        if len(raw) % 4:
            raise HttpError(400, "binary: residual bytes are not a multiple of 4")
        residual = list(struct.unpack(f"<{len(raw) // 4}f", raw))
        req = LogitsRequest(residual=[], top_k=5, temperature=1.0)
    else:
        req = await _json_body(request, LogitsRequest)
        residual = req.residual
    if len(residual) != H:
        raise HttpError(400, f"residual length {len(residual)} != hidden_size {H}")
    if not all(math.isfinite(x) for x in residual):
        raise HttpError(400, "residual must contain only finite numbers")
    top = await _on_model(st, lambda m: logits_top(m, residual, req.top_k, req.temperature)) \
        if st.engine is not None and st.engine.running else logits_top(model, residual, req.top_k, req.temperature)
    tok = model.tokenizer
    return {"top_k": [{"token_id": i, "token": tok.decode([i]), "prob": _r(p, 4)} for i, p in top],
            "latency_ms": _ms(t0)}


# -- /v1/token/encode, /v1/token/decode ----------------------------------------------------------------

@router.get("/v1/token/encode", responses=ERRORS)
async def token_encode(request: Request, text: str = Query(...)):
    model = _model(request, "/v1/token/encode", "embed")
    _text(text, "text")
    return {"token_ids": model.tokenizer.encode(text, add_special_tokens=False), "text": text}


@router.get("/v1/token/decode", responses=ERRORS)
async def token_decode(request: Request, ids: str = Query(..., description="comma-separated token ids")):
    model = _model(request, "/v1/token/decode", "embed")
    out: list[int] = []
    vocab = model.spec.vocab_size
    for part in ids.split(","):
        p = part.strip()
        if not p:
            continue
        try:
            t = int(p)
        except ValueError:
            raise HttpError(400, f"invalid token id: '{p}'") from None
        if not 0 <= t < vocab:
            raise HttpError(400, f"token_id {t} out of range (vocab={vocab})")
        out.append(t)
    return {"text": model.tokenizer.decode(out, skip_special_tokens=True), "token_ids": out}


__all__ = ["router", "VindexSource", "attach", "describe_args", "describe_json", "run_describe", "embed_rows",
           "logits_top", "ModelqlError"]
