"""The routes the web browser needs beyond the knowledge group (modelql extensions, JSON only).

* `POST /v1/trace` — `knowledge.trace` (TRACE) of a prompt at every position, for the heat map;
* `POST /v1/explain` — `knowledge.explain.attribute` of a given chat prompt + completion (the
  streamed chat's tokens explained on click), and for one token the per-layer attention-vs-FFN
  contributions to its logit (`knowledge.trace` with `answer_id` at the position that predicted it);
* `GET /v1/describe/rows` — `knowledge.describe`'s full rows (feature ids, bands, relation
  labels) with the same arguments as `/v1/describe?variant=lql`;
* `GET /v1/feature` — `knowledge.feature.feature_profile` (a feature's page);
* `POST /v1/lql`, `POST /v1/lql/complete` — LQL statements in a server-side session over what
  the server serves (read-only statements: nothing here opens, writes or edits anything) and the
  REPL's completion (`lql.repl.LqlCompleter`);
* `GET /v1/patch-files`, `POST /v1/patch-files/apply` — the `.vlp` files of the server's patch
  directory (`ServerConfig.patch_dir`) and applying one by name (never a path outside it).

Every route reads the same overlay as the knowledge group (`X-Session-Id` or the global one)
and runs the model on the engine's worker thread.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict
from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from ..body import JsonRoute
from .. import patch_files
from ..errors import HttpError, ServiceUnavailable
from ..describe_routes import _mode_for, run_describe
from ..edit_routes import _active, _mutate
from ..knowledge_base import MAX_LIMIT, _model, _scope, _st, _text, _vindex, editing
from ..knowledge_routes import _check_length, _prompt

router = APIRouter(route_class=JsonRoute, tags=["web"])

MAX_TRACE_TOKENS = 64
MAX_EXPLAIN_TOKENS = 512


def _ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 1)


# -- /v1/trace -----------------------------------------------------------------------------------------

class TraceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    prompt: str
    answer: str | None = Field(None, description="the token traced (first token of ' answer'); absent: the "
                                                 "model's own top-1 prediction at the last position")
    positions: Literal["all", "last"] = "all"


def trace_json(tr) -> dict[str, Any]:
    """A `Trace` as JSON (the same fields TRACE ... SAVE writes)."""
    return asdict(tr)


@router.post("/v1/trace")
async def trace(body: TraceRequest, request: Request):
    from ...knowledge.trace import trace as k_trace

    st = _st(request)
    model = _model(request, "/v1/trace", "generate")
    prompt = _prompt(body.prompt)
    _check_length(model, prompt)
    n = len(model.tokenizer.encode(prompt))
    if n > MAX_TRACE_TOKENS:
        raise HttpError(400, f"the prompt has {n} tokens; TRACE over HTTP takes at most {MAX_TRACE_TOKENS}")
    if body.answer is not None:
        _text(body.answer, "answer")
        if not body.answer.strip():
            raise HttpError(400, "empty answer")
    scope = _scope(request)
    t0 = time.perf_counter()

    def run(m):
        import torch

        from ...runtime import interp

        m = scope.model(m)
        if body.answer is not None:
            return k_trace(m, prompt, for_token=body.answer, positions=body.positions)
        with torch.inference_mode():
            logits, _ = interp.run_with_cache(m, prompt, [])
        return k_trace(m, prompt, answer_id=int(logits[-1].argmax()), positions=body.positions)

    tr = await st.engine.run(run)
    out = trace_json(tr)
    out["latency_ms"] = _ms(t0)
    return out


# -- /v1/explain ---------------------------------------------------------------------------------------

class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ExplainRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    messages: list[Message] | None = Field(None, min_length=1, description="a chat prompt (the chat template "
                                                                           "is applied, as /v1/chat/completions)")
    prompt: str | None = Field(None, description="or a plain text prompt")
    completion: str = Field(..., description="the generated text to explain")
    top: int = Field(5, ge=1, le=50)
    index: int | None = Field(None, ge=0, description="also give this token's per-layer attention/FFN "
                                                      "contributions to its logit")
    offset: int | None = Field(None, ge=0, description="or the token covering this character offset of the "
                                                       "completion (a streamed token the page shows)")


def _explain_prompt_ids(model, body: ExplainRequest) -> list[int]:
    tok = model.tokenizer
    if (body.messages is None) == (body.prompt is None):
        raise HttpError(400, "give either 'messages' or 'prompt'")
    if body.prompt is not None:
        ids = tok.encode(_prompt(body.prompt))
    else:
        msgs = [{"role": m.role, "content": _text(m.content, "messages.content")} for m in body.messages]
        try:
            ids = tok.encode_chat(msgs, add_generation_prompt=True)
        except Exception as exc:  # a template that breaks on this input is the request's problem
            raise HttpError(400, f"could not render the chat template: {exc}") from None
    if not ids:
        raise HttpError(400, "the prompt encodes to no tokens")
    return list(ids)


def logit_writers(model, seq: list[int], token_id: int, features, top: int) -> list[dict[str, Any]]:
    """The FFN features whose output adds most to `token_id`'s logit (relative to the mean logit)
    at the last position of `seq`: activation × (down column · the token's direction), the
    attribution DESCRIBE's decoded claims use (`knowledge.decode.attribute`)."""
    import torch

    from ...knowledge.decode import attribute as logit_attribution
    from ...runtime import interp

    n = model.spec.num_layers
    names = [f"blocks.{L}.mlp.hook_post" for L in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.inference_mode():
        _, cache = interp.run_with_cache(model, seq, names)
        acts = {L: cache[f"blocks.{L}.mlp.hook_post"][-1:].float() for L in range(n)}
        contribs = logit_attribution(model, acts, cache[f"blocks.{n - 1}.hook_resid_post"][-1:].float(), token_id)
    ranked = sorted(((float(v), L, int(f)) for L, c in contribs.items()
                     for v, f in zip(*c.topk(min(top, c.numel())))), reverse=True)[:top]
    out = []
    for v, L, f in ranked:
        info = features.info(L, [f]).get(f)
        out.append({"layer": L, "feature": f, "contribution": round(v, 4),
                    "activation": round(float(acts[L][0, f]), 4),
                    "top_tokens": list(info.top_tokens[:4]) if info else [],
                    "relation": info.relation if info else None})
    return out


def token_at(tok, ids: list[int], offset: int) -> int:
    """The index of the token of `ids` whose decoded text covers character `offset`."""
    end = 0
    for j in range(len(ids)):
        end = len(tok.decode(ids[: j + 1]))
        if end > offset:
            return j
    return len(ids) - 1


@router.post("/v1/explain")
async def explain(body: ExplainRequest, request: Request):
    from ...knowledge.explain import VindexFeatures, attribute
    from ...knowledge.trace import trace as k_trace

    st = _st(request)
    model = _model(request, "/v1/explain", "generate")
    _vindex(request, "/v1/explain")
    _text(body.completion, "completion")
    prompt_ids = _explain_prompt_ids(model, body)
    completion_ids = model.tokenizer.encode(body.completion, add_special_tokens=False)
    if not completion_ids:
        raise HttpError(400, "the completion encodes to no tokens")
    if len(completion_ids) > MAX_EXPLAIN_TOKENS:
        raise HttpError(400, f"the completion has {len(completion_ids)} tokens; at most {MAX_EXPLAIN_TOKENS}")
    if len(prompt_ids) + len(completion_ids) > model.spec.max_position:
        raise HttpError(400, f"prompt + completion exceed the context window ({model.spec.max_position})")
    index = body.index
    if index is None and body.offset is not None:
        if body.offset >= len(body.completion):
            raise HttpError(400, f"offset {body.offset} is outside the completion ({len(body.completion)} characters)")
        index = token_at(model.tokenizer, completion_ids, body.offset)
    if index is not None and index >= len(completion_ids):
        raise HttpError(400, f"index {index} is outside the completion ({len(completion_ids)} tokens)")
    scope = _scope(request)
    t0 = time.perf_counter()

    def run(m):
        m = scope.model(m)
        src = VindexFeatures(scope.view())
        toks = attribute(m, prompt_ids, completion_ids, src, top=body.top)
        layers = writers = None
        if index is not None:
            j = index
            seq = prompt_ids + completion_ids[:j]
            layers = k_trace(m, seq, answer_id=completion_ids[j], positions="last")
            writers = logit_writers(m, seq, completion_ids[j], src, top=body.top)
        return toks, layers, writers

    toks, tr, writers = await st.engine.run(run)
    offset, rows = 0, []
    for t in toks:
        row = t.to_json()
        row["offset"] = offset
        offset += len(t.token)
        rows.append(row)
    out: dict[str, Any] = {"tokens": rows, "completion": body.completion, "prompt_tokens": len(prompt_ids)}
    if tr is not None:
        out["index"] = index
        out["writers"] = writers
        out["layers"] = [{"layer": r.layer, "rank": r.answer_rank, "probability": r.answer_prob,
                          "attn_logit": r.attn_logit, "ffn_logit": r.ffn_logit, "attn_share": r.attn_share,
                          "who": r.who} for r in tr.rows]
    out["latency_ms"] = _ms(t0)
    return out


# -- /v1/describe/rows ---------------------------------------------------------------------------------

@router.get("/v1/describe/rows")
async def describe_rows(request: Request, entity: str = Query(...),
                        band: Literal["syntax", "knowledge", "output", "all"] = "all",
                        mode: Literal["auto", "embedding", "residual"] = "auto",
                        relations_only: bool = False,
                        limit: int = Query(200, ge=1, le=MAX_LIMIT)):
    st = _st(request)
    vx = _vindex(request, "/v1/describe/rows")
    if not entity.strip():
        raise HttpError(400, "missing entity")
    _text(entity, "entity")
    scope = _scope(request)
    kw = dict(band=None if band == "all" else band, mode=_mode_for(st, mode), relations_only=relations_only)
    result = await run_describe(st, vx, entity, scope=scope, knn_entries=scope.knn(), **kw)
    out = result.to_json()
    out["edges"] = out["edges"][:limit]
    return out


# -- /v1/feature ---------------------------------------------------------------------------------------

@router.get("/v1/feature")
async def feature(request: Request, layer: int = Query(...), feature: int = Query(...),
                  prompt: list[str] = Query([], description="prompts to score (repeat the parameter)"),
                  entity: str | None = Query(None, description="also score the vindex's probe templates filled "
                                                               "with this entity"),
                  top: int = Query(10, ge=1, le=100)):
    from ...knowledge.feature import MAX_PROMPTS, feature_profile
    from ...knowledge.labels import probe_templates

    st = _st(request)
    vx = _vindex(request, "/v1/feature")
    prompts = [_text(p, "prompt") for p in prompt if p.strip()]
    if entity is not None and entity.strip():
        _text(entity, "entity")
        for templates in probe_templates(vx).values():
            filled = templates[0].replace("{X}", entity.strip()) if templates else None
            if filled and filled not in prompts and len(prompts) < MAX_PROMPTS:
                prompts.append(filled)
    if len(prompts) > MAX_PROMPTS:
        raise HttpError(400, f"at most {MAX_PROMPTS} prompts")
    if prompts and st.config.inference and st.engine is not None:
        model = _model(request, "/v1/feature", "generate")
        for p in prompts:
            _check_length(model, p)
    scope = _scope(request)
    t0 = time.perf_counter()
    if prompts and st.config.inference and st.engine is not None:
        prof = await st.engine.run(lambda m: feature_profile(vx, layer, feature, model=scope.model(m),
                                                             prompts=prompts, top=top))
    else:
        prof = await run_in_threadpool(lambda: feature_profile(vx, layer, feature, top=top))
    out = prof.to_json()
    out["latency_ms"] = _ms(t0)
    return out


# -- /v1/lql, /v1/lql/complete ---------------------------------------------------------------------------

class LqlRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    statement: str = Field(..., max_length=100_000)


class WebLql:
    """The LQL session behind the console: what the server serves — the vindex with the request's
    overlay, the engine's (overlay-aware) model, the overlay's KNN facts — one statement at a time."""

    def __init__(self, vindex):
        from ...lql import default_vindex as dv
        from ...lql.repl import LqlCompleter
        from ...lql.session import LqlExecutionError, Session

        class Served(Session):
            served_model = None
            served_knn = None

            def model(self, keyword: str):
                if self.served_model is None:
                    raise LqlExecutionError(f"{keyword} needs inference: this server runs without it")
                return self.served_model

            def knn_entries(self):
                return self.served_knn

        self.base = vindex
        self.session = Served(default_vindex=False, progress=False)
        self.session.backend = "vindex"
        self.session.vindex = vindex
        self.session.vindex_is_default = vindex.model == dv.DEFAULT_NAME
        self.completer = LqlCompleter(self.session)
        self.lock = threading.Lock()

    def bind(self, scope, model) -> None:
        """Point the session at one request's overlay and model (under `lock`)."""
        self.session.vindex = scope.view()
        self.session.served_model = None if model is None else scope.model(model)
        self.session.served_knn = scope.knn()


def _web_lql(request: Request) -> WebLql:
    src = request.app.state.knowledge if hasattr(request.app.state, "knowledge") else None
    if src is None:
        raise ServiceUnavailable("this server has no vindex")
    base = src.require()
    cur = getattr(request.app.state, "web_lql", None)
    if cur is None or cur.base is not base:
        cur = request.app.state.web_lql = WebLql(base)
    return cur


def allowed(stmt) -> str | None:
    """Why `stmt` may not run over HTTP (None: it may): the console reads, it never opens,
    writes or edits anything on the server."""
    from ...lql import ast

    if isinstance(stmt, ast.Pipe):
        return allowed(stmt.left) or allowed(stmt.right)
    ok = (ast.Describe, ast.Walk, ast.Select, ast.Infer, ast.ExplainWalk, ast.ExplainInfer, ast.Trace,
          ast.ShowRelations, ast.ShowLayers, ast.ShowFeatures, ast.ShowEntities, ast.Stats)
    if not isinstance(stmt, ok):
        return f"{stmt.keyword} is not available in the web console (it reads only: use the patches view to edit)"
    if isinstance(stmt, ast.Stats) and stmt.path is not None:
        return 'STATS "path" is not available in the web console'
    if isinstance(stmt, ast.Trace) and stmt.save is not None:
        return "TRACE ... SAVE is not available in the web console (the heat map is in the TRACE view)"
    return None


@router.post("/v1/lql")
async def lql(body: LqlRequest, request: Request):
    from ...errors import ModelqlError
    from ...lql import render
    from ...lql.executor import Executor
    from ...lql.parser import parse_pieces

    st = _st(request)
    _vindex(request, "/v1/lql")
    web = _web_lql(request)
    pieces = parse_pieces(body.statement)
    if not pieces:
        raise HttpError(400, "no statement")
    for _, parsed in pieces:
        if isinstance(parsed, Exception):
            raise HttpError(400, str(parsed))
        why = allowed(parsed)
        if why:
            raise HttpError(400, why)
    scope = _scope(request)
    t0 = time.perf_counter()

    def run(m):
        outs = []
        with web.lock:
            web.bind(scope, m)
            ex = Executor(web.session)
            for piece, stmt in pieces:
                try:
                    outs.append({"statement": piece.text, "output": render.text(ex.execute(stmt))})
                except ModelqlError as exc:
                    outs.append({"statement": piece.text, "error": str(exc)})
                    break
                except Exception as exc:  # a bug: one line, as LQL batch mode reports it
                    outs.append({"statement": piece.text, "error": f"{type(exc).__name__}: {exc}"})
                    break
        return outs

    if st.engine is not None and st.config.inference:
        results = await st.engine.run(run)
    else:
        results = await run_in_threadpool(lambda: run(None))
    return {"results": results, "latency_ms": _ms(t0)}


class CompleteRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field("", max_length=100_000)
    cursor: int | None = Field(None, ge=0, description="offset of the cursor in text (default: its end)")
    limit: int = Field(50, ge=1, le=500)


@router.post("/v1/lql/complete")
async def lql_complete(body: CompleteRequest, request: Request):
    """What Tab offers at `cursor` in the REPL (POST: a console's text can outgrow a URL)."""
    from prompt_toolkit.document import Document

    _vindex(request, "/v1/lql/complete")
    web = _web_lql(request)
    text, limit = _text(body.text, "text"), body.limit
    pos = len(text) if body.cursor is None else min(body.cursor, len(text))

    def run():
        out = []
        for c in web.completer.get_completions(Document(text, pos), None):
            out.append({"text": c.text, "start": pos + c.start_position, "display": c.display_text})
            if len(out) >= limit:
                break
        return out

    return {"completions": await run_in_threadpool(run)}


@router.get("/v1/entities/complete")
async def entities_complete(request: Request, prefix: str = Query("", max_length=200),
                            limit: int = Query(20, ge=1, le=200)):
    """Entity names starting with `prefix` (the REPL's string completion source)."""
    _vindex(request, "/v1/entities/complete")
    web = _web_lql(request)
    low = prefix.lower()

    def run():
        out = []
        for name in web.completer.entity_names():
            if name.lower().startswith(low):
                out.append(name)
                if len(out) >= limit:
                    break
        return out

    return {"entities": await run_in_threadpool(run)}


# -- /v1/patch-files -------------------------------------------------------------------------------------

@router.get("/v1/patch-files")
async def patch_files_list(request: Request):
    return {"files": await run_in_threadpool(patch_files.listing, _st(request).config.patch_dir)}


class PatchFileApply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str


@router.post("/v1/patch-files/apply")
async def patch_files_apply(body: PatchFileApply, request: Request):
    """Apply a `.vlp` of the server's patch directory by name (`server.patch_files`, as `/v1/patches/apply`)."""
    cfg = _st(request).config
    path = patch_files.resolve(cfg.patch_dir, body.name)
    data = await run_in_threadpool(patch_files.read, path, body.name, cfg.max_patch_bytes)
    editing()

    def run(ps):
        ap = ps.apply(ps.validate(data, where=body.name), name=body.name)
        return {"applied": ap.name, "operations": len(ap.patch.operations), "active_patches": _active(ps)}

    return await _mutate(request, "/v1/patch-files/apply", run)


__all__ = ["router", "allowed", "trace_json", "WebLql"]
