"""Fixtures: one tiny random Llama with a trained byte-level BPE tokenizer (built once per session),
and servers on 127.0.0.1 free ports, each stopped by its fixture."""

from __future__ import annotations

import contextlib

import pytest

from tests.runtime.tiny_tokenizer import make_model_with_tokenizer


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("server-model")
    make_model_with_tokenizer(d, "chatml", max_position=256, seed=3)
    return d


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from modelql.runtime.loading import load_model

    return load_model(tiny_dir)


@pytest.fixture(scope="session")
def eos_id(tiny_model):
    return tiny_model.tokenizer.eos_token_ids[0]


@contextlib.contextmanager
def running_server(model, **config):
    """A served app on a free loopback port; always shut down (engine included) on exit."""
    from modelql.server.app import create_app
    from modelql.server.config import ServerConfig
    from modelql.server.engine import Engine
    from modelql.server.serve import BackgroundServer

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, **config)
    engine = Engine(model, max_batch=cfg.max_batch, max_queue=cfg.max_queue,
                    queue_full_status=cfg.queue_full_status)
    app = create_app(cfg, engine)
    server = BackgroundServer(app, cfg)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        engine.stop()


@pytest.fixture(scope="module")
def server(tiny_model):
    with running_server(tiny_model) as srv:
        yield srv


@pytest.fixture()
def make_server(tiny_model):
    """Start servers with specific flags: `with make_server(api_key="k") as srv: ...`."""
    return lambda **config: running_server(tiny_model, **config)


@pytest.fixture(scope="session")
def default_server():
    """The embedded model with every route group (the knowledge group without a vindex: its routes
    answer errors, which is what the envelope test needs)."""
    from modelql.remote import routes as ffn_routes
    from modelql.runtime.loading import load_model
    from modelql.server import knowledge_routes, stream_routes
    from modelql.server.app import create_app
    from modelql.server.config import ServerConfig
    from modelql.server.engine import Engine
    from modelql.server.serve import BackgroundServer

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, max_n=4)
    engine = Engine(load_model(None), max_batch=cfg.max_batch, max_queue=cfg.max_queue)
    app = create_app(cfg, engine, knowledge=[knowledge_routes.router, stream_routes.router, ffn_routes.router])
    knowledge_routes.attach(app, knowledge_routes.VindexSource.unavailable("no vindex in this test"))
    with BackgroundServer(app, cfg) as srv:
        yield srv
    engine.stop()


@pytest.fixture(scope="session", autouse=True)
def fuzz_report(request):
    """After the session: how many schemathesis cases the fuzz runs sent (issue 23's figure)."""
    yield
    from .fuzz_media import CASES

    if CASES:
        parts = []
        for mode in ("single", "multi"):
            ops = {k: n for k, n in CASES.items() if k.startswith(mode + " ")}
            if ops:
                parts.append(f"{mode}-model: {sum(ops.values())} cases over {len(ops)} operations")
        line = "fuzz: " + "; ".join(parts) + " (every answer < 500 or a documented 503)"
        capman = request.config.pluginmanager.getplugin("capturemanager")
        with capman.global_and_fixture_disabled():  # past pytest's capture: the run's figure
            print("\n" + line, flush=True)
