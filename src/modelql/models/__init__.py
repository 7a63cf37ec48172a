"""Model descriptions (`ModelSpec`) and weight sources (safetensors, GGUF).

Names are imported lazily so the CLI's `modelql.models.gguf_convert` import stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"ModelSpec": "spec", "RopeSpec": "spec", "TensorMap": "spec", "spec_from_config": "families"}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .families import spec_from_config
    from .spec import ModelSpec, RopeSpec, TensorMap


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
