"""`POST /v1/walk-ffn` through a real server: outputs against the HF `transformers` MLP of the same
layer (an independent reference), the JSON and binary forms, Accept negotiation, `/v1/stats`
ownership, features-only gate KNN against brute-force numpy, and every malformed frame → 400 with a
clear JSON message (never a 500)."""

from __future__ import annotations

import json
import struct

import httpx
import numpy as np
import pytest
import torch

from modelql.remote import wire

from .conftest import shard_inprocess

H = 256
LAYERS = 4


@pytest.fixture(scope="module")
def hf_model():
    import transformers as T

    from modelql.runtime.loading import default_model_dir

    return T.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()


def hf_mlp(hf_model, layer: int, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model.model.layers[layer].mlp(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def shard():
    with shard_inprocess(layers="1-2", i8_wire=True) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            yield c


@pytest.fixture(scope="module")
def vindex_shard(inference_vindex):
    with shard_inprocess(str(inference_vindex)) as url:
        with httpx.Client(base_url=url, timeout=30) as c:
            yield c


def x_rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, H)).astype(np.float32)


def post_binary(c, body: bytes, accept: str | None = None):
    headers = {"Content-Type": wire.MEDIA_F32}
    if accept:
        headers["Accept"] = accept
    return c.post("/v1/walk-ffn", content=body, headers=headers)


def test_stats_reports_owned_layers(shard):
    s = shard.get("/v1/stats").json()
    assert s["mode"] == "ffn-service" and s["owned_layers"] == [1, 2]
    assert s["hidden_size"] == H and s["layers"] == LAYERS


def test_binary_single_layer_matches_hf(shard, hf_model):
    x = x_rows(5)
    r = post_binary(shard, wire.encode_request(2, x))
    assert r.status_code == 200 and r.headers["content-type"] == wire.MEDIA_F32
    resp = wire.decode_response(r.content, "f32", H)
    (res,) = resp.results
    assert (res.layer, res.seq_len) == (2, 5)
    np.testing.assert_allclose(res.output.reshape(5, H), hf_mlp(hf_model, 2, x), rtol=1e-4, atol=1e-4)


def test_binary_batch_in_request_order(shard, hf_model):
    x = x_rows(3, seed=1)
    r = post_binary(shard, wire.encode_request([2, 1], x))
    resp = wire.decode_response(r.content, "f32", H)
    assert [x.layer for x in resp.results] == [2, 1]
    for res in resp.results:
        np.testing.assert_allclose(res.output.reshape(3, H), hf_mlp(hf_model, res.layer, x), rtol=1e-4, atol=1e-4)
    # a batch frame naming one layer is answered in the single form
    one = post_binary(shard, wire.encode_request([1], x, batch=True))
    assert struct.unpack_from("<I", one.content)[0] == 1


@pytest.mark.parametrize("accept, dtype", [(None, "f32"), (wire.accept_header("f16"), "f16"),
                                           (wire.accept_header("i8"), "i8"), (wire.MEDIA_I8, "i8")])
def test_accept_negotiation(shard, hf_model, accept, dtype):
    x = x_rows(2, seed=2)
    r = post_binary(shard, wire.encode_request(1, x), accept)
    assert r.headers["content-type"] == wire.MEDIA[dtype]
    out = wire.decode_response(r.content, dtype, H).results[0].output.reshape(2, H)
    ref = hf_mlp(hf_model, 1, x)
    tol = {"f32": 1e-5, "f16": 2e-3, "i8": 1.0 / 127}[dtype] * np.abs(ref).max()
    assert np.abs(out - ref).max() <= tol + 1e-6


def test_json_forms(shard, hf_model):
    x = x_rows(2, seed=3)
    r = shard.post("/v1/walk-ffn", json={"layer": 1, "residual": x.reshape(-1).tolist(), "seq_len": 2,
                                         "full_output": True})
    body = r.json()
    assert r.status_code == 200 and body["layer"] == 1 and body["seq_len"] == 2 and "latency_ms" in body
    np.testing.assert_allclose(np.array(body["output"]).reshape(2, H), hf_mlp(hf_model, 1, x), rtol=1e-4, atol=1e-5)
    r = shard.post("/v1/walk-ffn", json={"layers": [2, 1], "residual": x.reshape(-1).tolist(), "seq_len": 2,
                                         "full_output": True})
    body = r.json()
    assert [e["layer"] for e in body["results"]] == [2, 1] and body["seq_len"] == 2


def test_features_only_matches_brute_force(vindex_shard, inference_vindex):
    from modelql.vindex import Vindex

    vx = Vindex.load(inference_vindex)
    x = x_rows(1, seed=4)[0]
    r = vindex_shard.post("/v1/walk-ffn", json={"layers": [0, 3], "residual": x.tolist(), "top_k": 5})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        scores = vx.gate_array(res["layer"]).astype(np.float64) @ x.astype(np.float64)
        top = np.argsort(-np.abs(scores), kind="stable")[:5]
        assert res["features"] == top.tolist()
        np.testing.assert_allclose(res["scores"], np.round(scores[top], 2), atol=0.011)


def test_generation_routes_are_not_served(shard):
    r = shard.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 503


GOOD = wire.encode_request(1, x_rows(1))


@pytest.mark.parametrize("body, status, message", [
    (b"\x01\x00", 400, "binary: body too short (need ≥ 16 bytes)"),
    (GOOD[:-4], 400, "residual has 255 elements, expected 256 (seq_len=1 * hidden_size=256)"),
    (GOOD[:-1], 400, "binary: residual byte length is not a multiple of 4"),
    (struct.pack("<IIII", 1, 2, 1, 0) + GOOD[16:], 400, "residual has 256 elements, expected 512 (seq_len=2 * hidden_size=256)"),
    (wire.encode_request(7, x_rows(1)), 400, "layer 7 out of range (num_layers = 4)"),
    (wire.encode_request(3, x_rows(1)), 400, "layer 3 not served by this shard (owned: 1–2)"),
    (wire.encode_request([1, 0], x_rows(1)), 400, "layer 0 not served by this shard (owned: 1–2)"),
    (struct.pack("<IIII", 1, 1, 0, 0) + GOOD[16:], 400, "binary wire format requires full_output = true"),
    (struct.pack("<IIII", 0xFFFFFFFF, 9, 1, 1), 400, "binary batch: body too short for 9 layer indices"),
    (struct.pack("<IIII", 1, 0, 1, 0), 400, "seq_len must be >= 1"),
    (struct.pack("<IIIII", 0xFFFFFFFF, 0, 1, 1, 0), 400, "empty layer list"),
], ids=lambda v: v[:40] if isinstance(v, str) else ("frame" if isinstance(v, bytes) else str(v)))
def test_malformed_binary_is_a_400_with_a_message(shard, body, status, message):
    r = post_binary(shard, body)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["message"] == message


@pytest.mark.parametrize("body, message", [
    (b"{not json", "We could not parse the JSON body"),
    (b"[1]", "the request body must be a JSON object"),
    (b'{"residual": []}', "must provide 'layer' or 'layers'"),
    (b'{"layer": 1, "residual": [1, 2], "full_output": true}', "residual has 2 elements, expected 256"),
    (b'{"layer": 1, "residual": "abc"}', "invalid value for 'residual'"),
])
def test_malformed_json_is_a_400_with_a_message(shard, body, message):
    r = shard.post("/v1/walk-ffn", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and message in r.json()["error"]["message"]


def test_random_bodies_never_500(shard):
    rng = np.random.default_rng(7)
    for i in range(150):
        n = int(rng.integers(0, 64)) if i % 3 else int(rng.integers(16, 2100))
        body = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if i % 4 == 0 and n >= 16:  # plausible headers: small layer / seq_len / flags
            body = struct.pack("<IIII", int(rng.integers(0, 6)), int(rng.integers(0, 3)), 1, 0) + body[16:]
        r = post_binary(shard, body)
        assert r.status_code in (200, 400), (r.status_code, r.text)
        assert r.status_code == 200 or "error" in r.json()


def test_shard_loads_only_its_layers():
    from modelql.remote.loading import load_ffn_shard

    shard = load_ffn_shard(None, (1, 2))
    layers = {int(k.split(".")[1]) for k in shard.weights}
    assert layers == {1, 2} and all(k.split(".", 2)[2] in ("gate.weight", "up.weight", "down.weight")
                                    for k in shard.weights)
    assert shard.dense_ffn.w_in[0] is None and shard.dense_ffn.w_in[3] is None


def test_full_server_walk_ffn_is_overlay_aware(inference_vindex, hf_model):
    """A deleted feature (patch overlay) disappears from the walk-ffn output: FFN − a_f·d_f."""
    from modelql.server.config import ServerConfig
    from modelql.server.serve import background

    cfg = ServerConfig(port=0, graceful_timeout=1.0)
    with background(str(inference_vindex), cfg) as server, httpx.Client(base_url=server.url, timeout=60) as c:
        x = x_rows(1, seed=9)
        before = wire.decode_response(post_binary(c, wire.encode_request(1, x)).content, "f32", H)
        mlp = hf_model.model.layers[1].mlp
        with torch.no_grad():
            xt = torch.from_numpy(x)
            act = torch.nn.functional.silu(mlp.gate_proj(xt)) * mlp.up_proj(xt)  # [1, F]
            f = int(act[0].abs().argmax())
            expected = mlp(xt) - act[0, f] * mlp.down_proj.weight[:, f]
        base = json.loads((inference_vindex / "index.json").read_text())["model"]
        patch = {"version": 1, "base_model": base, "created_at": "", "description": "drop one feature",
                 "operations": [{"op": "delete", "layer": 1, "feature": f}]}
        r = c.post("/v1/patches/apply", json={"patch": patch})
        assert r.status_code == 200, r.text
        after = wire.decode_response(post_binary(c, wire.encode_request(1, x)).content, "f32", H)
        assert not np.allclose(after.results[0].output, before.results[0].output)
        np.testing.assert_allclose(after.results[0].output, expected.numpy()[0], rtol=1e-4, atol=1e-5)

