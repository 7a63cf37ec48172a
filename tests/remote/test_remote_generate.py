"""Generation with the FFN on other processes: token-identical to local generation (f32 wire) through
one shard and through two shards splitting the layers; f16/i8 top-1 agreement measured; the shard map
from /v1/stats or `a-b=URL`; the CLI (`modelql generate --ffn`) and `serve --ffn` paths."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest
import torch

from modelql.errors import RemoteError
from modelql.remote.client import RemoteFfn, load_remote_model, parse_shards

from .conftest import PROMPT, greedy, shard_inprocess, shard_process


@pytest.fixture(scope="module")
def one_shard():
    with shard_process() as (_, url):
        yield url


def test_one_shard_is_token_identical(one_shard, local_tokens):
    model = load_remote_model(None, one_shard)
    try:
        assert len(local_tokens) == 50
        assert greedy(model) == local_tokens
        st = model.ffn.stats
        assert st.requests == 4 * 50 and st.failovers == 0  # prefill + 49 decode steps, 4 layers
    finally:
        model.ffn.close()


def test_two_shards_split_layers_are_token_identical(two_shards, local_tokens):
    a, b = two_shards
    model = load_remote_model(None, f"{a},{b}")
    try:
        assert [s.layers for s in model.ffn.shards] == [(0, 1), (2, 3)]  # read from /v1/stats
        assert greedy(model) == local_tokens
    finally:
        model.ffn.close()
    explicit = load_remote_model(None, f"2-3={b},0-1={a}")
    try:
        assert greedy(explicit, n=10) == local_tokens[:10]
    finally:
        explicit.ffn.close()


def top1_agreement(local_model, model, tokens) -> tuple[float, int]:
    """Teacher-forced: the next-token argmax at every position of prompt + local greedy tokens."""
    ids = local_model.tokenizer.encode(PROMPT) + tokens
    ref = local_model.forward(ids)[0].argmax(-1)
    got = model.forward(ids)[0].argmax(-1)
    return float((ref == got).float().mean()), len(ids)


@pytest.mark.parametrize("dtype, floor", [("f32", 1.0), ("f16", 0.95), ("i8", 0.85), ("q8k", 0.85)])
def test_wire_dtype_top1_agreement(two_shards, local_model, local_tokens, dtype, floor, capsys):
    a, b = two_shards
    model = load_remote_model(None, f"{a},{b}", wire_dtype=dtype)
    try:
        agree, positions = top1_agreement(local_model, model, local_tokens)
        decoded = greedy(model)
        same = sum(x == y for x, y in zip(decoded, local_tokens))
        st = model.ffn.stats
        per_token = (st.bytes_sent + st.bytes_received) / (len(decoded) + 1)
    finally:
        model.ffn.close()
    with capsys.disabled():
        print(f"\n  wire {dtype}: teacher-forced top-1 agreement {agree:.1%} over "
              f"{positions} positions; greedy 50 tokens: {same}/50 identical "
              f"to local; {per_token / 1024:.1f} KiB on the wire per token")
    assert agree >= floor


def test_shard_map_errors(two_shards):
    a, _ = two_shards
    with pytest.raises(RemoteError, match=r"no FFN shard owns layers 2-3"):
        load_remote_model(None, a)
    with pytest.raises(RemoteError, match="not an http"):
        parse_shards("0-1=localhost:1")
    with pytest.raises(RemoteError, match="end \\(1\\) must be >= start \\(3\\)"):
        parse_shards("3-1=http://127.0.0.1:1")
    with pytest.raises(RemoteError, match="outside this 4-layer model"):
        load_remote_model(None, f"0-7={a}")
    with pytest.raises(RemoteError, match=r"FFN shard http://127.0.0.1:9: cannot read /v1/stats"):
        RemoteFfn.connect("http://127.0.0.1:9", 4, 256, timeout=2)


def test_a_refused_layer_names_shard_and_layer(two_shards):
    a, b = two_shards  # claim shard a owns 2-3: it answers 400 "not served by this shard"
    model = load_remote_model(None, f"0-3={a}")
    try:
        with pytest.raises(RemoteError, match=rf"FFN shard {a} refused layer 2: HTTP 400: layer 2 not served"):
            greedy(model, n=2)
    finally:
        model.ffn.close()


def test_generate_cli_with_ffn(one_shard):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "modelql.cli", "generate", PROMPT, "-n", "20"]
    local = subprocess.run(base, capture_output=True, text=True, env=env, timeout=120)
    remote = subprocess.run(base + ["--ffn", one_shard, "--wire", "f16", "-v"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert local.returncode == 0 and remote.returncode == 0, remote.stderr
    assert remote.stdout == local.stdout and remote.stdout.strip()
    assert "remote FFN: " in remote.stderr and "KiB on the wire per token" in remote.stderr
    bad = subprocess.run(base + ["--ffn", "http://127.0.0.1:9"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: FFN shard http://127.0.0.1:9")
    assert "Traceback" not in bad.stderr


def test_serve_with_remote_ffn_answers_like_local(one_shard, local_model):
    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import background

    body = {"prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    texts = []
    for model in (local_model, load_remote_model(None, one_shard)):
        cfg = ServerConfig(port=0, graceful_timeout=1.0)
        with background(None, cfg, model=model, vindex_source=VindexSource.unavailable("not needed")) as server:
            r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[0]


def test_batched_decode_sends_one_request_per_layer(local_model):
    """Several sequences decoded together: one request per layer carries every sequence's row."""
    from modelql.runtime.generate import generate_batch
    from modelql.runtime.sampling import SamplingParams

    prompts = ["The capital of France is", "The capital of Japan is", "Water is"]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    ref = [c.token_ids for c in generate_batch(local_model, prompts, params)]
    with shard_inprocess() as url:
        model = load_remote_model(None, url)
        try:
            got = [c.token_ids for c in generate_batch(model, prompts, params)]
            assert got == ref
            assert model.ffn.stats.requests == 4 * (1 + 7)  # one batched prefill + 7 batched decode steps
        finally:
            model.ffn.close()


def test_client_loads_no_ffn_weights(one_shard):
    model = load_remote_model(None, one_shard)
    try:
        assert model.dense_ffn is None
        assert not any(k.endswith(("gate.weight", "up.weight", "down.weight")) for k in model.weights)
        with pytest.raises(Exception, match="remote FFN"):
            model.forward([1, 2], hooks={"blocks.0.mlp.hook_post": lambda t, n: t})
        assert torch.is_tensor(model.forward([1, 2]))
    finally:
        model.ffn.close()
