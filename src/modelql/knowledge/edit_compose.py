"""INSERT MODE COMPOSE: a feature slot becomes a key → value memory (gate/up a contrastive
direction, down the write δ, balanced to a target probability); the embedding-mode install
without weights."""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np
import torch

from ..vindex import patch as vlp
from ..vindex.overlay import PatchSession
from . import mutations as _mut
from .edit_common import EditError, InsertResult, base_model, canonical_prompt, capture, install_layer, target_id

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
    base = base_model(ps)
    fixed_key = (layer, None, None)
    if fixed_key not in cache:
        cache[fixed_key] = torch.stack([capture(base, p, [layer])[layer] for p in FIXED_DECOYS])
    vx = ps.view
    texts = vx.vocab_texts() if hasattr(vx, "vocab_texts") else None
    words = []
    for i in range(min(vx.vocab_size, 5000)):
        w = texts[i] if texts is not None else vx.token_text(i)
        if len(w.encode("utf-8")) >= 3 and w.isalpha() and w.casefold() != entity.casefold():
            words.append(w)
            if len(words) == 10:
                break
    tmpl = [capture(base, canonical_prompt(relation, w), [layer])[layer] for w in words]
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
    base = base_model(ps)
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


def insert_compose(ps: PatchSession, entity: str, relation: str, target: str, layer: int | None,
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

    base = base_model(ps)
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

