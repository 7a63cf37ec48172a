"""`.vlp` patch files (vindex-format spec §12): the one module that reads and writes them.

A patch is a pretty-printed JSON document of edits to a vindex, applied in order onto an
in-memory overlay (`modelql.vindex.overlay`); the base files are never modified.

    patch = read_patch("fix.vlp", shape=PatchShape.of(vindex), base_model=vindex.model)
    write_patch("fix.vlp", patch)          # atomic: temp file + rename

Operations (`op` tag), spec §12.2:

* `insert` / `update` / `delete`: feature-keyed (`layer`, `feature`) edits of a slot's metadata
  (`down_meta` `{t, i, c}`) and gate / up / down vectors (`*_vector_b64`);
* `insert_knn` / `delete_knn`: retrieval-override facts (`knn_store.bin` entries);
* **modelql extension** `down_delta`: a low-rank weight-level edit of one layer's down
  projection, `ΔW_down = U · Vᵀ` (`U` `[H, r]`, `V` `[F, r]`), as produced by the MEMIT insert
  mode. Fields: `layer`, `rank` (r), `u_b64` (f32 `[H, r]` row-major), `v_b64` (f32 `[F, r]`
  row-major), `entity` / `relation` / `target` (parallel lists: the facts the edit carries),
  optional `edit_id` (groups the per-layer deltas of one batch edit), `method` (e.g. "memit"),
  `confidence`. A neuron edit (`method` "memit-neurons") instead adds r gated neurons:
  `gate_b64` and `up_b64` (f32 `[r, H]` row-major, their gate and up rows) replace `v_b64`, and
  `U` holds their down columns: `ΔFFN(x) = U · (act(gate·x) ⊙ up·x)`. LARQL does not know this op and rejects or ignores it; modelql refuses patches
  with any other unknown op.
* **modelql extension** `delete_edit`: `edit_id`, `reason` (str|null): removes every earlier
  `down_delta` of that `edit_id` from the overlay (DELETE / UPDATE of a weight-level fact; the
  batch's other facts are re-inserted after it as a new edit).

Vectors are standard base64 (no line breaks) of raw little-endian f32. modelql validates
strictly (LARQL silently skips bad vectors): a vector whose decoded length is not `4·H` (or
`4·H·r` / `4·F·r` for a delta) rejects the whole patch with ``invalid vector in operation #n``
(operations are numbered from 1). Every problem is a one-line `PatchError`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import numpy as np

from ..errors import PatchError
from ..fsutil import atomic_write_json

PATCH_VERSION = 1
PATCH_SUFFIX = ".vlp"

FEATURE_OPS = ("insert", "update", "delete")
KNOWN_OPS = ("insert", "update", "delete", "insert_knn", "delete_knn", "down_delta", "delete_edit")


# ---------------------------------------------------------------------------------------------
# operations
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DownMeta:
    """The `down_meta` object of an op: `{t: top token, i: top token id, c: c_score}`."""

    t: str
    i: int
    c: float

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "i": int(self.i), "c": float(self.c)}


@dataclass(frozen=True, eq=False)
class InsertOp:
    layer: int
    feature: int
    entity: str
    target: str
    relation: str | None = None
    confidence: float | None = None
    gate: np.ndarray | None = None
    up: np.ndarray | None = None
    down: np.ndarray | None = None
    down_meta: DownMeta | None = None
    op: str = "insert"


@dataclass(frozen=True, eq=False)
class UpdateOp:
    layer: int
    feature: int
    gate: np.ndarray | None = None
    up: np.ndarray | None = None
    down: np.ndarray | None = None
    down_meta: DownMeta | None = None
    op: str = "update"


@dataclass(frozen=True, eq=False)
class DeleteOp:
    layer: int
    feature: int
    reason: str | None = None
    op: str = "delete"


@dataclass(frozen=True, eq=False)
class InsertKnnOp:
    layer: int
    entity: str
    relation: str
    target: str
    target_id: int
    key: np.ndarray
    confidence: float | None = None
    op: str = "insert_knn"


@dataclass(frozen=True, eq=False)
class DeleteKnnOp:
    entity: str
    op: str = "delete_knn"


@dataclass(frozen=True, eq=False)
class DownDeltaOp:
    """modelql extension: `ΔW_down[layer] += u @ v.T` (u `[H, r]`, v `[F, r]`, float32)."""

    layer: int
    u: np.ndarray
    v: np.ndarray | None  # None: a neuron edit (gate / up)
    entity: tuple[str, ...] = ()
    relation: tuple[str, ...] = ()
    target: tuple[str, ...] = ()
    edit_id: str | None = None
    method: str | None = None
    confidence: float | None = None
    gate: np.ndarray | None = None  # [r, H]
    up: np.ndarray | None = None  # [r, H]
    op: str = "down_delta"

    @property
    def rank(self) -> int:
        return int(self.u.shape[1])

    def facts(self) -> list[tuple[str, str, str]]:
        return list(zip(self.entity, self.relation, self.target))


@dataclass(frozen=True, eq=False)
class DeleteEditOp:
    """modelql extension: drop every earlier `down_delta` whose `edit_id` is this one."""

    edit_id: str
    reason: str | None = None
    op: str = "delete_edit"


Op = Union[InsertOp, UpdateOp, DeleteOp, InsertKnnOp, DeleteKnnOp, DownDeltaOp, DeleteEditOp]


def is_feature_op(op: Op) -> bool:
    return op.op in FEATURE_OPS


def op_confidence(op: Op) -> float | None:
    """The confidence COMPILE … HIGHEST_CONFIDENCE compares: `down_meta.c`, else `confidence`."""
    dm = getattr(op, "down_meta", None)
    if dm is not None:
        return float(dm.c)
    c = getattr(op, "confidence", None)
    return None if c is None else float(c)


@dataclass(frozen=True)
class OpCounts:
    inserts: int = 0
    updates: int = 0
    deletes: int = 0

    @property
    def total(self) -> int:
        return self.inserts + self.updates + self.deletes


def count_ops(ops: Iterable[Op]) -> OpCounts:
    """Spec §12.2 counts: inserts = insert + insert_knn (+ each fact a down_delta edit carries,
    counted once per `edit_id`); updates = update; deletes = delete + delete_knn + delete_edit."""
    i = u = d = 0
    seen_edits: set[str] = set()
    for op in ops:
        if op.op in ("insert", "insert_knn"):
            i += 1
        elif op.op == "update":
            u += 1
        elif op.op in ("delete", "delete_knn", "delete_edit"):
            d += 1
        elif op.op == "down_delta":
            key = op.edit_id or f"#{id(op)}"
            if key not in seen_edits:
                seen_edits.add(key)
                i += len(op.entity)
    return OpCounts(i, u, d)


# ---------------------------------------------------------------------------------------------
# the patch document
# ---------------------------------------------------------------------------------------------


def now_rfc3339() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


@dataclass
class Patch:
    """A `.vlp` document (spec §12.1). `extra` keeps unknown top-level fields for rewrites."""

    base_model: str
    operations: list[Op] = field(default_factory=list)
    version: int = PATCH_VERSION
    base_checksum: str | None = None
    created_at: str = ""
    description: str | None = None
    author: str | None = None
    tags: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def counts(self) -> OpCounts:
        return count_ops(self.operations)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version,
            "base_model": self.base_model,
            "base_checksum": self.base_checksum,
            "created_at": self.created_at,
            "description": self.description,
            "author": self.author,
            "tags": list(self.tags),
            "operations": [op_to_json(op) for op in self.operations],
        }
        for k, v in self.extra.items():
            d.setdefault(k, v)
        return d


@dataclass(frozen=True)
class PatchShape:
    """What a patch is validated against: hidden size, layer count, features per layer."""

    hidden_size: int
    num_layers: int
    features: Mapping[int, int] | Callable[[int], int]

    @classmethod
    def of(cls, vindex) -> PatchShape:
        return cls(vindex.hidden_size, vindex.num_layers, vindex.num_features)

    def num_features(self, layer: int) -> int:
        f = self.features
        return int(f(layer)) if callable(f) else int(f.get(layer, 0))


# ---------------------------------------------------------------------------------------------
# vectors
# ---------------------------------------------------------------------------------------------


def encode_vector(v: np.ndarray | Sequence[float]) -> str:
    """Standard base64 of the raw little-endian f32 bytes."""
    a = np.ascontiguousarray(np.asarray(v, dtype="<f4"))
    return base64.b64encode(a.tobytes()).decode("ascii")


def decode_vector(text: Any, n: int, where: str) -> np.ndarray:
    """Decode a base64 f32 vector that must hold exactly `n` finite values."""
    if not isinstance(text, str):
        raise PatchError(f"invalid vector in {where}")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PatchError(f"invalid vector in {where}") from None
    if len(raw) % 4 or len(raw) != 4 * n:
        raise PatchError(f"invalid vector in {where}")
    a = np.frombuffer(raw, dtype="<f4").astype(np.float32)
    if not np.all(np.isfinite(a)):
        raise PatchError(f"invalid vector in {where}")
    return a


# ---------------------------------------------------------------------------------------------
# JSON <-> ops
# ---------------------------------------------------------------------------------------------


def _vec_json(v: np.ndarray | None) -> str | None:
    return None if v is None else encode_vector(v)


def op_to_json(op: Op) -> dict[str, Any]:
    if isinstance(op, InsertOp):
        return {"op": "insert", "layer": op.layer, "feature": op.feature, "relation": op.relation,
                "entity": op.entity, "target": op.target, "confidence": op.confidence,
                "gate_vector_b64": _vec_json(op.gate), "up_vector_b64": _vec_json(op.up),
                "down_vector_b64": _vec_json(op.down),
                "down_meta": op.down_meta.to_json() if op.down_meta is not None else None}
    if isinstance(op, UpdateOp):
        d: dict[str, Any] = {"op": "update", "layer": op.layer, "feature": op.feature}
        if op.gate is not None:
            d["gate_vector_b64"] = encode_vector(op.gate)
        if op.up is not None:
            d["up_vector_b64"] = encode_vector(op.up)
        if op.down is not None:
            d["down_vector_b64"] = encode_vector(op.down)
        if op.down_meta is not None:
            d["down_meta"] = op.down_meta.to_json()
        return d
    if isinstance(op, DeleteOp):
        return {"op": "delete", "layer": op.layer, "feature": op.feature, "reason": op.reason}
    if isinstance(op, InsertKnnOp):
        return {"op": "insert_knn", "layer": op.layer, "entity": op.entity, "relation": op.relation,
                "target": op.target, "target_id": int(op.target_id), "confidence": op.confidence,
                "key_vector_b64": encode_vector(op.key)}
    if isinstance(op, DeleteKnnOp):
        return {"op": "delete_knn", "entity": op.entity}
    if isinstance(op, DeleteEditOp):
        return {"op": "delete_edit", "edit_id": op.edit_id, "reason": op.reason}
    if isinstance(op, DownDeltaOp):
        d = {"op": "down_delta", "layer": op.layer, "rank": op.rank, "u_b64": encode_vector(op.u)}
        if op.v is not None:
            d["v_b64"] = encode_vector(op.v)
        else:
            d["gate_b64"], d["up_b64"] = encode_vector(op.gate), encode_vector(op.up)
        d |= {"entity": list(op.entity), "relation": list(op.relation), "target": list(op.target)}
        if op.edit_id is not None:
            d["edit_id"] = op.edit_id
        if op.method is not None:
            d["method"] = op.method
        if op.confidence is not None:
            d["confidence"] = op.confidence
        return d
    raise TypeError(f"not a patch operation: {op!r}")


def _int(d: Mapping, key: str, where: str, lo: int = 0, hi: int | None = None) -> int:
    v = d.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise PatchError(f"{where}: '{key}' must be an integer")
    if v < lo or (hi is not None and v >= hi):
        rng = f"0..{hi - 1}" if hi is not None else f">= {lo}"
        raise PatchError(f"{where}: {key} {v} is out of range ({rng})")
    return v


def _str(d: Mapping, key: str, where: str, nullable: bool = False) -> str | None:
    v = d.get(key)
    if v is None and nullable:
        return None
    if not isinstance(v, str):
        raise PatchError(f"{where}: '{key}' must be a string")
    return v


def _float(d: Mapping, key: str, where: str) -> float | None:
    v = d.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v):
        raise PatchError(f"{where}: '{key}' must be a number")
    return float(v)


def _down_meta(d: Mapping, where: str) -> DownMeta | None:
    m = d.get("down_meta")
    if m is None:
        return None
    if not isinstance(m, dict):
        raise PatchError(f"{where}: 'down_meta' must be an object {{t, i, c}}")
    t = m.get("t")
    i = m.get("i")
    c = m.get("c")
    if not isinstance(t, str) or isinstance(i, bool) or not isinstance(i, int) or i < 0 or i >= 2**32 \
            or isinstance(c, bool) or not isinstance(c, (int, float)) or not np.isfinite(c):
        raise PatchError(f"{where}: 'down_meta' must be {{t: string, i: u32, c: number}}")
    return DownMeta(t, int(i), float(c))


def _str_list(d: Mapping, key: str, where: str) -> tuple[str, ...]:
    v = d.get(key, [])
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise PatchError(f"{where}: '{key}' must be a list of strings")
    return tuple(v)


def op_from_json(d: Any, n: int, shape: PatchShape | None) -> Op:
    """Parse operation number `n` (1-based) and validate it against `shape` (if given)."""
    where = f"operation #{n}"
    if not isinstance(d, dict):
        raise PatchError(f"{where} is not an object")
    kind = d.get("op")
    if kind not in KNOWN_OPS:
        raise PatchError(f"unknown op {kind!r} in {where}" if isinstance(kind, str)
                         else f"{where} has no 'op' tag")
    H = shape.hidden_size if shape is not None else None
    n_layers = shape.num_layers if shape is not None else None

    def vec(key: str) -> np.ndarray | None:
        v = d.get(key)
        if v is None:
            return None
        if H is None:  # no shape: accept any whole number of f32 values
            if not isinstance(v, str):
                raise PatchError(f"invalid vector in {where}")
            try:
                raw = base64.b64decode(v, validate=True)
            except (binascii.Error, ValueError):
                raise PatchError(f"invalid vector in {where}") from None
            if len(raw) % 4 or not raw:
                raise PatchError(f"invalid vector in {where}")
            return decode_vector(v, len(raw) // 4, where)
        return decode_vector(v, H, where)

    if kind == "delete_knn":
        return DeleteKnnOp(entity=_str(d, "entity", where))
    if kind == "delete_edit":
        return DeleteEditOp(_str(d, "edit_id", where), _str(d, "reason", where, nullable=True))
    layer = _int(d, "layer", where, 0, n_layers)
    if kind in FEATURE_OPS:
        f_hi = shape.num_features(layer) if shape is not None else None
        if f_hi is not None and f_hi <= 0:
            raise PatchError(f"{where}: layer {layer} has no features in this vindex")
        feature = _int(d, "feature", where, 0, f_hi)
        if kind == "delete":
            return DeleteOp(layer, feature, _str(d, "reason", where, nullable=True))
        gate, up, down = vec("gate_vector_b64"), vec("up_vector_b64"), vec("down_vector_b64")
        dm = _down_meta(d, where)
        if kind == "update":
            return UpdateOp(layer, feature, gate, up, down, dm)
        return InsertOp(layer, feature, entity=_str(d, "entity", where), target=_str(d, "target", where),
                        relation=_str(d, "relation", where, nullable=True),
                        confidence=_float(d, "confidence", where), gate=gate, up=up, down=down, down_meta=dm)
    if kind == "insert_knn":
        key = vec("key_vector_b64")
        if key is None:
            raise PatchError(f"invalid vector in {where}")
        tid = _int(d, "target_id", where, 0, 2**32)
        return InsertKnnOp(layer, entity=_str(d, "entity", where), relation=_str(d, "relation", where),
                           target=_str(d, "target", where), target_id=tid, key=key,
                           confidence=_float(d, "confidence", where))
    # down_delta
    rank = _int(d, "rank", where, 1)
    gate = up = None
    if "gate_b64" in d or "up_b64" in d:
        if "v_b64" in d:
            raise PatchError(f"{where}: a down_delta has either 'v_b64' or 'gate_b64'/'up_b64', not both")
        if shape is not None:
            u = decode_vector(d.get("u_b64"), H * rank, where).reshape(H, rank)
            gate = decode_vector(d.get("gate_b64"), rank * H, where).reshape(rank, H)
            up = decode_vector(d.get("up_b64"), rank * H, where).reshape(rank, H)
        else:
            u, gate, up = vec("u_b64"), vec("gate_b64"), vec("up_b64")
            if u is None or gate is None or up is None or u.size % rank or gate.size != u.size or up.size != u.size:
                raise PatchError(f"invalid vector in {where}")
            u, gate, up = u.reshape(-1, rank), gate.reshape(rank, -1), up.reshape(rank, -1)
        v = None
    elif shape is not None:
        F = shape.num_features(layer)
        u = decode_vector(d.get("u_b64"), H * rank, where).reshape(H, rank)
        v = decode_vector(d.get("v_b64"), F * rank, where).reshape(F, rank)
    else:
        u = vec("u_b64")
        v = vec("v_b64")
        if u is None or v is None or u.size % rank or v.size % rank:
            raise PatchError(f"invalid vector in {where}")
        u, v = u.reshape(-1, rank), v.reshape(-1, rank)
    ents, rels, tgts = _str_list(d, "entity", where), _str_list(d, "relation", where), _str_list(d, "target", where)
    if not (len(ents) == len(rels) == len(tgts)):
        raise PatchError(f"{where}: 'entity', 'relation' and 'target' lists differ in length")
    return DownDeltaOp(layer, u, v, ents, rels, tgts, edit_id=_str(d, "edit_id", where, nullable=True),
                       method=_str(d, "method", where, nullable=True), confidence=_float(d, "confidence", where),
                       gate=gate, up=up)


def patch_from_json(data: Any, shape: PatchShape | None = None, base_model: str | None = None,
                    where: str = "patch") -> Patch:
    """Validate a parsed `.vlp` document; `base_model` (when given) must match the patch's."""
    if not isinstance(data, dict):
        raise PatchError(f"{where} is not a JSON object")
    version = data.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise PatchError(f"{where} has no integer 'version'")
    if version != PATCH_VERSION:
        raise PatchError(f"{where} has version {version}; modelql reads version {PATCH_VERSION}")
    for key in ("base_model", "created_at", "operations"):
        if key not in data:
            raise PatchError(f"{where} is missing required field '{key}'")
    bm = data["base_model"]
    if not isinstance(bm, str):
        raise PatchError(f"{where}: 'base_model' must be a string")
    if base_model is not None and bm != base_model:
        raise PatchError(f"{where} was made for base model {bm!r}, not {base_model!r}")
    created = data["created_at"]
    if not isinstance(created, str):
        raise PatchError(f"{where}: 'created_at' must be a string")
    for key in ("base_checksum", "description", "author"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise PatchError(f"{where}: '{key}' must be a string or null")
    tags = data.get("tags") or []
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise PatchError(f"{where}: 'tags' must be a list of strings")
    ops_json = data["operations"]
    if not isinstance(ops_json, list):
        raise PatchError(f"{where}: 'operations' must be an array")
    ops = [op_from_json(o, n, shape) for n, o in enumerate(ops_json, 1)]
    known = ("version", "base_model", "base_checksum", "created_at", "description", "author", "tags", "operations")
    return Patch(base_model=bm, operations=ops, version=version, base_checksum=data.get("base_checksum"),
                 created_at=created, description=data.get("description"), author=data.get("author"),
                 tags=list(tags), extra={k: v for k, v in data.items() if k not in known})


def read_patch(path: str | Path, shape: PatchShape | None = None, base_model: str | None = None) -> Patch:
    """Read and validate a `.vlp` file. Missing file ⇒ `PatchError("patch not found: <path>")`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PatchError(f"patch not found: {path}") from None
    except IsADirectoryError:
        raise PatchError(f"failed to load patch: {path} is a directory") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PatchError(f"failed to load patch: {path}: {exc}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PatchError(f"failed to load patch: {p.name} is not valid JSON ({exc.msg} at line {exc.lineno})") \
            from None
    try:
        return patch_from_json(data, shape, base_model, where=p.name)
    except PatchError as exc:
        raise PatchError(f"failed to load patch: {exc}") from None


def write_patch(path: str | Path, patch: Patch) -> Path:
    """Write pretty-printed JSON atomically (temp file in the same directory, then rename)."""
    try:
        return atomic_write_json(path, patch.to_json(), indent=2)
    except OSError as exc:
        raise PatchError(f"cannot write patch {path}: {exc.strerror or exc}") from None
