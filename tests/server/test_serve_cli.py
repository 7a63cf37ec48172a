"""`modelql serve` as a user runs it: a subprocess that prints its URL and a first request, answers it,
and shuts down gracefully on SIGTERM / SIGINT."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx

from tests.server.streaming import BackgroundStream


def start(args: list[str]) -> tuple[subprocess.Popen, str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "modelql.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    out, deadline = "", time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        out += line
        m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
        if m:
            for _ in range(2):  # "try:" and the first request line(s)
                out += proc.stdout.readline()
            return proc, m.group(1), out
    proc.kill()
    raise AssertionError(f"server did not print its URL:\n{out}")


def test_serve_prints_url_answers_and_exits_gracefully(tiny_dir):
    sig = signal.SIGTERM  # SIGINT (Ctrl-C) takes the same path through uvicorn's handler
    proc, url, out = start([str(tiny_dir), "--port", "0", "--api-key", "abc"])
    try:
        assert "curl " + url + "/v1/chat/completions" in out and "Bearer abc" in out
        assert httpx.get(url + "/health").json()["ready"] is True
        r = httpx.post(url + "/v1/chat/completions", headers={"Authorization": "Bearer abc"}, timeout=30,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert r.status_code == 200
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        rest = proc.stdout.read()
        assert "shutting down" in rest and "modelql server stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_serve_rejects_bad_flags(tiny_dir):
    r = subprocess.run([sys.executable, "-m", "modelql.cli", "serve", str(tiny_dir), "--rate-limit", "lots"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("error: invalid --rate-limit")
    r = subprocess.run([sys.executable, "-m", "modelql.cli", "serve", str(tiny_dir), "--no-infer", "--ffn-only"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "cannot be combined" in r.stderr


def test_serve_flags_and_sigint_ends_an_in_flight_stream(tiny_dir, tmp_path, monkeypatch):
    """--host/--port/--layers as a user passes them; Ctrl-C (SIGINT) while a 200-token stream runs:
    the stream still ends with its final chunk and [DONE], and the process exits 0."""
    monkeypatch.setenv("MODELQL_CACHE", str(tmp_path))
    # a generous --graceful-timeout: on a loaded machine 200 tokens can outlast the 10 s default
    proc, url, _ = start([str(tiny_dir), "--host", "127.0.0.1", "--port", "0", "--layers", "0-1",
                          "--graceful-timeout", "90"])
    try:
        assert httpx.get(url + "/v1/stats", timeout=30).json()["owned_layers"] == [0, 1]
        body = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200, "temperature": 0,
                "ignore_eos": True, "stream": True}
        stream = BackgroundStream(url + "/v1/chat/completions", body, timeout=60)
        assert stream.started.wait(20)
        proc.send_signal(signal.SIGINT)
        assert stream.join(90) and stream.raw.endswith(b"data: [DONE]\n\n")
        assert b'"finish_reason":"length"' in stream.raw or b'"finish_reason":"stop"' in stream.raw
        assert proc.wait(timeout=90) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
