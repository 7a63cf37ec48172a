"""A random-weight Llama written as a Q4_K_M-like GGUF (shared by the memory test and bench/decode.py).

llama.cpp's Q4_K_M mix: Q4_K matrices, Q6_K for the output head and for attn_v / ffn_down in half the
layers. Blocks are random codes with sane float16 scales (every code pattern is a valid block), so any
size can be written in seconds without a quantizer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: where a block keeps its float16 scale(s): (byte offset, bytes)
_SCALE_BYTES = {"Q4_K": (0, 4), "Q6_K": (-2, 2), "Q4_0": (0, 2), "Q4_1": (0, 4), "Q8_0": (0, 2), "Q5_K": (0, 4)}


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator, std: float | None = None) -> np.ndarray:
    """Random codes with float16 scales in a sane range; with `std`, the scales are then multiplied so the
    dequantized matrix has that standard deviation (every type's values are linear in its float16 scales),
    as a trained model's are, rather than the ~1-10 that random sub-scales give (a model with such weights
    is chaotic: any rounding anywhere flips its logits)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from gguf.quants import dequantize

    block, size = GGML_QUANT_SIZES[Q[qtype]]
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    if qtype == "Q6_K" and std is not None:
        # int8 sub-scales of like sign and size, as a quantizer writes them (random bytes flip signs between
        # neighbouring 16-weight groups, an ill-conditioned matrix)
        raw[..., 192:208] = rng.integers(24, 64, size=(rows, cols // block, 16), dtype=np.uint8)
    start, count = _SCALE_BYTES[qtype]
    where = slice(start, None) if start < 0 else slice(start, start + count)
    scales = (rng.random((rows, cols // block, count // 2)) * 0.002 + 0.0005).astype(np.float16)
    if std is not None:
        raw[..., where] = scales.view(np.uint8).reshape(rows, cols // block, -1)
        scales = (scales * (std / dequantize(raw.reshape(rows, -1), Q[qtype]).std())).astype(np.float16)
    raw[..., where] = scales.view(np.uint8).reshape(rows, cols // block, -1)
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


def with_random_blocks(src: Path, dst: Path, qtype_of, seed: int = 0, std: float = 0.05) -> dict[str, str]:
    """Copy the GGUF `src` to `dst` (metadata, tokenizer and all) with each matrix for which
    `qtype_of(name, rows, cols)` names a type replaced by random blocks of that type: a small model in any
    GGUF quantization mix without a quantizer (gguf-py quantizes Q8_0 only), weights of standard deviation
    `std`. Returns name → type."""
    rng = np.random.default_rng(seed)

    def replace(name, rows, cols, floats):
        qtype = qtype_of(name, rows, cols)
        return None if qtype is None else (random_blocks(qtype, rows, cols, rng, std), qtype)

    return _rewrite(src, dst, replace)


def requantized(src: Path, dst: Path, qtype: str) -> dict[str, str]:
    """Copy the GGUF `src` to `dst` with every matrix whose rows split into `qtype` blocks quantized to
    `qtype` by gguf-py's own quantizer (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0): the same model, quantized as
    llama.cpp's quantizer would (those types have one rounding rule). Returns name → type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q
    from gguf.quants import quantize

    block = GGML_QUANT_SIZES[Q[qtype]][0]
    return _rewrite(src, dst, lambda name, rows, cols, floats: (
        (quantize(floats(), Q[qtype]), qtype) if cols % block == 0 else None))


def _rewrite(src: Path, dst: Path, replace) -> dict[str, str]:
    """Copy a GGUF with matrices replaced: `replace(name, rows, cols, floats)` → (data, type) or None."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(src))
    writer = gguf.GGUFWriter(str(dst), arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind,
                             sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    types: dict[str, str] = {}
    tensors = []
    for t in reader.tensors:
        data, raw = t.data, t.tensor_type
        if len(t.shape) == 2:
            cols, rows = (int(x) for x in t.shape)
            floats = lambda t=t, rows=rows, cols=cols: dequantize(t.data, t.tensor_type).reshape(rows, cols)  # noqa: E731
            got = replace(t.name, rows, cols, floats)
            if got is not None:
                data, qtype = got
                raw = gguf.GGMLQuantizationType[qtype]
                types[t.name] = qtype
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, raw)
        tensors.append(data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in tensors:
        writer.write_tensor_data(data)
    writer.close()
    return types


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
