"""LARQL compatibility of the knowledge routes (issue 23, defect 7): a LARQL-shaped client — plain
httpx, LARQL's request bodies and defaults, no modelql field — gets LARQL's fields, types and
semantics. The expected shapes are LARQL's route docs (its handlers' `json!` bodies and request
structs), written out here independently of modelql's code.
"""

from __future__ import annotations

import httpx
import pytest

from modelql.server.config import ServerConfig

NUM = (int, float)


def _serve(model, source, **config):
    from modelql.server.serve import background

    return background(None, ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, **config),
                      model=model, vindex_source=source)


@pytest.fixture(scope="module")
def larql(kmodel, kvindex):
    """A fresh server per module (inserts below change its overlay) and a plain httpx client."""
    from modelql.server.knowledge_routes import VindexSource

    with _serve(kmodel, VindexSource.ready(kvindex)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


def _shape(body: dict, fields: dict) -> None:
    for name, types in fields.items():
        assert name in body, f"missing {name!r} in {sorted(body)}"
        assert isinstance(body[name], types), (name, body[name])


def test_stats(larql):
    s = larql.get("/v1/stats").json()
    _shape(s, {"model": str, "family": str, "mode": str, "layers": int, "features": int, "features_per_layer": int,
               "hidden_size": int, "vocab_size": int, "extract_level": str, "dtype": str, "layer_bands": dict,
               "loaded": dict})
    assert set(s["layer_bands"]) == {"syntax", "knowledge", "output"}
    # a full server answers walk-ffn and embed: LARQL reports both services loaded
    assert s["loaded"] == {"browse": True, "inference": True, "ffn_service": True, "embed_service": True}


def test_stats_service_modes(kmodel, kvindex):
    from modelql.server.knowledge_routes import VindexSource

    for flag, expected in [("ffn_only", (True, False)), ("embed_only", (False, True))]:
        with _serve(kmodel, VindexSource.ready(kvindex), **{flag: True}) as srv:
            loaded = httpx.get(srv.url + "/v1/stats", timeout=60).json()["loaded"]
            assert (loaded["ffn_service"], loaded["embed_service"]) == expected, (flag, loaded)


def test_describe_defaults_are_larqls(larql, kmodel, kvindex):
    """No parameters but `entity`: LARQL's min_score 5.0, band knowledge, limit 20; edges by gate
    score (labelled or not), one per lower-cased target."""
    from modelql import knowledge
    from modelql.server.knowledge_routes import describe_args

    body = larql.get("/v1/describe", params={"entity": "France"}).json()
    _shape(body, {"entity": str, "model": str, "edges": list, "latency_ms": NUM})
    edges = body["edges"]
    assert edges and len(edges) <= 20
    for e in edges:
        _shape(e, {"target": str, "gate_score": NUM, "layer": int})
        assert e["gate_score"] >= 5.0
    scores = [e["gate_score"] for e in edges]
    assert scores == sorted(scores, reverse=True)
    targets = [e["target"].strip().lower() for e in edges]
    assert len(targets) == len(set(targets))
    # the reference: knowledge.describe at threshold 5.0, deduped independently here
    ref = knowledge.describe(kvindex, "France", model=kmodel, **describe_args("knowledge", 20, 5.0, "auto"))
    best: dict[str, float] = {}
    for e in ref.edges:
        k = e.target.strip().lower()
        best[k] = max(best.get(k, float("-inf")), e.gate)
    expected = sorted(best.items(), key=lambda kv: -kv[1])[:20]
    assert targets == [k for k, _ in expected]
    # modelql's adaptive threshold is opt-in
    adaptive = larql.get("/v1/describe", params={"entity": "France", "min_score": "adaptive"}).json()
    assert adaptive["threshold"] != 5.0 and adaptive["unit"] == "z"
    assert larql.get("/v1/describe", params={"entity": "France", "min_score": "x"}).status_code == 400


def test_walk_select_relations(larql):
    w = larql.get("/v1/walk", params={"prompt": "France", "top": 3}).json()
    _shape(w, {"prompt": str, "hits": list, "latency_ms": NUM})
    for h in w["hits"]:
        _shape(h, {"layer": int, "feature": int, "gate_score": NUM, "target": str})
    s = larql.post("/v1/select", json={"entity": "Paris", "limit": 5}).json()
    _shape(s, {"edges": list, "total": int, "latency_ms": NUM})
    for e in s["edges"]:
        _shape(e, {"layer": int, "feature": int, "target": str, "c_score": NUM})
    r = larql.get("/v1/relations").json()
    _shape(r, {"relations": list, "probe_relations": list, "probe_count": int, "total": int, "latency_ms": NUM})


def test_infer_and_explain(larql):
    i = larql.post("/v1/infer", json={"prompt": "The capital of France is"}).json()
    _shape(i, {"prompt": str, "predictions": list, "mode": str, "latency_ms": NUM})
    _shape(i["predictions"][0], {"token": str, "probability": NUM})
    c = larql.post("/v1/infer", json={"prompt": "The capital of France is", "mode": "compare"}).json()
    _shape(c, {"walk": list, "walk_ms": NUM, "dense": list, "dense_ms": NUM})
    x = larql.post("/v1/explain-infer", json={"prompt": "The capital of France is"}).json()
    _shape(x, {"prompt": str, "predictions": list, "trace": list, "latency_ms": NUM})


def test_insert_is_larqls(larql):
    """LARQL's request (entity, relation, target required; no mode) → a fast insert, every field
    of LARQL's response with its type (`alpha` a number, never null)."""
    r = larql.post("/v1/insert", json={"entity": "Atlantis", "relation": "capital", "target": "Poseidonia"})
    assert r.status_code == 200, r.text
    body = r.json()
    _shape(body, {"entity": str, "relation": str, "target": str, "inserted": int, "mode": str, "alpha": NUM,
                  "latency_ms": NUM})
    assert body["mode"] == "knn" and body["inserted"] >= 1 and body["session"] is None
    assert body["alpha"] == 0.25  # LARQL's default alpha when the request gives none
    body = larql.post("/v1/insert", json={"entity": "Atlantis", "relation": "currency", "target": "Orichalc",
                                          "alpha": 0.4}).json()
    assert body["alpha"] == 0.4
    for missing in ("entity", "relation", "target"):
        req = {"entity": "A", "relation": "b", "target": "c"}
        del req[missing]
        r = larql.post("/v1/insert", json=req)
        assert r.status_code == 400, r.text
    schema = larql.get("/openapi.json").json()["components"]["schemas"]["InsertRequest"]
    assert {"required": ["entity", "relation", "target"]} in schema["anyOf"]
    pred = larql.post("/v1/infer", json={"prompt": "The capital of Atlantis is", "top": 1}).json()
    assert pred["predictions"][0]["token"].strip() == "Poseidonia"


def test_warmup_is_larqls(larql, kvindex):
    w = larql.post("/v1/warmup").json()
    _shape(w, {"model": str, "weights_loaded": bool, "weights_load_ms": int, "layers_prefetched": int,
               "prefetch_ms": int, "experts_prefetched": int, "expert_prefetch_ms": int, "hnsw_built": bool,
               "hnsw_warmup_ms": int, "total_ms": int})
    assert w["layers_prefetched"] == len(kvindex.layers()) and w["weights_loaded"] is True
    w = larql.post("/v1/warmup", json={"layers": [0, 1], "skip_weights": True}).json()
    assert w["layers_prefetched"] == 2 and w["weights_loaded"] is False
    assert larql.post("/v1/warmup", json={"layers": [999]}).status_code == 400


def test_patches_embed_logits_tokens(larql, kmodel, kvindex):
    p = larql.get("/v1/patches").json()
    _shape(p, {"patches": list})
    patch = {"version": 1, "base_model": kvindex.model, "created_at": "2026-01-01T00:00:00Z",
             "operations": [{"op": "delete", "layer": 0, "feature": 3}]}
    a = larql.post("/v1/patches/apply", json={"patch": patch}).json()
    _shape(a, {"applied": str, "operations": int, "active_patches": int})
    rm = larql.delete(f"/v1/patches/{a['applied']}").json()
    _shape(rm, {"removed": str, "active_patches": int})
    e = larql.post("/v1/embed", json={"token_ids": [1, 2]}).json()
    _shape(e, {"residual": list, "seq_len": int, "hidden_size": int, "latency_ms": NUM})
    H = kmodel.spec.hidden_size
    lg = larql.post("/v1/logits", json={"residual": [0.1] * H}).json()
    _shape(lg, {"top_k": list, "latency_ms": NUM})
    _shape(lg["top_k"][0], {"token_id": int, "token": str, "prob": NUM})
    enc = larql.get("/v1/token/encode", params={"text": "Paris"}).json()
    _shape(enc, {"token_ids": list, "text": str})
    dec = larql.get("/v1/token/decode", params={"ids": ",".join(map(str, enc["token_ids"]))}).json()
    _shape(dec, {"text": str, "token_ids": list})
    h = larql.get("/v1/health").json()
    _shape(h, {"status": str, "uptime_seconds": int, "requests_served": int})
