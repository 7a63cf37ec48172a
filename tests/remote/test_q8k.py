"""`POST /v1/walk-ffn-q8k`, LARQL's Q8K-prenormed FFN batch protocol (issue 23, defect 7).

The byte layout is checked against frames packed here by hand from LARQL's documentation
(crates/larql-inference/src/ffn/remote/q8k_wire.rs, module doc "Wire layout"; the quantiser is
crates/larql-compute/src/cpu/ops/q4k_q8k_dot.rs `quantize_x_to_q8k`), the route's answers against
the HF `transformers` MLP of the same layer on the dequantised rows (an independent reference) and
against our float `/v1/walk-ffn` within the Q8 error, and the client end to end.
"""

from __future__ import annotations

import struct

import httpx
import numpy as np
import pytest
import torch

from modelql.errors import RemoteError, WireError
from modelql.remote import q8k_wire, wire
from modelql.remote.client import RemoteFfn

from .conftest import shard_inprocess

H = 256
CT = "application/x-larql-ffn-q8k-batch"


def test_request_bytes_are_larqls_layout():
    """One entry, one block: d = 0.25 exactly, values on the grid plus three ties (x·(1/d) = ±k.5,
    which Rust's `f32::round` takes away from zero)."""
    q = np.arange(-127, 129, dtype=np.int64)
    q[-1] = 0
    x = (q * 0.25).astype(np.float32)
    x[1], x[2], x[3] = 0.125, 0.625, -0.375  # 0.5 → 1, 2.5 → 3, -1.5 → -2
    expected_q = q.copy()
    expected_q[1], expected_q[2], expected_q[3] = 1, 3, -2
    sums = [int(expected_q[s * 32:(s + 1) * 32].sum()) for s in range(8)]
    frame = (struct.pack("<I", 1) + struct.pack("<II", 7, 1) + expected_q.astype(np.int8).tobytes()
             + struct.pack("<f", 0.25) + struct.pack("<8h", *sums))
    act = q8k_wire.quantize(x)
    assert q8k_wire.encode_request([(7, act)]) == frame
    (entry,) = q8k_wire.decode_request(frame)
    assert entry.layer == 7 and entry.act.qs.tolist() == expected_q.tolist() and entry.act.d.tolist() == [0.25]
    assert entry.act.sums.tolist() == sums
    assert len(frame) == 4 + 8 + 256 + 4 + 16


def test_response_bytes_and_errors():
    out = [(5, np.array([1.0, 2.0, -3.5], np.float32)), (5, np.array([0.5], np.float32))]
    body = struct.pack("<I", 2) + struct.pack("<II3f", 5, 3, 1.0, 2.0, -3.5) + struct.pack("<IIf", 5, 1, 0.5)
    assert q8k_wire.encode_response(out) == body
    assert [(l, v.tolist()) for l, v in q8k_wire.decode_response(body)] == [(5, [1.0, 2.0, -3.5]), (5, [0.5])]
    assert q8k_wire.decode_request(struct.pack("<I", 0)) == []
    two_blocks = q8k_wire.encode_request([(1, q8k_wire.quantize(np.ones(512, np.float32)))])
    for bad in (b"", b"\x01\x00\x00", struct.pack("<I", 1), struct.pack("<I", 1) + struct.pack("<II", 0, 1),
                two_blocks[:-1], two_blocks + b"\x00", struct.pack("<I", 1 << 30)):
        with pytest.raises(WireError):
            q8k_wire.decode_request(bad)
    for bad in (b"", body[:-1], body + b"\x00", struct.pack("<I", 1) + struct.pack("<II", 0, 9)):
        with pytest.raises(WireError):
            q8k_wire.decode_response(bad)
    with pytest.raises(WireError, match="multiple of 256"):
        q8k_wire.quantize(np.ones(576, np.float32))


def test_quantiser_error_bound():
    """|x − d·q| ≤ d/2 per element (d = block amax / 127): the Q8 error the route inherits."""
    x = np.random.default_rng(1).standard_normal(4 * 256).astype(np.float32) * 3
    act = q8k_wire.quantize(x)
    d = np.repeat(act.d, 256)
    assert (np.abs(act.dequantize() - x) <= d / 2 + 1e-7).all()
    assert act.sums.tolist() == act.qs.reshape(-1, 32).astype(int).sum(1).tolist()


@pytest.fixture(scope="module")
def hf_model():
    import transformers as T

    from modelql.runtime.loading import default_model_dir

    return T.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def shard():
    with shard_inprocess(layers="1-2") as url, httpx.Client(base_url=url, timeout=30) as c:
        yield c


def _rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, H)).astype(np.float32)


def test_route_answers_the_ffn_of_the_dequantised_rows(shard, hf_model):
    """A LARQL-shaped client (plain httpx, one entry per layer): raw FFN output per entry, in order,
    equal to the HF MLP of `d·q`, and to our float walk-ffn within the Q8 error."""
    x = _rows(3)
    acts = [q8k_wire.quantize(r) for r in x]
    entries = [(2, acts[0]), (1, acts[1]), (1, acts[2])]
    r = shard.post("/v1/walk-ffn-q8k", content=q8k_wire.encode_request(entries), headers={"Content-Type": CT})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == CT
    got = q8k_wire.decode_response(r.content)
    assert [l for l, _ in got] == [2, 1, 1]
    worst = 0.0
    for (layer, act), (_, out), row in zip(entries, got, x):
        with torch.no_grad():
            ref = hf_model.model.layers[layer].mlp(torch.from_numpy(act.dequantize()[None])).numpy()[0]
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
        f = shard.post("/v1/walk-ffn", content=wire.encode_request(layer, row[None]),
                       headers={"Content-Type": wire.MEDIA_F32})
        exact = wire.decode_response(f.content, "f32", H).results[0].output
        rel = float(np.linalg.norm(out - exact) / np.linalg.norm(exact))
        worst = max(worst, rel)
    print(f"\n  q8k vs f32 walk-ffn: worst relative L2 error {worst:.4f} over {len(entries)} rows")
    assert worst < 0.05  # Q8: |Δx| ≤ amax/254 per element


def test_route_errors_are_400(shard):
    act = q8k_wire.quantize(_rows(1)[0])
    cases = {
        "layer 9 out of range": q8k_wire.encode_request([(9, act)]),
        "not served by this shard": q8k_wire.encode_request([(0, act)]),
        "hidden size is 256": q8k_wire.encode_request([(1, q8k_wire.quantize(np.ones(512, np.float32)))]),
        "truncated": q8k_wire.encode_request([(1, act)])[:-3],
        "must be finite": q8k_wire.encode_request([(1, q8k_wire.Q8KActivation(act.qs, np.array([np.inf], np.float32),
                                                                               act.sums))]),
    }
    for words, body in cases.items():
        r = shard.post("/v1/walk-ffn-q8k", content=body, headers={"Content-Type": CT})
        assert r.status_code == 400, (words, r.status_code, r.text)
        assert words in r.json()["error"]["message"], (words, r.text)
    empty = shard.post("/v1/walk-ffn-q8k", content=struct.pack("<I", 0), headers={"Content-Type": CT})
    assert empty.status_code == 200 and empty.content == struct.pack("<I", 0)


def test_client_q8k_wire_and_fallback(local_model):
    """`--wire q8k`: rows go as Q8_K (one entry per position) and come back within the Q8 error of
    the local FFN; a shard answering 404 on the route (an older server) gets f32 frames instead."""
    from fastapi import FastAPI
    from starlette.responses import JSONResponse

    from modelql.server.config import ServerConfig
    from modelql.server.serve import BackgroundServer, background

    x = torch.from_numpy(_rows(4, seed=3))
    with torch.no_grad():
        ref = [local_model.ffn.forward(layer, x).numpy() for layer in range(4)]
    with background(None, ServerConfig(port=0, ffn_only=True, graceful_timeout=1.0)) as srv:
        with RemoteFfn.connect(srv.url, 4, H, wire_dtype="q8k") as ffn:
            for layer in range(4):
                out = ffn.forward(layer, x).numpy()
                assert np.linalg.norm(out - ref[layer]) / np.linalg.norm(ref[layer]) < 0.05
            assert ffn.shards[0].q8k and ffn.stats.bytes_sent == 4 * (4 + 4 * (8 + 256 + 4 + 16))

        inner = srv.app
        old = FastAPI()

        @old.post("/v1/walk-ffn-q8k")
        def gone():
            return JSONResponse({"error": {"message": "not found"}}, status_code=404)

        async def older_server(scope, receive, send):
            await (old if scope.get("path") == "/v1/walk-ffn-q8k" else inner)(scope, receive, send)

        with BackgroundServer(older_server, ServerConfig(port=0, graceful_timeout=1.0)) as legacy, \
                RemoteFfn.connect(f"0-3={legacy.url}", 4, H, wire_dtype="q8k") as ffn:
            out = ffn.forward(1, x).numpy()
            np.testing.assert_allclose(out, ref[1], rtol=1e-4, atol=1e-5)  # f32 frames: exact
            assert ffn.shards[0].q8k is False
    with pytest.raises(RemoteError, match="multiple of 256"):
        RemoteFfn.connect("0-3=http://127.0.0.1:9", 4, 576, wire_dtype="q8k")
