"""The walk-ffn binary codec: byte layouts against hand-packed frames (struct, independent of the codec),
round trips of single and batch frames in f32/f16/i8, typed errors for malformed frames, and a fuzz
test: the decoders raise nothing but `WireError` on any bytes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from modelql.remote import wire
from modelql.remote.wire import WireError

H = 8


def rows(seq_len: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((seq_len, H)).astype(np.float32) * 3


# -- requests ------------------------------------------------------------------------------------

def test_single_request_layout_matches_the_spec():
    x = rows(2)
    body = wire.encode_request(5, x)
    assert body[:16] == struct.pack("<IIII", 5, 2, 1, 8092)
    assert body[16:] == x.astype("<f4").tobytes()
    req = wire.decode_request(body)
    assert (req.layers, req.seq_len, req.full_output, req.top_k, req.batch) == ([5], 2, True, 8092, False)
    np.testing.assert_array_equal(req.rows(H), x)


def test_batch_request_layout_matches_the_spec():
    x = rows(3)
    body = wire.encode_request([4, 1, 7], x, top_k=17)
    assert body[:28] == struct.pack("<IIIII", 0xFFFFFFFF, 3, 4, 1, 7) + struct.pack("<II", 3, 1)[:8]
    assert body[20:32] == struct.pack("<III", 3, 1, 17)
    req = wire.decode_request(body)
    assert (req.layers, req.seq_len, req.top_k, req.batch) == ([4, 1, 7], 3, 17, True)
    np.testing.assert_array_equal(req.rows(H), x)


def test_hand_packed_request_decodes():
    vals = [0.5, -1.25] * (H // 2)
    body = struct.pack("<IIII", 2, 1, 1, 3) + struct.pack(f"<{H}f", *vals)
    req = wire.decode_request(body)
    assert req.layers == [2] and req.top_k == 3
    assert req.residual.tolist() == vals


@pytest.mark.parametrize("body, message", [
    (b"", "body too short (need ≥ 16 bytes)"),
    (b"\x00" * 15, "body too short"),
    (struct.pack("<IIII", 0xFFFFFFFF, 5, 0, 0), "too short for 5 layer indices"),
    (struct.pack("<IIIII", 0xFFFFFFFF, 2, 0, 1, 1), "truncated fixed header"),
    (struct.pack("<IIII", 0, 1, 0, 0) + b"\x00" * 4, "requires full_output = true"),
    (struct.pack("<IIII", 0, 1, 1, 0) + b"\x00" * 5, "not a multiple of 4"),
])
def test_malformed_requests_raise_wire_error(body, message):
    with pytest.raises(WireError, match=message.replace("(", r"\(").replace(")", r"\)")):
        wire.decode_request(body)


def test_validate_messages():
    req = wire.decode_request(wire.encode_request(1, rows(2)))
    wire.validate(req, H, 4)
    with pytest.raises(WireError, match=r"residual has 16 elements, expected 24 \(seq_len=3 \* hidden_size=8\)"):
        wire.validate(wire.FfnRequest([1], req.residual, seq_len=3), H, 4)
    with pytest.raises(WireError, match=r"layer 9 out of range \(num_layers = 4\)"):
        wire.validate(wire.FfnRequest([9], req.residual, seq_len=2), H, 4)
    with pytest.raises(WireError, match="layer 3 not served by this shard \\(owned: 0–1\\)"):
        wire.validate(wire.FfnRequest([0, 3], req.residual, seq_len=2), H, 4, owned=(0, 1))
    with pytest.raises(WireError, match="seq_len must be >= 1"):
        wire.validate(wire.FfnRequest([0], np.zeros(0, np.float32), seq_len=0), H, 4)
    bad = req.residual.copy()
    bad[3] = np.nan
    with pytest.raises(WireError, match="finite"):
        wire.validate(wire.FfnRequest([0], bad, seq_len=2), H, 4)


def test_json_request_parsing():
    req = wire.parse_json_request({"layers": [0, 2], "residual": [1.0] * (2 * H), "seq_len": 2,
                                   "full_output": True, "ignored": 1})
    assert req.layers == [0, 2] and req.batch and req.seq_len == 2 and req.full_output
    assert wire.parse_json_request({"layer": 1, "residual": [0] * H}).full_output is False
    for body, msg in [({"residual": []}, "must provide 'layer' or 'layers'"),
                      ({"layers": [], "residual": []}, "empty layer list"),
                      ({"layer": "x", "residual": []}, "'layer'"),
                      ({"layer": 0}, "'residual'"),
                      ({"layer": 0, "residual": ["a"]}, "'residual'"),
                      ([1, 2], "JSON object")]:
        with pytest.raises(WireError, match=msg):
            wire.parse_json_request(body)


# -- responses -----------------------------------------------------------------------------------

def reference_i8(x: np.ndarray) -> np.ndarray:
    """The spec's i8 rule, written out per position with Python floats."""
    out = []
    for row in x.reshape(-1, H):
        peak = max(abs(float(v)) for v in row)
        scale = np.float32(peak / 127.0) if peak > 0 else np.float32(1.0)
        q = []
        for v in row:
            t = float(np.float32(v) / scale)
            r = int(abs(t) + 0.5) * (1 if t >= 0 else -1)
            q.append(max(-127, min(127, r)))
        out.append(np.array(q, dtype=np.float32) * scale)
    return np.concatenate(out)


@pytest.mark.parametrize("dtype", ["f32", "f16", "i8"])
@pytest.mark.parametrize("n_layers", [1, 3])
def test_response_round_trip(dtype, n_layers):
    seq = 3
    results = [wire.FfnResult(l, seq, rows(seq, seed=l).reshape(-1)) for l in range(n_layers)]
    results[0].output[:H] = 0.0  # an all-zero position: scale 1.0
    body = wire.encode_response(results, 12.5, dtype, H)
    back = wire.decode_response(body, dtype, H)
    assert back.latency_ms == 12.5 and back.nbytes == len(body)
    assert [r.layer for r in back.results] == list(range(n_layers))
    for r, b in zip(results, back.results):
        assert b.seq_len == seq
        if dtype == "f32":
            np.testing.assert_array_equal(b.output, r.output)
        elif dtype == "f16":
            np.testing.assert_array_equal(b.output, r.output.astype(np.float16).astype(np.float32))
        else:
            np.testing.assert_allclose(b.output, reference_i8(r.output), rtol=0, atol=1e-6)
            peak = np.abs(r.output.reshape(-1, H)).max(axis=1)
            err = np.abs(b.output - r.output).reshape(-1, H).max(axis=1)
            assert (err <= np.where(peak > 0, peak / 127 / 2 + 1e-6, 0)).all()


def test_response_layouts_match_the_spec():
    out = np.arange(2 * H, dtype=np.float32)
    single = wire.encode_response([wire.FfnResult(3, 2, out)], 1.5, "f32", H)
    assert single == struct.pack("<IIf", 3, 2, 1.5) + out.tobytes()
    batch = wire.encode_response([wire.FfnResult(3, 2, out), wire.FfnResult(4, 2, out)], 2.0, "f16", H)
    head = struct.pack("<IIf", 0xFFFFFFFF, 2, 2.0)
    entry = struct.pack("<III", 3, 2, 2 * H) + out.astype("<f2").tobytes()
    assert batch.startswith(head + entry)
    i8 = wire.encode_response([wire.FfnResult(0, 1, out[:H])], 0.0, "i8", H)
    scale, zero = struct.unpack_from("<ff", i8, 12)
    assert scale == np.float32(7 / 127) and zero == 0.0
    assert len(i8) == 12 + 8 + H
    assert wire.encode_values(np.array([1e6, -1e6] * (H // 2), np.float32), "f16", H)[:2] == b"\x00\x7c"  # +inf


def test_negotiation():
    assert wire.negotiate(None) == "f32"
    assert wire.negotiate(wire.accept_header("i8")) == "f16"  # i8 off by default
    assert wire.negotiate(wire.accept_header("i8"), i8_enabled=True) == "i8"
    assert wire.negotiate(wire.accept_header("f16"), f16_enabled=False) == "f32"
    assert wire.negotiate("application/x-larql-ffn") == "f32"


@pytest.mark.parametrize("body, message", [
    (b"\x00" * 11, "need ≥ 12"),
    (struct.pack("<IIf", 1, 2, 0.0) + b"\x00" * 4, "needs 64 value bytes"),
    (struct.pack("<IIf", 0xFFFFFFFF, 2, 0.0) + struct.pack("<III", 0, 1, H), "truncated"),
    (struct.pack("<IIf", 0xFFFFFFFF, 1, 0.0) + struct.pack("<III", 0, 1, 5), "count 5"),
    (struct.pack("<IIf", 0xFFFFFFFF, 0, 0.0) + b"xx", "trailing"),
])
def test_malformed_responses_raise_wire_error(body, message):
    with pytest.raises(WireError, match=message):
        wire.decode_response(body, "f32", H)


# -- fuzz -----------------------------------------------------------------------------------------

def _valid_frames() -> list[bytes]:
    x = rows(2)
    return [wire.encode_request(1, x), wire.encode_request([0, 3], x)]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_fuzz_decode_request_random_bytes(data):
    try:
        req = wire.decode_request(data)
    except WireError:
        return
    try:
        wire.validate(req, H, 4, owned=(0, 2))
    except WireError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(_valid_frames()), st.integers(0, 200), st.binary(max_size=8), st.integers(0, 255))
def test_fuzz_decode_request_mutated_frames(frame, pos, insert, flip):
    data = bytearray(frame)
    if data:
        i = pos % len(data)
        data[i] ^= flip
        data[i:i] = insert
    data = bytes(data[: pos * 3 % (len(data) + 1)]) if pos % 5 == 0 else bytes(data)
    try:
        req = wire.decode_request(data)
        wire.validate(req, H, 4)
    except WireError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=400), st.sampled_from(["f32", "f16", "i8"]), st.integers(1, 16))
def test_fuzz_decode_response(data, dtype, hidden):
    try:
        wire.decode_response(data, dtype, hidden)
    except WireError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(
                        st.sampled_from(["layer", "layers", "residual", "seq_len", "top_k", "full_output"]), c,
                        max_size=6), max_leaves=20))
def test_fuzz_json_request(data):
    try:
        req = wire.parse_json_request(data)
        wire.validate(req, H, 4)
    except WireError:
        pass
