"""Fixtures for the remote-FFN tests: the embedded model loaded locally (the reference), FFN shards
as real `modelql serve --ffn-only` processes or in-process servers on 127.0.0.1 free ports (always
stopped by their fixture), and an inference-level vindex of the embedded model for slicing."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time

import pytest

PROMPT = "The capital of France is"


@pytest.fixture(scope="session")
def local_model():
    from modelql.runtime.loading import load_model

    return load_model(None)


def greedy(model, prompt: str = PROMPT, n: int = 50) -> list[int]:
    from modelql.runtime.generate import generate

    return generate(model, prompt, max_tokens=n, temperature=0.0, ignore_eos=True).token_ids


@pytest.fixture(scope="session")
def local_tokens(local_model):
    return greedy(local_model)


@contextlib.contextmanager
def shard_process(*args: str, ref: str | None = None):
    """`modelql serve [REF] --ffn-only --port 0 ARGS...` as a subprocess; yields (proc, url); killed on exit."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "modelql.cli", "serve", *([ref] if ref else []), "--ffn-only", "--port", "0",
           "--threads", "1", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        out, deadline = "", time.monotonic() + 90
        url = None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            if m:
                url = m.group(1)
                break
        if url is None:
            raise AssertionError(f"shard did not start: {' '.join(cmd)}\n{out}")
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


@contextlib.contextmanager
def shard_inprocess(ref=None, **config):
    """An in-process `--ffn-only` server (uvicorn on a thread); yields its URL; always stopped."""
    from modelql.server.config import ServerConfig
    from modelql.server.serve import background

    with background(ref, ServerConfig(port=0, ffn_only=True, graceful_timeout=1.0, **config)) as server:
        yield server.url


@pytest.fixture(scope="session")
def two_shards():
    """Two shard processes splitting the embedded model's 4 layers (i8 answers enabled)."""
    with shard_process("--layers", "0-1", "--enable-i8-wire") as (_, a), \
            shard_process("--layers", "2-3", "--enable-i8-wire") as (_, b):
        yield a, b


@pytest.fixture(scope="session")
def inference_vindex(tmp_path_factory):
    """The embedded model extracted at the inference level (f32 browse files, no clustering)."""
    from modelql.runtime.loading import default_model_dir
    from modelql.vindex.extract import extract

    out = tmp_path_factory.mktemp("vx") / "default.vindex"
    extract(default_model_dir(), out, level="inference", dtype="f32", clusters=False)
    return out
