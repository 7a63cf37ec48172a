"""Multi-model mode (server-api §2.4): two vindexes with weights (two different random models) behind
one port. Each model's answers must equal the runtime's output of *that* model; the routing errors
use the spec's envelopes; the official openai client sees the right exception types."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import httpx
import openai
import pytest

from modelql.runtime.generate import generate
from modelql.runtime.sampling import SamplingParams
from tests.runtime.tiny_tokenizer import make_model_with_tokenizer


@pytest.fixture(scope="module")
def vindex_dir(tmp_path_factory):
    from modelql.vindex import extract

    root = tmp_path_factory.mktemp("multi")
    for name, seed in (("alpha", 3), ("beta", 11)):
        src = root / f"src-{name}"
        make_model_with_tokenizer(src, "chatml", max_position=256, seed=seed)
        extract(src, root / "dir" / f"{name}.vindex", level="inference", dtype="f32", clusters=False)
    (root / "dir" / "notes").mkdir()  # not a *.vindex: ignored
    return root / "dir"


@pytest.fixture(scope="module")
def models(vindex_dir):
    from modelql.runtime.loading import load_model

    return {name: load_model(vindex_dir / f"{name}.vindex") for name in ("alpha", "beta")}


def _serve(vindex_dir, **flags):
    from modelql.server.config import ServerConfig
    from modelql.server.multi import build_multi, vindex_children
    from modelql.server.serve import BackgroundServer

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, **flags)
    app, hosted = build_multi(vindex_children(vindex_dir), cfg)
    return BackgroundServer(app, cfg), hosted


@pytest.fixture(scope="module")
def msrv(vindex_dir):
    srv, hosted = _serve(vindex_dir)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        for h in hosted:
            h.engine.stop()


def test_models_lists_every_vindex(msrv):
    data = httpx.get(msrv.url + "/v1/models").json()["data"]
    assert [(m["id"], m["path"], m["loaded"]) for m in data] == [("alpha", "/v1/alpha", True),
                                                                  ("beta", "/v1/beta", True)]
    assert httpx.get(msrv.url + "/v1/models/beta").json()["id"] == "beta"
    assert httpx.get(msrv.url + "/health").json() == {"status": "ok", "ready": True, "models": ["alpha", "beta"]}


def test_openai_routes_select_by_model(msrv, models):
    """Each model id answers with that model's own greedy output (the two models differ)."""
    client = openai.OpenAI(base_url=msrv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
    texts = {}
    for name, model in models.items():
        r = client.completions.create(model=name, prompt="Hello world", max_tokens=12, temperature=0,
                                      extra_body={"ignore_eos": True})
        ref = generate(model, "Hello world", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
        assert r.model == name and r.choices[0].text == ref.text
        texts[name] = r.choices[0].text
        chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4, temperature=0, stream=True))
        assert {c.model for c in chunks} == {name}
        emb = client.embeddings.create(model=name, input="Paris").data[0].embedding
        assert len(emb) == model.spec.hidden_size
    assert texts["alpha"] != texts["beta"]
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "x"}])
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gamma")
    r = httpx.post(msrv.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model" and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(msrv.url + "/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_knowledge_routes_move_under_the_model_id(msrv, models):
    for name, model in models.items():
        stats = httpx.get(f"{msrv.url}/v1/{name}/stats").json()
        assert stats["model"] == name and stats["hidden_size"] == model.spec.hidden_size
        r = httpx.get(f"{msrv.url}/v1/{name}/token/encode", params={"text": "Hello world"})
        assert r.status_code == 200 and r.json()["text"] == "Hello world"
    r = httpx.get(msrv.url + "/v1/describe", params={"entity": "France"})
    assert r.status_code == 404 and "/v1/{model_id}/describe" in r.json()["error"]["message"]
    r = httpx.get(msrv.url + "/v1/gamma/stats")
    assert r.status_code == 404 and r.json()["error"]["message"] == "unknown model 'gamma' (models: alpha, beta)"
    doc = httpx.get(msrv.url + "/openapi.json").json()
    assert "/v1/{model_id}/describe" in doc["paths"] and "/v1/describe" not in doc["paths"]
    assert "/v1/chat/completions" in doc["paths"]


def test_websocket_under_the_model_id(msrv, models):
    import websockets

    ref = generate(models["beta"], "Hello", SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))

    async def run():
        async with websockets.connect(msrv.url.replace("http", "ws") + "/v1/beta/stream") as ws:
            await ws.send(json.dumps({"type": "generate", "prompt": "Hello", "max_tokens": 6, "ignore_eos": True}))
            texts = []
            while True:
                m = json.loads(await asyncio.wait_for(ws.recv(), 30))
                if m["type"] == "done":
                    return "".join(texts)
                texts.append(m["text"])

    text = asyncio.run(run())
    assert ref.text.startswith(text) and len(text) > 0


def test_metrics_are_labelled_by_model(msrv):
    httpx.post(msrv.url + "/v1/completions", json={"model": "alpha", "prompt": "x", "max_tokens": 2}, timeout=30)
    text = httpx.get(msrv.url + "/metrics").text
    assert 'modelql_generation_tokens_total{model="alpha"}' in text
    assert 'modelql_queue_depth{model="beta"}' in text
    assert text.count("# TYPE modelql_queue_depth gauge") == 1  # one family, one series per model


def test_edge_flags_apply_once_on_the_front(vindex_dir):
    srv, hosted = _serve(vindex_dir, api_key="k", rate_limit="5/min")
    try:
        srv.start()
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("/health").status_code == 200
            assert c.get("/v1/alpha/stats").json()["error"]["code"] == "invalid_api_key"
            assert c.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
            ok = {"Authorization": "Bearer k"}
            assert c.get("/v1/alpha/stats", headers=ok).status_code == 200
            assert c.post("/v1/completions", headers=ok,
                          json={"model": "beta", "prompt": "x", "max_tokens": 1}).status_code == 200
            codes = [c.get("/v1/models", headers=ok).status_code for _ in range(4)]
            assert codes[-1] == 429  # one bucket for the client across all models
    finally:
        srv.stop()
        for h in hosted:
            h.engine.stop()


def test_cli_dir_flag(vindex_dir, tmp_path):
    from tests.server.test_serve_cli import start

    proc, url, out = start(["--dir", str(vindex_dir), "--port", "0"])
    try:
        assert "2 models (alpha, beta" in out
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["alpha", "beta"]
    finally:
        proc.terminate()
        proc.wait(20)
    r = subprocess.run([sys.executable, "-m", "modelql.cli", "serve", "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: --dir") and "no *.vindex" in r.stderr
