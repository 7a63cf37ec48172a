"""Hyper-parameters llama.cpp stores indirectly come back as the HF config: Llama-3 RoPE scaling
from the `rope_freqs` divisors, Phi-3 LongRoPE from its factor tensors, windowed Qwen2."""

from __future__ import annotations

import math

import pytest
import torch

from modelql.models.gguf import GgufSource, llama3_rope_from_factors
from modelql.models.gguf_convert import _llama3_rope_factors, convert
from modelql.runtime import load_model


def _hf_llama3_inv_freq(theta, head_dim, scaling, max_pos):
    import transformers as T
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = T.LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_theta=theta,
                        max_position_embeddings=max_pos, rope_scaling=dict(scaling))
    inv, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    return inv.double()


@pytest.mark.parametrize("theta,head_dim,scaling,max_pos", [
    # Llama 3.1 / 3.2 (several frequencies in the smooth band)
    (500000.0, 128, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192}, 131072),
    (500000.0, 64, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}, 131072),
    # the tiny test model: no frequency in the smooth band
    (500000.0, 16, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 32}, 256),
])
def test_llama3_scaling_recovered_from_rope_freqs(theta, head_dim, scaling, max_pos):
    factors = _llama3_rope_factors({**scaling, "rope_theta": theta}, head_dim)
    recovered = llama3_rope_from_factors(factors, theta, head_dim, max_pos)
    assert recovered["rope_type"] == "llama3" and recovered["factor"] == scaling["factor"]
    want = _hf_llama3_inv_freq(theta, head_dim, scaling, max_pos)
    got = _hf_llama3_inv_freq(theta, head_dim, recovered, max_pos)
    assert torch.allclose(got, want, rtol=1e-6, atol=0)


def test_phi3_longrope_round_trip(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    half = 8
    cfg = T.Phi3Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=211, max_position_embeddings=256, pad_token_id=0,
                       original_max_position_embeddings=64,
                       rope_scaling={"type": "longrope", "long_factor": [1.0 + 0.5 * i for i in range(half)],
                                     "short_factor": [1.0 + 0.1 * i for i in range(half)]})
    hf = T.Phi3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
    hf.save_pretrained(tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "m.gguf", "f32").path
    src = GgufSource(path)
    assert src.meta["phi3.rope.scaling.type"] == "longrope"
    rope = src.config["rope_scaling"]
    assert rope["long_factor"] == pytest.approx(cfg.rope_scaling["long_factor"])
    assert rope["short_factor"] == pytest.approx(cfg.rope_scaling["short_factor"])
    assert src.config["original_max_position_embeddings"] == 64
    ids = torch.randint(0, 211, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (load_model(path).forward(ids) - ref).abs().max().item() < 1e-3


def test_qwen2_sliding_window_round_trip(tmp_path):
    import transformers as T

    torch.manual_seed(0)
    cfg = T.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=211, max_position_embeddings=256,
                        use_sliding_window=True, sliding_window=6, max_window_layers=1)
    hf = T.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
    hf.save_pretrained(tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "m.gguf", "f32").path
    model = load_model(path)
    assert model.spec.sliding_window == 6
    ids = torch.randint(0, 211, (1, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
    assert (model.forward(ids) - ref).abs().max().item() < 1e-3


def test_gemma_query_scale_defaults_follow_llama_cpp(tmp_path):
    """Files without attention.scale (llama.cpp's own) scale by head_dim, or n_embd/n_head for 27B."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(path=None, arch="gemma2")
    for key, value in (("block_count", 46), ("embedding_length", 64), ("head_count", 4), ("head_count_kv", 2),
                       ("key_length", 32), ("context_length", 64)):
        getattr(w, f"add_{key}")(value)
    w.add_tensor("token_embd.weight", np.zeros((8, 64), np.float32))
    w.write_header_to_file(path=tmp_path / "g.gguf")
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    cfg = GgufSource(tmp_path / "g.gguf").config
    assert cfg["query_pre_attn_scalar"] == 16  # 27B rule: n_embd / n_head
    assert cfg["attn_logit_softcapping"] == 50.0 and cfg["final_logit_softcapping"] == 30.0
    assert cfg["layer_types"][:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert math.isclose(cfg["rms_norm_eps"], 1e-6)
