"""SSE conformance at the byte level (spec §3.2.3): framing, chunk shapes, usage chunk, [DONE]."""

from __future__ import annotations

import json

import httpx
import pytest

from modelql.runtime.generate import eos_token_ids


@pytest.fixture(scope="module")
def no_eos(tiny_model):
    return {str(i): -100 for i in eos_token_ids(tiny_model)}


def raw_stream(url: str, path: str, body: dict) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", url + path, json=body, timeout=30) as r:
        return r, r.read()


def events(raw: bytes) -> list[str]:
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b"\r" not in raw
    parts = raw.split(b"\n\n")
    assert parts[-1] == b""
    out = []
    for p in parts[:-1]:
        assert p.startswith(b"data: ") and b"\n" not in p, p  # one `data:` line per event
        out.append(p[len(b"data: "):].decode("utf-8"))
    assert out.count("[DONE]") == 1
    return out


def test_chat_stream_bytes_with_usage(server, no_eos):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 6,
            "temperature": 0, "logit_bias": no_eos, "stream": True, "stream_options": {"include_usage": True}}
    r, raw = raw_stream(server.url, "/v1/chat/completions", body)
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    evs = events(raw)
    chunks = [json.loads(e) for e in evs[:-1]]
    first, *content, final, usage = chunks
    keys = {"id", "object", "created", "model", "system_fingerprint", "choices", "usage"}
    assert all(set(c) == keys for c in chunks)
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                 "finish_reason": None}]
    for c in content:
        (ch,) = c["choices"]
        assert set(ch["delta"]) == {"content"} and ch["delta"]["content"] and ch["finish_reason"] is None
        assert c["usage"] is None
    assert final["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}]
    assert final["usage"] is None
    assert usage["choices"] == []
    prompt = usage["usage"]["prompt_tokens"]
    assert usage["usage"] == {"prompt_tokens": prompt, "completion_tokens": 6, "total_tokens": prompt + 6}


def test_chat_stream_without_usage_has_no_usage_key(server, no_eos):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3, "temperature": 0,
            "logit_bias": no_eos, "stream": True}
    _, raw = raw_stream(server.url, "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in events(raw)[:-1]]
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_chat_stream_logprobs_cover_their_chunk(server, no_eos):
    body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8, "temperature": 0,
            "logit_bias": no_eos, "stream": True, "logprobs": True, "top_logprobs": 2}
    _, raw = raw_stream(server.url, "/v1/chat/completions", body)
    chunks = [json.loads(e) for e in events(raw)[:-1]]
    content = [c for c in chunks if c["choices"][0]["delta"].get("content")]
    for c in content:
        lp = c["choices"][0]["logprobs"]["content"]
        assert lp and all(len(e["top_logprobs"]) == 2 for e in lp)
        # the chunk's text is made of exactly the bytes of its tokens (a random model may emit invalid
        # UTF-8, which decodes to U+FFFD: compare only valid chunks)
        raw_bytes = bytes(b for e in lp for b in e["bytes"])
        if "\ufffd" not in c["choices"][0]["delta"]["content"]:
            assert raw_bytes.decode() == c["choices"][0]["delta"]["content"]


def test_stop_string_is_never_streamed(server, tiny_model, no_eos):
    base = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 24, "temperature": 0,
            "logit_bias": no_eos}
    full = httpx.post(server.url + "/v1/chat/completions", json=base, timeout=30).json()
    text = full["choices"][0]["message"]["content"]
    stop = text[5:8]
    assert len(stop) == 3 and text.find(stop) == 5
    _, raw = raw_stream(server.url, "/v1/chat/completions", {**base, "stop": [stop], "stream": True})
    chunks = [json.loads(e) for e in events(raw)[:-1]]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert streamed == text[:5]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_completions_stream_bytes(server, no_eos):
    body = {"prompt": "The capital of", "max_tokens": 4, "temperature": 0, "logit_bias": no_eos, "stream": True,
            "stream_options": {"include_usage": True}, "echo": True}
    _, raw = raw_stream(server.url, "/v1/completions", body)
    chunks = [json.loads(e) for e in events(raw)[:-1]]
    *text_chunks, final, usage = chunks
    assert all(c["object"] == "text_completion" for c in chunks)
    assert text_chunks[0]["choices"][0]["text"] == "The capital of"  # echo first
    for c in text_chunks + [final]:
        (ch,) = c["choices"]
        assert set(ch) == {"text", "index", "logprobs", "finish_reason"}
    assert final["choices"][0] == {"text": "", "index": 0, "logprobs": None, "finish_reason": "length"}
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 4


def test_error_before_stream_is_a_plain_json_error(server):
    r = httpx.post(server.url + "/v1/chat/completions", timeout=30,
                   json={"messages": [{"role": "user", "content": "x"}], "stream": True, "temperature": 5})
    assert r.status_code == 400 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["param"] == "temperature"


def test_keepalive_comment_while_no_output(make_server, no_eos):
    import threading

    with make_server(keepalive_seconds=0.05) as srv:
        engine = srv.app.state.modelql.engine
        gate = threading.Event()
        blocker = engine.call(lambda m: gate.wait(20))  # nothing is generated until released
        threading.Timer(0.4, gate.set).start()
        _, raw = raw_stream(srv.url, "/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0,
                             "logit_bias": no_eos, "stream": True})
        blocker.result(10)
    assert b": keep-alive\n\n" in raw
    data = b"".join(p + b"\n\n" for p in raw.split(b"\n\n") if p.startswith(b"data: "))
    chunks = [json.loads(e) for e in events(data)[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
