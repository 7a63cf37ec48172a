"""DELETE / UPDATE over `USE REMOTE`: the server resolves the WHERE with the function local LQL
runs, the client builds the same `.vlp` ops and applies them as an inline patch; afterwards the
remote session reads exactly like a local session that ran the same statement on the same vindex."""

from __future__ import annotations

import pytest

from modelql.errors import CapabilityError, ModelqlError
from modelql.lql.editing import AUTO_PATCH_LINE
from modelql.lql.executor import Executor
from modelql.lql.render import error_lines, text
from modelql.lql.session import Session

WHERE = 'WHERE entity = "Europe"'
READS = ('DESCRIBE "France"', 'DESCRIBE "Germany" VERBOSE', 'SELECT * FROM EDGES WHERE entity = "Europe" LIMIT 50',
         'SELECT * FROM EDGES WHERE entity = "Asia" LIMIT 50')


def _run(ex: Executor, stmt: str) -> str:
    return text(ex.run(stmt))


def _read(ex: Executor, stmt: str):
    """DESCRIBE text, or SELECT's layer / feature / token columns (/v1/select's top-token list is
    built differently from local SELECT's, whatever the edits)."""
    out = _run(ex, stmt)
    return [ln.split()[:3] for ln in out.splitlines()] if stmt.startswith("SELECT") else out


@pytest.fixture()
def remote(ksrv):
    ex = Executor(Session(default_vindex=False))
    _run(ex, f'USE REMOTE "{ksrv.url}"')
    try:
        yield ex
    finally:
        ex.session.reset()


@pytest.fixture()
def local(kvindex):
    ex = Executor(Session(default_vindex=False))
    ex.session.use_vindex(kvindex.path)
    try:
        yield ex
    finally:
        ex.session.reset()


def _same_mutation_text(remote_out: str, local_out: str, patch: str) -> None:
    lines = remote_out.splitlines()
    assert lines[-1] == f'  patch: {patch} (server session overlay; REMOVE PATCH "{patch}" undoes it)'
    assert lines[:-1] == [ln for ln in local_out.splitlines() if ln != AUTO_PATCH_LINE]


def test_delete_reads_like_local(remote, local):
    before = {s: _read(remote, s) for s in READS}
    assert "continent  → Europe" in before['DESCRIBE "France"']
    out, want = _run(remote, f"DELETE FROM EDGES {WHERE}"), _run(local, f"DELETE FROM EDGES {WHERE}")
    _same_mutation_text(out, want, "delete-1")
    assert out.startswith("Deleted ") and " 0 features" not in out
    for s in READS:
        assert _read(remote, s) == _read(local, s), s
    assert _read(remote, 'DESCRIBE "France"') != before['DESCRIBE "France"']  # the "Europe" edge went
    assert _run(remote, "SHOW PATCHES").splitlines()[0].startswith("  1. delete-1 ")
    assert _run(remote, 'REMOVE PATCH "delete-1"') == "Removed patch #1"
    assert {s: _read(remote, s) for s in READS} == before
    assert _run(remote, "SHOW PATCHES") == "  (no patches applied)"


def test_update_reads_like_local(remote, local):
    before = {s: _read(remote, s) for s in READS}
    stmt = f'UPDATE EDGES SET target = "Asia", confidence = 0.5 {WHERE}'
    out, want = _run(remote, stmt), _run(local, stmt)
    _same_mutation_text(out, want, "update-1")
    for s in READS:
        assert _read(remote, s) == _read(local, s), s
    assert _read(remote, READS[3]) != before[READS[3]]  # the updated slots now read "Asia"
    second = 'DELETE FROM EDGES WHERE entity = "Asia"'  # matches on the patched state
    _same_mutation_text(_run(remote, second), _run(local, second), "delete-2")
    for s in READS:
        assert _read(remote, s) == _read(local, s), s
    shown = _run(remote, "SHOW PATCHES").splitlines()
    assert shown[0].startswith("  1. update-1 ") and shown[1].startswith("  2. delete-2 ")
    _run(remote, 'REMOVE PATCH "delete-2"')
    _run(remote, 'REMOVE PATCH "update-1"')
    assert {s: _read(remote, s) for s in READS} == before


def test_no_match_is_the_local_message_and_sends_nothing(remote, local):
    for stmt in ('DELETE FROM EDGES WHERE entity = "zzqxq"', 'UPDATE EDGES SET target = "Asia" WHERE entity = "zzqxq"'):
        assert _run(remote, stmt) == _run(local, stmt) == "  (no matching features found)"
    assert _run(remote, "SHOW PATCHES") == "  (no patches applied)"


def test_server_errors_are_one_line(remote, local):
    stmt = 'DELETE FROM EDGES WHERE relation > "x"'
    with pytest.raises(ModelqlError) as got:
        remote.run(stmt)
    with pytest.raises(ModelqlError) as want:
        local.run(stmt)
    lines = error_lines(got.value)
    assert len(lines) == 1 and "(400)" in lines[0] and str(want.value) in lines[0]


def test_edits_under_unsaved_inserts_are_refused(remote):
    _run(remote, 'INSERT INTO EDGES (entity, relation, target) VALUES ("Atlantis", "capital", "Poseidonia") MODE KNN')
    with pytest.raises(CapabilityError, match="unsaved edit"):
        remote.run('DELETE FROM EDGES WHERE entity = "Atlantis"')
    _run(remote, 'REMOVE PATCH "(unsaved edits)"')
    assert _run(remote, 'DELETE FROM EDGES WHERE entity = "Atlantis"') == "  (no matching features found)"


def test_weight_level_facts_over_remote(remote, local, tmp_path):
    """A patch of two default-mode (MEMIT) facts applied on the server: a remote DELETE of one
    drops the batch (inline patch) and re-solves the other on the server, as local DELETE does."""
    _run(local, 'INSERT INTO EDGES (entity, relation, target) VALUES ("Kenya", "capital", "Lima"), '
                '("Norway", "capital", "Hanoi")')
    _run(local, f'SAVE PATCH "{tmp_path / "two.vlp"}"')
    _run(remote, f'APPLY PATCH "{tmp_path / "two.vlp"}"')

    def top(ex, entity):
        return _run(ex, f'INFER "The capital of {entity} is" TOP 1').splitlines()[1].split()[1]

    assert [top(remote, e) for e in ("Kenya", "Norway")] == ["Lima", "Hanoi"]
    out = _run(remote, 'DELETE FROM EDGES WHERE entity = "Kenya" AND relation = "capital"')
    assert out.splitlines() == ["Deleted 1 weight-level fact(s) (patch overlay; their batches re-solved)",
                                "  patch: delete-1 (server session overlay); 1 fact(s) of the edited batches "
                                "re-solved into the session's unsaved edits"]
    assert [top(remote, e) for e in ("Kenya", "Norway")] == ["Nairobi", "Hanoi"]
    _run(local, 'DELETE FROM EDGES WHERE entity = "Kenya" AND relation = "capital"')
    assert [top(local, e) for e in ("Kenya", "Norway")] == ["Nairobi", "Hanoi"]
