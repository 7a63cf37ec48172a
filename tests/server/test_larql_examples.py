"""LARQL's documented request/response examples, route by route, as data (issue 23, compatibility
suite): each request is sent as LARQL's docs write it (plain httpx, no modelql field, LARQL's
defaults) and the answer must carry the fields of LARQL's example response with the same JSON types.
Values differ (another model); where an example names something the tiny model lacks (layers 24-33
of a 34-layer model), the adaptation is noted.

Sources (LARQL, github.com/chrishayuk/larql): README = crates/larql-server/README.md ("API
Endpoints"); the route files are crates/larql-server/src/routes/*.rs (their `json!` bodies and
request/response structs). Semantics a LARQL client relies on (describe defaults, insert mode,
warmup) are in test_larql_compat.py; the binary walk-ffn frames in tests/remote/test_wire.py; the
q8k frames in tests/remote/test_q8k.py.
"""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest

from modelql.server.config import ServerConfig

NUM = (int, float)
H = 256  # the embedded model's hidden size (the residual examples are [0.12, -0.34, ...] of length H)
RESIDUAL = [0.01 * ((i % 7) - 3) for i in range(H)]


def _edge(**extra):
    return {"target": str, "gate_score": NUM, "layer": int, **extra}


# (id, method, path, request, expected shape). A shape is {field: type | [item shape] | {nested}};
# `[shape]` means a non-empty list whose items have that shape.
EXAMPLES = [
    # README "GET /v1/describe"
    ("describe", "GET", "/v1/describe", {"params": {"entity": "France"}},
     {"entity": str, "model": str, "edges": [_edge()], "latency_ms": NUM}),
    # README "GET /v1/describe" second form; routes/describe.rs: verbose adds layer_min/layer_max/count
    ("describe-verbose", "GET", "/v1/describe",
     {"params": {"entity": "France", "band": "all", "verbose": "true", "limit": "10", "min_score": "5.0"}},
     {"entity": str, "model": str, "edges": [_edge(layer_min=int, layer_max=int, count=int)], "latency_ms": NUM}),
    # README "GET /v1/walk"
    ("walk", "GET", "/v1/walk", {"params": {"prompt": "The capital of France is", "top": "5"}},
     {"prompt": str, "hits": [{"layer": int, "feature": int, "gate_score": NUM, "target": str}], "latency_ms": NUM}),
    # README "GET /v1/walk" second form (layers=24-33 there; this model has layers 0-3)
    ("walk-layers", "GET", "/v1/walk", {"params": {"prompt": "Einstein", "top": "10", "layers": "1-3"}},
     {"prompt": str, "hits": list, "latency_ms": NUM}),
    # README "POST /v1/select"
    ("select", "POST", "/v1/select", {"json": {"entity": "France", "limit": 10, "order_by": "c_score", "order": "desc"}},
     {"edges": [{"layer": int, "feature": int, "target": str, "c_score": NUM}], "total": int, "latency_ms": NUM}),
    # README "GET /v1/relations"
    ("relations", "GET", "/v1/relations", {},
     {"relations": [{"name": str, "count": int}], "total": int}),
    # README "GET /v1/stats"
    ("stats", "GET", "/v1/stats", {},
     {"model": str, "family": str, "layers": int, "features": int, "hidden_size": int,
      "layer_bands": {"syntax": list, "knowledge": list, "output": list},
      "loaded": {"browse": bool, "inference": bool}}),
    # README "POST /v1/warmup" (default: warm everything, no body)
    ("warmup", "POST", "/v1/warmup", {},
     {"model": str, "weights_loaded": bool, "weights_load_ms": int, "layers_prefetched": int, "prefetch_ms": int,
      "hnsw_built": bool, "hnsw_warmup_ms": int, "total_ms": int}),
    # README "POST /v1/warmup" selective (layers [14, 22, 28] there)
    ("warmup-selective", "POST", "/v1/warmup", {"json": {"layers": [0, 2, 3], "skip_weights": True}},
     {"model": str, "weights_loaded": bool, "layers_prefetched": int, "total_ms": int}),
    # README "POST /v1/infer", walk mode
    ("infer", "POST", "/v1/infer", {"json": {"prompt": "The capital of France is", "top": 5, "mode": "walk"}},
     {"prompt": str, "predictions": [{"token": str, "probability": NUM}], "mode": str, "latency_ms": NUM}),
    # README "POST /v1/infer", compare mode
    ("infer-compare", "POST", "/v1/infer", {"json": {"prompt": "The capital of France is", "mode": "compare"}},
     {"prompt": str, "walk": [{"token": str, "probability": NUM}], "walk_ms": NUM,
      "dense": [{"token": str, "probability": NUM}], "dense_ms": NUM, "latency_ms": NUM}),
    # routes/explain.rs: predictions + per-layer trace of features
    ("explain-infer", "POST", "/v1/explain-infer", {"json": {"prompt": "The capital of France is"}},
     {"prompt": str, "predictions": [{"token": str, "probability": NUM}],
      "trace": [{"layer": int, "features": list}], "latency_ms": NUM}),
    # routes/insert.rs: InsertRequest {entity, relation, target} → the insert summary
    ("insert", "POST", "/v1/insert", {"json": {"entity": "Atlantis", "relation": "capital", "target": "Poseidonia"}},
     {"entity": str, "relation": str, "target": str, "inserted": int, "mode": str, "alpha": NUM, "latency_ms": NUM}),
    # README "POST /v1/walk-ffn" single layer, features only
    ("walk-ffn", "POST", "/v1/walk-ffn", {"json": {"layer": 2, "residual": RESIDUAL, "top_k": 8092}},
     {"layer": int, "features": [int], "scores": [NUM], "latency_ms": NUM}),
    # README "POST /v1/walk-ffn" batched (layers 0..33 there)
    ("walk-ffn-batch", "POST", "/v1/walk-ffn", {"json": {"layers": [0, 1, 2, 3], "residual": RESIDUAL}},
     {"results": [{"layer": int, "features": [int], "scores": [NUM]}], "latency_ms": NUM}),
    # README "POST /v1/walk-ffn" full-output mode
    ("walk-ffn-full", "POST", "/v1/walk-ffn",
     {"json": {"layer": 2, "residual": RESIDUAL, "seq_len": 1, "full_output": True}},
     {"layer": int, "output": [NUM], "seq_len": int, "latency_ms": NUM}),
    # README "POST /v1/embed"
    ("embed", "POST", "/v1/embed", {"json": {"token_ids": [1, 5, 23, 12]}},
     {"residual": [[NUM]], "seq_len": int, "hidden_size": int, "latency_ms": NUM}),
    # routes/embed.rs handle_embed_single: JSON form {"token_id", "embedding", "hidden_size"}
    ("embed-token", "GET", "/v1/embed/5", {"headers": {"Accept": "application/json"}},
     {"token_id": int, "embedding": [NUM], "hidden_size": int}),
    # README "POST /v1/logits"
    ("logits", "POST", "/v1/logits", {"json": {"residual": RESIDUAL, "top_k": 5, "temperature": 1.0}},
     {"top_k": [{"token_id": int, "token": str, "prob": NUM}], "latency_ms": NUM}),
    # README "GET /v1/token/encode"
    ("token-encode", "GET", "/v1/token/encode", {"params": {"text": "Paris"}}, {"token_ids": [int], "text": str}),
    # README "GET /v1/token/decode"
    ("token-decode", "GET", "/v1/token/decode", {"params": {"ids": "9,23,12"}}, {"text": str, "token_ids": [int]}),
    # README "GET /v1/patches" (routes/patches.rs: {"patches": [...]})
    ("patches", "GET", "/v1/patches", {}, {"patches": list}),
    # README "GET /v1/health"
    ("health", "GET", "/v1/health", {}, {"status": str, "uptime_seconds": int, "requests_served": int}),
    # README "GET /v1/models"
    ("models", "GET", "/v1/models", {},
     {"object": str, "data": [{"id": str, "object": str, "created": int, "owned_by": str}]}),
    # README "OpenAI-compatible Endpoints": POST /v1/embeddings
    ("embeddings", "POST", "/v1/embeddings", {"json": {"model": "any", "input": "The capital of France"}},
     {"object": str, "data": [{"object": str, "embedding": [NUM], "index": int}], "model": str, "usage": dict}),
    # README "OpenAI-compatible Endpoints": POST /v1/completions
    ("completions", "POST", "/v1/completions", {"json": {"model": "any", "prompt": "The capital of France is",
                                                          "max_tokens": 4}},
     {"id": str, "object": str, "created": int, "model": str,
      "choices": [{"text": str, "index": int, "finish_reason": str}], "usage": dict}),
    # README "OpenAI-compatible Endpoints": POST /v1/chat/completions
    ("chat", "POST", "/v1/chat/completions",
     {"json": {"model": "any", "messages": [{"role": "user", "content": "Capital of France?"}], "max_tokens": 4}},
     {"id": str, "object": str, "created": int, "model": str,
      "choices": [{"index": int, "message": {"role": str, "content": str}, "finish_reason": str}], "usage": dict}),
]


def check_shape(value, shape, where="body"):
    if isinstance(shape, dict):
        assert isinstance(value, dict), (where, value)
        for name, sub in shape.items():
            assert name in value, f"{where}: missing {name!r} (has {sorted(value)})"
            check_shape(value[name], sub, f"{where}.{name}")
    elif isinstance(shape, list):
        assert isinstance(value, list) and value, f"{where}: expected a non-empty list, got {value!r}"[:300]
        for i, item in enumerate(value[:5]):
            check_shape(item, shape[0], f"{where}[{i}]")
    else:
        assert isinstance(value, shape) and not (isinstance(value, bool) and shape in (int, NUM)), \
            f"{where}: {value!r} is not {shape}"


@pytest.fixture(scope="module")
def larql(kmodel, kvindex):
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import background

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0)
    with background(None, cfg, model=kmodel, vindex_source=VindexSource.ready(kvindex)) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        yield c


@pytest.mark.parametrize("name, method, path, request_, shape", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_larql_example(larql, name, method, path, request_, shape):
    r = larql.request(method, path, **request_)
    assert r.status_code == 200, (name, r.status_code, r.text[:300])
    check_shape(r.json(), shape)


def test_patch_lifecycle_example(larql, kvindex):
    """README "Patch Endpoints": apply {"patch": {...}}, list, DELETE /v1/patches/{name}
    (routes/patches.rs: {"applied","operations","active_patches"} / {"removed","active_patches"})."""
    patch = {"version": 1, "base_model": kvindex.model, "created_at": "", "description": "larql-example",
             "operations": [{"op": "delete", "layer": 1, "feature": 3}]}
    a = larql.post("/v1/patches/apply", json={"patch": patch})
    assert a.status_code == 200, a.text
    check_shape(a.json(), {"applied": str, "operations": int, "active_patches": int})
    check_shape(larql.get("/v1/patches").json(), {"patches": [dict]})
    rm = larql.delete(f"/v1/patches/{a.json()['applied']}")
    check_shape(rm.json(), {"removed": str, "active_patches": int})


def test_binary_examples(larql):
    """README "POST /v1/embed" binary: `[num_tokens u32][token_id u32 × N]` → `[seq_len u32][hidden u32]
    [f32 × seq_len·hidden]`; README "POST /v1/logits" binary input: raw `[f32 × hidden]`;
    routes/embed.rs handle_embed_single: binary f32 LE by default."""
    ct = {"Content-Type": "application/x-larql-ffn"}
    r = larql.post("/v1/embed", content=struct.pack("<I3I", 3, 1, 5, 23), headers=ct)
    assert r.status_code == 200, r.text
    seq, hidden = struct.unpack_from("<II", r.content)
    assert (seq, hidden) == (3, H) and len(r.content) == 8 + 4 * 3 * H
    as_json = larql.post("/v1/embed", json={"token_ids": [1, 5, 23]}).json()["residual"]
    np.testing.assert_allclose(np.frombuffer(r.content[8:], "<f4").reshape(3, H), as_json, rtol=1e-6, atol=1e-7)
    lg = larql.post("/v1/logits", content=np.asarray(RESIDUAL, "<f4").tobytes(), headers=ct)
    assert lg.status_code == 200, lg.text
    check_shape(lg.json(), {"top_k": [{"token_id": int, "token": str, "prob": NUM}], "latency_ms": NUM})
    one = larql.get("/v1/embed/5")
    assert one.status_code == 200 and len(one.content) == 4 * H
    np.testing.assert_allclose(np.frombuffer(one.content, "<f4"), as_json[1], rtol=1e-6, atol=1e-7)


def test_stream_example(larql):
    """README "WS /v1/stream": → {"type": "describe", "entity", "band"}; ← layer messages, then
    {"type": "done", "entity", "total_edges", "latency_ms"}."""
    from websockets.sync.client import connect

    url = str(larql.base_url).replace("http://", "ws://").rstrip("/") + "/v1/stream"
    with connect(url) as ws:
        ws.send(json.dumps({"type": "describe", "entity": "France", "band": "all"}))
        msgs = []
        while not msgs or msgs[-1].get("type") not in ("done", "error"):
            msgs.append(json.loads(ws.recv(timeout=60)))
    assert msgs[-1]["type"] == "done", msgs[-1]
    for m in msgs[:-1]:
        check_shape(m, {"type": str, "layer": int, "edges": list})
    check_shape(msgs[-1], {"type": str, "entity": str, "total_edges": int, "latency_ms": NUM})


def test_expert_routes_of_a_dense_server(larql):
    """routes/topology.rs: GET /v1/expert/topology is a 404 on a server not launched with
    `--experts`; on a dense model every /v1/expert(s)/ route is a 404 with the error envelope (the
    single-expert routes answer MoE models: tests/edit/test_moe_edit.py)."""
    assert larql.get("/v1/expert/topology").status_code == 404
    for path in ("/v1/expert/batch", "/v1/experts/layer-batch", "/v1/experts/layer-batch-f16",
                 "/v1/experts/multi-layer-batch", "/v1/experts/multi-layer-batch-q8k", "/v1/expert/0/1"):
        r = larql.post(path, content=b"\x00" * 16)
        assert r.status_code == 404, (path, r.status_code)
        assert "message" in r.json()["error"]
