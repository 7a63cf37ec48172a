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

Modules: `edit_common` (results, shared helpers), `edit_knn`, `edit_memit`, `edit_compose` (one
per mode), `edit_where` (WHERE filters); this module dispatches and holds DELETE / UPDATE / MERGE.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from ..vindex import patch as vlp
from ..vindex.overlay import PatchSession
from .edit_common import (EditError, InsertResult, MergeResult, MutationResult, canonical_prompt, capture,
                          fact_triples, install_layer, require_weights, target_id)
from .edit_compose import COMPOSE_DEFAULT_ALPHA, GATE_ON, insert_compose, target_probability
from .edit_knn import insert_knn
from .edit_memit import insert_memit, memit_statistics_ready, prepare_memit_statistics
from .edit_where import Where, candidates, match
from .mutations import MatchedEdit, Matches, delete_ops, update_ops

__all__ = [
    "COMPOSE_DEFAULT_ALPHA", "DEFAULT_MODE", "GATE_ON", "MODES", "EditError", "InsertResult", "Matches", "MergeResult",
    "MutationResult", "Where", "candidates", "canonical_prompt", "capture", "delete", "install_layer", "insert",
    "insert_many", "match", "memit_statistics_ready", "merge", "parse_assignments", "prepare_memit_statistics",
    "resolve_mode", "target_id", "target_probability", "update",
]

#: Insert modes, and the default chosen by measurement (module docstring, bench/edit.py).
MODES = ("memit", "knn", "compose")
DEFAULT_MODE = "memit"
MODE_ALIASES = {"memit": "memit", "weights": "memit", "weight": "memit", "rome": "memit",
                "knn": "knn", "compose": "compose"}


def resolve_mode(mode: str | None) -> str:
    if mode is None:
        return DEFAULT_MODE
    m = MODE_ALIASES.get(str(mode).strip().lower())
    if m is None:
        raise EditError(f"unknown insert mode {mode!r} (use {', '.join(m.upper() for m in MODES)})")
    return m




def insert(ps: PatchSession, entity: str, relation: str, target: str, layer: int | None = None,
           confidence: float | None = None, alpha: float | None = None, mode: str | None = None,
           **hparams) -> InsertResult:
    """INSERT one fact into the overlay (see the module docstring for the modes)."""
    return insert_many(ps, [(entity, relation, target)], layer=layer, confidence=confidence, alpha=alpha,
                       mode=mode, **hparams)[0]


def insert_many(ps: PatchSession, facts: Iterable[Any], layer: int | None = None,
                confidence: float | None = None, alpha: float | None = None, mode: str | None = None,
                **hparams) -> list[InsertResult]:
    """INSERT many facts. MEMIT edits them together (one batch least-squares solve: better than
    sequential edits, which each see the previous ones as part of the model); KNN and COMPOSE
    install them one after the other. Facts are `(entity, relation, target)` tuples or objects."""
    items = fact_triples(facts)
    if not items:
        return []
    m = resolve_mode(mode)
    if confidence is not None and not (0.0 <= float(confidence) <= 1e6):
        raise EditError("CONFIDENCE must be a non-negative number")
    if m == "memit":
        return insert_memit(ps, items, layer, confidence, hparams)
    if m == "knn":
        return [insert_knn(ps, e, r, t, layer, confidence) for e, r, t in items]
    return [insert_compose(ps, e, r, t, layer, confidence, alpha) for e, r, t in items]


def _reinsert(ps: PatchSession, edits: Sequence[MatchedEdit], target: str | None = None,
              confidence: float | None = None, update: bool = False) -> None:
    """After their `delete_edit`: re-insert each edit's remaining facts (DELETE) or its facts
    with the matched ones changed (UPDATE) as a new weight-level batch in the same layers."""
    for e in edits:
        facts = e.updated(target) if update else e.kept()
        if facts:
            insert_many(ps, facts, mode="memit", layers=list(e.layers),
                        confidence=confidence if confidence is not None else e.confidence)


def delete(ps: PatchSession, where: Iterable[Any], reason: str | None = None) -> MutationResult:
    """DELETE FROM EDGES WHERE …: tombstone every matching slot, drop matching KNN facts, and
    take matching weight-level facts out of their edits (the rest of each batch is re-solved)."""
    m = match(ps, where, "DELETE")
    if m.edits:
        require_weights(ps, "DELETE of a weight-level fact")
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
        require_weights(ps, "UPDATE of a weight-level fact")
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
