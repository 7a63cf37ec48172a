"""WHERE filters of DELETE / UPDATE (algorithms §11): which feature slots, KNN facts and
weight-level facts a condition list selects, on the overlay's effective state."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np

from ..vindex import patch as vlp
from ..vindex.overlay import PatchSession
from .edit_common import EditError
from .mutations import MatchedEdit, MatchedKnn, MatchedSlot, Matches


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

