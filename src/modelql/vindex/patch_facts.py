"""The facts an overlay's patches assert: (entity, relation, target) with the patch that inserted them.

Why a separate reader: DESCRIBE and SELECT must show what an edit made the model believe, by
whatever mode it was made (feature-level `insert`, `insert_knn`, weight-level `down_delta` of
MEMIT-style edits), and stop showing it once deleted. The ops record their facts (entity,
relation, target), so the live facts are the ops replayed in order — applied patches, then the
session's recording — with each delete removing what it names:

* `delete` (layer, feature) removes the `insert` of that slot;
* `delete_knn` (entity) removes that entity's KNN facts;
* `delete_edit` (edit_id) removes the `down_delta` facts of that edit.

This reads the ops only (`PatchSession.applied` / `.recording`), never the solver's internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from . import patch as vlp


@dataclass(frozen=True)
class PatchFact:
    entity: str
    relation: str | None
    target: str
    patch: str  # the applied patch's name, or the recording's ("(session)" when anonymous)
    mode: str  # "feature" | "knn" | the weight-level edit's method ("memit", …) or "weights"
    layer: int | None = None
    feature: int | None = None
    target_id: int | None = None
    confidence: float | None = None
    edit_id: str | None = None


def facts_of(ops_by_patch: Iterable[tuple[str, Iterable[Any]]]) -> list[PatchFact]:
    """Replay `(patch name, ops)` in order; the facts still asserted at the end, in insertion order."""
    live: dict[tuple, PatchFact] = {}
    for name, ops in ops_by_patch:
        for op in ops:
            kind = getattr(op, "op", "")
            if kind == "insert":
                live.pop(("slot", op.layer, op.feature), None)
                live[("slot", op.layer, op.feature)] = PatchFact(
                    op.entity, op.relation, op.target, name, "feature", op.layer, op.feature,
                    op.down_meta.i if op.down_meta is not None else None, op.confidence)
            elif kind == "delete":
                live.pop(("slot", op.layer, op.feature), None)
            elif kind == "insert_knn":
                key = ("knn", op.entity.strip().lower(), op.relation, op.target.strip().lower())
                live.pop(key, None)
                live[key] = PatchFact(op.entity, op.relation, op.target, name, "knn", op.layer, None,
                                      op.target_id, op.confidence)
            elif kind == "delete_knn":
                ent = op.entity.strip().lower()
                for k in [k for k in live if k[0] == "knn" and k[1] == ent]:
                    del live[k]
            elif kind == "down_delta":
                for e, r, t in op.facts():
                    key = ("edit", op.edit_id, e.strip().lower(), r, t.strip().lower())
                    if key not in live:
                        live[key] = PatchFact(e, r or None, t, name, op.method or "weights", op.layer, None, None,
                                              op.confidence, op.edit_id)
            elif kind == "delete_edit":
                for k in [k for k in live if k[0] == "edit" and k[1] == op.edit_id]:
                    del live[k]
    return list(live.values())


def session_ops(session) -> list[tuple[str, list[Any]]]:
    """`(patch name, ops)` of a `PatchSession`: its applied patches in order, then the recording."""
    out = [(ap.name, list(ap.patch.operations)) for ap in session.applied]
    rec = session.recording
    if rec is not None and rec.ops:
        out.append((rec.path or "(session)", list(rec.ops)))
    return out


def overlay_facts(vindex) -> list[PatchFact]:
    """The live facts of an overlay view's session ([] for a plain vindex), cached per epoch."""
    session = getattr(vindex, "session", None)
    if session is None or not hasattr(session, "applied"):
        return []
    cache = getattr(session, "caches", None)
    key = ("patch_facts", getattr(session, "epoch", None), len(session.applied))
    if isinstance(cache, dict):
        got = cache.get("patch_facts")
        if got is not None and got[0] == key:
            return got[1]
    facts = facts_of(session_ops(session))
    if isinstance(cache, dict):
        cache["patch_facts"] = (key, facts)
    return facts


__all__ = ["PatchFact", "facts_of", "session_ops", "overlay_facts"]
