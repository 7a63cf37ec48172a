"""Random-weight models for benchmarks, built once with transformers and cached on disk."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import os
import tempfile
from pathlib import Path

SIZES = {
    # ~100M and ~500M parameter Llama-architecture models (vocab 32000, untied embeddings)
    "100m": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=12),
    "500m": dict(hidden_size=1280, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=20,
                 num_key_value_heads=20),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MODELQL_BENCH_CACHE", Path(tempfile.gettempdir()) / "modelql-bench"))


def random_llama(size: str, seed: int = 0) -> Path:
    """Path of a saved random LlamaForCausalLM of the given size (created on first use)."""
    path = cache_dir() / f"llama-{size}-seed{seed}"
    if (path / "config.json").exists():
        return path
    import torch
    import transformers as T

    torch.manual_seed(seed)
    config = T.LlamaConfig(vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
                           **SIZES[size])
    model = T.LlamaForCausalLM(config)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir().mkdir(parents=True, exist_ok=True) or cache_dir()))
    model.save_pretrained(tmp)
    tmp.rename(path)
    return path
