"""Model descriptions (`ModelSpec`) and weight sources (safetensors, GGUF).

Names are imported lazily so the CLI's `modelql.models.gguf_convert` import stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from modelql._lazy import lazy_exports

_EXPORTS = {"ModelSpec": "spec", "RopeSpec": "spec", "TensorMap": "spec", "spec_from_config": "families"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .families import spec_from_config
    from .spec import ModelSpec, RopeSpec, TensorMap


__getattr__ = lazy_exports(__name__, _EXPORTS)
