"""Model descriptions (`ModelSpec`) and weight sources (safetensors, GGUF)."""

from .families import spec_from_config
from .spec import ModelSpec, RopeSpec, TensorMap

__all__ = ["ModelSpec", "RopeSpec", "TensorMap", "spec_from_config"]
