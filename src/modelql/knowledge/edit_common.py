"""What every INSERT mode shares: the results it returns, the canonical prompt, the layer an
install goes to, and capturing a prompt's FFN input (the KNN key, the COMPOSE contrast rows)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch

from ..errors import CapabilityError, ModelqlError
from ..vindex.overlay import PatchSession


class EditError(ModelqlError):
    """An edit cannot be made (bad argument, no slot, no weights for a weight-level mode)."""


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InsertResult:
    """One inserted fact (fields mirror `POST /v1/insert`'s response)."""

    entity: str
    relation: str
    target: str
    mode: str  # memit | knn | compose | embedding
    layer: int | None
    target_id: int
    confidence: float
    alpha: float | None = None
    feature: int | None = None
    layers: tuple[int, ...] = ()
    key_source: str = "residual"  # residual | embedding
    knn_total: int | None = None
    probability: float | None = None  # COMPOSE: target probability after balancing
    auto_patch: bool = False  # this insert auto-started the recording
    latency_ms: float = 0.0
    inserted: int = 1
    neurons: int = 0  # MEMIT: FFN neurons the batch added (0: a down_proj update)

    def to_json(self) -> dict[str, Any]:
        d = {"entity": self.entity, "relation": self.relation, "target": self.target, "inserted": self.inserted,
             "mode": self.mode, "alpha": self.alpha, "layer": self.layer, "latency_ms": round(self.latency_ms, 1)}
        if self.feature is not None:
            d["feature"] = self.feature
        if self.layers:
            d["layers"] = list(self.layers)
        if self.neurons:
            d["neurons"] = self.neurons
        return d


@dataclass(frozen=True)
class MutationResult:
    """DELETE / UPDATE: how many slots (and KNN facts) changed."""

    kind: str  # delete | update
    features: int
    knn: int = 0
    slots: tuple[tuple[int, int], ...] = ()
    auto_patch: bool = False
    facts: int = 0  # weight-level (MEMIT) facts deleted or updated


@dataclass(frozen=True)
class MergeResult:
    source: str
    target: str
    merged: int
    skipped: int
    strategy: str
    auto_patch: bool = False


def canonical_prompt(relation: str, entity: str) -> str:
    """`P(r, e) = "The " + r (with - and _ as spaces) + " of " + e + " is"` (algorithms §10)."""
    return "The " + relation.replace("-", " ").replace("_", " ") + " of " + entity + " is"


def target_id(vindex, target: str) -> int:
    """First id of `enc(" " + target, add_special_tokens=False)` (0 if none)."""
    ids = vindex.tokenizer.encode(" " + target, add_special_tokens=False)
    return int(ids[0]) if ids else 0


def install_layer(vindex, layer: int | None) -> int:
    """`AT LAYER n` clamped to the model, else `max(knowledge.hi − 1, 0)`."""
    n = vindex.num_layers
    if layer is not None:
        return max(0, min(int(layer), n - 1))
    return max(vindex.bands.knowledge[1] - 1, 0)



def check_text(entity: str, relation: str, target: str) -> None:
    for name, v in (("entity", entity), ("relation", relation), ("target", target)):
        if not isinstance(v, str) or not v.strip():
            raise EditError(f"INSERT needs a non-empty {name}")


def capture(model, prompt: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """`x_L` (the FFN input) at the last position of `prompt` for each layer, float32."""
    ids = model.tokenizer.encode(prompt)
    if not ids:
        raise EditError(f"the prompt {prompt!r} encodes to no tokens")
    got: dict[int, torch.Tensor] = {}

    def grab(layer):
        def fn(t, _n):
            got[layer] = t[0, -1].detach().float().clone()

        return fn

    model.forward([ids], hooks={f"blocks.{l}.ln2.hook_normalized": grab(l) for l in layers}, logits="none")
    return got


def base_model(ps: PatchSession):
    """The base (un-patched) runtime model: dense FFN, no overlay."""
    return ps.base_runtime_model()


def require_weights(ps: PatchSession, what: str) -> None:
    if not ps.has_weights:
        raise CapabilityError(
            f"{what} needs model weights: {ps.base.path.name} is a {ps.base.extract_level}-level "
            f"(browse-only) vindex. Re-extract it with WITH INFERENCE, or use MODE KNN.")



def fact_triples(facts: Iterable[Any]) -> list[tuple[str, str, str]]:
    out = []
    for f in facts:
        if isinstance(f, (tuple, list)) and len(f) == 3:
            e, r, t = f
        else:
            e, r, t = getattr(f, "entity"), getattr(f, "relation"), getattr(f, "target")
        check_text(e, r, t)
        out.append((e.strip(), r.strip(), t.strip()))
    return out

