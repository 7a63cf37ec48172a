"""KnowledgeClient against a real server: every method returns what the Python API returns (at
the wire's precision), HTTP errors carry status/code/message, connection failures are retried."""

from __future__ import annotations

import math
import time

import httpx
import pytest

from modelql.client import KnowledgeClient, KnowledgeConnectionError, KnowledgeHTTPError

PROMPT = "The capital of France is"


def test_stats(kc, kvindex):
    from modelql import knowledge

    s, ref = kc.stats(), knowledge.stats(kvindex)
    assert (s.layers, s.features, s.features_per_layer, s.hidden_size, s.vocab_size) == \
        (ref.layers, ref.features, ref.features_per_layer, ref.hidden_size, ref.vocab_size)
    assert s.layer_bands == ref.layer_bands and s.mode == "full" and s.loaded["browse"] and s.loaded["inference"]


def test_health_and_warmup(kc, kmodel):
    from modelql.knowledge import memit

    assert kc.health().status == "ok"
    assert kc.warmup() >= 0
    kc.set_timeout(300)
    assert kc.warmup(editing=True) >= 0
    assert memit.statistics_ready(kmodel)  # the next weight-level insert computes nothing


def test_describe_equals_python_api(kc, kmodel, kvindex):
    from modelql import knowledge
    from modelql.server.knowledge_routes import describe_args

    got = kc.describe("France", verbose=True)  # LARQL's defaults: min_score 5.0, by score, one edge per target
    ref = knowledge.describe(kvindex, "France", model=kmodel, **describe_args("knowledge", 20, 5.0, "auto"))
    assert got.entity == "France" and got.mode == ref.mode == "residual" and got.found
    assert got.edges, "the embedded model knows something about France"
    seen, edges = set(), []
    for e in sorted(ref.edges, key=lambda e: -e.gate):
        if e.target.strip().lower() not in seen:
            seen.add(e.target.strip().lower())
            edges.append(e)
    want = [(e.target, round(e.gate, 1), e.layer, e.layer_min, e.layer_max, e.count, e.relation, e.also[:3])
            for e in edges[:20]]
    have = [(e.target, e.gate, e.layer, e.layer_min, e.layer_max, e.count, e.relation, e.also) for e in got.edges]
    assert have == want
    assert got.signal == ref.signal and got.unit == ref.unit and math.isclose(got.max_gate, ref.max_gate, abs_tol=1e-3)


def test_walk_equals_python_api(kc, kvindex):
    from modelql import knowledge

    got = kc.walk(PROMPT, top=3, layers=[1, 2])
    ref = knowledge.walk(kvindex, PROMPT, top=3, layers=[1, 2])
    assert [(r.layer, r.feature, r.gate_score, r.target, r.relation) for r in got.rows] == \
        [(r.layer, r.feature, round(r.gate_score, 1), r.target, r.relation) for r in ref.rows]
    assert got.layers == (1, 2)


def test_select_equals_python_api(kc, kvindex):
    from modelql import knowledge
    from modelql.knowledge.rows import Condition

    got = kc.select(relation="capital", limit=10)
    ref = knowledge.select(kvindex, "edges", [Condition("relation", "LIKE", "%capital%")], descending=True, limit=10)
    assert got.total == ref.total and got.rows
    assert [(r.layer, r.feature, r.token, r.c_score, r.relation, r.top_tokens) for r in got.rows] == \
        [(r.layer, r.feature, r.token, round(r.c_score, 4), r.relation, r.top_tokens[:5]) for r in ref.rows]


def test_select_features_filter_and_feature_info(kc, kvindex):
    from modelql.knowledge.explain import VindexFeatures

    got = kc.select(layer=3, features=[5, 905, 199], limit=1024)
    assert sorted(r.feature for r in got.rows) == sorted(f for f in (5, 905, 199)
                                                         if kvindex.feature_meta(3, f) is not None)
    info, ref = kc.feature_info(3, [905, 199]), VindexFeatures(kvindex).info(3, [905, 199])
    assert {f: (i.top_token, i.top_tokens, i.relation) for f, i in info.items()} == \
        {f: (i.top_token, i.top_tokens, i.relation) for f, i in ref.items()}


def test_relations_equals_python_api(kc, kvindex):
    from modelql import knowledge

    got, ref = kc.relations(), knowledge.relations(kvindex, top=50)
    assert got.probe_count == ref.probe_count and got.total == ref.total
    assert [(r.name, r.count) for r in got.probe_relations] == [(r.name, r.count) for r in ref.probe_relations]
    assert [(r.name, r.count, r.min_layer, r.max_layer, r.examples) for r in got.tokens] == \
        [(r.name, r.count, r.min_layer, r.max_layer, r.examples) for r in ref.tokens]


def test_infer_and_compare_equal_python_api(kc, kmodel):
    from modelql.knowledge.infer import infer

    got, ref = kc.infer(PROMPT, top=5), infer(kmodel, PROMPT, top=5)
    assert [(p.token, p.prob) for p in got.predictions] == [(p.token, round(p.prob, 4)) for p in ref.predictions]
    cmp = kc.infer(PROMPT, top=3, mode="compare")
    assert cmp.dense is not None and [p.token for p in cmp.dense] == [p.token for p in ref.predictions[:3]]


def test_explain_infer_equals_python_api(kc, kmodel, kvindex):
    from modelql.knowledge.infer import explain_infer

    got = kc.explain_infer(PROMPT, per_layer=3, with_attention=True)
    ref = explain_infer(kmodel, PROMPT, vindex=kvindex, top=3, with_attention=True)
    assert [(f.layer, f.feature, f.gate, f.top_token, f.top_tokens, f.relation) for f in got.trace] == \
        [(f.layer, f.feature, round(f.gate, 1), f.top_token, f.top_tokens[:3], f.relation) for f in ref.trace]
    assert [(a.layer, a.attended_token, a.lens_token) for a in got.attention] == \
        [(a.layer, a.attended_token, a.lens_token) for a in ref.attention]


def test_tokens_embed_logits_equal_python_api(kc, kmodel):
    from modelql.server.knowledge_routes import embed_rows, logits_top

    tok = kmodel.tokenizer
    ids = kc.encode("France")
    assert list(ids) == tok.encode("France", add_special_tokens=False)
    dec = kc.decode(ids)
    assert dec.text == tok.decode(list(ids), skip_special_tokens=True) and dec.token_ids == ids
    emb = kc.embed(list(ids))
    ref = embed_rows(kmodel, list(ids))
    assert emb.seq_len == len(ids) and emb.hidden_size == kmodel.spec.hidden_size
    assert max(abs(a - b) for a, b in zip(emb.residual[0], ref[0].tolist())) < 1e-6
    assert max(abs(a - b) for a, b in zip(kc.embed_token(ids[0]), ref[0].tolist())) < 1e-6
    residual = ref[0].tolist()
    got = kc.logits(residual, top_k=3)
    want = logits_top(kmodel, residual, 3, 1.0)
    assert [(r.token_id, r.prob) for r in got] == [(i, round(p, 4)) for i, p in want]


def test_insert_and_patches_in_a_session(ksrv, kmodel):
    """Edits through a client with its own X-Session-Id: visible to that session only."""
    with KnowledgeClient(ksrv.url, session_id="client-test-1", timeout=120) as c, \
            KnowledgeClient(ksrv.url, timeout=120) as other:
        r = c.insert("Atlantis", "capital", "Poseidonia", mode="knn")
        assert (r.entity, r.relation, r.target, r.mode) == ("Atlantis", "capital", "Poseidonia", "knn")
        assert r.layer is not None and r.inserted == 1
        pl = c.patches()
        assert pl.session == "client-test-1" and [p.operations for p in pl.patches] == [1]
        assert other.patches().patches == ()
        inf = c.infer("The capital of Atlantis is", top=3)
        assert inf.override is not None and inf.predictions[0].token.strip() == "Poseidonia"
        rm = c.remove_patch(pl.patches[0].name)
        assert rm.removed == pl.patches[0].name and rm.active_patches == 0 and rm.session == "client-test-1"
        with pytest.raises(KnowledgeHTTPError) as e:
            c.remove_patch("no-such-patch")
        assert e.value.status == 404 and e.value.code == "not_found" and "not found" in e.value.message


def test_insert_many_is_one_request_with_every_fact(ksrv):
    """`insert_many` → POST /v1/insert with modelql's `facts`: every fact inserted, one result each."""
    with KnowledgeClient(ksrv.url, session_id="client-batch-1", timeout=120) as c:
        rs = c.insert_many([("Atlantis", "capital", "Poseidonia"), ("Lemuria", "capital", "Mu")], mode="knn")
        assert [(r.entity, r.target, r.mode) for r in rs] == [("Atlantis", "Poseidonia", "knn"),
                                                            ("Lemuria", "Mu", "knn")]
        assert rs[-1].knn_total == 2 and [p.operations for p in c.patches().patches] == [2]
        for entity, target in (("Atlantis", "Poseidonia"), ("Lemuria", "Mu")):
            assert c.infer(f"The capital of {entity} is", top=1).predictions[0].token.strip() == target
        c.remove_patch(c.patches().patches[0].name)


def test_http_errors_carry_status_code_message(kc):
    with pytest.raises(KnowledgeHTTPError) as e:
        kc.describe("   ")
    assert (e.value.status, e.value.code, e.value.message) == (400, "invalid_request", "missing entity")
    assert "/v1/describe failed (400): missing entity" in str(e.value)
    with pytest.raises(KnowledgeHTTPError) as e:
        kc.infer("")
    assert e.value.status == 400 and e.value.message == "empty prompt"
    with pytest.raises(KnowledgeHTTPError) as e:
        kc.apply_patch(url="/nonexistent/p.vlp")
    assert e.value.status == 403 and "--patch-dir" in e.value.message  # this server has no patch directory
    with pytest.raises(KnowledgeHTTPError) as e:
        kc.logits([0.0, 1.0])
    assert e.value.status == 400 and "hidden_size" in e.value.message


def test_unauthorized_and_openai_envelope(kmodel, kvindex):
    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import background

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, api_key="s3cret")
    with background(None, cfg, model=kmodel, vindex_source=VindexSource.ready(kvindex)) as srv, \
            KnowledgeClient(srv.url) as bad, KnowledgeClient(srv.url, api_key="s3cret") as good:
        with pytest.raises(KnowledgeHTTPError) as e:
            bad.stats()
        assert e.value.status == 401 and e.value.code == "invalid_api_key" and "API key" in e.value.message
        assert good.stats().layers == kvindex.num_layers


def test_connection_refused_retries_then_clear_error(dead_url):
    t0 = time.perf_counter()
    with KnowledgeClient(dead_url, retries=3, backoff=0.05) as c:
        with pytest.raises(KnowledgeConnectionError) as e:
            c.stats()
    assert e.value.attempts == 4 and str(e.value).startswith(f"failed to connect to {dead_url}: ")
    assert "(4 attempts)" in str(e.value)
    assert time.perf_counter() - t0 >= 0.05 + 0.1 + 0.2  # the backoff ran between attempts


def test_connection_errors_are_retried_http_errors_are_not(ksrv):
    """A transport that refuses the first two connections, then passes through to the server."""
    calls = {"n": 0}
    real = httpx.HTTPTransport()

    class Flaky(httpx.BaseTransport):
        def handle_request(self, request):
            calls["n"] += 1
            if calls["n"] <= 2:
                raise httpx.ConnectError("connection refused", request=request)
            return real.handle_request(request)

    with KnowledgeClient(ksrv.url, retries=2, backoff=0.01, transport=Flaky()) as c:
        assert c.health().status == "ok" and calls["n"] == 3
        calls["n"] = 10
        with pytest.raises(KnowledgeHTTPError):
            c.describe(" ")
        assert calls["n"] == 11  # one request: an HTTP error is an answer, not retried


def test_reads_a_larql_shaped_server():
    """Minimal LARQL bodies (no modelql extension keys) still parse into the typed rows."""
    def handler(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/stats":
            return httpx.Response(200, json={"model": "gemma", "family": "gemma3", "layers": 34, "features": 348160,
                                             "features_per_layer": 10240, "hidden_size": 2560, "vocab_size": 262144,
                                             "extract_level": "browse", "dtype": "f16",
                                             "layer_bands": {"syntax": [0, 13], "knowledge": [14, 27],
                                                             "output": [28, 33]},
                                             "loaded": {"browse": True, "inference": False}})
        if path == "/v1/describe":
            return httpx.Response(200, json={"entity": "France", "model": "gemma", "edges": [
                {"target": "Paris", "gate_score": 1436.9, "layer": 27, "relation": "capital", "source": "probe",
                 "also": ["Berlin", "Tokyo"]}, {"target": "French", "gate_score": 35.2, "layer": 24}],
                "latency_ms": 12.3})
        if path == "/v1/select":
            return httpx.Response(200, json={"edges": [{"layer": 27, "feature": 9515, "target": "Paris",
                                                        "c_score": 0.91, "relation": "capital"},
                                                       {"layer": 27, "feature": 1, "target": "the", "c_score": 0.1}],
                                             "total": 2, "latency_ms": 1.0})
        if path == "/v1/infer":
            return httpx.Response(200, json={"prompt": "p", "predictions": [{"token": " Paris", "probability": 0.9}],
                                             "mode": "walk", "latency_ms": 3.0})
        return httpx.Response(404, json={"error": f"not found: {path}"})

    with KnowledgeClient("http://larql.test:8080/v1", transport=httpx.MockTransport(handler)) as c:
        d = c.describe("France")
        assert [(e.target, e.gate, e.band, e.relation) for e in d.edges] == \
            [("Paris", 1436.9, "knowledge", "capital"), ("French", 35.2, "knowledge", None)]
        assert d.max_gate == 1436.9 and d.signal == "clean" and d.bands["output"] == (28, 33)
        info = c.feature_info(27, [9515])  # the server ignores `features`: filtered client-side
        assert list(info) == [9515] and info[9515].top_token == "Paris" and info[9515].relation == "capital"
        assert c.infer("p").predictions[0].token == " Paris"
        with pytest.raises(KnowledgeHTTPError) as e:
            c.relations()
        assert e.value.status == 404 and e.value.code == "not_found"


def test_bad_base_url():
    from modelql.errors import RemoteError

    with pytest.raises(RemoteError, match="must start with http"):
        KnowledgeClient("localhost:8080")
