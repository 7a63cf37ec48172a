"""The FFN seam: every layer's feed-forward block is computed by an `FfnBackend`."""

from .base import FfnBackend, RoutedFfn, activation
from .dense import DenseFfn

from .walk import FeatureRows, WalkFfn

__all__ = ["FfnBackend", "DenseFfn", "RoutedFfn", "WalkFfn", "FeatureRows", "activation"]
