"""Greedy decoding and logits of the low-bit path against transformers' own GGUF loader (which dequantizes
every tensor to float32) on tiny random Llamas stored in the quantization mixes real files use: the
independent reference for "the same model, kept low-bit"."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxruntime")

#: a Q4_K_M-like mix (llama.cpp's: Q4_K matrices, Q6_K for the head, attn_v and ffn_down) and a mix of
#: the other block types (Q4_0, Q4_1, Q4_K, Q5_K, Q8_0); the kernel takes all of them exactly
MIXES = {
    "Q4_K_M": lambda name, rows, cols: "Q6_K" if name.split(".")[-2] in ("output", "attn_v", "ffn_down") else "Q4_K",
    "exact": lambda name, rows, cols: {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q8_0", "attn_output": "Q5_K",
                                       "ffn_gate": "Q4_1", "ffn_up": "Q4_K", "ffn_down": "Q4_0",
                                       "token_embd": "Q8_0", "output": "Q4_K"}[name.split(".")[-2]],
}


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory):
    """A tiny random Llama (K-quant widths: multiples of 256) with a real tokenizer, as an F16 GGUF."""
    import transformers as T

    from modelql.models.gguf_convert import convert
    from tests.gguf.helpers import write_tokenizer

    d = tmp_path_factory.mktemp("tiny-kquant")
    n = write_tokenizer("spm-first", d / "hf")
    torch.manual_seed(0)
    config = T.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=n, max_position_embeddings=256, bos_token_id=1,
                           eos_token_id=4, pad_token_id=None)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(d / "hf", safe_serialization=True)
    convert(d / "hf", d / "tiny-F16.gguf", "f16")
    return d / "tiny-F16.gguf"


def _mixed(tiny_f16, mix: str):
    from tests.random_gguf import with_random_blocks

    out = tiny_f16.parent / f"tiny-{mix}.gguf"
    if not out.exists():
        with_random_blocks(tiny_f16, out, MIXES[mix], seed=1)
    return out


def _greedy(model, ids: list[int], n: int) -> list[int]:
    from modelql.runtime.model import KVCache

    cache = KVCache()
    out = [int(model.forward(ids, cache, logits="last")[0].argmax())]
    while len(out) < n:
        out.append(int(model.forward([out[-1]], cache, logits="last")[0].argmax()))
    return out


def _reference(path):
    import transformers as T

    T.logging.set_verbosity_error()
    return T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.parametrize("mix", ["exact", "Q4_K_M"])
def test_greedy_and_logits_agree_with_transformers(tiny_f16, mix):
    from modelql.runtime import load_model

    path = _mixed(tiny_f16, mix)
    ref = _reference(path)
    model = load_model(path)
    assert model.quantized
    layout = max(w.error_rms for w in model.quant.info)
    gen = torch.Generator().manual_seed(0)
    same = total = 0
    worst = 0.0
    for _ in range(6):
        ids = torch.randint(5, ref.config.vocab_size, (1, 12), generator=gen)
        with torch.inference_mode():
            want = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                                do_sample=False, pad_token_id=0)[0, 12:].tolist()
            ref_logits = ref(ids).logits[0]
        got = _greedy(model, ids[0].tolist(), 16)
        same += sum(a == b for a, b in zip(got, want))
        total += len(want)
        logits = model.forward(ids[0], logits="all")[0]
        worst = max(worst, float((logits - ref_logits).abs().max() / ref_logits.abs().max()))
    # the file's own codes and scales (Q6_K: 8-bit codes in blocks of 16, its scales') times float32
    # activations: summation order only
    assert layout == 0.0 and worst < 1e-4 and same == total
