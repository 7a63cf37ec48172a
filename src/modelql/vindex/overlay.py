"""The patch overlay: base ⊕ p₁ ⊕ … ⊕ pₙ ⊕ session, never touching the base files (format §12.3).

* `OverlayState` — the *effective* edits: per `(layer, feature)` slot the metadata and gate /
  up / down overrides (each component last-wins independently) or a tombstone; the KNN store
  (the base `knn_store.bin` entries, then `insert_knn` / `delete_knn` in order); and the
  low-rank down-projection deltas of weight-level edits (modelql `down_delta` ops, dropped
  again by `delete_edit`), summed per layer. It also keeps every feature-keyed write per slot,
  so COMPILE … ON CONFLICT can find collisions (`collisions()`) and resolve them by confidence
  (`resolve_highest_confidence()`).
* `PatchSession` — the ordered list of applied patches plus the active *recording* (the
  implicit session patch, always applied last: BEGIN / SAVE PATCH, auto-patch). Mutations are
  applied incrementally; removing a patch recomputes the state from the base by re-applying
  the remaining patches, so a removal is exactly undone (LARQL keeps stale up/down overrides
  and loses base KNN entries there; modelql does not).
* `OverlayView` — a `Vindex`-compatible view of base ⊕ overlay for the browse functions:
  gate KNN with overridden gates substituted and tombstones excluded, feature metadata with
  overrides, and a runtime model whose FFN is the overlay-aware `PatchedFfn`, so INFER,
  TRACE and generation see the edits. Everything else is delegated to the base vindex.

With no edits the view answers exactly like the base and its model computes bit-identical
logits (the patched FFN then takes the dense path for every layer).
"""

from __future__ import annotations

import copy
import itertools
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import CapabilityError, PatchError
from . import patch as vlp
from .format import KNN_FILE, KnnEntry, read_knn_store
from .vindex import FeatureMeta, GateHit, WalkHit, topk_exact

DEFAULT_INSERT_C_SCORE = 0.9


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32)
    n = float(np.linalg.norm(v))
    return v / n if n >= 1e-8 else v


# ---------------------------------------------------------------------------------------------
# effective state
# ---------------------------------------------------------------------------------------------


@dataclass
class Slot:
    """The overlay's view of one `(layer, feature)`: overrides present, or a tombstone."""

    meta: FeatureMeta | None = None  # metadata override (None: base metadata unless tombstoned)
    gate: np.ndarray | None = None
    up: np.ndarray | None = None
    down: np.ndarray | None = None
    tombstone: bool = False
    relation: str | None = None  # relation carried by the last insert (COMPILE labels)

    @property
    def has_vectors(self) -> bool:
        return self.gate is not None or self.up is not None or self.down is not None


@dataclass
class Delta:
    """A weight-level edit of one layer: `ΔW_down += u @ v.T`, or r new neurons (`gate`, `up`)
    with down columns u (float32 numpy; `knowledge.delta_ffn.DownDelta`)."""

    layer: int
    u: np.ndarray  # [H, r]
    v: np.ndarray | None  # [F, r]; None for neurons
    op: vlp.DownDeltaOp | None = None
    gate: np.ndarray | None = None  # [r, H]
    up: np.ndarray | None = None  # [r, H]

    @property
    def neurons(self) -> bool:
        return self.gate is not None


class OverlayState:
    """Effective edits after applying ops in order (see the module docstring)."""

    def __init__(self, base_knn: Sequence[KnnEntry] = ()):
        self.slots: dict[tuple[int, int], Slot] = {}
        self.knn: list[KnnEntry] = list(base_knn)
        self.deltas: dict[int, list[Delta]] = {}
        # (layer, feature) -> [(patch index, op)] of feature-keyed ops, in application order
        self.writes: dict[tuple[int, int], list[tuple[int, vlp.Op]]] = {}
        self.relations: dict[tuple[int, int], str] = {}

    # -- applying ------------------------------------------------------------------------------

    def apply(self, op: vlp.Op, source: int = 0) -> None:
        """Apply one operation; `source` numbers the patch it came from (collision tracking)."""
        kind = op.op
        if kind in vlp.FEATURE_OPS:
            key = (op.layer, op.feature)
            self.writes.setdefault(key, []).append((source, op))
            self._apply_feature(key, op)
        elif kind == "insert_knn":
            conf = 1.0 if op.confidence is None else float(op.confidence)
            self.knn.append(KnnEntry(layer=op.layer, key=_unit(op.key), target_id=int(op.target_id),
                                     target_token=op.target, entity=op.entity, relation=op.relation,
                                     confidence=conf))
        elif kind == "delete_knn":
            e = op.entity.casefold()
            self.knn = [k for k in self.knn if k.entity.casefold() != e]
        elif kind == "down_delta":
            self.deltas.setdefault(op.layer, []).append(Delta(op.layer, op.u, op.v, op, op.gate, op.up))
        elif kind == "delete_edit":
            for layer, ds in self.deltas.items():
                self.deltas[layer] = [d for d in ds if d.op is None or d.op.edit_id != op.edit_id]
        else:  # pragma: no cover - ops are validated on read
            raise PatchError(f"unknown op {kind!r}")

    def _apply_feature(self, key: tuple[int, int], op: vlp.Op, components: Iterable[str] | None = None) -> None:
        slot = self.slots.setdefault(key, Slot())
        if op.op == "delete":
            slot.tombstone = True
            slot.meta = None
            slot.gate = slot.up = slot.down = None
            slot.relation = None
            return
        parts = set(components) if components is not None else {"meta", "gate", "up", "down"}
        if op.op == "insert":
            slot.tombstone = False
            if "meta" in parts:
                slot.meta = insert_meta(op)
                slot.relation = op.relation
        elif "meta" in parts and op.down_meta is not None:
            dm = op.down_meta
            slot.meta = FeatureMeta(dm.t, dm.i, dm.c, ((dm.t, dm.i, dm.c),))
        for comp in ("gate", "up", "down"):
            v = getattr(op, comp)
            if comp in parts and v is not None:
                setattr(slot, comp, np.asarray(v, dtype=np.float32))

    # -- questions -------------------------------------------------------------------------------

    def layer_slots(self, layer: int) -> dict[int, Slot]:
        return {f: s for (l, f), s in self.slots.items() if l == layer}

    def touched_layers(self) -> list[int]:
        ls = {l for (l, _f), s in self.slots.items() if s.tombstone or s.has_vectors}
        return sorted(ls | {l for l, d in self.deltas.items() if d})

    def collisions(self) -> dict[tuple[int, int], int]:
        """Slots written by ≥ 2 distinct patches (the session counts as one): slot → #patches."""
        out = {}
        for key, writes in self.writes.items():
            n = len({src for src, _ in writes})
            if n >= 2:
                out[key] = n
        return out

    def resolve_highest_confidence(self) -> None:
        """For each colliding slot, re-apply the components of its highest-confidence op
        (`down_meta.c`, else `confidence`; ties ⇒ the later one)."""
        for key in self.collisions():
            best = None
            best_c = None
            for _src, op in self.writes[key]:
                c = vlp.op_confidence(op)
                if c is None:
                    continue
                if best is None or c >= best_c:
                    best, best_c = op, c
            if best is not None and best.op != "delete":
                self._apply_feature(key, best)

    @property
    def empty(self) -> bool:
        return not self.slots and not any(self.deltas.values())


def insert_meta(op: vlp.InsertOp) -> FeatureMeta:
    """The metadata an `insert` op sets (spec §12.2)."""
    if op.down_meta is not None:
        dm = op.down_meta
        return FeatureMeta(dm.t, dm.i, dm.c, ((dm.t, dm.i, dm.c),))
    c = DEFAULT_INSERT_C_SCORE if op.confidence is None else float(op.confidence)
    return FeatureMeta(op.target, 0, c, ())


# ---------------------------------------------------------------------------------------------
# applied patches and the recording
# ---------------------------------------------------------------------------------------------


@dataclass
class AppliedPatch:
    """One patch on the stack: the name it is listed and removed under, and its contents."""

    name: str
    patch: vlp.Patch
    path: Path | None = None

    @property
    def counts(self) -> vlp.OpCounts:
        return self.patch.counts


@dataclass
class Recording:
    """The active recording (the session patch): a named `.vlp` target or anonymous (auto)."""

    path: str | None
    ops: list[vlp.Op] = field(default_factory=list)
    description: str | None = None

    @property
    def anonymous(self) -> bool:
        return self.path is None

    @property
    def counts(self) -> vlp.OpCounts:
        return vlp.count_ops(self.ops)


@dataclass(frozen=True)
class SavedPatch:
    path: str
    counts: vlp.OpCounts
    operations: int


_ids = itertools.count(1)


class PatchSession:
    """Base vindex + applied patches + the recording; owns the effective `OverlayState`.

    `view` is the overlay-aware vindex view; `model()` the overlay-aware runtime model.
    Thread-safety: one writer at a time (LQL sessions are single-threaded; the server
    serialises mutations per session).
    """

    def __init__(self, base, model=None, inherited: Sequence[AppliedPatch] = ()):
        if isinstance(base, OverlayView):
            base = base.base
        self.base = base
        self.applied: list[AppliedPatch] = list(inherited)
        self.recording: Recording | None = None
        self.caches: dict[str, Any] = {}
        self.epoch = 0
        self._base_model = model
        self._model = None
        self._lock = threading.RLock()
        self._base_knn: list[KnnEntry] | None = None
        self._ffn_cache: dict[int, Any] = {}
        self.state = OverlayState(self.base_knn())
        for i, ap in enumerate(self.applied, 1):
            for op in ap.patch.operations:
                self.state.apply(op, i)
        self.view = OverlayView(self)

    # -- base facts -------------------------------------------------------------------------------

    @property
    def base_model_id(self) -> str:
        return self.base.model

    @property
    def shape(self) -> vlp.PatchShape:
        return vlp.PatchShape.of(self.base)

    def base_knn(self) -> list[KnnEntry]:
        """The base vindex's `knn_store.bin` entries (read once; [] if none)."""
        if self._base_knn is None:
            p = Path(self.base.path) / KNN_FILE
            self._base_knn = read_knn_store(p)[1] if p.is_file() else []
        return list(self._base_knn)

    def fork(self) -> PatchSession:
        """A new session starting from this one's applied patches and recording ops, sharing the
        base model (server sessions: base ⊕ global patches ⊕ the session's own)."""
        inherited = list(self.applied)
        if self.recording is not None and self.recording.ops:
            inherited.append(AppliedPatch("(session)", self._recording_patch()))
        return PatchSession(self.base, self._base_model, inherited)

    # -- state ------------------------------------------------------------------------------------

    def _changed(self) -> None:
        self.epoch += 1
        self._ffn_cache.clear()

    def replay(self) -> OverlayState:
        """A fresh effective state: the base, the applied patches in order, then the recording."""
        st = OverlayState(self.base_knn())
        for i, ap in enumerate(self.applied, 1):
            for op in ap.patch.operations:
                st.apply(op, i)
        if self.recording is not None:
            for op in self.recording.ops:
                st.apply(op, len(self.applied) + 1)
        return st

    def rebuild(self) -> None:
        """Recompute the effective state from the base (applied patches, then the recording)."""
        with self._lock:
            self.state = self.replay()
            self._changed()

    @property
    def empty(self) -> bool:
        """True when no patch is applied and nothing is recorded."""
        return not self.applied and (self.recording is None or not self.recording.ops)

    def knn_entries(self) -> list[KnnEntry]:
        return list(self.state.knn)

    # -- recording ----------------------------------------------------------------------------------

    def begin(self, path: str, description: str | None = None) -> Recording:
        """BEGIN PATCH: start a named recording; an anonymous one is upgraded and keeps its ops."""
        with self._lock:
            if self.recording is not None and not self.recording.anonymous:
                raise PatchError("patch session already active. Run SAVE PATCH or discard first.")
            if self.recording is None:
                self.recording = Recording(path, description=description)
            else:
                self.recording.path = path
                self.recording.description = description or self.recording.description
            return self.recording

    def record(self, ops: Sequence[vlp.Op]) -> bool:
        """Apply mutation ops to the overlay and append them to the recording, starting an
        anonymous one if none is active. Returns True when a recording was auto-started."""
        with self._lock:
            started = self.recording is None
            if started:
                self.recording = Recording(None)
            src = len(self.applied) + 1
            for op in ops:
                self.state.apply(op, src)
                self.recording.ops.append(op)
            self._changed()
            return started

    def _recording_patch(self, description: str | None = None) -> vlp.Patch:
        rec = self.recording
        return vlp.Patch(base_model=self.base_model_id, operations=list(rec.ops if rec else []),
                         created_at=vlp.now_rfc3339(),
                         description=description or (rec.description if rec else None),
                         base_checksum=(self.base.index.checksums or {}).get("gate_vectors.bin"))

    def save(self, path: str | Path | None = None, resolved: Path | None = None,
             description: str | None = None) -> SavedPatch:
        """SAVE PATCH: write the recording as a `.vlp` (atomically) and end it. The edits stay
        applied: the saved patch joins the applied list under its path (REMOVE PATCH works)."""
        with self._lock:
            rec = self.recording
            if rec is None:
                raise PatchError("no active patch session. Run BEGIN PATCH first.")
            target = str(path) if path is not None else rec.path
            if target is None:
                raise PatchError('anonymous patch session — use SAVE PATCH "filename.vlp" or '
                                 'BEGIN PATCH "filename.vlp" first.')
            out = resolved if resolved is not None else Path(target)
            desc = description or rec.description or Path(target).stem
            p = self._recording_patch(desc)
            vlp.write_patch(out, p)
            self.applied.append(AppliedPatch(target, p, out))
            self.recording = None
            self.rebuild()  # same effective state; the ops now count as the saved patch's
            return SavedPatch(str(target), p.counts, len(p.operations))

    def discard_recording(self) -> int:
        """Drop the recording and its edits; returns how many ops were discarded."""
        with self._lock:
            n = len(self.recording.ops) if self.recording else 0
            self.recording = None
            self.rebuild()
            return n

    # -- applying and removing --------------------------------------------------------------------

    def load(self, path: str | Path) -> vlp.Patch:
        """Read and validate a patch for this base (shape and base model)."""
        return vlp.read_patch(path, self.shape, self.base_model_id)

    def validate(self, data: Any, where: str = "inline patch") -> vlp.Patch:
        """Validate a parsed patch object (server inline patches)."""
        try:
            return vlp.patch_from_json(data, self.shape, self.base_model_id, where=where)
        except PatchError as exc:
            raise PatchError(f"failed to load patch: {exc}") from None

    def apply(self, patch: vlp.Patch | str | Path, name: str | None = None,
              path: Path | None = None) -> AppliedPatch:
        """APPLY PATCH: stack a patch (file path or `Patch`) before the recording."""
        with self._lock:
            if not isinstance(patch, vlp.Patch):
                path = Path(patch) if path is None else path
                name = name or str(patch)
                patch = self.load(path)
            if patch.base_model != self.base_model_id:
                raise PatchError(f"failed to load patch: it was made for base model {patch.base_model!r}, "
                                 f"not {self.base_model_id!r}")
            name = name or patch.description or "inline-patch"
            ap = AppliedPatch(name, patch, path)
            self.applied.append(ap)
            if self.recording is not None and self.recording.ops:
                self.rebuild()  # the recording must stay last
            else:
                src = len(self.applied)
                for op in patch.operations:
                    self.state.apply(op, src)
                self._changed()
            return ap

    def find(self, name: str) -> int | None:
        """0-based index of the applied patch listed under `name` (path, file name or description)."""
        for i, ap in enumerate(self.applied):
            if ap.name == name:
                return i
        for i, ap in enumerate(self.applied):
            if (ap.path is not None and (str(ap.path) == name or ap.path.name == name)) \
                    or ap.patch.description == name:
                return i
        return None

    def remove(self, name: str) -> int:
        """REMOVE PATCH: drop the patch applied under `name`; returns its 1-based position."""
        with self._lock:
            i = self.find(name)
            if i is None:
                raise PatchError(f"patch not found: {name}")
            del self.applied[i]
            self.rebuild()
            return i + 1

    def clear(self) -> None:
        """Remove every patch and the recording: back to the bare base."""
        with self._lock:
            self.applied.clear()
            self.recording = None
            self.rebuild()

    # -- runtime ----------------------------------------------------------------------------------

    def base_runtime_model(self):
        """The base vindex's runtime model: the one given at construction (pass the model already
        loaded for the base, e.g. `knowledge.queries.model_for(base)`, to share it), else loaded
        from the base's weights once. Never calls `model_for` itself: `model_for(view)` holds its
        lock while it asks the view for a model."""
        if self._base_model is None:
            with self._lock:
                if self._base_model is None:
                    if not getattr(self.base, "has_weights", False):
                        raise CapabilityError(
                            f"{Path(self.base.path).name} is a {self.base.extract_level}-level vindex: this requires "
                            "model weights (re-extract with --level inference)")
                    self._base_model = self.base.load_model()
        return self._base_model

    @property
    def has_weights(self) -> bool:
        return self._base_model is not None or bool(getattr(self.base, "has_weights", False))

    def model(self):
        """The overlay-aware runtime model: the base model's tensors (shared, not copied) with a
        `PatchedFfn` reading this overlay live."""
        if self._model is None:
            from ..ffn.patched import PatchedFfn

            base = self.base_runtime_model()
            # memit caches its base-weight statistics on the model object: make every overlay copy
            # share the base model's caches instead of recomputing them
            for cache in ("_memit_covariance", "_memit_preserve", "_memit_gcov", "_memit_state"):
                base.__dict__.setdefault(cache, {})
            m = copy.copy(base)
            if base.spec.moe is not None and base.dense_ffn is None:
                from ..ffn.moe import PatchedMoeFfn

                m.ffn = PatchedMoeFfn(base.ffn, self)
            else:
                m.ffn = PatchedFfn(base.spec, base.dense_ffn, self)
            from .knn_match import KnnRecall

            m.recall = KnnRecall(self.knn_entries, base.tokenizer)
            self._model = m
        return self._model

    def layer_edits(self, layer: int):
        """The `LayerEdits` the patched FFN applies at `layer` (None: dense), cached per epoch."""
        if layer in self._ffn_cache:
            return self._ffn_cache[layer]
        with self._lock:
            from ..ffn.patched import build_layer_edits

            base = self.base_runtime_model()
            slots = {f: s for f, s in self.state.layer_slots(layer).items() if s.tombstone or s.has_vectors}
            deltas = self.state.deltas.get(layer, [])
            e = None
            if slots or deltas:
                # normal tensors even when first needed inside an inference-mode forward: weight-level
                # edits (MEMIT) later run autograd through this FFN
                with torch.inference_mode(False):
                    if base.dense_ffn is None and base.spec.moe is not None:
                        from ..ffn.moe import build_moe_layer_edits

                        e = build_moe_layer_edits(base.ffn, layer, slots, deltas) or None
                    else:
                        e = build_layer_edits(base.spec, base.dense_ffn, layer, slots, deltas)
            self._ffn_cache[layer] = e
            return e


# ---------------------------------------------------------------------------------------------
# the Vindex-compatible view
# ---------------------------------------------------------------------------------------------


class OverlayView:
    """base ⊕ overlay with the `Vindex` query surface (gate KNN, walk, metadata, model)."""

    def __init__(self, session: PatchSession):
        self.session = session
        self.base = session.base

    def __getattr__(self, name: str) -> Any:  # everything not overridden: the base vindex
        return getattr(self.base, name)

    def __repr__(self) -> str:
        return f"OverlayView({self.base!r}, patches={len(self.session.applied)})"

    @property
    def state(self) -> OverlayState:
        return self.session.state

    # -- gates --------------------------------------------------------------------------------------

    def _layer_overrides(self, layer: int) -> tuple[list[int], np.ndarray | None, list[int]]:
        slots = self.state.layer_slots(layer)
        gated = sorted(f for f, s in slots.items() if s.gate is not None and not s.tombstone)
        tomb = sorted(f for f, s in slots.items() if s.tombstone)
        G = np.stack([slots[f].gate for f in gated]) if gated else None
        return gated, G, tomb

    def gate_scores(self, layer: int, q) -> torch.Tensor:
        scores = self.base.gate_scores(layer, q).clone()
        gated, G, tomb = self._layer_overrides(layer)
        if gated:
            t = q if isinstance(q, torch.Tensor) else torch.as_tensor(np.asarray(q))
            t = t.detach().to(torch.float32)
            scores[..., gated] = t @ torch.from_numpy(G).t()
        if tomb:
            scores[..., tomb] = 0.0
        return scores

    def gate_scores_at(self, layer: int, q: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(features, dtype=torch.long)
        scores = self.base.gate_scores_at(layer, q, idx).clone()
        gated, G, tomb = self._layer_overrides(layer)
        if gated or tomb:
            t = q.detach().to(torch.float32)
            pos = {f: j for j, f in enumerate(gated)}
            for n, f in enumerate(idx.tolist()):
                if f in pos:
                    scores[n] = torch.from_numpy(G[pos[f]]).float() @ t
                if f in tomb:
                    scores[n] = 0.0
        return scores

    def _knn(self, scores: torch.Tensor, layer: int, k: int, tomb: list[int]) -> torch.Tensor:
        a = scores.abs()
        if tomb:
            a[..., tomb] = -1.0
        live = scores.shape[-1] - len(tomb)
        return topk_exact(a, max(0, min(k, live)))

    def gate_knn(self, layer: int, q, k: int = 10) -> list[GateHit]:
        scores = self.gate_scores(layer, q)
        _g, _G, tomb = self._layer_overrides(layer)
        idx = self._knn(scores, layer, k, tomb)
        return [GateHit(layer, f, v) for f, v in zip(idx.tolist(), scores[idx].tolist())]

    def gate_knn_batch(self, layer: int, queries, k: int = 10) -> list[list[GateHit]]:
        scores = self.gate_scores(layer, queries)
        _g, _G, tomb = self._layer_overrides(layer)
        idx = self._knn(scores, layer, k, tomb)
        vals = scores.gather(1, idx).tolist()
        return [[GateHit(layer, f, v) for f, v in zip(ri, rv)] for ri, rv in zip(idx.tolist(), vals)]

    def walk(self, q, layers: Iterable[int] | None = None, k: int = 10) -> list[WalkHit]:
        out: list[WalkHit] = []
        for layer in (self.base.layers() if layers is None else layers):
            for hit in self.gate_knn(layer, q, k):
                meta = self.feature_meta(layer, hit.feature)
                if meta is not None:
                    out.append(WalkHit(layer, hit.feature, hit.score, meta))
        return out

    def gate(self, layer: int) -> torch.Tensor:
        g = self.base.gate(layer)
        slots = self.state.layer_slots(layer)
        if not slots:
            return g
        g = g.clone()
        for f, s in slots.items():
            if s.gate is not None:
                g[f] = torch.from_numpy(s.gate)
        return g

    def gate_row(self, layer: int, feature: int) -> torch.Tensor:
        s = self.state.slots.get((layer, feature))
        if s is not None and s.gate is not None:
            return torch.from_numpy(s.gate.copy())
        return self.base.gate_row(layer, feature)

    # -- metadata -----------------------------------------------------------------------------------

    def feature_meta(self, layer: int, feature: int) -> FeatureMeta | None:
        s = self.state.slots.get((layer, feature))
        if s is not None:
            if s.tombstone:
                return None
            if s.meta is not None:
                return s.meta
        return self.base.feature_meta(layer, feature)

    def meta_arrays(self, layer: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        top, c, present = self.base.meta_arrays(layer)
        slots = self.state.layer_slots(layer)
        if not slots:
            return top, c, present
        top, c, present = np.array(top, dtype=np.uint32), np.array(c, dtype=np.float32), np.array(present, dtype=bool)
        for f, s in slots.items():
            if not 0 <= f < len(top):
                continue
            if s.tombstone:
                top[f], c[f], present[f] = 0, 0.0, False
            elif s.meta is not None:
                top[f], c[f], present[f] = s.meta.top_token_id, s.meta.c_score, True
        return top, c, present

    # -- knowledge surface --------------------------------------------------------------------------

    def knn_entries(self) -> list[KnnEntry]:
        """The effective retrieval-override store (base entries + KNN ops)."""
        return self.session.knn_entries()

    @property
    def has_weights(self) -> bool:
        return self.session.has_weights

    def load_model(self, dtype: Any = "float32"):
        return self.session.model()
