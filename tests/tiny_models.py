"""Tiny random-weight HF models of every supported family, built at test time (no downloads)."""

from __future__ import annotations

import functools
from pathlib import Path

COMMON = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=211, max_position_embeddings=256)

MOE = {**COMMON, "num_hidden_layers": 2, "intermediate_size": 48}


def _configs():
    import transformers as T

    return {
        "llama": lambda: T.LlamaConfig(**COMMON),
        "llama3": lambda: T.LlamaConfig(**COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}, rope_theta=500000.0, tie_word_embeddings=True),
        "mistral": lambda: T.MistralConfig(**COMMON, sliding_window=5),
        "qwen2": lambda: T.Qwen2Config(**COMMON),
        "qwen3": lambda: T.Qwen3Config(**COMMON, head_dim=16),
        "gemma": lambda: T.GemmaConfig(**COMMON, head_dim=16),
        "gemma2": lambda: T.Gemma2Config(**COMMON, head_dim=16, sliding_window=5,
                                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
                                         query_pre_attn_scalar=24),
        "gemma3": lambda: T.Gemma3TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16,
                                             sliding_window=5, sliding_window_pattern=2,
                                             layer_types=["sliding_attention", "full_attention"] * 2,
                                             query_pre_attn_scalar=24,
                                             rope_parameters={
                                                 "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
        "phi3": lambda: T.Phi3Config(**COMMON, pad_token_id=0),
        "gpt2": lambda: T.GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=211, n_positions=256),
        "olmo2": lambda: T.Olmo2Config(**COMMON, pad_token_id=0, eos_token_id=2),
        "olmo3": lambda: T.Olmo3Config(**{**COMMON, "num_hidden_layers": 4}, sliding_window=5, pad_token_id=0,
                                       eos_token_id=2),
        "granite": lambda: T.GraniteConfig(**COMMON, embedding_multiplier=6.0, attention_multiplier=0.05,
                                           residual_multiplier=0.4, logits_scaling=4.0),
        "smollm3": lambda: T.SmolLM3Config(**COMMON, no_rope_layers=[1, 0, 1], pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2),
        "mixtral": lambda: T.MixtralConfig(**MOE, num_local_experts=8, num_experts_per_tok=2, sliding_window=5),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**MOE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                              shared_expert_intermediate_size=48, norm_topk_prob=False),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**MOE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                              head_dim=16, norm_topk_prob=True),
        # Gemma 4: wider full-attention heads with values = keys, the last two layers on shared
        # keys/values (the double-wide FFN there), per-layer embeddings, proportional RoPE
        "gemma4": lambda: T.Gemma4TextConfig(
            **{**COMMON, "num_hidden_layers": 5}, head_dim=16, global_head_dim=32, sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
                         "full_attention"],
            hidden_size_per_layer_input=8, vocab_size_per_layer_input=211, num_kv_shared_layers=2,
            use_double_wide_mlp=True, attention_k_eq_v=True, num_global_key_value_heads=1,
            final_logit_softcapping=30.0),
        # Gemma 4's MoE variant (as 26B-A4B): experts beside the dense FFN, no per-layer embeddings
        "gemma4_moe": lambda: T.Gemma4TextConfig(
            **{**MOE, "num_hidden_layers": 3}, head_dim=16, global_head_dim=32, sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            hidden_size_per_layer_input=0, enable_moe_block=True, num_experts=8, top_k_experts=2,
            moe_intermediate_size=32, attention_k_eq_v=True, num_global_key_value_heads=1,
            final_logit_softcapping=30.0),
        "olmoe": lambda: T.OlmoeConfig(**MOE, num_experts=8, num_experts_per_tok=2,
                                       pad_token_id=0, eos_token_id=2),
    }


FAMILIES = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2"]
#: families the runtime loads from safetensors only (the MoE ones also from GGUF: tests/gguf/test_moe_roundtrip.py)
SAFETENSORS_ONLY = ["olmo2", "olmo3", "granite", "smollm3", "gemma4", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe",
                    "gemma4_moe"]
RUNTIME_FAMILIES = FAMILIES + SAFETENSORS_ONLY


def make_tiny(name: str, directory: Path, seed: int = 0, dtype: str = "float32"):
    """Save a random-weight model of family `name` into `directory`; returns the HF model (eval mode)."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = _configs()[name]()
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():  # HF init leaves norms at 1/0 and biases at 0: randomise all
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
            if p.dim() == 1 and "norm" in "".join(n for n, q in model.named_parameters() if q is p):
                p.add_(1.0 if "gemma" not in name or name.startswith("gemma4") else 0.0)
        for n, b in model.named_buffers():  # Gemma 4's per-block scalar, saved with the weights
            if n.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model


COUNTING_PERIOD = 199  # < vocab_size: counting wraps inside the vocabulary, leaving a few ids unused


def counting_batch(batch: int, length: int, generator, vocab: int = COUNTING_PERIOD):
    """Sequences that count up by one modulo `vocab` from random starts: (start + i) % vocab."""
    import torch

    start = torch.randint(0, vocab, (batch, 1), generator=generator)
    return (start + torch.arange(length)) % vocab


def make_trained_tiny(name: str, directory: Path, steps: int = 30, seed: int = 0):
    """Save a tiny model of family `name`, briefly trained to count (see `counting_batch`), into
    `directory`; returns the HF model (eval mode, float32).

    Random-weight models have nearly flat logits whose top-1 flips under any perturbation; a few
    AdamW steps on a deterministic task give predictions peaked like a trained model's, so
    quantisation fidelity can be judged on greedy agreement. Training is deterministic (seeded, CPU)
    and cached per process: every call with the same arguments saves the same weights."""
    import transformers as T

    config, state = _trained_state(name, steps, seed)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    model.load_state_dict(state)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@functools.lru_cache(maxsize=None)
def _trained_state(name: str, steps: int, seed: int):
    """(config, state dict) after `steps` AdamW steps from transformers' own initialisation."""
    import torch
    import transformers as T

    torch.manual_seed(seed)
    model = T.AutoModelForCausalLM.from_config(_configs()[name](), attn_implementation="eager").train()
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(steps):
        ids = counting_batch(8, 112, generator)
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return model.config, {k: v.detach().clone() for k, v in model.state_dict().items()}
