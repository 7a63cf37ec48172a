"""One feature's page: what it promotes, its label, how its gate scores over the vocabulary are
distributed, and which prompts fire it.

The web browser's feature view (and any Python caller) reads one `FeatureProfile`:

* `top_tokens` — the down vector's top tokens (the vindex's down metadata, as DESCRIBE shows);
* `label` — the probe label, else the cluster label (`labels_for`);
* `histogram` — the signed gate scores `g_f · s·E[t]` over every vocabulary token `t` (the
  embedding-mode query DESCRIBE makes), binned; `top_inputs` the tokens scoring highest;
* `prompts` — the gate score `g_f · x_L` at the last position of each given prompt (the
  pre-FFN normalised residual EXPLAIN uses), highest first, and the score's z within the layer
  (all features of the layer at that position), so "fires" is the scale-free test labelling uses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..errors import ModelqlError

#: bins of the gate-score histogram
BINS = 40
#: prompts scored per request (each is one forward pass)
MAX_PROMPTS = 64


@dataclass(frozen=True)
class PromptFiring:
    prompt: str
    gate: float  # g_f · x_L at the last position
    z: float  # (gate − mean) / std over the layer's features at that position
    rank: int  # 1 = the layer's strongest feature at that position

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "gate_score": round(self.gate, 4), "z": round(self.z, 2), "rank": self.rank}


@dataclass(frozen=True)
class FeatureProfile:
    layer: int
    feature: int
    band: str | None
    label: str | None
    label_source: str | None
    c_score: float | None
    top_token: str | None
    top_tokens: list[tuple[str, float]]
    histogram: list[tuple[float, float, int]]  # (low, high, count)
    top_inputs: list[tuple[str, float]]
    prompts: list[PromptFiring] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "feature": self.feature, "band": self.band, "label": self.label,
                "label_source": self.label_source,
                "c_score": None if self.c_score is None else round(self.c_score, 4), "top_token": self.top_token,
                "top_tokens": [{"token": t, "logit": round(v, 3)} for t, v in self.top_tokens],
                "gate_histogram": [{"low": round(lo, 4), "high": round(hi, 4), "count": c}
                                   for lo, hi, c in self.histogram],
                "top_inputs": [{"token": t, "gate_score": round(v, 4)} for t, v in self.top_inputs],
                "prompts": [p.to_json() for p in self.prompts]}


def _histogram(scores: torch.Tensor, bins: int) -> list[tuple[float, float, int]]:
    lo, hi = float(scores.min()), float(scores.max())
    if hi <= lo:
        return [(lo, hi, int(scores.numel()))]
    counts = torch.histc(scores, bins=bins, min=lo, max=hi)
    step = (hi - lo) / bins
    return [(lo + i * step, lo + (i + 1) * step, int(c)) for i, c in enumerate(counts.tolist())]


def prompt_firings(model, vindex, layer: int, feature: int, prompts: Sequence[str]) -> list[PromptFiring]:
    """Gate score of (layer, feature) at the last position of each prompt, highest first."""
    from ..runtime import interp

    name = f"blocks.{layer}.ln2.hook_normalized"
    out = []
    for p in prompts[:MAX_PROMPTS]:
        if not p.strip():
            continue
        with torch.inference_mode():
            _, cache = interp.run_with_cache(model, p, [name])
        x = cache[name][-1].float()
        scores = vindex.gate_scores(layer, x)
        g = float(scores[feature])
        std = float(scores.std())
        z = (g - float(scores.mean())) / std if std > 0 else 0.0
        out.append(PromptFiring(p, g, z, 1 + int((scores > scores[feature]).sum())))
    return sorted(out, key=lambda f: -f.gate)


def feature_profile(vindex, layer: int, feature: int, *, model=None, prompts: Sequence[str] = (),
                    top: int = 10, bins: int = BINS) -> FeatureProfile:
    """The page of feature `feature` at `layer` (see the module docstring). `model` is needed
    only to score `prompts`."""
    from .labels import labels_for

    if layer not in vindex.layers():
        raise ModelqlError(f"layer {layer} is not in this vindex (layers {min(vindex.layers())}-"
                           f"{max(vindex.layers())})")
    n = vindex.num_features(layer)
    if not 0 <= feature < n:
        raise ModelqlError(f"feature {feature} is outside layer {layer} (0..{n - 1})")
    meta = vindex.feature_meta(layer, feature)
    lab = labels_for(vindex).get(layer, feature)
    g = vindex.gate_row(layer, feature)
    scores = vindex.embeddings() @ g * float(vindex.embed_scale)
    vals, idx = scores.topk(min(top, scores.numel()))
    top_inputs = [(vindex.token_text(int(i)), float(v)) for v, i in zip(vals, idx)]
    bands = getattr(vindex, "bands", None)
    band = bands.band_of(layer) if bands is not None and hasattr(bands, "band_of") else None
    firings = prompt_firings(model, vindex, layer, feature, prompts) if prompts and model is not None else []
    return FeatureProfile(
        layer=layer, feature=feature, band=band, label=lab[0] if lab else None, label_source=lab[1] if lab else None,
        c_score=float(meta.c_score) if meta else None, top_token=meta.top_token if meta else None,
        top_tokens=[(t, float(v)) for t, _i, v in (meta.top_k[:top] if meta else ())],
        histogram=_histogram(scores, bins), top_inputs=top_inputs, prompts=firings)


__all__ = ["FeatureProfile", "PromptFiring", "feature_profile", "prompt_firings", "BINS", "MAX_PROMPTS"]
