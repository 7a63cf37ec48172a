"""Editing knowledge: INSERT (three modes), UPDATE, DELETE, MERGE — all into a patch overlay.

Every function takes a `PatchSession` (`modelql.vindex.overlay`: base vindex + applied patches
+ the recording) and records `.vlp` operations into it; the base files are never touched.
LQL (`INSERT INTO EDGES …`), HTTP (`POST /v1/insert`, `/v1/patches/*`) and Python call these.

    from modelql.vindex import Vindex
    from modelql.vindex.overlay import PatchSession
    from modelql.knowledge import edit
    ps = PatchSession(Vindex.load("model.vindex"))
    edit.insert(ps, "France", "capital", "Lyon")                    # default mode
    edit.insert_many(ps, [("France", "capital", "Lyon"), ...])      # one batch edit
    ps.model()   # runtime model that sees the edits (INFER, generation, TRACE)

Insert modes (algorithms §10; the canonical prompt is `"The <relation> of <entity> is"`):

* ``memit`` — **weight-level** (the default, see below): a rank-k update of the down
  projection, computed by `modelql.knowledge.memit.memit_edit`. Where the key sits is measured
  per model by causal tracing over the first edit's prompts (`knowledge.edit_site`, cached):
  on a pretrained model the subject's last token, in the window of mid layers whose FFNs carry
  the fact (SmolLM2-135M: layers 5–9; `knowledge.memit_subject`, statistics from text the model
  samples itself, `knowledge.generic_text`); on the embedded model the prompt's last token in
  its last layer (one key per training phrasing and target token, regularised by the keys of the
  facts it was trained on). n facts inserted together form one least-squares batch. A batch
  that would change the greedy continuations of generic prompts beyond a bound is refused
  (`memit.fluency_guard`, `FluencyGuardError`). Recorded as modelql `down_delta` ops; the
  patched FFN adds them at run time and COMPILE bakes them into `down_proj`.
* ``knn`` — retrieval override (the reference default, §10.1): the FFN input `x_l` of the
  canonical prompt is stored as a key; INFER replaces its top prediction when a captured
  residual is within cosine 0.75 of a key. No weights change (`insert_knn` ops).
* ``compose`` — feature-slot install (§10.2, its slot choice, balancing and cross-fact check):
  a free (or the weakest) feature of layer `l` becomes a key → value memory. The key (gate and
  up) is a ridge-regression direction that reads ≈ +1 on the relation's phrasings about the
  entity and ≈ −1 on other entities' phrasings, the entity's other relations, decoy prompts
  and the layer's other installs, so that, scaled by `GATE_ON`, the slot is off everywhere
  else; the reference's Gram–Schmidt against the other installs' prompts left almost nothing of
  a gate once two installs shared a template (0% efficacy at 50, weakness §15.5). The value
  (down) is the residual write δ optimised so the phrasings predict the target (`memit.
  target_deltas`), ALPHA scaling it relative to the default 0.10, then balanced so the target
  probability lands in [0.30, 0.95] (`insert` ops with vectors). Without weights: the
  reference's embedding mode (a gate on the entity vector, no down).

How the default and its parameters were chosen — every configuration measured, on the embedded
model and on a real pretrained one (SmolLM2-135M-Instruct) — is recorded in
`modelql.knowledge.edit_record`.

"""

from __future__ import annotations

import re
import time
import uuid
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import CapabilityError, ModelqlError
from ..vindex import patch as vlp
from ..vindex.overlay import PatchSession
from . import mutations as _mut
from .mutations import MatchedEdit, MatchedKnn, MatchedSlot, Matches, delete_ops, update_ops

#: Insert modes, and the default chosen by measurement (module docstring, bench/edit.py).
MODES = ("memit", "knn", "compose")
DEFAULT_MODE = "memit"
MODE_ALIASES = {"memit": "memit", "weights": "memit", "weight": "memit", "rome": "memit",
                "knn": "knn", "compose": "compose"}

KNN_DEFAULT_CONFIDENCE = 1.0
COMPOSE_DEFAULT_CONFIDENCE = _mut.COMPOSE_DEFAULT_CONFIDENCE
COMPOSE_DEFAULT_ALPHA = 0.10
GATE_SCALE = 30.0
NORM_SAMPLE = 100
BALANCE_MAX = 16
BALANCE_TOP = 200
BALANCE_FLOOR = 0.30
BALANCE_CEILING = 0.95
AMPLIFY = 1.6
SHRINK = 0.7
STALE_LIMIT = 2
CROSS_PASSES = 8
CROSS_PRIORS = 16
CROSS_FLOOR = 0.20
CONTRAST_PHRASINGS = 3
CONTRAST_ENTITIES = 120
CONTRAST_RIDGE = 1e-3
GATE_ON = 10.0
FIXED_DECOYS = (
    "Once upon a time", "The quick brown fox", "To be or not to be", "Water is a", "A long time ago",
    "In the beginning", "The weather today is", "She opened the door and", "He looked at the sky",
    "The children played in the",
)


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

    def to_json(self) -> dict[str, Any]:
        d = {"entity": self.entity, "relation": self.relation, "target": self.target, "inserted": self.inserted,
             "mode": self.mode, "alpha": self.alpha, "layer": self.layer, "latency_ms": round(self.latency_ms, 1)}
        if self.feature is not None:
            d["feature"] = self.feature
        if self.layers:
            d["layers"] = list(self.layers)
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


# ---------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------


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


def resolve_mode(mode: str | None) -> str:
    if mode is None:
        return DEFAULT_MODE
    m = MODE_ALIASES.get(str(mode).strip().lower())
    if m is None:
        raise EditError(f"unknown insert mode {mode!r} (use {', '.join(m.upper() for m in MODES)})")
    return m


def _check_text(entity: str, relation: str, target: str) -> None:
    for name, v in (("entity", entity), ("relation", relation), ("target", target)):
        if not isinstance(v, str) or not v.strip():
            raise EditError(f"INSERT needs a non-empty {name}")


def _capture(model, prompt: str, layers: Sequence[int]) -> dict[int, torch.Tensor]:
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


def _base_model(ps: PatchSession):
    """The base (un-patched) runtime model: dense FFN, no overlay."""
    return ps.base_runtime_model()


def _require_weights(ps: PatchSession, what: str) -> None:
    if not ps.has_weights:
        raise CapabilityError(
            f"{what} needs model weights: {ps.base.path.name} is a {ps.base.extract_level}-level "
            f"(browse-only) vindex. Re-extract it with WITH INFERENCE, or use MODE KNN.")


# ---------------------------------------------------------------------------------------------
# INSERT
# ---------------------------------------------------------------------------------------------


def insert(ps: PatchSession, entity: str, relation: str, target: str, layer: int | None = None,
           confidence: float | None = None, alpha: float | None = None, mode: str | None = None,
           **hparams) -> InsertResult:
    """INSERT one fact into the overlay (see the module docstring for the modes)."""
    return insert_many(ps, [(entity, relation, target)], layer=layer, confidence=confidence, alpha=alpha,
                       mode=mode, **hparams)[0]


def _facts(facts: Iterable[Any]) -> list[tuple[str, str, str]]:
    out = []
    for f in facts:
        if isinstance(f, (tuple, list)) and len(f) == 3:
            e, r, t = f
        else:
            e, r, t = getattr(f, "entity"), getattr(f, "relation"), getattr(f, "target")
        _check_text(e, r, t)
        out.append((e.strip(), r.strip(), t.strip()))
    return out


def insert_many(ps: PatchSession, facts: Iterable[Any], layer: int | None = None,
                confidence: float | None = None, alpha: float | None = None, mode: str | None = None,
                **hparams) -> list[InsertResult]:
    """INSERT many facts. MEMIT edits them together (one batch least-squares solve: better than
    sequential edits, which each see the previous ones as part of the model); KNN and COMPOSE
    install them one after the other. Facts are `(entity, relation, target)` tuples or objects."""
    items = _facts(facts)
    if not items:
        return []
    m = resolve_mode(mode)
    if confidence is not None and not (0.0 <= float(confidence) <= 1e6):
        raise EditError("CONFIDENCE must be a non-negative number")
    if m == "memit":
        return _insert_memit(ps, items, layer, confidence, hparams)
    if m == "knn":
        return [_insert_knn(ps, e, r, t, layer, confidence) for e, r, t in items]
    return [_insert_compose(ps, e, r, t, layer, confidence, alpha) for e, r, t in items]


# -- KNN -----------------------------------------------------------------------------------------


def _insert_knn(ps: PatchSession, entity: str, relation: str, target: str, layer: int | None,
                confidence: float | None) -> InsertResult:
    t0 = time.perf_counter()
    vx = ps.view
    l = install_layer(vx, layer)
    tid = target_id(vx, target)
    conf = KNN_DEFAULT_CONFIDENCE if confidence is None else float(confidence)
    if ps.has_weights:
        key = _capture(ps.model(), canonical_prompt(relation, entity), [l]).get(l)
        if key is None:
            raise EditError(f"no residual captured at layer {l}")
        source = "residual"
    else:
        from .queries import entity_vector

        key = entity_vector(vx, entity)
        if key is None:
            raise EditError(f"entity {entity!r} has no tokens in this vocabulary")
        source = "embedding"
    op = vlp.InsertKnnOp(l, entity, relation, target, tid, key.numpy().astype(np.float32), conf)
    auto = ps.record([op])
    return InsertResult(entity, relation, target, "knn", l, tid, conf, layers=(l,), key_source=source,
                        knn_total=len(ps.state.knn), auto_patch=auto,
                        latency_ms=(time.perf_counter() - t0) * 1000)


# -- MEMIT ---------------------------------------------------------------------------------------


def _insert_memit(ps: PatchSession, items: list[tuple[str, str, str]], layer: int | None,
                  confidence: float | None, hparams: dict) -> list[InsertResult]:
    t0 = time.perf_counter()
    _require_weights(ps, "a weight-level INSERT (MODE MEMIT)")
    from . import memit as M

    model = ps.model()
    layers, params = _memit_args(ps, layer, hparams)
    requests = [M.EditRequest(e, r, t) for e, r, t in items]
    deltas = M.memit_edit(model, requests, layers=layers, params=params)
    edit_id = uuid.uuid4().hex[:12]
    conf = None if confidence is None else float(confidence)
    ops = [vlp.DownDeltaOp(int(d.layer), d.u.detach().float().numpy().astype(np.float32),
                           d.v.detach().float().numpy().astype(np.float32),
                           entity=tuple(e for e, _, _ in items), relation=tuple(r for _, r, _ in items),
                           target=tuple(t for _, _, t in items), edit_id=edit_id, method="memit",
                           confidence=conf)
           for d in deltas]
    auto = ps.record(ops)
    used = tuple(sorted(int(d.layer) for d in deltas))
    ms = (time.perf_counter() - t0) * 1000
    vx = ps.view
    return [InsertResult(e, r, t, "memit", used[-1] if used else None, target_id(vx, t),
                         1.0 if conf is None else conf, layers=used, auto_patch=auto and i == 0,
                         latency_ms=ms / len(items))
            for i, (e, r, t) in enumerate(items)]


def _memit_args(ps: PatchSession, layer: int | None, hparams: dict):
    """(edit layers, MemitParams) of an INSERT: `AT LAYER`, else the hyper-parameters' `layers`,
    else MEMIT's default; the other hyper-parameters override `MemitParams` fields."""
    from . import memit as M

    hparams = dict(hparams)
    layers = [install_layer(ps.view, layer)] if layer is not None else None
    if "layers" in hparams:
        layers = list(hparams.pop("layers"))
    params = hparams.pop("params", None)
    if hparams:
        import dataclasses

        params = dataclasses.replace(params or M.MemitParams(), **hparams)
    return layers, params


def memit_statistics_ready(ps: PatchSession, layer: int | None = None, **hparams) -> bool:
    """Whether a weight-level INSERT finds the model's statistics cached; the first one on a
    model computes them (tens of seconds on the embedded model), so LQL shows progress around
    `prepare_memit_statistics` first. True without weights (the INSERT will refuse anyway)."""
    from . import memit as M

    if not ps.has_weights:
        return True
    return M.statistics_ready(ps.model(), *_memit_args(ps, layer, hparams))


def prepare_memit_statistics(ps: PatchSession, layer: int | None = None, facts: Iterable[Any] = (),
                             **hparams) -> None:
    """Compute the model's edit site (traced over `facts`' own prompts when given) and statistics."""
    from . import memit as M

    _require_weights(ps, "a weight-level INSERT (MODE MEMIT)")
    reqs = [M.EditRequest(e, r, t) for e, r, t in _facts(facts)] if facts else []
    M.prepare_statistics(ps.model(), *_memit_args(ps, layer, hparams), requests=reqs)


# -- COMPOSE -------------------------------------------------------------------------------------


def _median(values: Iterable[float]) -> float:
    vs = sorted(v for v in values if np.isfinite(v) and v > 0)
    return vs[len(vs) // 2] if vs else 1.0


def _unit(v: torch.Tensor) -> torch.Tensor:
    n = float(v.norm())
    return v / n if n >= 1e-8 else v


def _compose_cache(ps: PatchSession) -> dict:
    return ps.caches.setdefault("compose", {"decoys": {}, "installs": {}, "norms": {}, "order": []})


def _decoys(ps: PatchSession, layer: int, relation: str, entity: str) -> torch.Tensor:
    """Decoy residuals at `layer` (base model): the 10 fixed prompts plus 10 template decoys."""
    cache = _compose_cache(ps)["decoys"]
    key = (layer, relation, entity.casefold())
    if key in cache:
        return cache[key]
    base = _base_model(ps)
    fixed_key = (layer, None, None)
    if fixed_key not in cache:
        cache[fixed_key] = torch.stack([_capture(base, p, [layer])[layer] for p in FIXED_DECOYS])
    vx = ps.view
    texts = vx.vocab_texts() if hasattr(vx, "vocab_texts") else None
    words = []
    for i in range(min(vx.vocab_size, 5000)):
        w = texts[i] if texts is not None else vx.token_text(i)
        if len(w.encode("utf-8")) >= 3 and w.isalpha() and w.casefold() != entity.casefold():
            words.append(w)
            if len(words) == 10:
                break
    tmpl = [_capture(base, canonical_prompt(relation, w), [layer])[layer] for w in words]
    out = torch.cat([cache[fixed_key]] + ([torch.stack(tmpl)] if tmpl else []))
    cache[key] = out
    return out


def _gate_norm(ps: PatchSession, layer: int) -> float:
    """Median gate-row norm of the layer's first features (the embedding-mode gate's scale)."""
    cache = _compose_cache(ps)["norms"]
    if layer not in cache:
        cache[layer] = _median(ps.base.gate(layer)[: min(ps.base.num_features(layer), NORM_SAMPLE)].norm(dim=1).tolist())
    return cache[layer]


def _free_slot(ps: PatchSession, layer: int, within: range | None = None) -> int:
    """First feature with no base metadata and no overlay gate; else the weakest real feature
    (lowest base c_score) without an overlay gate. `within`: only those features (one expert's)."""
    top, c, present = ps.base.meta_arrays(layer)
    n = ps.base.num_features(layer)
    allowed = range(n) if within is None else within
    taken = {f for (l, f), s in ps.state.slots.items() if l == layer and (s.gate is not None or s.tombstone)}
    present = np.asarray(present, dtype=bool)
    for f in allowed:
        if (f >= len(present) or not present[f]) and f not in taken:
            return f
    order = np.argsort(np.asarray(c, dtype=np.float64), kind="stable")
    for f in order.tolist():
        if f not in taken and f in allowed:
            return int(f)
    raise EditError("no free feature slots in target layers")


def target_probability(model, prompt: str, target: str, top: int = BALANCE_TOP) -> float:
    """Probability of the first of the top-`top` predictions whose text contains `target` or
    starts with its first 3 characters (0 if none)."""
    ids = model.tokenizer.encode(prompt)
    probs = torch.softmax(model.forward([ids], logits="last")[0].double(), -1)
    vals, idx = torch.topk(probs, min(top, probs.shape[-1]))
    t = target.strip()
    head = t[:3]
    for p, i in zip(vals.tolist(), idx.tolist()):
        text = model.tokenizer.decode([i]).strip()
        if text and (t in text or text.startswith(head)):
            return float(p)
    return 0.0


def _residuals(model, prompts: Sequence[str], layer: int) -> torch.Tensor:
    """`x_L` (FFN input) at the last position of each prompt: [len(prompts), H]."""
    from ..runtime.interp import last_activations

    return last_activations(model, prompts, f"blocks.{layer}.ln2.hook_normalized")


def _contrast_negatives(ps: PatchSession, layer: int, relation: str, entity: str) -> torch.Tensor:
    """What a COMPOSE gate must stay silent on (base model, cached per layer and relation): the
    fixed decoy prompts, the relation's phrasings about other entities (the facts table's, which
    are names every English model knows, and the reference's template decoys), and this entity
    with the other relations."""
    from .. import defaults as D
    from .memit import relation_templates

    cache = _compose_cache(ps)["decoys"]
    key = ("contrast", layer, relation)
    base = _base_model(ps)
    if key not in cache:
        tpls = relation_templates(relation)[:CONTRAST_PHRASINGS]
        ents = sorted({f.entity for f in D.facts()})
        ents = ents[:: max(1, len(ents) // CONTRAST_ENTITIES)]
        prompts = [(e, D.prompt(t, e)) for e in ents for t in tpls]
        cache[key] = ([e for e, _ in prompts], _residuals(base, [p for _, p in prompts], layer))
    owners, same_rel = cache[key]
    keep = torch.tensor([o.casefold() != entity.casefold() for o in owners])
    other_rel = [D.prompt(t[0], entity) for r, t in D.TRAIN_TEMPLATES.items() if r != relation]
    return torch.cat([_decoys(ps, layer, relation, entity), same_rel[keep], _residuals(base, other_rel, layer)])


def _contrast_gate(pos: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
    """Ridge least squares: g with g·x ≈ 1 on the positive rows and ≈ -1 on the negative ones
    (scaled by GATE_ON, a negative pre-activation switches the slot off: SiLU(-10) ≈ -5e-4)."""
    x = torch.cat([pos, neg]).double()
    y = torch.cat([torch.ones(len(pos)), -torch.ones(len(neg))]).double()
    w = torch.cat([torch.full((len(pos),), len(neg) / len(pos)), torch.ones(len(neg))]).double()  # classes weigh alike
    a = x.T @ (w[:, None] * x)
    a = a + CONTRAST_RIDGE * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a, x.T @ (w * y)).float()


def _token_probability(model, prompt: str, token_id: int) -> float:
    return float(torch.softmax(model.forward([model.tokenizer.encode(prompt)], logits="last")[0].double(), -1)[token_id])


def _insert_compose(ps: PatchSession, entity: str, relation: str, target: str, layer: int | None,
                    confidence: float | None, alpha: float | None) -> InsertResult:
    t0 = time.perf_counter()
    vx = ps.view
    l = install_layer(vx, layer)
    tid = target_id(vx, target)
    conf = COMPOSE_DEFAULT_CONFIDENCE if confidence is None else float(confidence)
    a = COMPOSE_DEFAULT_ALPHA if alpha is None else float(alpha)
    meta = vlp.DownMeta(target, tid, conf)
    f = _free_slot(ps, l)
    if not ps.has_weights:  # embedding mode (§10.2 without weights): a gate on the entity vector only
        from .queries import entity_vector

        r = entity_vector(vx, entity)
        if r is None:
            raise EditError(f"entity {entity!r} has no tokens in this vocabulary")
        gate = GATE_SCALE * _gate_norm(ps, l) * _unit(r)
        auto = ps.record([vlp.InsertOp(l, f, entity=entity, target=target, relation=relation, confidence=conf,
                                       gate=gate.numpy().astype(np.float32), down_meta=meta)])
        return InsertResult(entity, relation, target, "embedding", l, tid, conf, alpha=a, feature=f, layers=(l,),
                            key_source="embedding", auto_patch=auto, latency_ms=(time.perf_counter() - t0) * 1000)

    from . import memit as M

    base = _base_model(ps)
    prompt = canonical_prompt(relation, entity)
    phrasings = [prompt] + [t.replace("{X}", entity) for t in M.relation_templates(relation)
                            if t.replace("{X}", entity) != prompt]
    pos = _residuals(base, phrasings, l)
    if base.spec.moe is not None and base.dense_ffn is None:
        # a MoE layer: the slot goes into the expert the canonical prompt is routed to, where
        # the compiled model will run it too
        _, ids = base.ffn.route(l, pos[:1])
        f = _free_slot(ps, l, ps.base.expert_range(l, int(ids[0, 0])))
    cache = _compose_cache(ps)
    installs: dict[int, dict[int, dict]] = cache["installs"]
    priors = [(info, target_probability(ps.model(), info["prompt"], info["target"]))
              for info in (installs.get(pl, {}).get(pf) for pl, pf in cache["order"][-CROSS_PRIORS:])
              if info is not None]
    layer_installs = installs.setdefault(l, {})
    layer_installs[f] = {"pos": pos, "neg": _contrast_negatives(ps, l, relation, entity), "target": target,
                         "prompt": prompt}
    cache["order"].append((l, f))
    # key: every install of the layer is (re)fitted against its negatives and the others' phrasings
    vecs = {}
    for fi, info in layer_installs.items():
        g = _contrast_gate(info["pos"], torch.cat([info["neg"]] + [v["pos"] for fj, v in layer_installs.items()
                                                                    if fj != fi]))
        vecs[fi] = (GATE_ON * g).numpy().astype(np.float32), g.numpy().astype(np.float32)
    ops: list[vlp.Op] = [vlp.UpdateOp(l, fi, gate=g_i, up=u_i) for fi, (g_i, u_i) in vecs.items() if fi != f]
    gate, up = vecs[f]
    # value: the write δ that makes every phrasing predict the target's first token (ROME's v*),
    # divided by the slot's activation on the canonical prompt
    act = float((base.dense_ffn or base.ffn).act(torch.tensor(float(gate @ pos[0].numpy()))))
    if base.spec.gated_ffn:
        act *= float(up @ pos[0].numpy())
    req = M.EditRequest(entity, relation, target)
    sites = M.edit_sites(base, [req], {req: M.relation_templates(relation)})
    delta = M.target_deltas(ps.model(), [req], sites.subset({0}), l, M.MemitParams().resolved("last"))[0]
    down = (a / COMPOSE_DEFAULT_ALPHA) * delta / (act if abs(act) > 1e-6 else 1e-6)
    ins = vlp.InsertOp(l, f, entity=entity, target=target, relation=relation, confidence=conf, gate=gate, up=up,
                       down=down.numpy().astype(np.float32), down_meta=meta)
    auto = ps.record(ops + [ins])
    model = ps.model()

    def set_down(vec: torch.Tensor) -> None:
        ps.record([vlp.UpdateOp(l, f, down=vec.numpy().astype(np.float32))])

    # balance the down vector so the target probability lands in [floor, ceiling]; progress is
    # judged on the target token's own probability (the top-200 text match reads 0 until it ranks)
    p, q = target_probability(model, prompt, target), _token_probability(model, prompt, tid)
    best_q, best_p, best_down, stale = -1.0, p, None, 0
    for _ in range(BALANCE_MAX):
        if BALANCE_FLOOR <= p <= BALANCE_CEILING:
            break
        if p < BALANCE_FLOOR:
            if q > best_q:
                best_q, best_p, best_down, stale = q, p, down.clone(), 0
            else:
                stale += 1
                if stale >= STALE_LIMIT:
                    break
            down = down * AMPLIFY
        else:
            down = down * SHRINK
        set_down(down)
        p, q = target_probability(model, prompt, target), _token_probability(model, prompt, tid)
    if not (BALANCE_FLOOR <= p <= BALANCE_CEILING) and best_down is not None:
        down, p = best_down, best_p
        set_down(down)
    # cross-fact check: earlier installs must keep their targets. Only an install this one
    # pushed below the floor counts (the reference counts any, so one weak install shrank every
    # later one)
    for _ in range(CROSS_PASSES):
        if not any(target_probability(model, info["prompt"], info["target"]) < CROSS_FLOOR
                   for info, before in priors if before >= CROSS_FLOOR):
            break
        down = down * SHRINK
        set_down(down)
    p = target_probability(model, prompt, target)
    # the recording keeps one insert op carrying the final vectors (no intermediate updates)
    final = vlp.InsertOp(l, f, entity=entity, target=target, relation=relation, confidence=conf, gate=gate, up=up,
                         down=down.numpy().astype(np.float32), down_meta=meta)
    _replace_tail(ps, ins, final)
    return InsertResult(entity, relation, target, "compose", l, tid, conf, alpha=a, feature=f, layers=(l,),
                        probability=p, auto_patch=auto, latency_ms=(time.perf_counter() - t0) * 1000)


def _replace_tail(ps: PatchSession, first: vlp.Op, final: vlp.Op) -> None:
    """Collapse the recording's ops from `first` on into `final` (balancing updates folded in)."""
    rec = ps.recording
    if rec is None:
        return
    for i in range(len(rec.ops) - 1, -1, -1):
        if rec.ops[i] is first:
            rec.ops[i:] = [final]
            break
    ps.rebuild()


# ---------------------------------------------------------------------------------------------
# WHERE filters: DELETE / UPDATE candidates (algorithms §11)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    field: str
    op: str
    value: Any


def _conds(where: Iterable[Any]) -> list[Where]:
    out = []
    for c in where:
        if isinstance(c, Where):
            out.append(c)
        elif isinstance(c, (tuple, list)) and len(c) == 3:
            out.append(Where(str(c[0]).lower(), str(c[1]).upper(), c[2]))
        elif isinstance(c, dict):
            for k, v in c.items():
                out.append(Where(str(k).lower(), "=", v))
        else:
            op = getattr(c, "op", "=")
            out.append(Where(str(getattr(c, "field")).lower(), str(getattr(op, "value", op)).upper(),
                             getattr(c, "value")))
    return out


def _like(pattern: str, text: str) -> bool:
    regex = "^" + ".*".join(re.escape(p) for p in str(pattern).lower().split("%")) + "$"
    return re.match(regex, text.lower(), re.S) is not None


def _num(op: str, a: float, b: Any) -> bool:
    if op == "IN":
        vals = b if isinstance(b, (tuple, list)) else (b,)
        return any(_num("=", a, v) for v in vals)
    try:
        bv = float(b)
    except (TypeError, ValueError):
        raise EditError(f"expected a number, got {b!r}") from None
    ops = {"=": a == bv, "!=": a != bv, ">": a > bv, "<": a < bv, ">=": a >= bv, "<=": a <= bv}
    if op not in ops:
        raise EditError(f"operator {op} is not valid for numbers")
    return ops[op]


def _relation_match(op: str, label: str | None, value: Any) -> bool:
    lab = (label or "").lower()
    if op == "LIKE":
        return bool(lab) and _like(str(value), lab)
    v = str(value).lower()
    hit = bool(lab) and (v in lab or lab in v)
    if op == "=":
        return hit
    if op == "!=":
        return bool(lab) and not hit
    raise EditError(f"unsupported relation predicate operator: {op}")


_FIELDS = {"entity", "relation", "layer", "feature", "confidence", "c_score", "score", "token", "top_token",
           "target"}


def candidates(ps: PatchSession, where: Iterable[Any]) -> list[tuple[int, int]]:
    """The slots a WHERE clause selects (algorithms §11), on the effective (overlay) state."""
    conds = _conds(where)
    for c in conds:
        if c.field not in _FIELDS:
            raise EditError(f"unknown field {c.field!r} in WHERE (use entity, relation, layer, feature)")
    vx = ps.view
    eq = {c.field: c.value for c in conds if c.op == "="}
    if isinstance(eq.get("layer"), int) and isinstance(eq.get("feature"), int) and not any(
            c.field in ("entity", "relation", "token", "top_token", "target") for c in conds):
        L, f = int(eq["layer"]), int(eq["feature"])
        if L not in vx.layers() or not 0 <= f < vx.num_features(L):
            return []
        others = [c for c in conds if c.field not in ("layer", "feature")]
        if not others:
            return [(L, f)]
    rel_conds = [c for c in conds if c.field == "relation"]
    labels = None
    if rel_conds:
        from .labels import labels_for

        labels = labels_for(vx)
        if not labels.probe and not labels.cluster_of and not any(s.relation for s in ps.state.slots.values()):
            raise NoRelationLabels("relation filters require relation labels for the active vindex; "
                                   "target by layer/feature or omit relation")
        for c in rel_conds:
            if c.op not in ("=", "!=", "LIKE"):
                raise EditError(f"unsupported relation predicate operator: {c.op}")
    ent_conds = [c for c in conds if c.field in ("entity", "token", "top_token", "target")]
    out = []
    for L in vx.layers():
        if not all(_num(c.op, L, c.value) for c in conds if c.field == "layer"):
            continue
        top, cs, present = vx.meta_arrays(L)
        present = np.asarray(present, dtype=bool)
        idx = np.nonzero(present)[0]
        # entity = substring of the top token (or the entity an overlay insert carries)
        for f in idx.tolist():
            if not all(_num(c.op, f, c.value) for c in conds if c.field == "feature"):
                continue
            if not all(_num(c.op, float(cs[f]), c.value) for c in conds
                       if c.field in ("confidence", "c_score", "score")):
                continue
            if ent_conds:
                meta = vx.feature_meta(L, f)
                tok = meta.top_token if meta is not None else ""
                ins_entity = _inserted_entity(ps, L, f)
                ok = True
                for c in ent_conds:
                    v = str(c.value)
                    if c.op == "LIKE":
                        hit = _like(v, tok) or (ins_entity is not None and _like(v, ins_entity))
                    else:
                        hit = v.lower() in tok.lower() or (
                            c.field == "entity" and ins_entity is not None and ins_entity.lower() == v.lower())
                        if c.op == "!=":
                            hit = not hit
                        elif c.op != "=":
                            raise EditError(f"operator {c.op} is not valid for {c.field}")
                    ok = ok and hit
                if not ok:
                    continue
            if rel_conds:
                lab = ps.state.slots.get((L, f)).relation if (L, f) in ps.state.slots else None
                lab = lab or labels.label(L, f)
                if not all(_relation_match(c.op, lab, c.value) for c in rel_conds):
                    continue
            out.append((L, f))
    return out


class NoRelationLabels(EditError):
    """A relation filter on slots of a vindex without relation labels."""


def _inserted_entity(ps: PatchSession, layer: int, feature: int) -> str | None:
    for _src, op in reversed(ps.state.writes.get((layer, feature), [])):
        if op.op == "insert":
            return op.entity
    return None


def _knn_matches(ps: PatchSession, where: Iterable[Any]) -> list[str]:
    """Entities of KNN facts a WHERE clause selects (entity `=`, optional relation/layer)."""
    conds = _conds(where)
    ents = [c for c in conds if c.field == "entity" and c.op == "="]
    if not ents:
        return []
    out = []
    for e in ps.state.knn:
        if not all(e.entity.casefold() == str(c.value).casefold() for c in ents):
            continue
        if not all(_num(c.op, e.layer, c.value) for c in conds if c.field == "layer"):
            continue
        if not all(_relation_match(c.op, e.relation, c.value) for c in conds if c.field == "relation"):
            continue
        if e.entity not in out:
            out.append(e.entity)
    return out


def _edit_matches(ps: PatchSession, where: Iterable[Any]) -> tuple[MatchedEdit, ...]:
    """The weight-level edits of the overlay holding facts a WHERE selects. A fact matches on
    its entity (`=` case-insensitive equality, `!=`, LIKE), relation (as slot labels do), target
    (`=` containment, `!=`, LIKE), layer (the edit's layers) and confidence; a feature filter
    never matches (the fact has no slot), and a WHERE without an entity, relation or target
    condition addresses slots only."""
    conds = _conds(where)
    if not any(c.field in ("entity", "relation", "target", "token", "top_token") for c in conds):
        return ()
    if any(c.field == "feature" for c in conds):
        return ()

    def text_ok(c: Where, value: str, equal: bool) -> bool:
        v = str(c.value)
        if c.op == "LIKE":
            return _like(v, value)
        hit = value.casefold() == v.casefold() if equal else v.casefold() in value.casefold()
        if c.op == "=":
            return hit
        if c.op == "!=":
            return not hit
        raise EditError(f"operator {c.op} is not valid for {c.field}")

    ops: dict[str, list[vlp.DownDeltaOp]] = {}
    for deltas in ps.state.deltas.values():
        for d in deltas:
            if d.op is not None and d.op.edit_id is not None:
                ops.setdefault(d.op.edit_id, []).append(d.op)
    out = []
    for edit_id, group in ops.items():
        first = group[0]
        layers = tuple(sorted({o.layer for o in group}))
        conf = 1.0 if first.confidence is None else float(first.confidence)
        if not all(any(_num(c.op, l, c.value) for l in layers) for c in conds if c.field == "layer"):
            continue
        if not all(_num(c.op, conf, c.value) for c in conds if c.field in ("confidence", "c_score", "score")):
            continue
        hits = []
        for i, (e, r, t) in enumerate(first.facts()):
            if all(text_ok(c, e, True) for c in conds if c.field == "entity") and \
                    all(text_ok(c, t, False) for c in conds if c.field in ("target", "token", "top_token")) and \
                    all(_relation_match(c.op, r, c.value) for c in conds if c.field == "relation"):
                hits.append(i)
        if hits:
            out.append(MatchedEdit(edit_id, layers, tuple(first.facts()), tuple(hits), first.confidence))
    return tuple(out)


def _reinsert(ps: PatchSession, edits: Sequence[MatchedEdit], target: str | None = None,
              confidence: float | None = None, update: bool = False) -> None:
    """After their `delete_edit`: re-insert each edit's remaining facts (DELETE) or its facts
    with the matched ones changed (UPDATE) as a new weight-level batch in the same layers."""
    for e in edits:
        facts = e.updated(target) if update else e.kept()
        if facts:
            insert_many(ps, facts, mode="memit", layers=list(e.layers),
                        confidence=confidence if confidence is not None else e.confidence)


# ---------------------------------------------------------------------------------------------
# DELETE / UPDATE / MERGE
# ---------------------------------------------------------------------------------------------


def match(ps: PatchSession, where: Iterable[Any], keyword: str = "DELETE") -> Matches:
    """The slots and KNN facts a DELETE / UPDATE WHERE selects (algorithms §11)."""
    where = list(where)
    if not where:
        raise EditError(f"{keyword} needs a WHERE clause")
    vx = ps.view
    ents = _knn_matches(ps, where)
    edits = _edit_matches(ps, where)
    try:
        cands = candidates(ps, where)
    except NoRelationLabels:
        if not (ents or edits):
            raise
        cands = []  # the facts carry their relation; unlabelled slots just match nothing
    slots = []
    for L, f in cands:
        meta = vx.feature_meta(L, f)
        slots.append(MatchedSlot(L, f) if meta is None else
                     MatchedSlot(L, f, meta.top_token, int(meta.top_token_id), float(meta.c_score)))
    knn = tuple(MatchedKnn(e.entity, int(e.layer), e.relation, e.target_token, int(e.target_id),
                           float(e.confidence), tuple(float(x) for x in np.asarray(e.key, dtype=np.float32)))
                for ent in ents for e in ps.state.knn if e.entity.casefold() == ent.casefold())
    return Matches(ps.base_model_id, tuple(slots), tuple(ents), knn, edits=edits)


def delete(ps: PatchSession, where: Iterable[Any], reason: str | None = None) -> MutationResult:
    """DELETE FROM EDGES WHERE …: tombstone every matching slot, drop matching KNN facts, and
    take matching weight-level facts out of their edits (the rest of each batch is re-solved)."""
    m = match(ps, where, "DELETE")
    if m.edits:
        _require_weights(ps, "DELETE of a weight-level fact")
    ops = delete_ops(m, reason)
    auto = ps.record(ops) if ops else False
    _reinsert(ps, m.edits)
    return MutationResult("delete", len(m.slots), len(m.knn_entities), tuple((s.layer, s.feature) for s in m.slots),
                          auto, m.facts)


def update(ps: PatchSession, where: Iterable[Any], assignments: Any) -> MutationResult:
    """UPDATE EDGES SET target|top_token = "x", confidence|c_score = n WHERE …: replace metadata
    (a new target is re-tokenised: `top_token_id` = first id of `encode(" " + x)`). KNN facts of a
    matching entity get the new target too (their keys are kept); a weight-level edit holding a
    matching fact is re-solved with the fact's new target."""
    sets = parse_assignments(assignments)
    m = match(ps, where, "UPDATE")
    if m.edits:
        _require_weights(ps, "UPDATE of a weight-level fact")
    vx = ps.view
    ops, knn = update_ops(m, sets, lambda t: target_id(vx, t))
    auto = ps.record(ops) if ops else False
    _reinsert(ps, m.edits, sets.get("target"), sets.get("confidence"), update=True)
    return MutationResult("update", len(m.slots), knn, tuple((s.layer, s.feature) for s in m.slots), auto,
                          m.facts)


def parse_assignments(assignments: Any) -> dict[str, Any]:
    """UPDATE's SET list as {"target": str, "confidence": float} (validated)."""
    items = assignments.items() if isinstance(assignments, dict) else [
        (a[0], a[1]) if isinstance(a, (tuple, list)) else (getattr(a, "field"), getattr(a, "value"))
        for a in assignments]
    out: dict[str, Any] = {}
    for k, v in items:
        k = str(k).lower()
        if k in ("target", "top_token"):
            if not isinstance(v, str) or not v.strip():
                raise EditError("SET target needs a non-empty string")
            out["target"] = v.strip()
        elif k in ("confidence", "c_score"):
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise EditError(f"SET {k} needs a number")
            out["confidence"] = float(v)
        else:
            raise EditError(f"cannot SET {k!r} (use target/top_token and confidence/c_score)")
    if not out:
        raise EditError("UPDATE needs at least one SET assignment")
    return out


MERGE_STRATEGIES = ("keep_source", "keep_target", "highest_confidence")


def merge(ps: PatchSession, source, strategy: str | None = None, target_name: str | None = None) -> MergeResult:
    """MERGE "src": copy the source vindex's per-feature metadata into the overlay (`update` ops).

    KEEP_SOURCE (default) writes every differing slot; KEEP_TARGET skips slots that already have
    metadata; HIGHEST_CONFIDENCE writes only where the source's c_score is larger."""
    from ..vindex import Vindex

    s = (strategy or "keep_source").lower()
    if s not in MERGE_STRATEGIES:
        raise EditError(f"unknown MERGE strategy {strategy!r}")
    src = source if not isinstance(source, (str, bytes)) and hasattr(source, "meta_arrays") else Vindex.load(source)
    if src.hidden_size != ps.base.hidden_size:
        raise EditError(f"cannot merge {src.path.name}: hidden size {src.hidden_size} != {ps.base.hidden_size}")
    vx = ps.view
    ops: list[vlp.Op] = []
    merged = skipped = 0
    for L in src.layers():
        if L not in vx.layers():
            continue
        s_top, s_c, s_present = src.meta_arrays(L)
        t_top, t_c, t_present = vx.meta_arrays(L)
        n = min(len(s_present), vx.num_features(L))
        for f in range(n):
            if not s_present[f]:
                continue
            same = f < len(t_present) and t_present[f] and int(t_top[f]) == int(s_top[f]) \
                and abs(float(t_c[f]) - float(s_c[f])) <= 1e-6
            if same:
                continue
            has = f < len(t_present) and bool(t_present[f])
            if has and s == "keep_target":
                skipped += 1
                continue
            if has and s == "highest_confidence" and not float(s_c[f]) > float(t_c[f]):
                skipped += 1
                continue
            meta = src.feature_meta(L, f)
            ops.append(vlp.UpdateOp(L, f, down_meta=vlp.DownMeta(meta.top_token, meta.top_token_id, meta.c_score)))
            merged += 1
    auto = ps.record(ops) if ops else False
    return MergeResult(str(getattr(src, "path", source)), target_name or str(ps.base.path), merged, skipped,
                       s.upper(), auto)
