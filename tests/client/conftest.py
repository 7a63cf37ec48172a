"""Fixtures: a `KnowledgeClient` on the shared server (tests/conftest.py: the embedded model with
its cached, probe-labelled vindex, as `modelql serve` builds it)."""

from __future__ import annotations

import socket

import pytest


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
