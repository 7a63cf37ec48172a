"""Fixtures: a real server on a free 127.0.0.1 port serving the embedded model with its cached,
probe-labelled vindex (built as `modelql serve` builds it), the same model and vindex for the
Python API calls the client is compared with, and a `KnowledgeClient` on the server."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


def _model_dir() -> Path | None:
    from modelql import defaults as D

    p = Path(os.environ.get("MODELQL_TEST_DEFAULT_MODEL") or D.DEFAULT_MODEL_DIR)
    return p if (p / "config.json").exists() else None


@pytest.fixture(scope="session")
def kmodel_dir() -> Path:
    d = _model_dir()
    if d is None:
        pytest.skip("the embedded default model is not installed (src/modelql/data/default-model)")
    return d


@pytest.fixture(scope="session")
def kvindex(kmodel_dir):
    import torch

    from modelql.lql import default_vindex as dv
    from modelql.vindex import Vindex

    torch.set_num_threads(1)
    path = dv.ensure_vindex(kmodel_dir, name=dv.DEFAULT_NAME, model_id=dv.DEFAULT_NAME, progress=False, label=True)
    return Vindex.load(path)


@pytest.fixture(scope="session")
def kmodel(kmodel_dir):
    from modelql.runtime.loading import load_model

    return load_model(kmodel_dir)


@pytest.fixture(scope="session")
def ksrv(kmodel, kvindex):
    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import BackgroundServer, build

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0)
    app, engine = build(None, cfg, model=kmodel, vindex_source=VindexSource.ready(kvindex))
    srv = BackgroundServer(app, cfg)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        engine.stop()


@pytest.fixture()
def kc(ksrv):
    from modelql.client import KnowledgeClient

    with KnowledgeClient(ksrv.url, timeout=120) as c:
        yield c


@pytest.fixture()
def dead_url() -> str:
    """A loopback URL nothing listens on (a port bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"
