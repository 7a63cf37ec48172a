"""Dequantisation of every supported tensor type, through a real GGUF file and `GgufSource`.

The references are straightforward numpy transcriptions of ggml's scalar reference code
(`dequantize_row_q4_0`, `_q4_1`, `_q5_0`, `_q5_1`, `_q8_0`, `_q4_K`, `_q5_K`, `_q6_K` in
ggml-quants.c, one block at a time, float32 arithmetic in the C order) run on hand-built blocks with random payloads, plus
transformers' independent dequantisers (which also cover Q2_K and Q3_K). Q4_0 and Q8_0 files are also
made with gguf's own quantiser (the K-quants have no Python quantiser) and checked against the
data they came from.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelql.models.gguf import GgufSource

QK_K = 256
F = np.float32


def f16(b: bytes) -> np.float32:
    return F(np.frombuffer(b, dtype=np.float16)[0])


# -- ggml reference dequantisers, transcribed --------------------------------------------------

def ref_q8_0(b: bytes) -> list:
    d = f16(b[0:2])
    qs = np.frombuffer(b[2:34], dtype=np.int8)
    return [F(qs[j]) * d for j in range(32)]


def ref_q4_0(b: bytes) -> list:
    d = f16(b[0:2])
    qs = b[2:18]
    y = [F(0)] * 32
    for j in range(16):
        x0 = (qs[j] & 0x0F) - 8
        x1 = (qs[j] >> 4) - 8
        y[j] = F(x0) * d
        y[j + 16] = F(x1) * d
    return y


def ref_q4_1(b: bytes) -> list:
    d, m = f16(b[0:2]), f16(b[2:4])
    qs = b[4:20]
    y = [F(0)] * 32
    for j in range(16):
        y[j] = F(qs[j] & 0x0F) * d + m
        y[j + 16] = F(qs[j] >> 4) * d + m
    return y


def _q5(b: bytes, signed: bool) -> list:
    d = f16(b[0:2])
    m = f16(b[2:4]) if not signed else None
    o = 2 if signed else 4
    qh = int.from_bytes(b[o:o + 4], "little")
    qs = b[o + 4:o + 20]
    y = [F(0)] * 32
    for j in range(16):
        xh_0 = ((qh >> (j + 0)) << 4) & 0x10
        xh_1 = ((qh >> (j + 12))) & 0x10
        x0 = ((qs[j] & 0x0F) | xh_0) - (16 if signed else 0)
        x1 = ((qs[j] >> 4) | xh_1) - (16 if signed else 0)
        y[j] = F(x0) * d if signed else F(x0) * d + m
        y[j + 16] = F(x1) * d if signed else F(x1) * d + m
    return y


def ref_q5_0(b: bytes) -> list:
    return _q5(b, signed=True)


def ref_q5_1(b: bytes) -> list:
    return _q5(b, signed=False)


def get_scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4)


def ref_q4_k(b: bytes) -> list:
    d, dmin = f16(b[0:2]), f16(b[2:4])
    scales, q = b[4:16], b[16:144]
    y, qi, is_ = [], 0, 0
    for _ in range(0, QK_K, 64):
        sc, m = get_scale_min_k4(is_ + 0, scales)
        d1, m1 = d * F(sc), dmin * F(m)
        sc, m = get_scale_min_k4(is_ + 1, scales)
        d2, m2 = d * F(sc), dmin * F(m)
        y += [d1 * F(q[qi + l] & 0xF) - m1 for l in range(32)]
        y += [d2 * F(q[qi + l] >> 4) - m2 for l in range(32)]
        qi += 32
        is_ += 2
    return y


def ref_q5_k(b: bytes) -> list:
    d, dmin = f16(b[0:2]), f16(b[2:4])
    scales, qh, ql = b[4:16], b[16:48], b[48:176]
    y, qi, is_, u1, u2 = [], 0, 0, 1, 2
    for _ in range(0, QK_K, 64):
        sc, m = get_scale_min_k4(is_ + 0, scales)
        d1, m1 = d * F(sc), dmin * F(m)
        sc, m = get_scale_min_k4(is_ + 1, scales)
        d2, m2 = d * F(sc), dmin * F(m)
        y += [d1 * F((ql[qi + l] & 0xF) + (16 if qh[l] & u1 else 0)) - m1 for l in range(32)]
        y += [d2 * F((ql[qi + l] >> 4) + (16 if qh[l] & u2 else 0)) - m2 for l in range(32)]
        qi += 32
        is_ += 2
        u1 <<= 2
        u2 <<= 2
    return y


def ref_q6_k(b: bytes) -> list:
    ql, qh = b[0:128], b[128:192]
    sc = np.frombuffer(b[192:208], dtype=np.int8)
    d = f16(b[208:210])
    y = [F(0)] * QK_K
    for n in range(2):
        o, qlo, qho, so = 128 * n, 64 * n, 32 * n, 8 * n
        for l in range(32):
            is_ = l // 16
            q1 = ((ql[qlo + l] & 0xF) | (((qh[qho + l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[qlo + l + 32] & 0xF) | (((qh[qho + l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[qlo + l] >> 4) | (((qh[qho + l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[qlo + l + 32] >> 4) | (((qh[qho + l] >> 6) & 3) << 4)) - 32
            y[o + l] = d * F(sc[so + is_]) * F(q1)
            y[o + l + 32] = d * F(sc[so + is_ + 2]) * F(q2)
            y[o + l + 64] = d * F(sc[so + is_ + 4]) * F(q3)
            y[o + l + 96] = d * F(sc[so + is_ + 6]) * F(q4)
    return y


REFERENCES = {"Q8_0": ref_q8_0, "Q4_0": ref_q4_0, "Q4_1": ref_q4_1, "Q5_0": ref_q5_0, "Q5_1": ref_q5_1,
              "Q4_K": ref_q4_k, "Q5_K": ref_q5_k, "Q6_K": ref_q6_k}


# -- blocks and files ----------------------------------------------------------------------------

def _half(rng, lo=1e-4, hi=1e-1) -> bytes:
    return np.float16(rng.uniform(lo, hi) * rng.choice([1, -1])).tobytes()


def random_blocks(qtype: str, n: int, rng) -> bytes:
    """n blocks with random payloads and finite f16 scales at their offsets (ggml's block layouts)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]][1]
    out = bytearray()
    for _ in range(n):
        b = bytearray(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
        if qtype in ("Q8_0", "Q4_0", "Q5_0"):
            b[0:2] = _half(rng)
        elif qtype in ("Q4_1", "Q5_1"):
            b[0:2], b[2:4] = _half(rng), _half(rng)
        elif qtype in ("Q4_K", "Q5_K"):
            b[0:2], b[2:4] = _half(rng), _half(rng)
        elif qtype == "Q2_K":
            b[80:82], b[82:84] = _half(rng), _half(rng)
        elif qtype == "Q3_K":
            b[108:110] = _half(rng)
        elif qtype == "Q6_K":
            b[208:210] = _half(rng)
        out += b
    return bytes(out)


def write_gguf(path, tensors: dict, arch: str = "llama") -> None:
    """A minimal model file: `tensors` maps name → float32 array or (raw uint8 blocks, type name)."""
    import gguf

    w = gguf.GGUFWriter(path=None, arch=arch)
    first = next(iter(tensors.values()))
    cols = first.shape[-1] if isinstance(first, np.ndarray) else first[2][-1]
    w.add_block_count(1)
    w.add_embedding_length(cols)
    w.add_head_count(1)
    w.add_context_length(16)
    for name, t in tensors.items():
        if isinstance(t, np.ndarray):
            w.add_tensor(name, t)
        else:
            raw, qtype, _shape = t
            w.add_tensor(name, raw, raw_dtype=gguf.GGMLQuantizationType[qtype])
    w.write_header_to_file(path=path)
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _raw(blocks: bytes, rows: int, qtype: str):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = np.frombuffer(blocks, dtype=np.uint8).reshape(rows, -1)
    return raw, qtype, (rows, raw.shape[1] // size * block)


@pytest.mark.parametrize("qtype", sorted(REFERENCES))
def test_dequantisation_matches_ggml_reference(qtype, tmp_path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    rng = np.random.default_rng(hash(qtype) % 2**32)
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows, per_row = 3, 512 // block
    blocks = random_blocks(qtype, rows * per_row, rng)
    write_gguf(tmp_path / "q.gguf", {"token_embd.weight": _raw(blocks, rows, qtype)})
    src = GgufSource(tmp_path / "q.gguf")
    assert src.tensor_type("token_embd.weight") == qtype
    ours = src.array("token_embd.weight")
    assert ours.shape == (rows, per_row * block) and ours.dtype == np.float32
    ref = np.array([v for i in range(rows * per_row) for v in REFERENCES[qtype](blocks[i * size:(i + 1) * size])],
                   dtype=np.float32).reshape(rows, -1)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_dequantisation_matches_transformers(qtype, tmp_path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    rng = np.random.default_rng(7)
    block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    rows = 4
    blocks = random_blocks(qtype, rows * (512 // block), rng)
    raw = _raw(blocks, rows, qtype)
    write_gguf(tmp_path / "q.gguf", {"token_embd.weight": raw})
    ours = GgufSource(tmp_path / "q.gguf").array("token_embd.weight")
    theirs = hf_dequantize(torch.from_numpy(raw[0].copy()), int(GGMLQuantizationType[qtype])).reshape(ours.shape)
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("qtype,bound", [("Q8_0", 0.6 / 127), ("Q4_0", 1.05 / 8), ("BF16", 2**-8)])
def test_gguf_quantiser_round_trip(qtype, bound, tmp_path):
    import gguf

    rng = np.random.default_rng(3)
    data = rng.normal(0, 0.05, (8, 256)).astype(np.float32)
    q = gguf.quants.quantize(data, gguf.GGMLQuantizationType[qtype])
    write_gguf(tmp_path / "q.gguf", {"token_embd.weight": (q, qtype, data.shape)})
    ours = GgufSource(tmp_path / "q.gguf").array("token_embd.weight")
    if qtype == "BF16":
        np.testing.assert_array_equal(ours, torch.from_numpy(data).bfloat16().float().numpy())
    else:
        blocks = data.reshape(-1, 32)
        err = np.abs(ours.reshape(-1, 32) - blocks).max(axis=1)
        assert (err <= np.abs(blocks).max(axis=1) * bound + 1e-7).all()
        size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]][1]
        raw = q.tobytes()
        ref = np.array([v for i in range(len(raw) // size) for v in REFERENCES[qtype](raw[i * size:(i + 1) * size])],
                       dtype=np.float32).reshape(ours.shape)
        np.testing.assert_array_equal(ours, ref)


def test_float_types_exact(tmp_path):
    rng = np.random.default_rng(5)
    a32 = rng.normal(0, 1, (4, 64)).astype(np.float32)
    a16 = rng.normal(0, 1, (4, 64)).astype(np.float16)
    write_gguf(tmp_path / "f.gguf", {"token_embd.weight": a32, "output.weight": a16})
    src = GgufSource(tmp_path / "f.gguf")
    assert src.tensor_type("output.weight") == "F16"
    np.testing.assert_array_equal(src.array("token_embd.weight"), a32)
    np.testing.assert_array_equal(src.array("output.weight"), a16.astype(np.float32))
    # get() returns an owned, writable copy (never a view of the read-only mapping)
    t = src.get("model.embed_tokens.weight")
    t += 1
    np.testing.assert_array_equal(src.array("token_embd.weight"), a32)
