"""Layer bands (syntax / knowledge / output), resolved per vindex-format spec §2.2.

Resolution order, used everywhere: (1) `index.json.layer_bands`; (2) the family table; (3) for
`n ≥ 8` layers the proportional split `s = ⌊2n/5⌋, k = ⌊4n/5⌋`; (4) otherwise every band is the
whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BAND_NAMES = ("syntax", "knowledge", "output")


@dataclass(frozen=True)
class Bands:
    """Inclusive layer ranges `(lo, hi)` of the three bands, and where they came from."""

    syntax: tuple[int, int]
    knowledge: tuple[int, int]
    output: tuple[int, int]
    source: str = "proportional"  # index | family | proportional | whole

    def get(self, name: str) -> tuple[int, int]:
        if name not in BAND_NAMES:
            raise KeyError(name)
        return getattr(self, name)

    def layers(self, name: str) -> range:
        lo, hi = self.get(name)
        return range(lo, hi + 1)

    def band_of(self, layer: int) -> str | None:
        """The first band containing `layer` (syntax, then knowledge, then output), or None."""
        for name in BAND_NAMES:
            lo, hi = self.get(name)
            if lo <= layer <= hi:
                return name
        return None

    def to_json(self) -> dict[str, list[int]]:
        return {name: list(self.get(name)) for name in BAND_NAMES}


def _t(a: int, b: int, c: int, d: int, e: int, f: int) -> tuple[tuple[int, int], ...]:
    return ((a, b), (c, d), (e, f))


# (family, num_layers) → (syntax, knowledge, output)
FAMILY_BANDS: dict[tuple[str, int], tuple[tuple[int, int], ...]] = {
    ("gemma3", 34): _t(0, 13, 14, 27, 28, 33),
    ("gemma3", 42): _t(0, 16, 17, 34, 35, 41),
    ("gemma2", 42): _t(0, 16, 17, 34, 35, 41),
    ("gemma2", 26): _t(0, 10, 11, 20, 21, 25),
    ("gemma2", 46): _t(0, 18, 19, 37, 38, 45),
    ("gemma4", 30): _t(0, 11, 12, 23, 24, 29),
    ("gemma4", 35): _t(0, 13, 14, 27, 28, 34),
    ("gemma4", 36): _t(0, 14, 15, 28, 29, 35),
    ("gemma4", 60): _t(0, 23, 24, 47, 48, 59),
    **{(fam, 32): _t(0, 12, 13, 25, 26, 31) for fam in ("llama", "mistral", "mixtral", "qwen2", "phi")},
    **{(fam, 40): _t(0, 15, 16, 32, 33, 39) for fam in ("llama", "qwen2", "phi")},
    ("llama", 80): _t(0, 31, 32, 63, 64, 79),
    ("qwen2", 80): _t(0, 31, 32, 63, 64, 79),
    ("qwen2", 28): _t(0, 10, 11, 22, 23, 27),
    ("qwen2", 64): _t(0, 25, 26, 51, 52, 63),
    ("gpt2", 12): _t(0, 4, 5, 9, 10, 11),
    ("gpt2", 24): _t(0, 9, 10, 19, 20, 23),
    ("gpt2", 36): _t(0, 14, 15, 28, 29, 35),
    ("gpt2", 48): _t(0, 19, 20, 38, 39, 47),
}

# families whose table rows are shared under another name
_FAMILY_ALIASES = {"phi3": "phi", "gemma3_text": "gemma3", "gemma2_text": "gemma2", "gemma4_text": "gemma4"}


def _from_index(value: Any) -> Bands | None:
    if not isinstance(value, dict):
        return None
    try:
        parts = []
        for name in BAND_NAMES:
            lo, hi = value[name]
            parts.append((int(lo), int(hi)))
    except (KeyError, TypeError, ValueError):
        return None
    return Bands(*parts, source="index")


def resolve_bands(family: str, num_layers: int, layer_bands: Any = None) -> Bands:
    """The bands of a model: index.json value, else the family table, else the proportional split."""
    bands = _from_index(layer_bands)
    if bands is not None:
        return bands
    fam = str(family).removesuffix("_text")
    fam = _FAMILY_ALIASES.get(fam, fam)
    row = FAMILY_BANDS.get((fam, num_layers))
    if row is not None:
        return Bands(*row, source="family")
    n = num_layers
    if n >= 8:
        s, k = (2 * n) // 5, (4 * n) // 5
        return Bands((0, s - 1), (s, k - 1), (k, n - 1), source="proportional")
    return Bands((0, n - 1), (0, n - 1), (0, n - 1), source="whole")
