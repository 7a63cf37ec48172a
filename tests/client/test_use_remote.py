"""LQL `USE REMOTE`: statements forwarded through KnowledgeClient render like local ones."""

from __future__ import annotations

import pytest

from modelql.errors import CapabilityError
from modelql.lql.executor import Executor
from modelql.lql.render import text
from modelql.lql.session import Session


def _run(ex: Executor, stmt: str) -> str:
    return text(ex.run(stmt))


@pytest.fixture()
def remote(ksrv):
    ex = Executor(Session(default_vindex=False))
    out = _run(ex, f'USE REMOTE "{ksrv.url}"')
    yield ex, out
    ex.session.reset()


@pytest.fixture(scope="module")
def local(kvindex):
    ex = Executor(Session(default_vindex=False))
    ex.session.use_vindex(kvindex.path)
    return ex


def test_use_remote_connects(remote, ksrv, kvindex):
    ex, out = remote
    from modelql.lql.render import format_count

    n = sum(kvindex.num_features(layer) for layer in kvindex.layers())
    assert out.splitlines() == [f"Connected: modelql-default ({kvindex.num_layers} layers, {format_count(n)} features)",
                                f"  Remote: {ksrv.url}"]
    assert ex.session.backend == "remote" and ex.session.summary() == f"remote {ksrv.url}"


@pytest.mark.parametrize("stmt", ['DESCRIBE "France"', 'DESCRIBE "France" VERBOSE',
                                  'DESCRIBE "Germany" ALL LAYERS', 'DESCRIBE "France" KNOWLEDGE'])
def test_describe_equals_local(remote, local, stmt):
    ex, _ = remote
    got, want = _run(ex, stmt), _run(local, stmt)
    assert got == want
    assert "→" in got


def test_infer_and_explain_infer_like_local(remote, local):
    ex, _ = remote
    got = _run(ex, 'INFER "The capital of France is" TOP 3')
    want = _run(local, 'INFER "The capital of France is" TOP 3')
    assert got.splitlines()[:4] == want.splitlines()[:4] and "Paris" in got
    e = _run(ex, 'EXPLAIN INFER "The capital of France is"')
    assert "L3" in e and "gate=" in e


def test_walk_select_relations_stats(remote):
    ex, _ = remote
    assert "L0" in _run(ex, 'WALK "France" TOP 3')
    sel = _run(ex, 'SELECT * FROM EDGES WHERE relation = "capital" LIMIT 5')
    assert "capital" in sel
    assert _run(ex, "SHOW RELATIONS").strip()
    st = _run(ex, "STATS")
    assert "Model: modelql-default" in st and "Remote: http://127.0.0.1:" in st


def test_insert_and_patches_stay_in_the_lql_session(remote, ksrv):
    from modelql.client import KnowledgeClient

    ex, _ = remote
    out = _run(ex, 'INSERT INTO EDGES (entity, relation, target) VALUES ("Atlantis", "capital", "Poseidonia") MODE KNN')
    assert out.startswith("Inserted: Atlantis —[capital]→ Poseidonia at L") and "KNN store: 1 entries total" in out
    assert "1. (unsaved edits) 1 ops" in _run(ex, "SHOW PATCHES")
    assert "Poseidonia" in _run(ex, 'INFER "The capital of Atlantis is" TOP 1')
    with KnowledgeClient(ksrv.url) as global_view:  # another client sees the base model
        assert global_view.patches().patches == ()
    assert _run(ex, 'REMOVE PATCH "(unsaved edits)"') == "Removed patch #1"
    assert _run(ex, "SHOW PATCHES") == "  (no patches applied)"
    out = _run(ex, 'INSERT INTO EDGES (entity, relation, target) VALUES ("Atlantis", "capital", "Poseidonia"), '
                   '("Lemuria", "capital", "Mu") MODE KNN')
    assert out.splitlines()[:2] == ["Inserted: Atlantis —[capital]→ Poseidonia at L2 (KNN store)",
                                   "Inserted: Lemuria —[capital]→ Mu at L2 (KNN store)"]
    assert out.endswith("KNN store: 2 entries total") and "Mu" in _run(ex, 'INFER "The capital of Lemuria is" TOP 1')
    assert _run(ex, 'REMOVE PATCH "(unsaved edits)"') == "Removed patch #1"


@pytest.mark.parametrize("stmt,keyword", [('TRACE "The capital of France is"', "TRACE"),
                                          ("SHOW LAYERS", "SHOW LAYERS"),
                                          ('MERGE "other.vindex"', "MERGE"),
                                          ('BEGIN PATCH "p.vlp"', "BEGIN PATCH")])
def test_unsupported_statements_name_themselves(remote, stmt, keyword):
    ex, _ = remote
    with pytest.raises(CapabilityError, match=f"^{keyword} is not supported on a remote backend.*Supported: "):
        ex.run(stmt)


def test_unsupported_select_forms(remote):
    ex, _ = remote
    with pytest.raises(CapabilityError, match="NEAREST TO"):
        ex.run('SELECT * FROM EDGES NEAREST TO "France" AT LAYER 2')
    with pytest.raises(CapabilityError, match="FROM FEATURES"):
        ex.run("SELECT * FROM FEATURES WHERE layer = 1")


def test_use_after_remote_goes_local(remote, kvindex):
    ex, _ = remote
    client = ex.session.remote
    ex.session.use_vindex(kvindex.path)
    assert ex.session.backend == "vindex" and ex.session.remote is None and client._http.is_closed


def test_use_remote_refused(dead_url):
    from modelql.client import KnowledgeConnectionError

    ex = Executor(Session(default_vindex=False))
    with pytest.raises(KnowledgeConnectionError, match=f"failed to connect to {dead_url}"):
        ex.run(f'USE REMOTE "{dead_url}"')
    assert ex.session.backend == "none"
