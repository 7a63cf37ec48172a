"""Multi-model mode (server-api §2.4): one process, several models, one port.

Every model gets the app `serve.build` makes for a single model (its own engine, knowledge group,
vindex source). A front app answers what spans the models and routes the rest:

* `/health`, `/v1/health`, `/metrics` (all models' series, per-model ones labelled `model`), the web
  UI (`/`, `/ui/…`: the page lets a person pick the model and prefixes its knowledge calls),
  `/v1/models` (one card per model, `path: "/v1/{id}"`), `/v1/models/{id}`, `/openapi.json`;
* the OpenAI routes select a model by the body's `model` (missing: 400 param `model`; unknown:
  404 `model_not_found`), `/v1/walk-ffn` by the JSON body's `model_id`;
* the knowledge routes move under `/v1/{model_id}/…` (WebSocket `/v1/{model_id}/stream` too); the
  request reaches the model's app with the prefix removed.

The edge (rate limit, auth, body limit, request metrics) and CORS run once, on the front; the model
apps get a config without key, rate limit or CORS.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response
from starlette.types import Message, Receive, Scope, Send

from .. import __version__
from . import errors
from .body import OFFLOAD_BYTES, BodyError, read_json, use_json_reader
from .config import ServerConfig, ServerConfigError
from .errors import HttpError, error_bytes
from .metrics import CONTENT_TYPE, Metrics
from .middleware import EdgeMiddleware

BODY_SELECTED = {"/v1/chat/completions": "model", "/v1/completions": "model", "/v1/embeddings": "model",
                 "/v1/walk-ffn": "model_id"}
FRONT_PATHS = frozenset({"/health", "/v1/health", "/metrics", "/v1/models", "/openapi.json", "/docs",
                         "/docs/oauth2-redirect", "/redoc"})
HTTP_FAMILIES = ("modelql_http_", "modelql_rate_limited", "modelql_auth_failures")


def vindex_children(directory: str | Path) -> list[Path]:
    """`--dir DIR`: every `*.vindex` child, sorted by name."""
    d = Path(directory)
    if not d.is_dir():
        raise ServerConfigError(f"--dir {directory}: not a directory")
    found = sorted(p for p in d.iterdir() if p.is_dir() and p.name.endswith(".vindex"))
    if not found:
        raise ServerConfigError(f"--dir {directory}: no *.vindex directories in it")
    return found


def model_ids(refs: list[str | Path]) -> list[str]:
    """The id of each model (directory name without `.vindex`); two models may not share one."""
    from .app import default_model_id

    ids = [default_model_id(Path(r)) for r in refs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ServerConfigError(f"two models would have the same id {dup[0]!r}: rename a directory")
    return ids


@dataclasses.dataclass
class Hosted:
    """One served model: its id, its single-model app and engine."""

    model_id: str
    app: FastAPI
    engine: Any


def model_config(config: ServerConfig, model_id: str) -> ServerConfig:
    """A model app's config: the edge's jobs (key, rate limit, CORS) stay on the front."""
    return dataclasses.replace(config, model_id=model_id, api_key=None, rate_limit=None, cors=False,
                               strict_model_name=True)


def build_multi(refs: list[str | Path], config: ServerConfig, dtype: str = "float32", loader=None, out=None
                ) -> tuple[FastAPI, list[Hosted]]:
    """Load every model (in order, printing progress to `out`) and build the front app."""
    from .serve import build

    if config.model_id:
        raise ServerConfigError("--model-id names a single model; with several, ids are the directory names")
    ids = model_ids(refs)
    hosted = []
    for i, (ref, mid) in enumerate(zip(refs, ids), 1):
        if out is not None:
            print(f"  [{i}/{len(refs)}] {mid}  ({ref})", file=out, flush=True)
        app, engine = build(ref, model_config(config, mid), dtype, loader=loader)
        hosted.append(Hosted(mid, app, engine))
    return create_multi_app(config, hosted), hosted


class _Dispatch:
    """ASGI: sends a request to the model app it selects, or to the front app."""

    def __init__(self, front: FastAPI, hosted: list[Hosted]):
        self.front = front
        self.by_id = {h.model_id: h for h in hosted}

    def _names(self) -> str:
        return ", ".join(self.by_id)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.front(scope, receive, send)
            return
        path: str = scope["path"]
        if path in FRONT_PATHS or path.startswith("/v1/models/") or not path.startswith("/v1/"):
            await self.front(scope, receive, send)
            return
        if scope["type"] == "http" and path in BODY_SELECTED:
            await self._by_body(scope, receive, send, path)
            return
        head, _, rest = path[len("/v1/"):].partition("/")
        target = self.by_id.get(head)
        if target is not None and rest:
            sub = dict(scope, path="/v1/" + rest, raw_path=("/v1/" + rest).encode())
            await target.app(sub, receive, send)
            if "route" in sub:
                scope["route"] = sub["route"]
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008,
                        "reason": f"multi-model mode: connect to /v1/{{model_id}}/stream (models: {self._names()})"})
            return
        msg = (f"unknown model '{head}' (models: {self._names()})" if target is None and rest else
               f"multi-model mode: this route is /v1/{{model_id}}{path[3:]} (models: {self._names()})")
        await _reply(send, 404, error_bytes(path, 404, msg, "model_not_found"))

    async def _by_body(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        field = BODY_SELECTED[path]
        try:
            doc = read_json(body) if len(body) < OFFLOAD_BYTES else await run_in_threadpool(read_json, body)
        except BodyError:
            doc = None
        if not isinstance(doc, dict):  # not a JSON object: the model app says what is wrong with it
            if field == "model_id":
                await _reply(send, 400, error_bytes(path, 400, "multi-model mode: /v1/walk-ffn needs a JSON body "
                                                              "with model_id"))
                return
            target = next(iter(self.by_id.values()))
        else:
            name = doc.get(field)
            if not isinstance(name, str) or not name:
                msg = f"you must provide a {field}: this server serves several models ({self._names()})"
                await _reply(send, 400, _error(path, 400, msg, "invalid_value", field))
                return
            target = self.by_id.get(name)
            if target is None:
                msg = f"The model '{name}' does not exist (models: {self._names()})"
                await _reply(send, 404, _error(path, 404, msg, "model_not_found", field))
                return
        replayed = [False]

        async def replay() -> Message:
            if not replayed[0]:
                replayed[0] = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await target.app(scope, replay, send)


def _error(path: str, status: int, message: str, code: str, param: str) -> bytes:
    return json.dumps(errors.error_body(path, status, message, code, param)).encode()


async def _reply(send: Send, status: int, body: bytes) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class _MergedMetrics:
    """A collector over the front registry and every model's: the request families come from the
    front (it sees every request), the engine families from each model, labelled `model`."""

    def __init__(self, front: Metrics, hosted: list[Hosted]):
        self.front = front
        self.hosted = hosted

    def collect(self):
        families: dict[str, Metric] = {}
        sources = [(None, self.front.registry)] + [(h.model_id, h.app.state.modelql.metrics.registry)
                                                    for h in self.hosted]
        for mid, registry in sources:
            for fam in registry.collect():
                front_family = fam.name.startswith(HTTP_FAMILIES)
                if (mid is None) != front_family:
                    continue
                merged = families.get(fam.name)
                if merged is None:
                    merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                for s in fam.samples:
                    labels = dict(s.labels)
                    if mid is not None:
                        labels.setdefault("model", mid)
                    merged.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        yield from families.values()


def create_multi_app(config: ServerConfig, hosted: list[Hosted], *, manage_engines: bool = True) -> FastAPI:
    """The front app over several model apps (see the module docstring). With `manage_engines`, its
    lifespan starts every model's engine and stops them at shutdown."""
    ids = [h.model_id for h in hosted]
    metrics_ = Metrics(",".join(ids), __version__)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MergedMetrics(metrics_, hosted))
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engines:
            for h in hosted:
                h.engine.start()
        try:
            yield
        finally:
            if manage_engines:
                for h in hosted:
                    h.engine.stop(config.graceful_timeout)

    front = FastAPI(title="modelql", version=__version__, lifespan=lifespan,
                    description=f"OpenAI-compatible API and knowledge API of {len(ids)} local models "
                                f"({', '.join(ids)}); knowledge routes under /v1/{{model_id}}/.")
    front.state.hosted = hosted
    front.state.metrics = metrics_
    errors.install(front)
    from . import web

    front.include_router(web.router)  # the web UI's page and assets; the page picks a model from /v1/models

    def card(h: Hosted) -> dict:
        spec = h.engine.model.spec
        return {"id": h.model_id, "object": "model", "created": int(started), "owned_by": "modelql",
                "path": f"/v1/{h.model_id}", "features": spec.num_layers * spec.intermediate_size, "loaded": True}

    @front.get("/health", tags=["operations"])
    async def health():
        if not all(h.engine.running for h in hosted):
            return JSONResponse({"status": "loading", "ready": False, "models": ids}, status_code=503)
        return {"status": "ok", "ready": True, "models": ids}

    @front.get("/v1/health", tags=["operations"])
    async def health_v1():
        served = 0
        for metric in metrics_.requests.collect():
            served += int(sum(s.value for s in metric.samples if s.name.endswith("_total")))
        return {"status": "ok", "uptime_seconds": int(time.time() - started), "requests_served": served,
                "models": ids}

    @front.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)

    @front.get("/v1/models", tags=["openai"])
    async def list_models():
        return {"object": "list", "data": [card(h) for h in hosted]}

    @front.get("/v1/models/{model_id:path}", tags=["openai"])
    async def get_model(model_id: str):
        for h in hosted:
            if h.model_id == model_id:
                return card(h)
        raise HttpError(404, f"The model '{model_id}' does not exist", code="model_not_found", param="model")

    def openapi() -> dict:
        """The model apps' document with the knowledge paths moved under /v1/{model_id}/."""
        if front.openapi_schema is None:
            doc = copy.deepcopy(hosted[0].app.openapi())
            doc["info"]["description"] = front.description
            paths: dict[str, Any] = {}
            for path, ops in doc["paths"].items():
                if path in FRONT_PATHS or path in BODY_SELECTED or path.startswith("/v1/models") \
                        or not path.startswith("/v1/"):
                    paths[path] = ops
                    continue
                for op in ops.values():
                    if isinstance(op, dict):
                        op.setdefault("parameters", []).insert(0, {
                            "name": "model_id", "in": "path", "required": True,
                            "schema": {"type": "string", "enum": ids}, "description": "a served model's id"})
                paths["/v1/{model_id}/" + path[len("/v1/"):]] = ops
            doc["paths"] = paths
            front.openapi_schema = doc
        return front.openapi_schema

    front.openapi = openapi  # type: ignore[method-assign]
    use_json_reader(front)
    app: Any = _Dispatch(front, hosted)
    app = EdgeMiddleware(app, config=config, metrics=metrics_)
    if config.cors:
        app = CORSMiddleware(app, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"], expose_headers=["*"])
    return _Root(app, front)


class _Root:
    """The ASGI callable uvicorn runs: the middleware chain, with the front app's `state` (tests and
    `serve` read `app.state`) and its lifespan (every model's engine)."""

    def __init__(self, chain, front: FastAPI):
        self.chain = chain
        self.front = front
        self.state = front.state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.front(scope, receive, send)
            return
        await self.chain(scope, receive, send)
