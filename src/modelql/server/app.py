"""The app factory: `create_app(config, engine)` → one FastAPI app serving every route group.

Routers: `openai_routes.router` (chat/completions, completions, embeddings, models),
`responses_routes.router` (/v1/responses), /docs and /redoc from packaged assets (`docs.py`), the operational
routes below (/health, /v1/health, /metrics), and a slot for the knowledge group: pass its routers
as `knowledge=[...]` (they get the mode checks in `ServerConfig.unavailable_reason`); every route
answers errors in OpenAI's envelope (`errors.py`). Middleware, outermost first: CORS (when enabled) → the edge
(metrics, rate limit, auth, body limit) → FastAPI's exception handlers (`errors.install`).

`engine` may be None while the model loads (`serve` starts listening first): /health then answers
503 `{"status":"loading","ready":false}` and model routes 503 until `set_engine` is called.
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse, Response

from .. import __version__
from . import docs, errors
from .body import use_json_reader
from .config import ServerConfig
from .errors import ServiceUnavailable
from .metrics import CONTENT_TYPE, Metrics
from .middleware import EdgeMiddleware
from .schemas import Health


@dataclass
class ServerState:
    """What every route reads: `request.app.state.modelql`."""

    config: ServerConfig
    model_id: str
    metrics: Metrics
    engine: Any = None  # Engine | None (None while loading)
    started: float = field(default_factory=time.time)

    @property
    def model(self):
        return None if self.engine is None else self.engine.model

    def require_model(self):
        if self.engine is None:
            raise ServiceUnavailable("model is still loading", headers={"Retry-After": "1"})
        return self.engine.model

    def set_engine(self, engine) -> None:
        """Install the engine once the model is loaded (health turns ready)."""
        if engine.metrics is None:
            engine.metrics = self.metrics
        self.engine = engine


def default_model_id(model_or_path) -> str:
    """The id /v1/models reports: the directory name (without .vindex); the embedded model is
    `modelql-default`."""
    path = getattr(model_or_path, "path", model_or_path)
    if path is None:
        return "modelql"
    from ..defaults import DEFAULT_MODEL_DIR

    if Path(path).resolve() == DEFAULT_MODEL_DIR.resolve():
        return "modelql-default"
    name = Path(path).name
    return name[: -len(".vindex")] if name.endswith(".vindex") else name


ops = APIRouter()


@ops.get("/health", response_model=Health, tags=["operations"],
         responses={503: {"model": Health, "description": "still loading"}})
async def health(request: Request):
    st: ServerState = request.app.state.modelql
    if st.engine is None:
        return JSONResponse({"status": "loading", "ready": False}, status_code=503)
    return {"status": "ok", "ready": True, "model": st.model_id}


@ops.get("/v1/health", tags=["operations"])
async def health_v1(request: Request):
    st: ServerState = request.app.state.modelql
    served = 0
    for metric in st.metrics.requests.collect():
        served += int(sum(s.value for s in metric.samples if s.name.endswith("_total")))
    return {"status": "ok", "uptime_seconds": int(time.time() - st.started), "requests_served": served}


@ops.get("/metrics", tags=["operations"], response_class=Response,
         responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format 0.0.4"}})
async def metrics(request: Request):
    st: ServerState = request.app.state.modelql
    return Response(st.metrics.exposition(), media_type=CONTENT_TYPE)


def create_app(config: ServerConfig, engine=None, *, model_id: str | None = None,
               knowledge: Iterable[APIRouter] = (), manage_engine: bool = True) -> FastAPI:
    """Build the app. With `manage_engine`, the app's lifespan starts the engine's worker thread
    and stops it at shutdown."""
    from . import openai_routes, responses_routes

    mid = config.model_id or model_id or (default_model_id(engine.model) if engine is not None else "modelql")
    metrics_ = Metrics(mid, __version__)
    state = ServerState(config=config, model_id=mid, metrics=metrics_)
    if engine is not None:
        state.set_engine(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        if manage_engine and state.engine is not None:
            state.engine.start()
        try:
            yield
        finally:
            if manage_engine and state.engine is not None:
                state.engine.stop(config.graceful_timeout)

    app = FastAPI(title="modelql", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API and knowledge API of a local transformer model.")
    app.state.modelql = state
    errors.install(app)
    docs.install(app)  # /docs and /redoc from packaged assets (no CDN)
    app.include_router(ops)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    for router in knowledge:
        app.include_router(router)
    use_json_reader(app)
    app.add_middleware(EdgeMiddleware, config=config, metrics=metrics_)
    if config.cors:
        app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"],
                           expose_headers=["*"])
    return app
