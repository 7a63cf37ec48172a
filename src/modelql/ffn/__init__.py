"""The FFN seam: every layer's feed-forward block is computed by an `FfnBackend`."""

from .base import FfnBackend, activation
from .dense import DenseFfn

__all__ = ["FfnBackend", "DenseFfn", "activation"]
