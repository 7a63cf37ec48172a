"""The torch runtime: forward pass with KV cache, hooks, generation."""

from .loading import load_model
from .model import KVCache, Model

__all__ = ["Model", "KVCache", "load_model"]
