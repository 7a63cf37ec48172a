"""Mixture-of-experts families through GGUF: experts stacked the way llama.cpp stores them, read back exactly.

References: HF transformers (logits, greedy generation) of the safetensors model the file was
converted from, and llama.cpp's own Python reader (`gguf.GGUFReader`) for the file's tensor names,
stacked [E, rows, cols] layout and `expert_*` metadata.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from modelql.models.gguf import GgufSource
from modelql.models.gguf_convert import convert
from modelql.runtime import load_model
from tests.tiny_models import make_tiny

MOE_FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"]


@pytest.fixture(scope="module", params=MOE_FAMILIES)
def converted(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf = make_tiny(request.param, d / "hf")
    files = {t: convert(d / "hf", d / f"m.{t}.gguf", t).path for t in ("f32", "q8_0")}
    return request.param, hf, files, load_model(files["f32"])


def _ids(n, seed):
    return torch.randint(0, 211, (1, n), generator=torch.Generator().manual_seed(seed))


def test_gguf_logits_match_transformers(converted):
    _, hf, _, model = converted
    ids = _ids(24, 1)
    with torch.no_grad():
        ref = hf(ids).logits
    assert (model.forward(ids) - ref).abs().max().item() < 1e-4


def test_gguf_spec_equals_the_safetensors_spec(converted):
    from modelql.models.families import spec_from_config

    _, hf, _, model = converted
    a, b = model.spec, spec_from_config(hf.config.to_dict())
    assert a.moe == b.moe and a.family == b.family
    for field in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "qk_norm",
                  "qk_norm_per_head", "attn_bias", "sliding_window", "layer_sliding", "tie_embeddings"):
        assert getattr(a, field) == getattr(b, field), field


def test_gguf_decode_and_greedy_generation(converted):
    _, hf, _, model = converted
    ids = _ids(20, 2)
    full = model.forward(ids)
    cache = model.new_cache()
    model.forward(ids[:, :7], cache)
    for t in range(7, 20):
        assert (model.forward(ids[:, t:t + 1], cache, logits="last") - full[:, t]).abs().max().item() < 1e-4
    prompt = _ids(6, 3)
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                          pad_token_id=0, eos_token_id=None)[0, 6:].tolist()
    cache = model.new_cache()
    logits = model.forward(prompt, cache, logits="last")
    out = []
    for _ in range(20):
        out.append(int(logits.argmax(-1)))
        logits = model.forward([[out[-1]]], cache, logits="last")
    assert out == ref


def test_experts_are_stacked_as_llama_cpp_names_them(converted):
    """llama.cpp's reader sees blk.N.ffn_{gate,up,down}_exps as [E, rows, cols] (ggml dims reversed)
    holding each HF expert's matrix, the router as ffn_gate_inp, and the expert metadata."""
    import gguf

    name, hf, files, _ = converted
    cfg = hf.config
    reader = gguf.GGUFReader(str(files["f32"]))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    field = lambda key: reader.fields[f"{arch}.{key}"].parts[-1][0]  # noqa: E731
    experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    assert field("expert_count") == experts and field("expert_used_count") == cfg.num_experts_per_tok
    tensors = {t.name: t for t in reader.tensors}
    state = hf.state_dict()  # transformers keeps experts stacked in memory: gate_up [E, 2F, H], down [E, H, F]
    layer = 1
    gate_up = state[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
    f = gate_up.shape[1] // 2
    expected = {"ffn_gate_exps": gate_up[:, :f], "ffn_up_exps": gate_up[:, f:],
                "ffn_down_exps": state[f"model.layers.{layer}.mlp.experts.down_proj"]}
    for leaf, want in expected.items():
        t = tensors[f"blk.{layer}.{leaf}.weight"]
        data = np.asarray(t.data).reshape(tuple(reversed([int(x) for x in t.shape])))
        assert data.shape == tuple(want.shape) and data.shape[0] == experts
        np.testing.assert_array_equal(data, want.numpy())
    router = tensors[f"blk.{layer}.ffn_gate_inp.weight"]
    np.testing.assert_array_equal(np.asarray(router.data).reshape(experts, -1),
                                  state[f"model.layers.{layer}.mlp.gate.weight"].numpy())
    if name == "qwen2_moe":
        assert f"blk.{layer}.ffn_up_shexp.weight" in tensors and f"blk.{layer}.ffn_gate_inp_shexp.weight" in tensors


def test_quantized_experts_read_from_their_own_bytes(converted):
    """One expert dequantised from its slice of a Q8_0 stacked tensor equals that expert of the
    whole tensor dequantised by gguf-py."""
    from gguf.quants import dequantize

    _, _, files, _ = converted
    src = GgufSource(files["q8_0"])
    name = "blk.0.ffn_down_exps.weight"
    assert src.tensor_type(name) in ("Q8_0", "F16")
    t = src._tensors[name]
    whole = dequantize(src._raw(t).reshape(*t.shape[:-1], -1), t.tensor_type).reshape(t.shape) \
        if src.tensor_type(name) == "Q8_0" else src.array(name)
    for e in range(t.shape[0]):
        np.testing.assert_array_equal(src.expert_array(name, e), whole[e])
