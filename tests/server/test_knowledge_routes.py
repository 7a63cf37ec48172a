"""The knowledge group (server-api.md §4) and WebSocket /v1/stream (§6) on the embedded model's vindex.

The server under test is built the way `modelql serve` builds it (`serve.build`), serving the
embedded model (or `MODELQL_TEST_DEFAULT_MODEL`, as tests/knowledge and tests/lql) with its cached,
probe-labelled vindex. Shapes are checked against the spec; DESCRIBE over HTTP is checked against
`knowledge.describe` called directly with the same model and vindex. A second, tiny server covers
the model-directory path (background extraction) and the modes.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from pathlib import Path

import httpx
import pytest

from modelql.server.config import ServerConfig


def _serve(model, source, **config):
    """A server built as `modelql serve` builds it (context manager: always stopped, engine too)."""
    from modelql.server.serve import background

    return background(None, ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, **config),
                      model=model, vindex_source=source)


@pytest.fixture(scope="module")
def client(ksrv):
    with httpx.Client(base_url=ksrv.url, timeout=60) as c:
        yield c


# -- shapes ---------------------------------------------------------------------------------------------

def test_stats_shape(client, kvindex):
    s = client.get("/v1/stats").json()
    for key in ("model", "family", "mode", "layers", "features", "features_per_layer", "hidden_size", "vocab_size",
                "extract_level", "dtype", "layer_bands", "loaded", "owned_layers", "knn_entries", "patches_active"):
        assert key in s, key
    assert s["mode"] == "full" and s["layers"] == kvindex.num_layers and s["hidden_size"] == kvindex.hidden_size
    assert set(s["layer_bands"]) == {"syntax", "knowledge", "output"}
    assert s["loaded"] == {"browse": True, "inference": True, "ffn_service": True, "embed_service": True}


def test_describe_france_equals_python_api(client, kmodel, kvindex):
    """DESCRIBE France over HTTP == knowledge.describe(...) with the same arguments, rendered per spec."""
    from modelql import knowledge
    from modelql.server.knowledge_routes import describe_args

    r = client.get("/v1/describe", params={"entity": "France", "verbose": "true", "min_score": "adaptive"})
    assert r.status_code == 200
    body = r.json()
    ref = knowledge.describe(kvindex, "France", model=kmodel, **describe_args("knowledge", 20, None, "auto"))
    seen, kept = set(), []
    for e in sorted(ref.to_json()["edges"], key=lambda e: -e["gate"]):  # LARQL: by score, one per target
        if e["target"].strip().lower() not in seen:
            seen.add(e["target"].strip().lower())
            kept.append(e)
    j = ref.to_json()
    assert body["entity"] == "France" and body["model"] == j["model"] and body["mode"] == j["mode"] == "residual"
    assert isinstance(body["latency_ms"], float)
    expected = []
    for e in kept[:20]:
        row = {"target": e["target"], "gate_score": round(e["gate"], 1), "layer": e["layer"],
               "layer_min": e["layer_min"], "layer_max": e["layer_max"], "count": e["count"]}
        if e["relation"]:
            row["relation"], row["source"] = e["relation"], "probe"
        if e["also"]:
            row["also"] = e["also"][:3]
        expected.append(row)
    assert body["edges"] == expected
    assert body["edges"], "the embedded model knows something about France"
    # brief form: no layer_min/layer_max/count
    brief = client.get("/v1/describe", params={"entity": "France"}).json()
    assert all(set(e) <= {"target", "gate_score", "layer", "relation", "source", "also"} for e in brief["edges"])


def test_describe_reference_threshold_and_embedding_mode(client, kvindex):
    from modelql import knowledge

    body = client.get("/v1/describe", params={"entity": "France", "mode": "embedding", "min_score": 0.5,
                                              "band": "all", "limit": 5}).json()
    ref = knowledge.describe(kvindex, "France", mode="embedding", threshold=0.5, k=5, token_filter="light",
                             probe_only=True)
    assert [e["target"] for e in body["edges"]] == [e.target for e in ref.edges][:5]
    assert body["unit"] == "score" and body["threshold"] == 0.5 and len(body["edges"]) <= 5


def test_describe_etag_and_304(client):
    r = client.get("/v1/describe", params={"entity": "Japan"})
    tag = r.headers["etag"]
    assert tag.startswith('"') and r.headers["cache-control"] == "public, max-age=86400"
    assert client.get("/v1/describe", params={"entity": "Japan"}, headers={"If-None-Match": tag}).status_code == 304
    assert client.get("/v1/describe", params={"entity": "Japan"}, headers={"If-None-Match": "*"}).status_code == 304
    assert client.get("/v1/describe", params={"entity": "Japan"},
                      headers={"If-None-Match": '"other"'}).status_code == 200


def test_walk_shape(client, kvindex):
    from modelql import knowledge

    body = client.get("/v1/walk", params={"prompt": "The capital of France is", "top": 3, "layers": "0-1"}).json()
    assert body["prompt"] == "The capital of France is" and isinstance(body["latency_ms"], float)
    ref = knowledge.walk(kvindex, "The capital of France is", top=3, layers=[0, 1])
    assert [(h["layer"], h["feature"], h["target"]) for h in body["hits"]] == \
        [(r.layer, r.feature, r.target) for r in ref.rows]
    assert {h["layer"] for h in body["hits"]} <= {0, 1}
    for h in body["hits"]:
        assert set(h) <= {"layer", "feature", "gate_score", "target", "relation"}


def test_select_shape(client):
    body = client.post("/v1/select", json={"relation": "capital", "limit": 4, "order_by": "c_score"}).json()
    assert set(body) == {"edges", "total", "latency_ms"}
    assert len(body["edges"]) <= 4 and body["total"] >= len(body["edges"])
    scores = [e["c_score"] for e in body["edges"]]
    assert scores == sorted(scores, reverse=True)
    for e in body["edges"]:
        assert {"layer", "feature", "target", "c_score"} <= set(e) and "capital" in e["relation"].lower()
    layer1 = client.post("/v1/select", json={"layer": 1, "limit": 3, "order": "asc", "order_by": "confidence"}).json()
    assert all(e["layer"] == 1 for e in layer1["edges"])


def test_relations_shape(client):
    body = client.get("/v1/relations").json()
    assert set(body) == {"relations", "probe_relations", "probe_count", "total", "latency_ms"}
    assert len(body["relations"]) <= 50
    for r in body["relations"]:
        assert set(r) == {"name", "count", "max_score", "min_layer", "max_layer", "examples"}
    assert body["probe_count"] > 0 and all(set(p) == {"name", "count"} for p in body["probe_relations"])


def test_infer_shapes_equal_knowledge_infer(client, kmodel):
    from modelql.knowledge.infer import infer

    body = client.post("/v1/infer", json={"prompt": "The capital of France is", "top": 3}).json()
    ref = infer(kmodel, "The capital of France is", top=3)
    assert body["mode"] == "walk" and body["prompt"] == "The capital of France is"
    assert body["predictions"] == [{"token": p.token, "probability": round(p.prob, 4)} for p in ref.predictions]
    cmp = client.post("/v1/infer", json={"prompt": "The capital of France is", "top": 2, "mode": "compare"}).json()
    assert {"prompt", "walk", "walk_ms", "dense", "dense_ms", "latency_ms"} <= set(cmp)
    assert len(cmp["walk"]) == len(cmp["dense"]) == 2


def test_explain_infer_shape(client):
    body = client.post("/v1/explain-infer", json={"prompt": "The capital of France is", "per_layer": 2,
                                                  "with_attention": True}).json()
    assert {"prompt", "predictions", "trace", "latency_ms"} <= set(body) and len(body["predictions"]) == 5
    assert body["trace"]
    for t in body["trace"]:
        assert len(t["features"]) <= 2
        for f in t["features"]:
            assert set(f) == {"feature", "gate_score", "top_token", "top_tokens", "relation"}
        assert {"token", "probability"} == set(t["lens"]) and t["attention"][0].keys() == {"token", "weight"}


def test_embed_json_binary_and_single(client, kmodel):
    import numpy as np

    H = kmodel.spec.hidden_size
    body = client.post("/v1/embed", json={"token_ids": [5, 7]}).json()
    assert body["seq_len"] == 2 and body["hidden_size"] == H and len(body["residual"]) == 2
    expected = (kmodel.embed[[5, 7]].float() * kmodel.spec.embed_scale).numpy()
    assert np.allclose(np.array(body["residual"]), expected, atol=1e-6)
    raw = client.post("/v1/embed", content=struct.pack("<III", 2, 5, 7),
                      headers={"Content-Type": "application/x-larql-ffn"})
    assert raw.headers["content-type"].startswith("application/x-larql-ffn")
    n, h = struct.unpack_from("<II", raw.content)
    assert (n, h) == (2, H)
    assert np.allclose(np.frombuffer(raw.content[8:], "<f4").reshape(2, H), expected, atol=1e-6)
    one = client.get("/v1/embed/7")
    assert one.headers["cache-control"] == "public, max-age=31536000, immutable" and one.headers["vary"] == "Accept"
    assert np.allclose(np.frombuffer(one.content, "<f4"), expected[1], atol=1e-6)
    js = client.get("/v1/embed/7", headers={"Accept": "application/json"}).json()
    assert js["token_id"] == 7 and js["hidden_size"] == H and len(js["embedding"]) == H


def test_logits_and_tokens(client, kmodel):
    import torch

    ids = client.get("/v1/token/encode", params={"text": "France"}).json()
    assert ids["text"] == "France" and ids["token_ids"] == kmodel.tokenizer.encode("France", add_special_tokens=False)
    dec = client.get("/v1/token/decode", params={"ids": ",".join(map(str, ids["token_ids"]))}).json()
    assert dec == {"text": "France", "token_ids": ids["token_ids"]}
    # the final residual of a prompt through /v1/logits gives the model's own next-token distribution
    h = kmodel.forward([kmodel.tokenizer.encode("The capital of France is")], logits="none")[0, -1]
    body = client.post("/v1/logits", json={"residual": h.tolist(), "top_k": 3}).json()
    probs = torch.softmax(kmodel.unembed(h[None])[0].double(), -1)
    assert [t["token_id"] for t in body["top_k"]] == torch.topk(probs, 3).indices.tolist()
    assert set(body["top_k"][0]) == {"token_id", "token", "prob"}
    raw = client.post("/v1/logits", content=h.numpy().astype("<f4").tobytes(),
                      headers={"Content-Type": "application/x-larql-ffn"}).json()
    assert raw["top_k"][0]["token_id"] == body["top_k"][0]["token_id"]


# -- errors ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,path,kw,status,message", [
    ("get", "/v1/describe", {"params": {"entity": " "}}, 400, "missing entity"),
    ("get", "/v1/describe", {}, 400, None),
    ("get", "/v1/walk", {"params": {"prompt": ""}}, 400, "empty prompt"),
    ("post", "/v1/infer", {"json": {"prompt": ""}}, 400, "empty prompt"),
    ("post", "/v1/infer", {"json": {"prompt": "x", "mode": "nope"}}, 400, None),
    ("post", "/v1/embed", {"json": {"token_ids": []}}, 400, "token_ids must be non-empty"),
    ("post", "/v1/embed", {"json": {"token_ids": [10 ** 7]}}, 400, "token_id 10000000 out of range (vocab="),
    ("post", "/v1/embed", {"content": b"\x01\x00", "headers": {"Content-Type": "application/x-larql-ffn"}}, 400, None),
    ("get", "/v1/embed/-1", {}, 400, "out of range"),
    ("post", "/v1/logits", {"json": {"residual": [1.0, 2.0]}}, 400, "residual length 2 != hidden_size"),
    ("get", "/v1/token/decode", {"params": {"ids": "1,x"}}, 400, "invalid token id: 'x'"),
    ("post", "/v1/patches/apply", {"json": {}}, 400, "must provide 'url' or 'patch' in request body"),
    ("get", "/v1/nope", {}, 404, None),
])
def test_errors_use_the_openai_envelope(client, method, path, kw, status, message):
    r = getattr(client, method)(path, **kw)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    if message:
        assert message in body["error"]["message"]


def test_editing_routes_without_edits(client):
    assert client.get("/v1/patches").json()["patches"] == []
    assert client.delete("/v1/patches/none").json()["error"]["message"] == "patch 'none' not found"
    r = client.post("/v1/insert", json={"entity": "France", "relation": "capital", "target": "Lyon",
                                        "mode": "constellation"})
    assert r.status_code == 400 and "constellation" in r.json()["error"]["message"]
    for body, msg in [({"entity": "France", "relation": "capital"}, "must provide 'entity', 'relation' and 'target'"),
                      ({"entity": "France", "relation": "capital", "target": "Lyon",
                        "facts": [{"entity": "Spain", "relation": "capital", "target": "Porto"}]}, "not both")]:
        r = client.post("/v1/insert", json=body)
        assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text
    assert client.post("/v1/insert", json={"facts": []}).status_code == 400
    assert client.get("/v1/patches").json()["patches"] == []  # nothing was recorded


def test_insert_knn_overrides_infer_and_patches_roundtrip(kmodel, kvindex, tmp_path):
    """POST /v1/insert (MODE KNN) → INFER's top prediction is overridden, the edit is listed as a
    patch, describe turns no-cache; removing it restores the base (same knowledge.edit as LQL INSERT)."""
    from modelql.server.knowledge_routes import RECORDING_NAME, VindexSource

    with _serve(kmodel, VindexSource.ready(kvindex)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        prompt = "The capital of France is"
        before = c.post("/v1/infer", json={"prompt": prompt, "top": 3}).json()
        ins = c.post("/v1/insert", json={"entity": "France", "relation": "capital", "target": "Lyon", "mode": "knn"})
        assert ins.status_code == 200, ins.text
        body = ins.json()
        assert {"entity", "relation", "target", "inserted", "mode", "alpha", "layer", "session", "latency_ms"} <= set(body)
        assert body["mode"] == "knn" and body["inserted"] == 1 and body["session"] is None
        after = c.post("/v1/infer", json={"prompt": prompt, "top": 3}).json()
        assert after["predictions"][0] == {"token": "Lyon", "probability": 1.0}
        ko = after["knn_override"]
        assert ko["token"] == "Lyon" and ko["source"] == "knn_override" and ko["materialized"] is False
        assert ko["model_top1"] == before["predictions"][0]
        assert c.get("/v1/patches").json()["patches"] == [
            {"name": RECORDING_NAME, "operations": 1, "base_model": kvindex.model}]
        assert c.get("/v1/stats").json()["patches_active"] == 1
        d = c.get("/v1/describe", params={"entity": "France", "limit": 200})
        assert d.headers["cache-control"] == "no-cache"
        assert any(e["target"] == "Lyon" for e in d.json()["edges"])
        rm = c.delete(f"/v1/patches/{RECORDING_NAME}").json()
        assert rm == {"removed": RECORDING_NAME, "active_patches": 0}
        assert c.post("/v1/infer", json={"prompt": prompt, "top": 3}).json()["predictions"] == before["predictions"]
        bad = c.post("/v1/patches/apply", json={"patch": {"x": 1}})
        assert bad.status_code == 400 and bad.json()["error"]["message"].startswith("failed to load patch")
        assert c.post("/v1/patches/apply", json={"url": str(tmp_path / "none.vlp")}).status_code == 403  # no --patch-dir


# -- WebSocket /v1/stream -----------------------------------------------------------------------------------

def _ws_url(srv) -> str:
    return srv.url.replace("http://", "ws://") + "/v1/stream"


async def _recv(ws) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), 30))


def test_ws_generate_streams_tokens_equal_to_greedy_generate(ksrv, kmodel):
    import websockets

    from modelql.runtime.generate import generate
    from modelql.runtime.sampling import SamplingParams

    ref = generate(kmodel, "The capital of France is", SamplingParams(max_tokens=8, temperature=0))

    async def run():
        async with websockets.connect(_ws_url(ksrv)) as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": "The capital of France is", "max_tokens": 8}))
            texts = []
            while True:
                m = await _recv(ws)
                if m["type"] == "done":
                    return texts, m
                assert m["type"] == "token" and m["index"] == len(texts)
                texts.append(m["text"])

    texts, done = asyncio.run(run())
    assert "".join(texts) == ref.text and done["tokens"] == len(texts) and "cancelled" not in done


def test_ws_cancel_stops_generation(ksrv, kmodel):
    import websockets

    async def run():
        async with websockets.connect(_ws_url(ksrv)) as ws:
            # cancel right behind the request (a trained model may reach EOS within a few tokens)
            await ws.send(json.dumps({"type": "generate", "prompt": "Hello", "max_tokens": 400}))
            await ws.send(json.dumps({"type": "cancel"}))
            n = 0
            while True:
                m = await _recv(ws)
                if m["type"] == "done":
                    return n, m
                n += 1

    n, done = asyncio.run(run())
    assert done["cancelled"] is True and done["tokens"] == n and n < 400

    async def still_usable():  # the connection serves the next request after a cancel
        async with websockets.connect(_ws_url(ksrv)) as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": "Hello", "max_tokens": 2}))
            await ws.send(json.dumps({"type": "cancel"}))
            await ws.send(json.dumps({"type": "generate", "prompt": "Hello", "max_tokens": 2}))
            dones = []
            while len(dones) < 2:
                m = await _recv(ws)
                if m["type"] == "done":
                    dones.append(m)
            return dones

    first, second = asyncio.run(still_usable())
    assert "cancelled" not in second and second["tokens"] <= 2


def test_ws_describe_infer_and_errors(ksrv, kvindex):
    import websockets

    async def run():
        out = []
        async with websockets.connect(_ws_url(ksrv)) as ws:
            await ws.send(json.dumps({"type": "describe", "entity": "France", "band": "all"}))
            while True:
                m = await _recv(ws)
                out.append(m)
                if m["type"] == "done":
                    break
            await ws.send(json.dumps({"type": "infer", "prompt": "The capital of France is", "top": 3}))
            for _ in range(4):
                out.append(await _recv(ws))
            await ws.send("{not json")
            out.append(await _recv(ws))
            await ws.send(json.dumps({"type": "fly"}))
            out.append(await _recv(ws))
            await ws.send(json.dumps({"type": "describe"}))
            out.append(await _recv(ws))
        return out

    msgs = asyncio.run(run())
    layers = [m for m in msgs if m["type"] == "layer"]
    assert [m["layer"] for m in layers] == kvindex.layers()
    for m in layers:
        for e in m["edges"]:
            assert {"target", "gate_score", "feature"} <= set(e)
    done = next(m for m in msgs if m["type"] == "done")
    assert done["entity"] == "France" and done["total_edges"] == sum(len(m["edges"]) for m in layers)
    preds = [m for m in msgs if m["type"] == "prediction"]
    assert [p["rank"] for p in preds] == [1, 2, 3]
    infer_done = next(m for m in msgs if m["type"] == "infer_done")
    assert infer_done["predictions"] == [{"token": p["token"], "probability": p["probability"]} for p in preds]
    errors = [m["message"] for m in msgs if m["type"] == "error"]
    assert errors == ["invalid JSON", "unknown message type: fly. Supported: describe, infer, generate",
                      "missing entity"]


# -- modes and vindex sources --------------------------------------------------------------------------------

def test_no_infer_mode(kmodel, kvindex):
    from modelql.server.knowledge_routes import VindexSource

    with _serve(kmodel, VindexSource.ready(kvindex), no_infer=True) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.post("/v1/infer", json={"prompt": "x"})
            assert r.status_code == 503 and r.json()["error"]["message"] == "inference disabled (--no-infer)"
            d = c.get("/v1/describe", params={"entity": "France"}).json()
            assert d["mode"] == "embedding"  # no forward passes without inference
            assert c.get("/v1/stats").json()["loaded"]["inference"] is False
            assert c.get("/v1/token/encode", params={"text": "a"}).status_code == 200


def test_embed_only_mode_refuses_browse(kmodel, kvindex):
    from modelql.server.knowledge_routes import VindexSource

    with _serve(kmodel, VindexSource.ready(kvindex), embed_only=True) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.get("/v1/describe", params={"entity": "France"})
            assert r.status_code == 503 and r.json()["error"]["message"] == "/v1/describe is not served in embed-service mode"
            assert c.post("/v1/embed", json={"token_ids": [1]}).status_code == 200
            assert c.get("/v1/stats").json()["mode"] == "embed-service"


def test_model_directory_vindex_extracted_in_background(tiny_dir, tiny_model, tmp_path, monkeypatch):
    """`modelql serve MODEL_DIR`: browse routes answer 503 while the cached vindex is extracted,
    then serve it; chat-side routes work meanwhile."""
    from modelql.server.knowledge_routes import VindexSource

    monkeypatch.setenv("MODELQL_CACHE", str(tmp_path / "cache"))
    src = VindexSource.extract(tiny_dir, start=False)
    with _serve(tiny_model, src) as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            r = c.get("/v1/walk", params={"prompt": "hello"})
            assert r.status_code == 503 and "being extracted" in r.json()["error"]["message"] and r.headers["retry-after"]
            assert c.get("/v1/token/encode", params={"text": "hello"}).status_code == 200
            stats = c.get("/v1/stats").json()  # answered from the model meanwhile
            assert stats["loaded"]["browse"] is False and stats["layer_bands"] is None
            assert stats["vindex_status"] == "extracting" and stats["layers"] == tiny_model.spec.num_layers
            src._thread.start()
            assert src.wait(120)
            assert c.get("/v1/walk", params={"prompt": "hello"}).status_code == 200
    assert list((tmp_path / "cache" / "vindex").glob("*.vindex"))


def test_warmup_computes_the_editing_statistics_on_request(tiny_dir, tiny_model, fast_memit, monkeypatch):
    """`POST /v1/warmup {"editing": true}` (modelql) pays for a model's first weight-level insert
    ahead of time; plain warmup does not, and a --no-infer server says why it cannot."""
    from modelql.knowledge import memit
    from modelql.server.knowledge_routes import VindexSource

    for k in ("_memit_covariance", "_memit_preserve", "_memit_gcov", "_memit_state"):
        monkeypatch.delitem(tiny_model.__dict__, k, raising=False)
    src = VindexSource.extract(tiny_dir)
    assert src.wait(120)
    with _serve(tiny_model, src) as srv, httpx.Client(base_url=srv.url, timeout=300) as c:
        assert "edit_statistics" not in c.post("/v1/warmup", json={}).json()
        assert not memit.statistics_ready(tiny_model)
        r = c.post("/v1/warmup", json={"editing": True})
        assert r.status_code == 200 and r.json()["edit_statistics"] == "ready"
    # the traced edit site and the statistics of its key position, on disk: a new process computes nothing
    stored = sorted(p.name.split("-", 1)[1] for p in (Path(os.environ["MODELQL_CACHE"]) / "memit").glob("*"))
    site = memit.site_for(tiny_model)
    from modelql.knowledge.generic_text import corpus_tag

    tag = corpus_tag()
    want = ([f"gcov-{tag}-L{l}.pt" for l in site[1]] + [f"corpus-{tag}.json"] if site[0] == "subject" else
            [f"cov-L{l}-n{memit.MemitParams().cov_sentences}.pt" for l in site[1]]
            + [f"preserve-last-L{l}.pt" for l in site[1]])
    assert sorted(want + ["site.json"]) == stored
    with _serve(tiny_model, src, no_infer=True) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.post("/v1/warmup", json={"editing": True})
        assert r.status_code == 503 and "without inference" in r.json()["error"]["message"]


def test_gguf_or_unknown_ref_has_a_reason():
    from modelql.server.knowledge_routes import VindexSource

    src = VindexSource.for_model_ref("/nonexistent/model.gguf")
    with pytest.raises(Exception) as exc:
        src.require()
    assert "modelql extract" in str(exc.value)


def test_sessions_isolate_edits(kmodel, kvindex):
    """X-Session-Id (§2.3): a session's insert is seen by that session only and echoes its id."""
    from modelql.server.knowledge_routes import RECORDING_NAME, VindexSource

    s1 = {"X-Session-Id": "alice.1"}
    with _serve(kmodel, VindexSource.ready(kvindex)) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
        prompt = {"prompt": "The capital of France is", "top": 2}
        base = c.post("/v1/infer", json=prompt).json()["predictions"]
        ins = c.post("/v1/insert", headers=s1,
                     json={"entity": "France", "relation": "capital", "target": "Lyon", "mode": "knn"}).json()
        assert ins["session"] == "alice.1"
        assert c.post("/v1/infer", json=prompt, headers=s1).json()["predictions"][0]["token"] == "Lyon"
        assert c.post("/v1/infer", json=prompt).json()["predictions"] == base
        assert c.post("/v1/infer", json=prompt, headers={"X-Session-Id": "bob"}).json()["predictions"] == base
        listed = c.get("/v1/patches", headers=s1).json()
        assert listed["session"] == "alice.1" and [p["name"] for p in listed["patches"]] == [RECORDING_NAME]
        assert c.get("/v1/patches").json() == {"patches": []}
        bad = c.get("/v1/patches", headers={"X-Session-Id": "no spaces"})
        assert bad.status_code == 400 and bad.json()["error"]["message"] == "invalid X-Session-Id"
