"""LARQL's batch expert routes on MoE servers, against each expert's SwiGLU computed here in numpy from
the checkpoint's own tensors: `/v1/experts/layer-batch[-f16]`, `/v1/experts/multi-layer-batch[-q8k]`,
the binary `/v1/expert/batch`, `/v1/expert/topology`; Gemma 4's experts read their own norm of the
residual (transformers' `pre_feedforward_layernorm_2` is the reference). The frames are built here
byte by byte with `struct`, as LARQL's Rust encoders lay them out, not with the server's codec."""

from __future__ import annotations

import struct

import httpx
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from modelql.remote.q8k_wire import quantize
from modelql.server.config import ServerConfig
from modelql.server.serve import background
from tests.tiny_models import make_tiny


def silu(v):
    return v / (1 + np.exp(-v))


def mixtral_expert(w: dict, layer: int, e: int, x: np.ndarray) -> np.ndarray:
    p = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
    x = x.astype(np.float64)
    return w[p + "w2.weight"] @ (silu(w[p + "w1.weight"] @ x) * (w[p + "w3.weight"] @ x))


def layer_frame(layer, residual, ids, weights, f16=False) -> bytes:
    res = np.asarray(residual, "<f2" if f16 else "<f4").tobytes()
    pairs = b"".join(struct.pack("<If", e, w) for e, w in zip(ids, weights))
    return struct.pack("<III", layer, len(residual), len(ids)) + res + pairs


def multi_frame(tasks) -> bytes:
    out = struct.pack("<I", len(tasks))
    for layer, residual, ids, weights in tasks:
        out += struct.pack("<III", layer, len(residual), len(ids)) + np.asarray(residual, "<f4").tobytes()
        out += struct.pack(f"<{len(ids)}I", *ids) + struct.pack(f"<{len(ids)}f", *weights)
    return out


def read_multi(raw: bytes) -> list[tuple[int, np.ndarray]]:
    (n,), pos, out = struct.unpack_from("<I", raw), 4, []
    for _ in range(n):
        layer, hidden = struct.unpack_from("<II", raw, pos)
        pos += 8
        out.append((layer, np.frombuffer(raw, "<f4", hidden, pos)))
        pos += 4 * hidden
    assert pos == len(raw)
    return out


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    d = tmp_path_factory.mktemp("mixtral")
    make_tiny("mixtral", d)
    with background(d, ServerConfig(port=0, ffn_only=True, graceful_timeout=1.0)) as srv:
        yield srv.url, load_file(str(d / "model.safetensors"))


def test_layer_batch_is_the_weighted_sum_of_swiglu_experts(mixtral):
    url, w = mixtral
    x = np.random.default_rng(0).standard_normal(64).astype(np.float32)
    want = 0.3 * mixtral_expert(w, 1, 3, x) + 0.7 * mixtral_expert(w, 1, 6, x)
    r = httpx.post(url + "/v1/experts/layer-batch", content=layer_frame(1, x, [3, 6], [0.3, 0.7]),
                   headers={"Content-Type": "application/x-larql-experts-layer"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-larql-experts-layer"
    hidden, latency = struct.unpack_from("<If", r.content)
    assert hidden == 64 and latency >= 0 and len(r.content) == 8 + 4 * 64
    assert np.abs(np.frombuffer(r.content, "<f4", 64, 8) - want).max() < 1e-5
    # f16: the residual is rounded to half on the wire, the answer comes back as half
    x16 = x.astype(np.float16).astype(np.float32)
    want16 = 0.3 * mixtral_expert(w, 1, 3, x16) + 0.7 * mixtral_expert(w, 1, 6, x16)
    r = httpx.post(url + "/v1/experts/layer-batch-f16", content=layer_frame(1, x, [3, 6], [0.3, 0.7], f16=True))
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-larql-experts-layer-f16"
    assert struct.unpack_from("<I", r.content)[0] == 64 and len(r.content) == 8 + 2 * 64
    got = np.frombuffer(r.content, "<f2", 64, 8).astype(np.float64)
    assert np.abs(got - want16).max() <= 1e-3 * max(1.0, np.abs(want16).max())


def test_multi_layer_batch_answers_every_task_in_order(mixtral):
    url, w = mixtral
    rng = np.random.default_rng(1)
    tasks = [(1, rng.standard_normal(64).astype(np.float32), [0, 7], [0.5, 0.25]),
             (0, rng.standard_normal(64).astype(np.float32), [2], [1.0]),
             (1, rng.standard_normal(64).astype(np.float32), [], [])]
    r = httpx.post(url + "/v1/experts/multi-layer-batch", content=multi_frame(tasks),
                   headers={"Content-Type": "application/x-larql-experts-multi-layer"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-larql-experts-multi-layer"
    got = read_multi(r.content)
    assert [layer for layer, _ in got] == [1, 0, 1]
    for (layer, x, ids, ws), (_, out) in zip(tasks, got):
        want = sum((wt * mixtral_expert(w, layer, e, x) for e, wt in zip(ids, ws)), np.zeros(64))
        assert np.abs(out - want).max() < 1e-5


def test_binary_expert_batch(mixtral):
    url, w = mixtral
    x = np.random.default_rng(2).standard_normal(64).astype(np.float32)
    frame = struct.pack("<II", 2, 64) + struct.pack("<II", 1, 5) + x.tobytes() + struct.pack("<II", 0, 1) + x.tobytes()
    r = httpx.post(url + "/v1/expert/batch", content=frame, headers={"Content-Type": "application/x-larql-expert"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-larql-expert"
    n, hidden, _latency = struct.unpack_from("<IIf", r.content)
    assert (n, hidden) == (2, 64) and len(r.content) == 12 + 2 * (8 + 4 * 64)
    for i, (layer, e) in enumerate([(1, 5), (0, 1)]):
        off = 12 + i * (8 + 256)
        assert struct.unpack_from("<II", r.content, off) == (layer, e)
        assert np.abs(np.frombuffer(r.content, "<f4", 64, off + 8) - mixtral_expert(w, layer, e, x)).max() < 1e-5
    # the same request as JSON answers the same outputs
    j = httpx.post(url + "/v1/expert/batch", json={"requests": [{"layer": 1, "expert_id": 5, "residual": x.tolist()}]})
    assert np.abs(np.array(j.json()["results"][0]["output"]) - mixtral_expert(w, 1, 5, x)).max() < 1e-5


def test_bad_frames_are_400s_and_topology_needs_experts(mixtral):
    url, _ = mixtral
    x = np.zeros(64, np.float32)
    bad = {
        "/v1/experts/layer-batch": [layer_frame(1, x, [3], [1.0])[:-3], layer_frame(2, x, [0], [1.0]),
                                    layer_frame(1, x, [8], [1.0]), layer_frame(1, x[:10], [0], [1.0]),
                                    layer_frame(1, x, [0], [float("nan")]), b""],
        "/v1/experts/multi-layer-batch": [multi_frame([(0, x, [1], [1.0])])[:-1], struct.pack("<I", 3)],
        "/v1/experts/multi-layer-batch-q8k": [struct.pack("<IIII", 1, 0, 64, 0)],  # hidden not a multiple of 256
        "/v1/expert/batch": [struct.pack("<II", 1, 64)],
    }
    for path, frames in bad.items():
        for frame in frames:
            ct = "application/x-larql-expert" if path == "/v1/expert/batch" else "application/octet-stream"
            r = httpx.post(url + path, content=frame, headers={"Content-Type": ct})
            assert r.status_code == 400 and r.json()["error"]["message"], (path, frame[:16], r.status_code)
    r = httpx.get(url + "/v1/expert/topology")  # a shard of every expert: not launched with --experts
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_q8k_multi_layer_batch(tmp_path):
    """Hidden 256: the client's Q8_K row of the (normalised) expert input, dequantised by the server."""
    import transformers as T

    torch.manual_seed(0)
    cfg = T.MixtralConfig(hidden_size=256, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=50, num_local_experts=4, num_experts_per_tok=2)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path, safe_serialization=True)
    w = load_file(str(tmp_path / "model.safetensors"))
    x = np.random.default_rng(3).standard_normal(256).astype(np.float32)
    q = quantize(x)
    frame = struct.pack("<IIII", 1, 0, 256, 2) + q.qs.astype("i1").tobytes() + q.d.astype("<f4").tobytes() \
        + q.sums.astype("<i2").tobytes() + struct.pack("<2I", 1, 3) + struct.pack("<2f", 0.6, 0.4)
    xq = q.dequantize()
    want = 0.6 * mixtral_expert(w, 0, 1, xq) + 0.4 * mixtral_expert(w, 0, 3, xq)
    with background(tmp_path, ServerConfig(port=0, ffn_only=True, experts="0-3", graceful_timeout=1.0)) as srv:
        r = httpx.post(srv.url + "/v1/experts/multi-layer-batch-q8k", content=frame,
                       headers={"Content-Type": "application/x-larql-experts-multi-layer-q8k"})
        assert r.status_code == 200, r.text
        [(layer, out)] = read_multi(r.content)
        assert layer == 0 and np.abs(out - want).max() < 1e-4
        topo = httpx.get(srv.url + "/v1/expert/topology").json()
        assert topo == {"model_id": topo["model_id"], "num_experts": 4, "num_layers": 1, "owned_start": 0,
                        "owned_end": 3}


def test_gemma4_experts_read_their_own_norm_of_the_residual(tmp_path):
    """As LARQL: the residual sent is the post-attention residual; the server applies the experts'
    pre-norm (transformers' `pre_feedforward_layernorm_2`), then gelu-gated experts from the stacked
    `gate_up_proj` / `down_proj` tensors."""
    hf = make_tiny("gemma4_moe", tmp_path / "g")
    w = load_file(str(tmp_path / "g" / "model.safetensors"))
    h = np.random.default_rng(4).standard_normal(64).astype(np.float32) * 3
    with torch.no_grad():
        xn = hf.model.layers[1].pre_feedforward_layernorm_2(torch.from_numpy(h)).double().numpy()
    gu, down = w["model.layers.1.experts.gate_up_proj"].astype(np.float64), w["model.layers.1.experts.down_proj"]

    def expert(e):
        gate, up = np.split(gu[e] @ xn, 2)
        gelu = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3)))
        return down[e] @ (gelu * up)

    with background(tmp_path / "g", ServerConfig(port=0, graceful_timeout=1.0)) as srv:
        one = httpx.post(srv.url + "/v1/expert/1/2", json={"residual": h.tolist()}).json()
        assert np.abs(np.array(one["output"]) - expert(2)).max() < 1e-5
        r = httpx.post(srv.url + "/v1/experts/layer-batch", content=layer_frame(1, h, [2, 5], [0.25, 0.5]))
        assert np.abs(np.frombuffer(r.content, "<f4", 64, 8) - (0.25 * expert(2) + 0.5 * expert(5))).max() < 1e-5
