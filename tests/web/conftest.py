"""One served embedded model for the web tests: API key, patch directory with one saved patch."""

from __future__ import annotations

import pytest

KEY = "web-test-key"
PATCH = "atlantis.vlp"


@pytest.fixture(scope="session")
def patch_dir(tmp_path_factory, kvindex):
    """A patch directory holding one KNN patch (Atlantis → capital → Zorbu), saved by LQL."""
    from modelql.lql.executor import run_batch
    from modelql.lql.session import Session

    d = tmp_path_factory.mktemp("patches")
    script = (f'USE "{kvindex.path}"; BEGIN PATCH "{d / PATCH}"; '
              'INSERT INTO EDGES (entity, relation, target) VALUES ("Atlantis", "capital", "Zorbu") MODE KNN; '
              "SAVE PATCH;")
    for o in run_batch(script, Session(default_vindex=False, progress=False)):
        assert o.ok, o.error
    assert (d / PATCH).is_file()
    return d


@pytest.fixture(scope="session")
def web_srv(kmodel, kvindex, patch_dir):
    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import background

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, api_key=KEY, patch_dir=str(patch_dir))
    with background(None, cfg, model=kmodel, vindex_source=VindexSource.ready(kvindex)) as srv:
        yield srv
