"""Server machinery: concurrency, batching, cancellation, limits, auth, modes, metrics, shutdown."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from modelql.runtime.generate import eos_token_ids, generate
from modelql.runtime.sampling import SamplingParams
from tests.server.streaming import BackgroundStream


@pytest.fixture(scope="module")
def no_eos(tiny_model):
    return {str(i): -100 for i in eos_token_ids(tiny_model)}


def chat(n_tokens: int, no_eos: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": n_tokens, "temperature": 0,
            "logit_bias": no_eos, **extra}


@pytest.mark.parametrize("extra", [
    {"temperature": 0},
    {"temperature": 0, "frequency_penalty": 1.5, "presence_penalty": 0.5},
    {"temperature": 0.8, "top_p": 0.5, "seed": 3},
    {"temperature": 1.2, "top_k": 5, "seed": 9, "stop": ["a"]},
])
def test_output_is_the_runtime_generate_output(server, tiny_model, extra):
    """The server samples with the runtime's SamplingParams/Sequence: same request, same text."""
    body = {"prompt": "Hello world", "max_tokens": 20, "ignore_eos": True, **extra}
    r = httpx.post(server.url + "/v1/completions", timeout=30, json=body).json()
    ref = generate(tiny_model, "Hello world", SamplingParams(max_tokens=20, ignore_eos=True, **extra))
    assert r["choices"][0]["text"] == ref.text
    assert r["choices"][0]["finish_reason"] == ref.finish_reason
    assert r["usage"]["completion_tokens"] == ref.completion_tokens


def test_max_completion_tokens_wins(server, no_eos):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json=chat(9, no_eos, max_completion_tokens=3)).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"


def test_context_length_exceeded(server):
    r = httpx.post(server.url + "/v1/completions", timeout=30, json={"prompt": list(range(5, 5 + 300))})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded" and r.json()["error"]["param"] == "prompt"


def test_health_answers_while_a_long_completion_streams(server, no_eos):
    worst, count, done = 0.0, 0, threading.Event()
    result: dict = {}

    def streamer():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                          json=chat(200, no_eos, stream=True, stream_options={"include_usage": True})) as r:
            result["raw"] = r.read()
        done.set()

    t = threading.Thread(target=streamer)
    t.start()
    with httpx.Client(base_url=server.url, timeout=10) as c:
        while not done.is_set():
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            worst = max(worst, time.perf_counter() - t0)
            count += 1
            time.sleep(0.005)
    t.join()
    usage = json.loads(result["raw"].split(b"\n\n")[-3][6:])["usage"]
    assert usage["completion_tokens"] == 200
    print(f"\n/health during a 200-token stream: {count} probes, worst latency {worst * 1000:.1f} ms")
    assert count >= 3 and worst < 1.0


def test_concurrent_streams_are_batched_and_unchanged(server, no_eos):
    engine = server.app.state.modelql.engine
    prompts = ["Hello", "The capital of France", "Emoji are fun", "user assistant"]
    solo = []
    for p in prompts:
        body = {"prompt": p, "max_tokens": 30, "temperature": 0, "logit_bias": no_eos}
        solo.append(httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"])
    engine.max_batch_seen = 0
    out: dict[int, str] = {}

    def run(i: int):
        body = {"prompt": prompts[i], "max_tokens": 30, "temperature": 0, "logit_bias": no_eos, "stream": True}
        text = ""
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
        out[i] = text

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(len(prompts))] == solo
    assert engine.max_batch_seen >= 2


def test_sequences_leaving_and_joining_the_batch_keep_their_output(server, no_eos):
    """Streams of different lengths started at different times: the engine packs the running
    sequences' caches (sequences leave mid-batch, the rest move down, late ones join); every text
    equals the same request served alone."""
    engine = server.app.state.modelql.engine
    jobs = [("Hello", 6, 0.0), ("The capital of France", 40, 0.0), ("Emoji are fun", 15, 0.05),
            ("user assistant", 40, 0.1), ("Hi", 3, 0.15)]
    solo = []
    for prompt, n, _ in jobs:
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logit_bias": no_eos}
        solo.append(httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()["choices"][0]["text"])
    engine.max_batch_seen = 0
    out: dict[int, str] = {}

    def run(i: int):
        prompt, n, delay = jobs[i]
        time.sleep(delay)
        body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "logit_bias": no_eos}
        out[i] = httpx.post(server.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [out[i] for i in range(len(jobs))] == solo
    assert engine.max_batch_seen >= 2 and engine.block is not None


def test_client_disconnect_stops_generation(server, no_eos):
    engine = server.app.state.modelql.engine
    gate = threading.Event()
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=30,
                      json=chat(200, no_eos, stream=True)) as r:
        lines = r.iter_lines()
        for _ in range(4):
            next(lines)
        blocker = engine.call(lambda m: gate.wait(20))  # freeze decoding while the client leaves
    deadline = time.monotonic() + 10  # the server notices the closed connection and cancels the request
    while not all(s.request.cancelled for s in list(engine._active)) and time.monotonic() < deadline:
        time.sleep(0.01)
    steps0 = engine.steps
    gate.set()
    blocker.result(10)
    deadline = time.monotonic() + 5
    while engine.active and time.monotonic() < deadline:
        time.sleep(0.005)
    assert engine.active == 0
    assert engine.steps - steps0 <= 1  # dropped before (at most) one more decode step


def test_queue_limit_rejects_with_envelope(make_server, no_eos):
    for status, etype in ((503, "server_error"), (429, "rate_limit_error")):
        with make_server(max_batch=1, max_queue=0, queue_full_status=status) as srv:
            engine = srv.app.state.modelql.engine
            gate = threading.Event()
            blocker = engine.call(lambda m: gate.wait(20))  # hold the worker: admissions stay queued
            first: dict = {}
            t = threading.Thread(target=lambda: first.update(r=httpx.post(
                srv.url + "/v1/chat/completions", json=chat(3, no_eos), timeout=30)))
            t.start()
            deadline = time.monotonic() + 10
            while engine.queue_depth < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            r = httpx.post(srv.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=30)
            assert r.status_code == status and r.headers["retry-after"] == "1"
            assert r.json()["error"]["type"] == etype
            assert httpx.get(srv.url + "/health").status_code == 200
            gate.set()
            blocker.result(10)
            t.join(10)
            assert first["r"].status_code == 200  # the queued request was served


def test_auth(make_server):
    with make_server(api_key="k3y") as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/v1/health").status_code == 200
        for path in ("/metrics", "/v1/models", "/openapi.json"):
            r = c.get(path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/describe").json()["error"]["code"] == "invalid_api_key"  # one envelope for every route
        assert c.get("/v1/models", headers={"Authorization": "Basic k3y"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200


def test_rate_limit(make_server):
    with make_server(rate_limit="3/min") as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        assert [c.get("/v1/models").status_code for _ in range(3)] == [200] * 3
        r = c.get("/v1/models")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "rate_limit_exceeded"
        assert c.get("/v1/walk").json()["error"]["code"] == "rate_limit_exceeded"
        assert c.get("/health").status_code == 200  # exempt


def test_body_limit(make_server):
    with make_server(max_body_bytes=1000) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        big = {"prompt": "x" * 2000}
        r = c.post("/v1/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield json.dumps(big).encode()

        r = c.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code == 200


def test_cors_preflight_needs_no_key(make_server):
    with make_server(cors=True, api_key="k") as srv:
        r = httpx.options(srv.url + "/v1/chat/completions", headers={
            "Origin": "http://example.test", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] in ("*", "http://example.test")


@pytest.mark.parametrize("flags,chat_msg,emb_status", [
    ({"no_infer": True}, "inference disabled (--no-infer)", 200),
    ({"embed_only": True}, "/v1/chat/completions is not served in embed-service mode", 200),
    ({"ffn_only": True}, "/v1/chat/completions is not served in ffn-service mode", 503),
])
def test_modes(make_server, flags, chat_msg, emb_status):
    with make_server(**flags) as srv, httpx.Client(base_url=srv.url, timeout=10) as c:
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 503 and r.json()["error"]["message"] == chat_msg
        assert c.post("/v1/completions", json={"prompt": "x"}).status_code == 503
        r = c.post("/v1/embeddings", json={"input": "Paris"})
        assert r.status_code == emb_status
        if emb_status == 200:  # static pooling without inference
            assert c.post("/v1/embeddings", json={"input": "Paris", "x_pooling": "mean"}).status_code == 400
        assert c.get("/health").status_code == 200 and c.get("/v1/models").status_code == 200


def test_validation_errors_name_the_param(server):
    cases = [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "bogus", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"x": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "x"}], "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": 5}}}, "response_format.json_schema.schema"),
        ({}, "messages"),
    ]
    for body, param in cases:
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=10)
        assert r.status_code == 400, (body, r.text)
        err = r.json()["error"]
        assert err["param"] == param and err["type"] == "invalid_request_error", (body, err)
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", timeout=10,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "suffix": "y"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()


def test_metrics(server, no_eos):
    httpx.post(server.url + "/v1/chat/completions", json=chat(3, no_eos, stream=True), timeout=30).read()
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.text
    for family in ("modelql_build_info", "modelql_http_requests_total", "modelql_http_request_duration_seconds",
                   "modelql_http_requests_in_flight", "modelql_prompt_tokens_total",
                   "modelql_generation_tokens_total", "modelql_time_to_first_token_seconds",
                   "modelql_time_per_output_token_seconds", "modelql_queue_depth", "modelql_rate_limited_total",
                   "modelql_auth_failures_total"):
        assert f"# TYPE {family} " in text, family
    assert 'modelql_http_requests_total{method="POST",route="/v1/chat/completions",status="200"}' in text
    ttft = [ln for ln in text.splitlines() if ln.startswith("modelql_time_to_first_token_seconds_count")]
    assert ttft and float(ttft[0].split()[-1]) >= 1


def test_openapi_document(server):
    doc = httpx.get(server.url + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models", "/health", "/metrics"):
        assert path in doc["paths"]


def test_graceful_shutdown_ends_streams(make_server, no_eos):
    with make_server() as srv:
        stream = BackgroundStream(srv.url + "/v1/chat/completions", chat(200, no_eos, stream=True), timeout=30)
        assert stream.started.wait(10)
        t0 = time.monotonic()
        srv.stop()
        assert stream.join(10) and not srv.thread.is_alive()
        assert time.monotonic() - t0 < 8
        assert stream.raw.endswith(b"data: [DONE]\n\n")


def test_n_choices_when_enabled(make_server, no_eos):
    with make_server(max_n=3) as srv:
        body = chat(5, no_eos, n=3, temperature=1.0, seed=7)
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).json()
        assert [c["index"] for c in r["choices"]] == [0, 1, 2]
        assert r["usage"]["completion_tokens"] == 15
        again = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=30).json()
        assert [c["message"]["content"] for c in again["choices"]] == [c["message"]["content"] for c in r["choices"]]
        r = httpx.post(srv.url + "/v1/chat/completions", json=chat(2, no_eos, n=4), timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_knowledge_router_slot_gets_the_knowledge_envelope(tiny_model):
    from fastapi import APIRouter

    from modelql.errors import VindexError
    from modelql.server.app import create_app
    from modelql.server.config import ServerConfig
    from modelql.server.engine import Engine
    from modelql.server.serve import BackgroundServer

    router = APIRouter()

    @router.get("/v1/describe")
    async def describe(entity: str):
        raise VindexError(f"no vindex loaded for {entity}")

    cfg = ServerConfig(port=0)
    engine = Engine(tiny_model)
    with BackgroundServer(create_app(cfg, engine, knowledge=[router]), cfg) as srv:
        r = httpx.get(srv.url + "/v1/describe", params={"entity": "France"})
        assert r.status_code == 400 and r.json()["error"]["message"] == "no vindex loaded for France"
        r = httpx.get(srv.url + "/v1/describe")  # missing query parameter
        assert r.status_code == 400 and r.json()["error"]["message"] == "missing required parameter: 'entity'"
        assert httpx.get(srv.url + "/metrics").text.count('route="/v1/describe"') >= 2
    engine.stop()


def test_ignore_eos_extension(server):
    body = {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=30).json()
    assert r["usage"]["completion_tokens"] == 12 and r["choices"][0]["finish_reason"] == "length"
