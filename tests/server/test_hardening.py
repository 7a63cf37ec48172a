"""Issue 23: what a remote client may touch and how the server fails (defects 1, 2, 3, 6).

Each test fails on the code before the fix: patch files read from anywhere (1), 500s on deep /
non-UTF-8 / lone-surrogate bodies (2), the rate limit bypassed with X-Forwarded-For (3), silently
clamped or overflowing values and FFN work on the event loop (6).
"""

from __future__ import annotations

import asyncio
import json
import threading

import httpx
import pytest

from modelql.server.config import ServerConfig


def error_message(r: httpx.Response) -> str:
    """The error text of a response in either envelope: `{"error": "msg"}` or OpenAI's
    `{"error": {"message": ...}}` (the knowledge group is moving to the latter)."""
    err = r.json()["error"]
    return err["message"] if isinstance(err, dict) else err


def _serve(model, source, **config):
    from modelql.server.serve import background

    return background(None, ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, **config),
                      model=model, vindex_source=source)


def _patch(kvindex, layer=0, feature=0) -> dict:
    return {"version": 1, "base_model": kvindex.model, "created_at": "2026-01-01T00:00:00Z",
            "operations": [{"op": "delete", "layer": layer, "feature": feature}]}


@pytest.fixture(scope="module")
def patch_dir(tmp_path_factory, kvindex):
    d = tmp_path_factory.mktemp("patches")
    (d / "ok.vlp").write_text(json.dumps(_patch(kvindex)))
    (d / "sub").mkdir()
    (d / "sub" / "nested.vlp").write_text(json.dumps(_patch(kvindex, feature=1)))
    (d / "broken.vlp").write_text("{not json")
    (d / "big.vlp").write_text(" " * 5000 + json.dumps(_patch(kvindex)))
    outside = tmp_path_factory.mktemp("elsewhere")
    (outside / "secret.vlp").write_text(json.dumps(_patch(kvindex)))
    (d / "link.vlp").symlink_to(outside / "secret.vlp")
    return d, outside


# -- 1: /v1/patches/apply reads only the patch directory ---------------------------------------------------

def test_patch_urls_without_patch_dir_reveal_nothing(ksrv, kvindex, patch_dir):
    d, outside = patch_dir
    with httpx.Client(base_url=ksrv.url, timeout=60) as c:
        answers = []
        for url in ["/etc/shadow", "/etc/passwd", "/nonexistent/x.vlp", str(outside / "secret.vlp"),
                    "file:///etc/hostname"]:
            r = c.post("/v1/patches/apply", json={"url": url})
            answers.append((r.status_code, error_message(r).replace(url, "")))
        assert {a for a in answers} == {answers[0]}, answers  # the same answer whatever exists on disk
        assert answers[0][0] == 403 and "--patch-dir" in answers[0][1]
        assert c.get("/v1/patches").json()["patches"] == []  # nothing was applied


def test_patch_dir_resolves_names_inside_it_only(kmodel, kvindex, patch_dir):
    from modelql.server.knowledge_routes import VindexSource

    d, outside = patch_dir
    with _serve(kmodel, VindexSource.ready(kvindex), patch_dir=str(d), max_patch_bytes=4096) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        for url in [str(outside / "secret.vlp"), "../" + outside.name + "/secret.vlp", "/etc/passwd",
                    "sub/../../x.vlp", "ok.json", "https://example.com/p.vlp", "~/x.vlp"]:
            r = c.post("/v1/patches/apply", json={"url": url})
            assert r.status_code == 400, (url, r.text)
            assert "patch directory" in error_message(r)
        r = c.post("/v1/patches/apply", json={"url": "link.vlp"})  # a symlink out of the directory
        assert r.status_code == 404, r.text
        assert c.post("/v1/patches/apply", json={"url": "missing.vlp"}).status_code == 404
        r = c.post("/v1/patches/apply", json={"url": "big.vlp"})
        assert r.status_code == 413 and "4096" in error_message(r)
        r = c.post("/v1/patches/apply", json={"url": "broken.vlp"})
        assert r.status_code == 400 and str(d) not in error_message(r)
        assert c.get("/v1/patches").json()["patches"] == []
        ok = c.post("/v1/patches/apply", json={"url": "ok.vlp"})
        assert ok.status_code == 200, ok.text
        assert ok.json()["applied"] == "ok.vlp" and ok.json()["operations"] == 1
        assert c.post("/v1/patches/apply", json={"url": "file://sub/nested.vlp"}).status_code == 200
        assert [p["name"] for p in c.get("/v1/patches").json()["patches"]] == ["ok.vlp", "file://sub/nested.vlp"]


def test_patch_dir_must_exist(tmp_path):
    from modelql.server.config import ServerConfigError

    with pytest.raises(ServerConfigError, match="not a directory"):
        ServerConfig(patch_dir=str(tmp_path / "none"))


# -- 2: one JSON body reader ---------------------------------------------------------------------------------

BAD_BODIES = [b"[" * 100_000, b'{"a":' * 50_000, b"\xff\xfe\xfa", b'{"token_ids": [1], "x": "\\ud800"}',
              b'{"residual": [NaN]}', b"\x00" * 64]
JSON_ROUTES = ["/v1/embed", "/v1/logits", "/v1/walk-ffn", "/v1/insert", "/v1/select", "/v1/infer",
               "/v1/explain-infer", "/v1/patches/apply", "/v1/edges/match", "/v1/warmup", "/v1/chat/completions",
               "/v1/completions", "/v1/embeddings"]


@pytest.mark.parametrize("route", JSON_ROUTES)
def test_bad_json_bodies_are_400_on_every_route(ksrv, route):
    with httpx.Client(base_url=ksrv.url, timeout=60) as c:
        for body in BAD_BODIES:
            r = c.post(route, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (route, body[:20], r.status_code, r.text[:200])
            assert error_message(r)
        assert c.get("/health").status_code == 200  # the keep-alive connection is still usable


def test_websocket_lone_surrogate_is_a_clear_error(ksrv):
    import websockets

    async def run():
        async with websockets.connect(ksrv.url.replace("http://", "ws://") + "/v1/stream") as ws:
            out = []
            for text in ['{"type": "describe", "entity": "\\ud800"}', "[" * 100_000,
                         '{"type": "infer", "prompt": "\\udfff x"}']:
                await ws.send(text)
                out.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
            return out

    for msg in asyncio.run(run()):
        assert msg["type"] == "error" and "internal" not in msg["message"], msg


def test_multi_model_bad_bodies(tiny_dir, tiny_model, tmp_path_factory):
    from modelql.server.multi import build_multi
    from modelql.server.serve import BackgroundServer

    import shutil

    a = tmp_path_factory.mktemp("m") / "alpha"
    b = a.parent / "beta"
    shutil.copytree(tiny_dir, a)
    shutil.copytree(tiny_dir, b)
    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0)
    app, hosted = build_multi([a, b], cfg, loader=lambda ref, dtype: tiny_model)
    try:
        with BackgroundServer(app, cfg) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
            for route in ["/v1/walk-ffn", "/v1/chat/completions", "/v1/alpha/embed", "/v1/beta/logits"]:
                for body in BAD_BODIES:
                    r = c.post(route, content=body, headers={"Content-Type": "application/json"})
                    assert 400 <= r.status_code < 500, (route, body[:20], r.status_code, r.text[:200])
    finally:
        for h in hosted:
            h.engine.stop()


# -- 3: X-Forwarded-For is not trusted unless asked -------------------------------------------------------

def test_rate_limit_not_bypassed_with_forwarded_for(make_server):
    with make_server(rate_limit="3/min") as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        codes = [c.get("/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(6)]
    assert codes[:3] == [200] * 3 and codes[3:] == [429] * 3, codes


def test_forwarded_for_keys_the_limit_when_trusted(make_server):
    with make_server(rate_limit="2/min", trust_forwarded_for=True) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as c:
        a = [c.get("/v1/models", headers={"X-Forwarded-For": "10.0.0.1"}).status_code for _ in range(3)]
        b = c.get("/v1/models", headers={"X-Forwarded-For": "10.0.0.2"}).status_code
    assert a == [200, 200, 429] and b == 200


# -- 6: ranges validated at the edge, heavy FFN work off the event loop ---------------------------------------

@pytest.mark.parametrize("body", [
    {"entity": "France", "relation": "capital", "target": "Lyon", "layer": 99, "mode": "knn"},
    {"entity": "France", "relation": "capital", "target": "Lyon", "layer": -1, "mode": "knn"},
])
def test_insert_layer_out_of_range(client_k, body, kvindex):
    r = client_k.post("/v1/insert", json=body)
    assert r.status_code == 400, r.text
    assert "layer" in error_message(r) and str(kvindex.num_layers) in error_message(r)
    assert client_k.get("/v1/patches").json()["patches"] == []


@pytest.mark.parametrize("params,word", [({"layer": 99}, "layer"), ({"layer": -1}, "layer"),
                                         ({"limit": -1}, "limit")])
def test_select_out_of_range(client_k, params, word):
    r = client_k.post("/v1/select", json=params)
    assert r.status_code == 400 and word in error_message(r), r.text


def test_describe_layer_out_of_range(client_k):
    assert client_k.get("/v1/describe", params={"entity": "France", "layer": 99}).status_code == 400


def test_walk_ffn_overflowing_residual_is_400(client_k, kmodel):
    H = kmodel.spec.hidden_size
    for full in (True, False):
        r = client_k.post("/v1/walk-ffn", json={"layer": 0, "residual": [3e38] * H, "full_output": full})
        assert r.status_code == 400 and "non-finite" in error_message(r), r.text[:300]
    r = client_k.post("/v1/walk-ffn", content='{"layer": 0, "residual": [%s]}' % ", ".join(["1e999"] * H),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400


def test_large_walk_ffn_frames_run_off_the_event_loop(kmodel, kvindex, monkeypatch):
    """An 8 MB frame is decoded and computed on a worker thread, not the event loop's (which
    keeps answering /health); small frames on a shard may stay inline."""
    import numpy as np

    from modelql.remote import routes, wire
    from modelql.server.knowledge_routes import VindexSource

    seen = []
    real = routes.ffn_outputs

    def spy(*a, **kw):
        seen.append(threading.current_thread().name)
        return real(*a, **kw)

    monkeypatch.setattr(routes, "ffn_outputs", spy)
    H = kmodel.spec.hidden_size
    rows = (8 * 1024 * 1024) // (4 * H)
    frame = wire.encode_request(0, np.zeros((rows, H), np.float32), seq_len=rows)
    with _serve(kmodel, VindexSource.ready(kvindex), ffn_only=True) as srv, \
            httpx.Client(base_url=srv.url, timeout=120) as c:
        loop_thread = srv.thread.name
        r = c.post("/v1/walk-ffn", content=frame, headers={"Content-Type": wire.MEDIA_F32})
        assert r.status_code == 200, r.text[:200]
    assert seen and seen[0] != loop_thread


@pytest.fixture(scope="module")
def client_k(ksrv):
    with httpx.Client(base_url=ksrv.url, timeout=60) as c:
        yield c
