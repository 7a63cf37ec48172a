"""INFER and TRACE on a tiny model with a real tokenizer, checked against direct computation."""

from __future__ import annotations

import pytest
import torch

from modelql.errors import CapabilityError, ModelqlError
from modelql.knowledge.infer import infer, knn_override
from modelql.knowledge.trace import Trace, trace
from modelql.runtime import interp, load_model
from modelql.vindex import Vindex, extract
from tests.runtime.tiny_tokenizer import make_model_with_tokenizer

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    make_model_with_tokenizer(d / "model")
    extract(d / "model", d / "full.vindex", level="inference", dtype="f32")
    extract(d / "model", d / "browse.vindex", level="browse", dtype="f32")
    return load_model(d / "model"), Vindex.load(d / "full.vindex"), Vindex.load(d / "browse.vindex")


def test_infer_predictions_are_the_softmax_top_k(setup):
    model, vx, _ = setup
    r = infer(model, PROMPT, top=5, vindex=vx)
    probs = torch.softmax(model.forward(model.tokenizer.encode(PROMPT))[0, -1].double(), -1)
    top = torch.topk(probs, 5)
    assert [p.token_id for p in r.predictions] == top.indices.tolist()
    assert r.predictions[0].prob == pytest.approx(float(top.values[0]), abs=1e-9)


def test_infer_trace_is_gate_knn_of_the_ffn_input(setup):
    model, vx, _ = setup
    r = infer(model, PROMPT, vindex=vx, per_layer=3)
    _, cache = interp.run_with_cache(model, PROMPT, [f"blocks.{i}.ln2.hook_normalized" for i in range(2)])
    for layer in range(2):
        x = cache[f"blocks.{layer}.ln2.hook_normalized"][-1]
        scores = model.weights[f"layers.{layer}.gate.weight"] @ x
        want = [int(i) for i in scores.abs().argsort(descending=True) if vx.feature_meta(layer, int(i))][:3]
        got = [f.feature for f in r.trace if f.layer == layer]
        assert got == want
        for f in r.trace:
            if f.layer == layer:
                assert f.gate == pytest.approx(float(scores[f.feature]), rel=1e-4, abs=1e-4)


def test_infer_from_a_vindex_loads_its_weights(setup):
    model, vx, _ = setup
    a = infer(None, PROMPT, vindex=vx)
    b = infer(model, PROMPT, vindex=vx)
    assert [p.token_id for p in a.predictions] == [p.token_id for p in b.predictions]


def test_infer_on_browse_only_vindex_says_weights_are_needed(setup):
    _, _, browse = setup
    with pytest.raises(CapabilityError, match=r"requires model weights.*--level inference"):
        infer(None, PROMPT, vindex=browse)


def test_knn_override_fires_on_matching_residual_and_replaces_top1(setup):
    model, vx, _ = setup
    _, cache = interp.run_with_cache(model, PROMPT, ["blocks.1.ln2.hook_normalized"])
    key = cache["blocks.1.ln2.hook_normalized"][-1]

    from modelql.vindex import KnnEntry

    e = KnnEntry(layer=1, key=key.numpy(), target_id=7, target_token=" Lyon", entity="France", relation="capital")
    r = infer(model, PROMPT, vindex=vx, knn=[e])
    assert r.override is not None and r.override.layer == 1 and r.override.cosine > 0.999
    assert r.predictions[0].token_id == 7 and r.predictions[0].prob == 1.0
    opposite = KnnEntry(layer=1, key=-key.numpy(), target_id=7, target_token=" Lyon", entity="France",
                        relation="capital")
    assert knn_override({1: key}, [opposite]) is None


def test_trace_rows_match_logit_lens_and_final_prediction(setup):
    model, _, _ = setup
    t = trace(model, PROMPT, for_token="Paris")
    assert [r.layer for r in t.rows] == [-1, 0, 1]
    probs = torch.softmax(model.forward(model.tokenizer.encode(PROMPT))[0, -1].double(), -1)
    last = t.rows[-1]
    assert last.top_prob == pytest.approx(float(probs.max()), abs=1e-6)
    pid = model.tokenizer.encode(" Paris", add_special_tokens=False)[0]
    assert last.answer_prob == pytest.approx(float(probs[pid]), abs=1e-6)
    assert last.answer_rank == 1 + int((probs > probs[pid]).sum())
    assert t.rows[0].who == "embed"


def test_trace_saves_and_reloads_identical(setup, tmp_path):
    model, _, _ = setup
    t = trace(model, PROMPT, for_token="Paris", positions="all")
    assert len(t.rows) == 3 * len(t.tokens)
    path = t.save(tmp_path / "sub" / "t.json")
    assert Trace.load(path) == t
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ModelqlError, match="not a modelql trace"):
        Trace.load(tmp_path / "bad.json")
