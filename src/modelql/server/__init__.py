"""The HTTP server: one FastAPI app serving the OpenAI-compatible group and the knowledge group.

`create_app(config, engine)` builds the app (app.py); `Engine` (engine.py) is the continuous-batching
scheduler that owns the model on one worker thread; `serve()` (serve.py) runs it under uvicorn.
Imports are lazy so `import modelql.server` stays cheap.
"""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app", "Engine", "serve"]


def __getattr__(name: str):
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "Engine":
        from .engine import Engine

        return Engine
    if name == "serve":
        from .serve import serve

        return serve
    raise AttributeError(name)
