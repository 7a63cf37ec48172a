"""Run the app under uvicorn: `serve(model, config)` (the `modelql serve` command) and
`BackgroundServer` (a server on a thread, for tests and benchmarks; always stopped by its owner).

Graceful shutdown: on SIGINT/SIGTERM uvicorn stops accepting connections and gives in-flight
requests (streams included) `config.graceful_timeout` seconds; then the lifespan stops the engine,
which fails any sequence still running with 503 "server is shutting down".
"""

from __future__ import annotations

import contextlib
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

from ..errors import VindexError
from .config import ServerConfig


def _uvicorn_config(app, config: ServerConfig):
    import uvicorn

    # Proxy headers (X-Forwarded-For rewriting the client address) only with --trust-forwarded-for:
    # uvicorn trusts them from 127.0.0.1 by default, which let any local client pick its rate-limit key.
    trust = config.trust_forwarded_for
    return uvicorn.Config(app, host=config.host, port=config.port, log_level=config.log_level,
                          timeout_graceful_shutdown=config.graceful_timeout, access_log=False,
                          lifespan="on", http="h11", ws="websockets-sansio", proxy_headers=trust,
                          forwarded_allow_ips="*" if trust else None)


def build(model_ref: str | Path | None, config: ServerConfig, dtype: str = "float32", model=None, loader=None,
          vindex_source=None, patches: list[str | Path] | None = None):
    """Load the model (None: the embedded default) and build the app and its engine, with the
    knowledge group browsing `vindex_source` (default: `VindexSource.for_model_ref(model_ref)` — the
    vindex given, or a model directory's cached vindex, extracted in the background on first use).
    `patches` (`serve --patch`) are applied into the served patch session (`apply_patches`)."""
    from ..remote import expert_routes
    from ..remote import routes as ffn_routes
    from . import knowledge_routes, stream_routes
    from .app import create_app
    from .engine import Engine

    if model is None and config.ffn_only:
        from ..remote.loading import load_ffn_shard

        model = load_ffn_shard(model_ref, config.owned_layers, dtype, config.owned_experts)
        if vindex_source is None and not (Path(str(model_ref)) / "index.json").is_file():
            vindex_source = knowledge_routes.VindexSource.unavailable(
                "this --ffn-only shard serves a model directory: browse routes need a vindex")
    if model is None:
        if loader is None:
            from ..runtime.loading import load_model as loader
        model = loader(model_ref, dtype)
    engine = Engine(model, max_batch=config.max_batch, max_queue=config.max_queue,
                    queue_full_status=config.queue_full_status)
    from . import web

    app = create_app(config, engine, knowledge=[knowledge_routes.router, stream_routes.router, ffn_routes.router, expert_routes.router,
                                                *web.routers()])
    if vindex_source is None:
        try:
            vindex_source = knowledge_routes.VindexSource.for_model_ref(model_ref)
        except VindexError as exc:  # e.g. a client slice: no browse files
            vindex_source = knowledge_routes.VindexSource.unavailable(str(exc))
    knowledge_routes.attach(app, vindex_source)
    if patches:
        apply_patches(app, patches)
    return app, engine


def apply_patches(app, paths: list[str | Path]) -> None:
    """`serve --patch FILE`: stack each .vlp file on the server's global patch session, as
    `POST /v1/patches/apply` does, so generation, `GET /v1/patches`, DESCRIBE and the LQL console all
    read the same overlay (and a client may remove the patch again). Waits for the vindex (a model
    directory's is extracted on first use): a patch edits the vindex's features."""
    from ..errors import ModelqlError
    from .knowledge_base import editing

    st, src = app.state.modelql, app.state.knowledge
    if not src.wait(None):
        raise ModelqlError(f"--patch needs the served model's vindex: {src.error or src.reason or 'none loaded'}")
    editing()
    ps = src.session(st.engine.model)
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ModelqlError(f"patch file not found: {raw}")
        ps.apply(path, name=path.name)
    if ps.has_weights and st.config.inference:
        st.engine.model = ps.model()


def first_request(url: str, model_id: str, api_key: str | None, inference: bool) -> str:
    auth = f" -H {shlex.quote('Authorization: Bearer ' + api_key)}" if api_key else ""
    if not inference:
        return f"curl {url}/v1/models{auth}"
    body = ('{"model": "%s", "messages": [{"role": "user", "content": "What is the capital of France?"}], '
            '"max_tokens": 32}' % model_id)
    return (f"curl {url}/v1/chat/completions{auth} -H 'Content-Type: application/json' \\\n"
            f"  -d {shlex.quote(body)}")


def serve(model_ref: str | Path | None | list[str | Path], config: ServerConfig, dtype: str = "float32", out=None,
          loader=None, multi: bool = False, patches: list[str] | None = None) -> None:
    """Load, print the URL and a first request to try, serve until interrupted. Several model
    references (or `multi`, as `--dir` asks) serve in multi-model mode (`multi.py`)."""
    import uvicorn

    out = out or sys.stdout
    refs = list(model_ref) if isinstance(model_ref, (list, tuple)) else [model_ref]
    if multi or len(refs) > 1:
        from .multi import build_multi

        print(f"loading {len(refs)} models (multi-model mode) ...", file=out, flush=True)
        app, hosted = build_multi(refs, config, dtype, loader=loader, out=out)
        ids = [h.model_id for h in hosted]
        served = f"{len(ids)} models ({', '.join(ids)}; knowledge routes under /v1/{{model_id}}/)"
    else:
        print(f"loading {refs[0] or 'the embedded default model'} ...", file=out, flush=True)
        app, engine = build(refs[0], config, dtype, loader=loader, patches=patches)
        ids = [app.state.modelql.model_id]
        served = ids[0]
        if patches:
            served += " with " + ", ".join(Path(p).name for p in patches) + " applied (GET /v1/patches)"

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            if self.started:
                port = self.servers[0].sockets[0].getsockname()[1] if self.servers else config.port
                host = config.host if ":" not in config.host else f"[{config.host}]"
                url = f"http://{host}:{port}"
                print(f"modelql serving {served} at {url}  (OpenAPI: {url}/docs)\n"
                      f"try:\n  {first_request(url, ids[0], config.api_key, config.inference)}",
                      file=out, flush=True)

        def handle_exit(self, sig, frame):
            # a requested stop is a clean exit (uvicorn would re-raise the signal after shutdown)
            if self.should_exit:
                if sig == signal.SIGINT:  # a second Ctrl-C: stop waiting for in-flight requests
                    self.force_exit = True
                return
            self.should_exit = True
            print(f"shutting down: finishing in-flight requests (up to {config.graceful_timeout:g} s) ...",
                  file=out, flush=True)

    _Server(_uvicorn_config(app, config)).run()
    print("modelql server stopped", file=out, flush=True)


@contextlib.contextmanager
def background(model_ref: str | Path | None, config: ServerConfig, **build_kwargs):
    """`build` + a started `BackgroundServer`; on exit the server and its engine always stop.
    For tests and embedding: the one place that owns both lifetimes."""
    app, engine = build(model_ref, config, **build_kwargs)
    try:
        with BackgroundServer(app, config) as server:
            yield server
    finally:
        engine.stop()


class BackgroundServer:
    """A uvicorn server on a daemon thread (port 0 = a free port). Use as a context manager."""

    def __init__(self, app, config: ServerConfig | None = None):
        import uvicorn

        config = config or ServerConfig(port=0)
        self.app = app
        self.server = uvicorn.Server(_uvicorn_config(app, config))
        self.server.install_signal_handlers = lambda: None  # not the main thread
        self.thread = threading.Thread(target=self.server.run, name="modelql-uvicorn", daemon=True)
        self.url = ""

    def start(self, timeout: float = 30.0) -> "BackgroundServer":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> "BackgroundServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
