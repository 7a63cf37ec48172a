"""DELETE / UPDATE as data: what a WHERE matched (`Matches`) and the `.vlp` operations built from it.

`knowledge.edit.match` resolves a WHERE on a patch session; `delete_ops` / `update_ops` turn the
result into operations. Local LQL records them in the session overlay; a remote LQL session gets
the same `Matches` from `POST /v1/edges/match` and sends the same operations to
`POST /v1/patches/apply` as an inline patch — one implementation for both. Kept free of torch so
the HTTP client can import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from ..vindex import patch as vlp

#: c_score of a slot UPDATE rewrites that had no metadata (same as a COMPOSE install)
COMPOSE_DEFAULT_CONFIDENCE = 0.9


@dataclass(frozen=True)
class MatchedSlot:
    """A feature slot a WHERE selected, with the metadata UPDATE keeps (None: the slot has none)."""

    layer: int
    feature: int
    top_token: str | None = None
    top_token_id: int | None = None
    c_score: float | None = None


@dataclass(frozen=True)
class MatchedKnn:
    """A KNN fact of a matched entity (UPDATE re-inserts it after `delete_knn` drops the entity)."""

    entity: str
    layer: int
    relation: str
    target_token: str
    target_id: int
    confidence: float
    key: tuple[float, ...]


@dataclass(frozen=True)
class MatchedEdit:
    """A weight-level (MEMIT) edit of the overlay some of whose facts a WHERE selected: DELETE
    drops the edit (`delete_edit`) and re-inserts the other facts as a new batch; UPDATE
    re-inserts the whole batch with the matched facts changed."""

    edit_id: str
    layers: tuple[int, ...]
    facts: tuple[tuple[str, str, str], ...]  # every fact of the batch: (entity, relation, target)
    matched: tuple[int, ...]  # indices into `facts`
    confidence: float | None = None

    def kept(self) -> list[tuple[str, str, str]]:
        """The facts a DELETE leaves (re-inserted as a new edit)."""
        return [f for i, f in enumerate(self.facts) if i not in self.matched]

    def updated(self, target: str | None) -> list[tuple[str, str, str]]:
        """The batch after an UPDATE setting `target` (None: unchanged) on the matched facts."""
        return [(e, r, target if i in self.matched and target is not None else t)
                for i, (e, r, t) in enumerate(self.facts)]


@dataclass(frozen=True)
class Matches:
    """What a DELETE / UPDATE WHERE selects on the effective (overlay) state. The server's
    `POST /v1/edges/match` returns exactly this, so a remote LQL session edits the same slots."""

    base_model: str
    slots: tuple[MatchedSlot, ...] = ()
    knn_entities: tuple[str, ...] = ()
    knn: tuple[MatchedKnn, ...] = ()
    #: unsaved (recording) ops that write a matched slot or KNN entity: a patch applied now stacks
    #: beneath the recording, so it would not override them (local edits record after them instead)
    recorded: int = 0
    edits: tuple[MatchedEdit, ...] = ()

    @property
    def empty(self) -> bool:
        return not self.slots and not self.knn_entities and not self.edits

    @property
    def facts(self) -> int:
        """Weight-level facts matched."""
        return sum(len(e.matched) for e in self.edits)

    def to_json(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "recorded": self.recorded,
                "slots": [{"layer": s.layer, "feature": s.feature, "top_token": s.top_token,
                           "top_token_id": s.top_token_id, "c_score": s.c_score} for s in self.slots],
                "knn_entities": list(self.knn_entities),
                "knn": [{"entity": k.entity, "layer": k.layer, "relation": k.relation, "target": k.target_token,
                         "target_id": k.target_id, "confidence": k.confidence, "key": list(k.key)}
                        for k in self.knn],
                "edits": [{"edit_id": e.edit_id, "layers": list(e.layers), "facts": [list(f) for f in e.facts],
                           "matched": list(e.matched), "confidence": e.confidence} for e in self.edits]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Matches:
        return cls(str(d["base_model"]),
                   tuple(MatchedSlot(int(s["layer"]), int(s["feature"]), s.get("top_token"), s.get("top_token_id"),
                                     s.get("c_score")) for s in d.get("slots", ())),
                   tuple(str(e) for e in d.get("knn_entities", ())),
                   tuple(MatchedKnn(str(k["entity"]), int(k["layer"]), str(k["relation"]), str(k["target"]),
                                    int(k["target_id"]), float(k["confidence"]), tuple(float(x) for x in k["key"]))
                         for k in d.get("knn", ())),
                   int(d.get("recorded", 0)),
                   tuple(MatchedEdit(str(e["edit_id"]), tuple(int(x) for x in e["layers"]),
                                     tuple((str(f[0]), str(f[1]), str(f[2])) for f in e["facts"]),
                                     tuple(int(i) for i in e["matched"]), e.get("confidence"))
                         for e in d.get("edits", ())))


def recorded_overlap(m: Matches, recording_ops) -> int:
    """How many of `recording_ops` write a slot, KNN entity or weight-level edit `m` matched."""
    slots = {(s.layer, s.feature) for s in m.slots}
    ents = {e.casefold() for e in m.knn_entities}
    edits = {e.edit_id for e in m.edits}
    return sum(1 for op in recording_ops
               if (vlp.is_feature_op(op) and (op.layer, op.feature) in slots)
               or (op.op in ("insert_knn", "delete_knn") and op.entity.casefold() in ents)
               or (op.op == "down_delta" and op.edit_id in edits))


def delete_ops(m: Matches, reason: str | None = None) -> list[vlp.Op]:
    """DELETE's `.vlp` operations: tombstone every matched slot, drop every matched KNN entity and
    every weight-level edit holding a matched fact (the caller re-inserts the edit's other facts)."""
    ops: list[vlp.Op] = [vlp.DeleteOp(s.layer, s.feature, reason) for s in m.slots]
    ops += [vlp.DeleteKnnOp(e) for e in m.knn_entities]
    return ops + [vlp.DeleteEditOp(e.edit_id, reason) for e in m.edits]


def update_ops(m: Matches, sets: dict[str, Any], token_id: Callable[[str], int]) -> tuple[list[vlp.Op], int]:
    """UPDATE's `.vlp` operations for `sets` (from `parse_assignments`) and how many KNN facts
    they re-insert. `token_id(text)` is `target_id` on the vindex that re-tokenises a new target."""
    new_target, new_c = sets.get("target"), sets.get("confidence")
    new_id = token_id(new_target) if new_target is not None and not m.empty else None
    ops: list[vlp.Op] = []
    for s in m.slots:
        t = new_target if new_target is not None else (s.top_token if s.top_token is not None else "")
        i = new_id if new_id is not None else (s.top_token_id if s.top_token_id is not None else 0)
        c = float(new_c) if new_c is not None else (s.c_score if s.c_score is not None else
                                                    COMPOSE_DEFAULT_CONFIDENCE)
        ops.append(vlp.UpdateOp(s.layer, s.feature, down_meta=vlp.DownMeta(t, int(i), c)))
    # delete_knn removes every entry of the entity: re-insert them after it
    ops += [vlp.DeleteKnnOp(e) for e in m.knn_entities]
    ops += [vlp.InsertKnnOp(k.layer, k.entity, k.relation, new_target if new_target is not None else k.target_token,
                            new_id if new_id is not None else k.target_id, np.asarray(k.key, dtype=np.float32),
                            float(new_c) if new_c is not None else k.confidence) for k in m.knn]
    # weight-level edits are dropped here and re-solved by the caller with the updated facts
    ops += [vlp.DeleteEditOp(e.edit_id, "updated") for e in m.edits]
    return ops, len(m.knn)


def patch_json(m: Matches, ops: list[vlp.Op], description: str) -> dict[str, Any]:
    """The inline `.vlp` object of `ops` for `m`'s base model (what `/v1/patches/apply` takes)."""
    return vlp.Patch(base_model=m.base_model, operations=list(ops), created_at=vlp.now_rfc3339(),
                     description=description).to_json()
