"""The editing statements through LQL: mutations, patches (save → fresh session → apply), COMPILE,
DIFF, auto-patch, and bad input (one-line errors, nothing written)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from modelql.lql import render
from modelql.lql.executor import Executor, run_batch
from modelql.lql.session import Session
from tests.edit.conftest import file_digests

INS = 'INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Tokyo")'


@pytest.fixture
def work(tmp_path, vindex_dir):
    """A working directory with the tiny vindex copied in (so relative paths resolve there)."""
    shutil.copytree(vindex_dir, tmp_path / "tiny.vindex")
    return tmp_path


def run(session: Session, text: str) -> list[str]:
    out = Executor(session).run(text)
    return [line for r in out for line in render.lines(r)]


def new_session(work) -> Session:
    s = Session(default_vindex=False, cwd=work)
    run(s, 'USE "tiny.vindex"')
    return s


def infer_lines(session, prompt="The capital of France is") -> list[str]:
    lines = run(session, f'INFER "{prompt}" TOP 5')
    return [l for l in lines if not l.endswith("ms")]  # drop the timing line


def test_insert_auto_patch_save_apply_remove(work):
    s = new_session(work)
    base_infer = infer_lines(s)
    base_logits = s.model("INFER").forward(s.model("INFER").tokenizer.encode("Hello there"), logits="last").clone()
    digests = file_digests(work / "tiny.vindex")
    out = run(s, INS + " MODE KNN")
    assert out[0].startswith("Auto-patch started")
    assert out[1] == "Inserted: France —[capital]→ Tokyo at L0 (KNN store)"
    assert out[2:] == ["  mode: KNN — residual capture (retrieval override)", "  KNN store: 1 entries total"]
    out = run(s, INS.replace("France", "Spain") + " MODE COMPOSE")
    assert not out[0].startswith("Auto-patch") and out[0].startswith("Inserted: Spain —[capital]→ Tokyo at L0")
    assert run(s, "DELETE FROM EDGES WHERE layer = 1 AND feature = 3") == ["Deleted 1 features (patch overlay)"]
    assert run(s, 'DELETE FROM EDGES WHERE entity = "no-such-token-xyz"') == ["  (no matching features found)"]
    edited_infer = infer_lines(s)
    assert edited_infer != base_infer and "source=knn_override" in "\n".join(edited_infer)
    assert run(s, "SHOW PATCHES") == ["  Total: 0 from files, 1 in session", "  Recording: (anonymous) (3 ops pending)"]
    with pytest.raises(Exception, match="anonymous patch session"):
        run(s, "SAVE PATCH")
    assert run(s, 'SAVE PATCH "fix.vlp"') == ["Saved: fix.vlp (2 inserts, 0 updates, 1 deletes)"]
    assert json.loads((work / "fix.vlp").read_text())["base_model"] == s.vindex.model
    assert run(s, "SHOW PATCHES") == ["  1. fix.vlp 3 ops (2 ins, 0 upd, 1 del)", "  Total: 1 from files, 0 in session"]
    assert infer_lines(s) == edited_infer  # the edits stay applied after SAVE

    # a fresh session: APPLY reproduces identical INFER output
    s2 = new_session(work)
    assert infer_lines(s2) == base_infer
    assert run(s2, 'APPLY PATCH "fix.vlp"') == ["Applied: fix.vlp (3 operations: 2 inserts, 0 updates, 1 deletes)"]
    assert infer_lines(s2) == edited_infer
    # REMOVE restores bit-identical logits; the base files never changed
    assert run(s2, 'REMOVE PATCH "fix.vlp"') == ["Removed patch #1"]
    m = s2.model("INFER")
    assert torch.equal(m.forward(m.tokenizer.encode("Hello there"), logits="last"), base_logits)
    assert infer_lines(s2) == base_infer
    assert run(s2, "SHOW PATCHES") == ["  (no patches applied)"]
    assert file_digests(work / "tiny.vindex") == digests
    assert s2.vindex.verify().ok


def test_first_weight_level_insert_shows_progress_while_the_statistics_are_computed(work, fast_memit, capsys,
                                                                                   monkeypatch):
    """The one slow step of a model's first MEMIT edit is announced on stderr; later inserts (a
    fresh session reads the disk cache) compute nothing and print nothing."""
    from modelql.knowledge import edit, memit

    note = "Computing the model's editing statistics (once per model, then cached) ..."
    s = new_session(work)
    run(s, INS + " MODE KNN")
    assert note not in capsys.readouterr().err
    assert not edit.memit_statistics_ready(s.patches())
    run(s, INS.replace("Tokyo", "Rome"))
    err = capsys.readouterr().err.splitlines()
    assert err[0] == note and err[1].startswith("Done in ")

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(memit, "_covariance", boom)
    s2 = new_session(work)
    assert edit.memit_statistics_ready(s2.patches())
    out = run(s2, INS.replace("France", "Spain"))
    assert any(line.startswith("Inserted: Spain —[capital]→ Tokyo") for line in out)
    assert note not in capsys.readouterr().err


def test_memit_patch_save_fresh_session_apply_and_remove(work, fast_memit):
    """A weight-level (MEMIT down_delta) patch: saved, applied in a fresh session it gives the
    same INFER output (logits equal to float32 rounding); removing it restores bit-identical logits; base files unchanged."""
    s = new_session(work)
    m = s.model("INFER")
    base_logits = m.forward(m.tokenizer.encode("The capital of France is"), logits="last").clone()
    digests = file_digests(work / "tiny.vindex")
    run(s, INS + " MODE MEMIT")
    m = s.model("INFER")
    edited_logits = m.forward(m.tokenizer.encode("The capital of France is"), logits="last").clone()
    assert not torch.equal(edited_logits, base_logits)
    edited_infer = infer_lines(s)
    assert run(s, 'SAVE PATCH "w.vlp"')[0].startswith("Saved: w.vlp")

    s2 = new_session(work)
    run(s2, 'APPLY PATCH "w.vlp"')
    m2 = s2.model("INFER")
    # the same float32 u/v; only the order the overlay sums them in can differ (≤ 1 ulp-ish)
    torch.testing.assert_close(m2.forward(m2.tokenizer.encode("The capital of France is"), logits="last"),
                               edited_logits, rtol=0, atol=1e-5)
    assert infer_lines(s2) == edited_infer
    run(s2, 'REMOVE PATCH "w.vlp"')
    m2 = s2.model("INFER")
    assert torch.equal(m2.forward(m2.tokenizer.encode("The capital of France is"), logits="last"), base_logits)
    assert file_digests(work / "tiny.vindex") == digests


def test_begin_patch_named_recording(work):
    s = new_session(work)
    run(s, INS + " MODE KNN")
    assert run(s, 'BEGIN PATCH "named.vlp"') == ["Patch session started: named.vlp",
                                                 "  (kept 1 ops from the auto-patch recording)"]
    with pytest.raises(Exception, match="patch session already active"):
        run(s, 'BEGIN PATCH "other.vlp"')
    out = run(s, "UPDATE EDGES SET confidence = 2.5 WHERE layer = 0 AND feature = 1")
    assert out == ["Updated 1 features (patch overlay)"]  # no auto-patch line: a recording is active
    assert run(s, "SAVE PATCH") == ["Saved: named.vlp (1 inserts, 1 updates, 0 deletes)"]
    with pytest.raises(Exception, match="no active patch session"):
        run(s, "SAVE PATCH")


def test_compile_and_diff_statements(work):
    s = new_session(work)
    run(s, INS + " MODE KNN")
    run(s, "DELETE FROM EDGES WHERE layer = 0 AND feature = 4")
    out = run(s, 'COMPILE CURRENT INTO VINDEX "out.vindex"')
    assert out[0] == f"Compiled CURRENT → {work / 'out.vindex'}" and "KNN entries: 1" in out
    assert any(l.startswith("Size: ") for l in out)
    out = run(s, 'DIFF "tiny.vindex" "out.vindex"')
    assert out[0].split() == ["Layer", "Feature", "A", "(token)", "B", "(token)", "Status"]
    assert "removed" in out[2] and out[-1] == "1 differences shown (limit 20)"
    out = run(s, 'DIFF "tiny.vindex" CURRENT INTO PATCH "d.vlp"')
    assert out[-1] == f"Extracted: {work / 'd.vlp'} (1 ops: 0 inserts, 0 updates, 1 deletes)"
    assert run(s, 'DIFF "out.vindex" "out.vindex"') == ["  (no differences found)"]
    # COMPILE INTO MODEL: KNN facts are materialised (here: MODE KNN is the only edit kind)
    out = run(s, 'COMPILE CURRENT INTO MODEL "m.gguf" FORMAT GGUF')
    assert out[0] == f"Compiled CURRENT → {work / 'm.gguf'} (model, gguf F32)"
    assert "  KNN facts materialised as weight edits: 1" in out and (work / "m.gguf").is_file()
    # a fresh session on the compiled vindex answers like the patched one
    s2 = Session(default_vindex=False, cwd=work)
    run(s2, 'USE "out.vindex"')
    assert infer_lines(s2) == infer_lines(s)


def test_merge_statement(work):
    s = new_session(work)
    run(s, "UPDATE EDGES SET confidence = 7.0 WHERE layer = 1 AND feature = 2")
    run(s, 'COMPILE CURRENT INTO VINDEX "src.vindex"')
    s2 = new_session(work)
    out = run(s2, 'MERGE "src.vindex"')
    assert out[1:] == [f"Merged {work / 'src.vindex'} → {s2.vindex.path} (patch overlay)",
                       "  1 features merged, 0 skipped (strategy: KEEP_SOURCE)"]
    with pytest.raises(Exception, match="source vindex not found: nope.vindex"):
        run(s2, 'MERGE "nope.vindex"')


def test_bad_input_gives_one_line_errors_and_writes_nothing(work, browse_dir):
    s = new_session(work)
    # a corrupted .vlp
    run(s, INS + " MODE KNN")
    run(s, 'SAVE PATCH "good.vlp"')
    text = (work / "good.vlp").read_text()
    (work / "bad.vlp").write_text(text[: len(text) // 2])
    doc = json.loads(text)
    doc["operations"][0]["key_vector_b64"] = doc["operations"][0]["key_vector_b64"][:-8]
    (work / "badvec.vlp").write_text(json.dumps(doc))
    doc = json.loads(text)
    doc["base_model"] = "someone/else"
    (work / "other.vlp").write_text(json.dumps(doc))
    before = run(s, "SHOW PATCHES")
    script = '\n'.join([
        'APPLY PATCH "bad.vlp";', 'APPLY PATCH "badvec.vlp";', 'APPLY PATCH "other.vlp";',
        'APPLY PATCH "missing.vlp";', 'REMOVE PATCH "never-applied.vlp";',
        'COMPILE CURRENT INTO VINDEX "tiny.vindex";', 'COMPILE CURRENT INTO MODEL "busy";',
    ])
    (work / "busy").mkdir()
    (work / "busy" / "x").write_text("x")
    outcomes = run_batch(script, s)
    errors = [render.error_lines(o.error) for o in outcomes[:7]]
    assert all(len(e) == 1 for e in errors)
    msgs = [e[0] for e in errors]
    assert msgs[0].startswith("Error: failed to load patch: bad.vlp is not valid JSON")
    assert msgs[1] == "Error: failed to load patch: invalid vector in operation #1"
    assert "made for base model 'someone/else'" in msgs[2]
    assert msgs[3] == "Error: patch not found: missing.vlp"
    assert msgs[4] == "Error: patch not found: never-applied.vlp"
    assert "resolves to the source vindex" in msgs[5]
    assert "already exists and is not empty; nothing was written" in msgs[6]
    assert run(s, "SHOW PATCHES") == before  # nothing was applied
    assert sorted(p.name for p in (work / "busy").iterdir()) == ["x"]
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no staging directories left
    # a weight-level INSERT on a browse-only vindex
    shutil.copytree(browse_dir, work / "browse.vindex")
    b = Session(default_vindex=False, cwd=work)
    run(b, 'USE "browse.vindex"')
    outcomes = run_batch(INS + " MODE MEMIT;\n" + INS + ";\nSHOW PATCHES;\n" +
                         'COMPILE CURRENT INTO MODEL "m2";', b)
    msg = render.error_lines(outcomes[0].error)
    assert len(msg) == 1 and "needs model weights" in msg[0] and "browse-only" in msg[0]
    assert outcomes[1].error is not None  # the default mode is weight-level too
    assert render.lines(outcomes[2].results[0]) == ["  (no patches applied)"]  # nothing recorded
    assert "COMPILE INTO MODEL requires model weights" in render.error_lines(outcomes[3].error)[0]
    assert not (work / "m2").exists()


def test_mutations_need_a_vindex_backend(model_dir, tmp_path):
    s = Session(default_vindex=False, cwd=tmp_path)
    with pytest.raises(Exception, match="No backend loaded"):
        run(s, INS)
    run(s, f'USE MODEL "{model_dir}"')
    with pytest.raises(Exception, match="mutation requires a vindex"):
        run(s, INS)
    with pytest.raises(Exception, match="requires a vindex"):
        run(s, 'BEGIN PATCH "x.vlp"')
