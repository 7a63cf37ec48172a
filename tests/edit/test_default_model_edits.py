"""Counterfactual edits of the embedded model against ground truth: five capitals changed in one
LQL statement (the default mode: one MEMIT batch), checked on the edit prompts, on held-out
paraphrases, on facts that must not move, in a fresh session after SAVE / APPLY, and in
transformers after COMPILE INTO MODEL; removing the patch restores bit-identical logits."""

from __future__ import annotations

import pytest
import torch

from modelql import defaults as D
from modelql.lql import render
from modelql.lql.executor import Executor
from modelql.lql.session import Session
from tests.edit.conftest import file_digests

#: (country, true capital, new capital): new targets are real capitals of other countries, some of
#: which are themselves in the locality set (Italy → Rome must survive France → Rome)
EDITS = [("France", "Paris", "Rome"), ("Japan", "Tokyo", "Cairo"), ("Brazil", "Brasília", "Ottawa"),
         ("Kenya", "Nairobi", "Lima"), ("Norway", "Oslo", "Hanoi")]
OTHER_COUNTRIES = ["Italy", "Egypt", "Canada", "Peru", "Vietnam", "Germany", "Spain", "China", "India",
                   "Australia", "Argentina", "Sweden", "Mexico", "Nigeria", "Thailand"]
OTHER_RELATIONS = ["continent", "language", "currency"]


def run(session: Session, text: str) -> list[str]:
    return [line for r in Executor(session).run(text) for line in render.lines(r)]


def new_session(tmp_path, vindex) -> Session:
    s = Session(default_vindex=False, cwd=tmp_path)
    run(s, f'USE "{vindex.path}"')
    return s


def infer_lines(session: Session, prompt: str) -> list[str]:
    return [l for l in run(session, f'INFER "{prompt}" TOP 3') if not l.endswith("ms")]  # no timing line


def first_id(tok, text: str) -> int:
    return tok.encode(" " + text, add_special_tokens=False)[0]


def top1(model, prompt: str) -> int:
    return int(model.forward(model.tokenizer.encode(prompt), logits="last")[0].argmax())


def locality_facts(model) -> list[tuple[str, int]]:
    """(prompt, true answer's first token) of facts the edits must leave alone: other countries'
    capitals, and other relations of the edited countries, in the canonical phrasing."""
    targets = D.targets_by_subject()
    pairs = [(c, "capital") for c in OTHER_COUNTRIES] + [(e, r) for e, _, _ in EDITS for r in OTHER_RELATIONS]
    out = []
    for e, r in pairs:
        p = D.prompt(D.TRAIN_TEMPLATES[r][0], e)
        out.append((p, first_id(model.tokenizer, targets[(e, r)][0])))
    return out


@pytest.fixture(scope="module")
def edited(kvindex, tmp_path_factory):
    """A session with the five edits inserted in one statement, and its saved patch."""
    tmp = tmp_path_factory.mktemp("cf")
    s = new_session(tmp, kvindex)
    base = s.model("INFER")
    facts = ", ".join(f'("{e}", "capital", "{new}")' for e, _, new in EDITS)
    out = run(s, f"INSERT INTO EDGES (entity, relation, target) VALUES {facts}")
    return tmp, s, base, out


def test_the_unedited_model_knows_every_fact_involved(kmodel):
    tok = kmodel.tokenizer
    for e, true, _ in EDITS:
        assert top1(kmodel, D.prompt(D.TRAIN_TEMPLATES["capital"][0], e)) == first_id(tok, true), e
    assert [p for p, want in locality_facts(kmodel) if top1(kmodel, p) != want] == []


def test_batch_insert_states_the_new_facts_and_keeps_the_others(edited, kmodel):
    _, s, _, out = edited
    assert out[0].startswith("Auto-patch started")
    assert out[1] == "Inserted 5 facts at L3 (weight edit), solved as one batch"
    assert out[2:7] == [f"  {e} —[capital]→ {new}" for e, _, new in EDITS]
    m = s.model("INFER")
    tok = m.tokenizer
    for e, _, new in EDITS:  # efficacy: every edit prompt, through LQL INFER
        lines = run(s, f'INFER "The capital of {e} is" TOP 1')
        assert lines[1].split()[:2] == ["1.", new.split()[0]], lines
    para = [top1(m, D.prompt(h, e)) == first_id(tok, new) for e, _, new in EDITS
            for h in D.HELDOUT_TEMPLATES["capital"]]
    assert sum(para) >= 12, para  # held-out paraphrases (never used by the edit): ≥ 80%
    moved = [p for p, want in locality_facts(kmodel) if top1(m, p) != want]
    assert len(moved) <= 1, moved  # of 30


def test_saved_patch_reproduces_and_removal_restores(edited, kvindex):
    tmp, s, base, _ = edited
    digests = file_digests(kvindex.path)
    prompts = [f"The capital of {e} is" for e, _, _ in EDITS] + ["The capital of Italy is"]
    infer = [infer_lines(s, p) for p in prompts]
    assert run(s, 'SAVE PATCH "cf.vlp"')[0].startswith("Saved: cf.vlp (5 inserts")

    s2 = new_session(tmp, kvindex)
    ids = base.tokenizer.encode("The capital of Germany is")
    base_logits = s2.model("INFER").forward(ids, logits="last").clone()
    run(s2, 'APPLY PATCH "cf.vlp"')
    assert [infer_lines(s2, p) for p in prompts] == infer
    run(s2, 'REMOVE PATCH "cf.vlp"')
    assert torch.equal(s2.model("INFER").forward(ids, logits="last"), base_logits)
    assert file_digests(kvindex.path) == digests and kvindex.verify().ok


def test_compiled_model_carries_the_edits_into_transformers(edited, kmodel):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp, s, _, _ = edited
    out = run(s, 'COMPILE CURRENT INTO MODEL "cf-model" FORMAT safetensors')
    assert out[0].startswith("Compiled CURRENT → ")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp / "cf-model"), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tmp / "cf-model"))
    m = s.model("INFER")
    prompts = [f"The capital of {e} is" for e, _, _ in EDITS] + [p for p, _ in locality_facts(kmodel)]
    with torch.no_grad():
        got = [int(hf(input_ids=tok(p, return_tensors="pt").input_ids).logits[0, -1].argmax()) for p in prompts]
    assert got == [top1(m, p) for p in prompts]  # survival: every top-1 of the patched session
    assert got[: len(EDITS)] == [first_id(m.tokenizer, new) for _, _, new in EDITS]


def test_delete_and_update_reach_inserted_facts(kvindex, tmp_path):
    """DELETE / UPDATE address default-mode (weight-level) facts by entity and relation: the
    deleted fact goes back to what the model knew, the updated one takes its new target, the
    rest of the batch stays edited."""
    s = new_session(tmp_path, kvindex)
    run(s, 'INSERT INTO EDGES (entity, relation, target) VALUES ("Kenya", "capital", "Lima"), '
           '("Norway", "capital", "Hanoi")')
    m = s.model("INFER")
    assert [top1(m, f"The capital of {e} is") for e in ("Kenya", "Norway")] == \
        [first_id(m.tokenizer, t) for t in ("Lima", "Hanoi")]
    out = run(s, 'DELETE FROM EDGES WHERE entity = "Kenya" AND relation = "capital"')
    assert out[-1] == "Deleted 1 weight-level fact(s) (patch overlay; their batches re-solved)"
    m = s.model("INFER")
    assert [top1(m, f"The capital of {e} is") for e in ("Kenya", "Norway")] == \
        [first_id(m.tokenizer, t) for t in ("Nairobi", "Hanoi")]
    out = run(s, 'UPDATE EDGES SET target = "Madrid" WHERE entity = "Norway" AND relation = "capital"')
    assert out[-1] == "Updated 1 weight-level fact(s) (patch overlay; their batches re-solved)"
    m = s.model("INFER")
    assert [top1(m, f"The capital of {e} is") for e in ("Kenya", "Norway")] == \
        [first_id(m.tokenizer, t) for t in ("Nairobi", "Madrid")]


def test_a_multi_token_target_is_generated_whole(kvindex, tmp_path):
    """"Rio de Janeiro" is 8 tokens of this tokenizer: the edit writes each of them (one key per
    target token), so greedy generation spells the whole name, in the session and in transformers
    after COMPILE INTO MODEL."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    s = new_session(tmp_path, kvindex)
    run(s, 'INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Rio de Janeiro")')
    m = s.model("INFER")
    tok = m.tokenizer
    want = tok.encode(" Rio de Janeiro", add_special_tokens=False)
    assert len(want) > 3
    prompt = "The capital of France is"
    ids = tok.encode(prompt)
    for _ in want:
        ids.append(int(m.forward(ids, logits="last")[0].argmax()))
    assert ids[-len(want):] == want
    run(s, 'COMPILE CURRENT INTO MODEL "rio"')
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "rio"), dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "rio"))
    with torch.no_grad():
        out = hf.generate(**hf_tok(prompt, return_tensors="pt"), max_new_tokens=len(want), do_sample=False)
    assert hf_tok.decode(out[0, -len(want):]) == " Rio de Janeiro"


def test_compose_installs_hold_together(kvindex, kmodel, tmp_path):
    """MODE COMPOSE, several facts of one template in one layer: each install keeps its target
    after the later ones (the reference's Gram–Schmidt gates lost every one of them) and the
    locality facts keep theirs."""
    s = new_session(tmp_path, kvindex)
    facts = EDITS[:4]
    values = ", ".join(f'("{e}", "capital", "{new}")' for e, _, new in facts)
    out = run(s, f"INSERT INTO EDGES (entity, relation, target) VALUES {values} MODE COMPOSE")
    assert sum(line.startswith("Inserted: ") for line in out) == 4
    m = s.model("INFER")
    assert [top1(m, f"The capital of {e} is") for e, _, _ in facts] == \
        [first_id(m.tokenizer, new) for _, _, new in facts]
    moved = [p for p, want in locality_facts(kmodel) if top1(m, p) != want]
    assert len(moved) <= 1, moved
