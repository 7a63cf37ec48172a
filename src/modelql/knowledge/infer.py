"""INFER and EXPLAIN INFER: next-token predictions plus the FFN features that produced them.

The forward pass is the model's own (whatever FFN backend is installed: dense, walk, patched),
so the predictions are exactly what generation would sample from. INFER's per-layer trace queries
each layer's gates with that layer's real FFN input `x_L` (algorithms §7.3), so "features that
fired" means features whose gate scores were largest in this very computation. EXPLAIN INFER
ranks each layer's features by their direct contribution to the predicted token's logit instead
(`FiredFeature.contribution`, the exact split of `knowledge.decode.attribute`): a large gate says a
feature fired, not that it wrote the prediction (on SmolLM2-135M the same late-layer features
have the largest gates for every token).

The KNN override (algorithms §8) is applied after the logits when a retrieval store is given:
the first layer whose captured residual is within cosine 0.75 of a stored key replaces the top
prediction, and the result says so.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from ..errors import CapabilityError, ModelqlError
from ..runtime import interp
from ..runtime.model import Model
from ..vindex.knn_match import KNN_COSINE, knn_override  # noqa: F401 — re-exported

TRACE_K = 20


@dataclass(frozen=True)
class Prediction:
    token: str
    token_id: int
    prob: float


@dataclass(frozen=True)
class Override:
    """A retrieval override that replaced the model's top prediction."""

    target: str
    target_id: int
    cosine: float
    layer: int
    entity: str
    relation: str
    model_top1: Prediction


@dataclass(frozen=True)
class FiredFeature:
    layer: int
    feature: int
    gate: float  # signed g_f · x_L
    top_token: str
    top_tokens: tuple[str, ...]
    relation: str | None = None
    source: str | None = None  # "probe" | "cluster"
    #: direct contribution to the explained token's logit (relative to the mean logit), exact
    #: split at the final norm (`knowledge.decode.attribute`); None where not computed
    contribution: float | None = None


@dataclass(frozen=True)
class AttentionRow:
    """EXPLAIN INFER WITH ATTENTION: one line per layer."""

    layer: int
    feature: FiredFeature | None
    attended_token: str
    attended_position: int
    attention_weight: float
    lens_token: str
    lens_prob: float


@dataclass(frozen=True)
class InferResult:
    prompt: str
    mode: str  # "walk" (the installed FFN, overlays included) or "dense" (base weights)
    predictions: tuple[Prediction, ...]
    override: Override | None
    trace: tuple[FiredFeature, ...]
    elapsed_ms: float
    dense: tuple[Prediction, ...] | None = None
    dense_ms: float | None = None
    attention: tuple[AttentionRow, ...] = ()


def _predictions(model: Model, logits: torch.Tensor, top: int) -> tuple[Prediction, ...]:
    probs = torch.softmax(logits.double(), dim=-1)
    vals, idx = torch.topk(probs, min(top, probs.shape[-1]))
    return tuple(Prediction(model.tokenizer.decode([int(i)]), int(i), float(v)) for v, i in zip(vals, idx))


def _text(model: Model, prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    return model.tokenizer.decode(interp.to_ids(model, prompt)[0].tolist()) if model.tokenizer else ""


def _routed_hits(vindex, layer: int, x: torch.Tensor, experts: Iterable[int], k: int):
    """Gate KNN over the features of `experts` only: in an MoE layer the other experts' features did
    not fire (the router did not choose them), whatever their gate score."""
    from ..vindex.vindex import GateHit

    cand = torch.cat([torch.arange(r.start, r.stop) for r in (vindex.expert_range(layer, e) for e in sorted(experts))])
    scores = vindex.gate_scores(layer, x.float())[cand]
    order = torch.argsort(scores.abs(), descending=True, stable=True)[:k]
    return [GateHit(layer, int(cand[i]), float(scores[i])) for i in order]


def routed_experts(vindex, cache, layer: int) -> set[int] | None:
    """The experts an MoE layer ran at the last position (the shared one too); None: a dense layer."""
    ids = cache.get(f"blocks.{layer}.mlp.hook_expert_ids")
    info = vindex.layer_info(layer)
    if ids is None or not info.num_experts:
        return None
    blocks = info.num_features // info.num_features_per_expert
    return set(ids[-1].tolist()) | ({info.num_experts} if blocks > info.num_experts else set())


def _fired(vindex, labels, layer: int, x: torch.Tensor, n: int, relations_only: bool = False,
           experts: Iterable[int] | None = None) -> list[FiredFeature]:
    hits = vindex.gate_knn(layer, x.float(), TRACE_K) if experts is None else \
        _routed_hits(vindex, layer, x, experts, TRACE_K)
    out = []
    for h in hits:
        meta = vindex.feature_meta(layer, h.feature)
        if meta is None:
            continue
        lab = labels.get(layer, h.feature) if labels is not None else None
        if relations_only and lab is None:
            continue
        out.append(FiredFeature(layer, h.feature, float(h.score), meta.top_token,
                                tuple(t for t, _, _ in meta.top_k[:3]), lab[0] if lab else None,
                                lab[1] if lab else None))
    if relations_only:
        out.sort(key=lambda f: (f.gate <= 0, -abs(f.gate)))
    return out[:n]


def _contributors(vindex, labels, layer: int, x: torch.Tensor, contrib: torch.Tensor, n: int,
                  relations_only: bool = False) -> list[FiredFeature]:
    """The layer's features with the largest direct contribution to the predicted token's logit
    (EXPLAIN INFER: what wrote the prediction, not what merely has a large gate)."""
    vals, idx = torch.topk(contrib, min(TRACE_K + n, contrib.numel()))
    gates = None
    out = []
    for c, f in zip(vals.tolist(), idx.tolist()):
        if len(out) >= n or c <= 0:
            break
        meta = vindex.feature_meta(layer, f)
        if meta is None:
            continue
        lab = labels.get(layer, f) if labels is not None else None
        if relations_only and lab is None:
            continue
        if gates is None:
            gates = vindex.gate_scores(layer, x.float())
        out.append(FiredFeature(layer, f, float(gates[f]), meta.top_token, tuple(t for t, _, _ in meta.top_k[:3]),
                                lab[0] if lab else None, lab[1] if lab else None, round(float(c), 4)))
    return out


def _require(model: Model | None, what: str, vindex=None) -> Model:
    if model is None and vindex is not None:
        if not vindex.has_weights:
            raise CapabilityError(
                f"{what} requires model weights, and {vindex.path.name} is a {vindex.extract_level}-level vindex: "
                f"re-extract it with `modelql extract MODEL -o OUT --level inference`")
        from .queries import model_for

        model = model_for(vindex)
    if model is None:
        raise CapabilityError(f"{what} requires model weights: load a model or a vindex extracted with --level inference")
    if model.tokenizer is None:
        raise ModelqlError(f"{what} needs a tokenizer")
    return model


def _run(model: Model, ids: torch.Tensor, dense: bool, extra: Sequence[str] = ()):
    names = [f"blocks.{i}.ln2.hook_normalized" for i in range(model.spec.num_layers)] + list(extra)
    if model.spec.experts_are_features:
        names += [f"blocks.{i}.mlp.hook_expert_ids" for i in range(model.spec.num_layers)]
    saved = model.ffn
    if dense:  # the base weights: a patched MoE FFN's unedited experts
        model.ffn = model.dense_ffn if model.dense_ffn is not None else getattr(saved, "moe_ffn", saved)
    try:
        logits, cache = interp.run_with_cache(model, ids, names)
    finally:
        model.ffn = saved
    return logits[-1], cache


def infer(model: Model | None, prompt: str, top: int = 5, mode: str = "walk", compare: bool = False,
          vindex=None, knn: Iterable | None = None, per_layer: int = 3) -> InferResult:
    """Top-`top` next tokens of `prompt`, the features that fired per layer, and any KNN override.

    `mode="walk"` uses the model's installed FFN backend (patched overlays included); `"dense"`
    the base weights; `compare=True` adds the dense predictions to a walk result.
    """
    model = _require(model, "INFER", vindex)
    if mode not in ("walk", "dense", "compare"):
        raise ModelqlError(f"mode must be walk, dense or compare, not {mode!r}")
    if mode == "compare":
        mode, compare = "walk", True
    if top < 1:
        raise ModelqlError("TOP must be at least 1")
    ids = interp.to_ids(model, prompt)
    start = time.perf_counter()
    logits, cache = _run(model, ids, dense=mode == "dense")
    preds = _predictions(model, logits, top)
    n = model.spec.num_layers
    residuals = {i: cache[f"blocks.{i}.ln2.hook_normalized"][-1] for i in range(n)}
    override = None
    if knn is not None and mode == "walk":
        hit = knn_override(residuals, knn, _text(model, prompt))
        if hit is not None:
            entry, cos, layer = hit
            target = Prediction(entry.target_token, int(entry.target_id), 1.0)
            override = Override(entry.target_token, int(entry.target_id), cos, layer, entry.entity,
                                entry.relation, preds[0])
            preds = (target,) + tuple(p for p in preds if p.token_id != target.token_id)[: top - 1]
    elapsed = (time.perf_counter() - start) * 1000
    fired: list[FiredFeature] = []
    if vindex is not None:
        from .labels import labels_for

        labels = labels_for(vindex)
        for layer in vindex.layers():
            if layer in residuals:
                fired += _fired(vindex, labels, layer, residuals[layer], per_layer,
                                experts=routed_experts(vindex, cache, layer))
    dense = dense_ms = None
    if compare:
        t0 = time.perf_counter()
        dense = _predictions(model, _run(model, ids, dense=True)[0], top)
        dense_ms = round((time.perf_counter() - t0) * 1000, 1)
    return InferResult(prompt, mode, preds, override, tuple(fired), round(elapsed, 1), dense, dense_ms)


def _attention_rows(model: Model, ids: torch.Tensor, cache: dict, fired: dict[int, FiredFeature],
                    layers: Iterable[int]) -> list[AttentionRow]:
    spec = model.spec
    t = ids.shape[1]
    rows = []
    for layer in layers:
        q = cache[f"blocks.{layer}.attn.hook_q"][:, -1:]  # [nh, 1, hd]
        k = cache[f"blocks.{layer}.attn.hook_k"].repeat_interleave(spec.num_heads // spec.num_kv_heads, 0)
        scores = (q @ k.transpose(-1, -2))[:, 0].float() * spec.query_scale  # [nh, T]
        if spec.attn_softcap is not None:
            scores = torch.tanh(scores / spec.attn_softcap) * spec.attn_softcap
        window = spec.window(layer)
        if window is not None:
            scores[:, : max(0, t - window)] = float("-inf")
        weights = torch.softmax(scores, dim=-1).mean(0)
        pos = int(weights.argmax())
        lens = torch.softmax(model.unembed(cache[f"blocks.{layer}.hook_resid_post"][-1][None]).double(), -1)[0]
        lt = int(lens.argmax())
        rows.append(AttentionRow(layer, fired.get(layer), model.tokenizer.decode([int(ids[0, pos])]), pos,
                                 float(weights[pos]), model.tokenizer.decode([lt]), float(lens[lt])))
    return rows


def explain_infer(model: Model | None, prompt: str, vindex=None, layers: Iterable[int] | None = None,
                  band: str | None = None, top: int = 3, relations_only: bool = False,
                  with_attention: bool = False, knn: Iterable | None = None) -> InferResult:
    """EXPLAIN INFER: the prediction and, per layer, the top `top` features (optionally labelled only)."""
    model = _require(model, "EXPLAIN INFER", vindex)
    if vindex is None:
        raise CapabilityError("EXPLAIN INFER needs a vindex (feature metadata): USE a vindex first")
    ids = interp.to_ids(model, prompt)
    n = model.spec.num_layers
    extra = [f"blocks.{i}.mlp.hook_post" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    if with_attention:
        for i in range(n):
            extra += [f"blocks.{i}.attn.hook_q", f"blocks.{i}.attn.hook_k", f"blocks.{i}.hook_resid_post"]
    start = time.perf_counter()
    logits, cache = _run(model, ids, dense=False, extra=extra)
    preds = _predictions(model, logits, 1)
    residuals = {i: cache[f"blocks.{i}.ln2.hook_normalized"][-1] for i in range(n)}
    override = None
    if knn is not None:
        hit = knn_override(residuals, knn, _text(model, prompt))
        if hit is not None:
            entry, cos, layer = hit
            override = Override(entry.target_token, int(entry.target_id), cos, layer, entry.entity,
                                entry.relation, preds[0])
    elapsed = round((time.perf_counter() - start) * 1000, 1)
    chosen = set(range(n)) if layers is None else set(layers)
    if band not in (None, "all"):
        try:
            chosen &= set(vindex.bands.layers(band))
        except KeyError:
            raise ModelqlError(f"unknown band {band!r} (syntax, knowledge, output or all)") from None
    from .labels import labels_for

    labels = labels_for(vindex)
    fired: list[FiredFeature] = []
    first: dict[int, FiredFeature] = {}
    from .decode import attribute as dla

    pred = preds[0].token_id
    contribs = dla(model, {L: cache[f"blocks.{L}.mlp.hook_post"][-1][None] for L in range(n)},
                   cache[f"blocks.{n - 1}.hook_resid_post"][-1][None], pred)
    for layer in sorted(chosen & set(vindex.layers())):
        got = (_contributors(vindex, labels, layer, residuals[layer], contribs[layer], top, relations_only)
               if layer in contribs else _fired(vindex, labels, layer, residuals[layer], top, relations_only))
        fired += got
        if got:
            first[layer] = got[0]
    attention = tuple(_attention_rows(model, ids, cache, first, sorted(chosen))) if with_attention else ()
    return InferResult(prompt, "walk", preds, override, tuple(fired), elapsed, attention=attention)
