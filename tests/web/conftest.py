"""One served embedded model for the web tests (API key, patch directory with one saved patch), and
the headless Chromium the browser tests drive (Debian's `chromium` through playwright; no download)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

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


CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
NO_CHROMIUM = "Debian's chromium is not installed (apt-get install -y chromium; .ci/run installs it)"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where screenshots go: $MODELQL_ARTIFACTS/web (default: test-artifacts/web)."""
    d = Path(os.environ.get("MODELQL_ARTIFACTS", "test-artifacts")) / "web"
    d.mkdir(parents=True, exist_ok=True)
    return d


@pytest.fixture(scope="module")
def browser():
    """Module-scoped: playwright's sync API keeps an event loop running in this thread while it lives
    (a later test's asyncio.run would fail)."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    profile = tempfile.mkdtemp(prefix="modelql-chromium-")
    with sync_api.sync_playwright() as p:
        # the network is off for everything but loopback: a dead proxy (port 9, discard) takes the rest
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, headless=True,
                                                   args=FLAGS + ["--proxy-server=http://127.0.0.1:9"],
                                                   viewport={"width": 1280, "height": 900})
        try:
            yield ctx
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)


def network_guard(page, origin: str) -> list[str]:
    """Refuse (and record) every request the page makes outside `origin`: the network is "disabled"."""
    outside: list[str] = []

    def guard(route):
        if route.request.url.startswith(origin):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", guard)
    return outside
