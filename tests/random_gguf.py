"""A random-weight Llama written as a Q4_K_M-like GGUF (shared by the memory test and bench/decode.py).

llama.cpp's Q4_K_M mix: Q4_K matrices, Q6_K for the output head and for attn_v / ffn_down in half the
layers. Blocks are random codes with sane float16 scales (every code pattern is a valid block), so any
size can be written in seconds without a quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_SCALE_BYTES = {"Q4_K": (0, 4), "Q6_K": (-2, 2)}  # where the block's float16 scale(s) sit


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

    block, size = GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    start, count = _SCALE_BYTES[qtype]
    scales = (rng.random((rows, cols // block, count // 2)) * 0.002 + 0.0005).astype(np.float16).view(np.uint8)
    if start < 0:
        raw[..., start:] = scales.reshape(rows, cols // block, -1)
    else:
        raw[..., start:start + count] = scales.reshape(rows, cols // block, -1)
    return raw.reshape(rows, -1)


def write_random_q4_k_m(path: Path, hidden=2048, layers=16, inter=5632, heads=32, kv=8, vocab=32000) -> int:
    """Write the file; returns the parameter count (the defaults: ~0.85B parameters, ~520 MB)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path=str(path), arch="llama")
    w.add_block_count(layers)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_context_length(2048)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    hd = hidden // heads
    params = 0

    def add(name, qtype, rows, cols):
        nonlocal params
        w.add_tensor(name, random_blocks(qtype, rows, cols, rng), raw_dtype=Q[qtype])
        params += rows * cols

    add("token_embd.weight", "Q4_K", vocab, hidden)
    add("output.weight", "Q6_K", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        add(p + "attn_q.weight", "Q4_K", heads * hd, hidden)
        add(p + "attn_k.weight", "Q4_K", kv * hd, hidden)
        add(p + "attn_v.weight", "Q6_K" if i % 2 == 0 else "Q4_K", kv * hd, hidden)
        add(p + "attn_output.weight", "Q4_K", hidden, heads * hd)
        add(p + "ffn_gate.weight", "Q4_K", inter, hidden)
        add(p + "ffn_up.weight", "Q4_K", inter, hidden)
        add(p + "ffn_down.weight", "Q6_K" if i % 2 == 0 else "Q4_K", hidden, inter)
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return params


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as fh:
        return int(fh.read().split(key + ":")[1].split()[0]) / 1024


def load_rss(path: str) -> dict:
    """Load `path` in this (fresh) process and report memory in MB: `base` (RSS once the libraries are
    imported and onnxruntime has built one session, so their fixed costs are not counted as the model's),
    `peak` (the process's high-water mark, VmHWM, read after the load) and `after` (RSS after the load).
    Linux only (/proc)."""
    import onnxruntime as ort
    import torch
    from onnx import TensorProto, helper

    from modelql.runtime import load_model

    torch.set_num_threads(2)
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "warm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    ort.InferenceSession(model.SerializeToString(),
                         providers=["CPUExecutionProvider"])
    base = _status_mb("VmRSS")
    model = load_model(path)
    out = {"base": base, "peak": _status_mb("VmHWM"), "after": _status_mb("VmRSS"), "quantized": model.quantized}
    logits = model.forward(list(range(1, 9)), logits="last")
    out["finite"] = bool(torch.isfinite(logits).all())
    return out
