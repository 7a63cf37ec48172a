"""DIFF a b (algorithms §14): the features two vindexes (or overlays, `CURRENT`) differ in, and
DIFF … INTO PATCH, the patch that turns a into b. Reads FFN weights through COMPILE's helpers."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CompileError, VindexError
from . import patch as vlp
from .compile import (
    _canonical_view, _expert_blocks, _ffn_maps, _hf_key, _layer_edits_canonical, _read_tensors, _spec_and_prefix,
)
from .overlay import OverlayView


@dataclass(frozen=True)
class DiffRow:
    layer: int
    feature: int
    a_token: str | None
    b_token: str | None
    status: str  # modified | added | removed
    vectors: tuple[str, ...] = ()  # differing components: gate, up, down


@dataclass
class DiffResult:
    a: str
    b: str
    rows: list[DiffRow] = field(default_factory=list)
    limit: int = 20
    patch_path: str | None = None
    patch_counts: vlp.OpCounts | None = None
    operations: int = 0

    @property
    def total(self) -> int:
        return len(self.rows)

    @property
    def shown(self) -> list[DiffRow]:
        return self.rows[: self.limit]


def _ffn_weights(vx, layer: int) -> dict[str, torch.Tensor] | None:
    """Effective canonical f32 gate/up/down of a layer (overlay edits included), or None."""
    ps = vx.session if isinstance(vx, OverlayView) else None
    base = ps.base if ps is not None else vx
    if not getattr(base, "has_weights", False):
        return None
    src = Path(base.path)
    cache = getattr(base, "_diff_weight_cache", None)
    if cache is None:
        cache = {}
        try:
            base._diff_weight_cache = cache
        except AttributeError:
            pass
    if layer not in cache:
        spec, wmap, prefix = _spec_and_prefix(src)
        out = {}
        for comp, tm in _ffn_maps(spec, layer).items():
            key = _hf_key(prefix, tm.hf_name)
            if key not in wmap:
                continue
            t = _read_tensors(src, wmap, [key])[key].to(torch.float32)
            out[comp] = _canonical_view(t, tm.transform).clone()
        if spec.experts_are_features:  # the experts as one layer of the vindex's features
            blocks = _expert_blocks(spec)
            out = {"gate.weight": torch.cat([out[b + "gate.weight"] for b in blocks]),
                   "up.weight": torch.cat([out[b + "up.weight"] for b in blocks]),
                   "down.weight": torch.cat([out[b + "down.weight"] for b in blocks], dim=1)}
        out["_gated"] = spec.gated_ffn
        cache[layer] = out
    w = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in cache[layer].items()}
    if ps is not None and layer in ps.state.touched_layers():
        _layer_edits_canonical(_Gated(w["_gated"]), ps.state, layer, w)
    return w


class _Gated:
    def __init__(self, gated: bool):
        self.gated_ffn = gated


def diff(a, b, layer: int | None = None, relation: str | None = None, limit: int | None = None,
         vectors: bool = True, tol: float = 0.0) -> DiffResult:
    """DIFF a b (algorithms §14) on effective states (`OverlayView` = CURRENT)."""
    if a.hidden_size != b.hidden_size:
        raise CompileError(f"cannot diff vindexes of different hidden sizes ({a.hidden_size} vs {b.hidden_size})")
    labels_b = labels_a = None
    if relation is not None:
        from ..knowledge.labels import labels_for

        labels_a, labels_b = labels_for(a), labels_for(b)
    layers = [layer] if layer is not None else sorted(set(a.layers()) | set(b.layers()))
    rows: list[DiffRow] = []
    for L in layers:
        fa = a.num_features(L) if L in a.layers() else 0
        fb = b.num_features(L) if L in b.layers() else 0
        if not fa and not fb:
            continue
        ga = a.gate(L) if fa and vectors else None
        gb = b.gate(L) if fb and vectors else None
        wa = _ffn_weights(a, L) if vectors and fa else None
        wb = _ffn_weights(b, L) if vectors and fb else None
        for f in range(max(fa, fb)):
            ma = a.feature_meta(L, f) if f < fa else None
            mb = b.feature_meta(L, f) if f < fb else None
            status = None
            if ma is not None and mb is not None:
                if ma.top_token != mb.top_token or abs(ma.c_score - mb.c_score) > 0.01:
                    status = "modified"
            elif ma is not None:
                status = "removed"
            elif mb is not None:
                status = "added"
            comps = []
            if vectors and f < fa and f < fb:
                if ga is not None and gb is not None and not _close(ga[f], gb[f], tol):
                    comps.append("gate")
                if wa is not None and wb is not None:
                    if wa.get("up.weight") is not None and wb.get("up.weight") is not None and wa["_gated"] \
                            and not _close(wa["up.weight"][f], wb["up.weight"][f], tol):
                        comps.append("up")
                    if not _close(wa["down.weight"][:, f], wb["down.weight"][:, f], tol):
                        comps.append("down")
            if status is None and comps:
                status = "modified"
            if status is None:
                continue
            if relation is not None:
                lab = (labels_b.label(L, f) if mb is not None else None) or labels_a.label(L, f) or ""
                r = relation.lower()
                if not lab or not (r in lab.lower() or lab.lower() in r):
                    continue
            rows.append(DiffRow(L, f, ma.top_token if ma else None, mb.top_token if mb else None, status,
                                tuple(comps)))
    return DiffResult(_name(a), _name(b), rows, 20 if limit is None else int(limit))


def _close(x: torch.Tensor, y: torch.Tensor, tol: float) -> bool:
    if tol <= 0:
        return bool(torch.equal(x, y))
    return float((x - y).abs().max()) <= tol


def _name(vx) -> str:
    if isinstance(vx, OverlayView):
        return "CURRENT"
    return str(getattr(vx, "path", vx))


def diff_patch(a, b, result: DiffResult) -> vlp.Patch:
    """The `.vlp` reproducing `b` from `a`: update (with b's down_meta and differing vectors),
    delete ("removed in target") and insert (entity "", b's metadata) ops."""
    ops: list[vlp.Op] = []
    cache: dict[int, tuple] = {}
    for row in result.rows:
        L, f = row.layer, row.feature
        if L not in cache:
            cache[L] = (b.gate(L) if L in b.layers() else None, _ffn_weights(b, L) if L in b.layers() else None)
        gb, wb = cache[L]
        mb = b.feature_meta(L, f)
        dm = vlp.DownMeta(mb.top_token, mb.top_token_id, mb.c_score) if mb is not None else None
        gate = gb[f].numpy().copy() if "gate" in row.vectors else None
        up = wb["up.weight"][f].numpy().copy() if "up" in row.vectors and wb is not None else None
        down = wb["down.weight"][:, f].numpy().copy() if "down" in row.vectors and wb is not None else None
        if row.status == "removed":
            ops.append(vlp.DeleteOp(L, f, "removed in target"))
        elif row.status == "added":
            ops.append(vlp.InsertOp(L, f, entity="", target=mb.top_token, relation=None, confidence=mb.c_score,
                                    gate=gate, up=up, down=down, down_meta=dm))
        else:
            meta_changed = row.a_token != row.b_token or (
                a.feature_meta(L, f) is not None and mb is not None
                and abs(a.feature_meta(L, f).c_score - mb.c_score) > 0.01)
            ops.append(vlp.UpdateOp(L, f, gate=gate, up=up, down=down, down_meta=dm if meta_changed else None))
    base_model = a.model
    return vlp.Patch(base_model=base_model, operations=ops, created_at=vlp.now_rfc3339(),
                     description=f"Diff: {result.a} vs {result.b}")


def diff_into_patch(a, b, path: str | Path, **kw) -> DiffResult:
    """DIFF a b INTO PATCH "path": compute, write the patch atomically, report counts."""
    res = diff(a, b, **kw)
    p = diff_patch(a, b, res)
    vlp.write_patch(path, p)
    res.patch_path = str(path)
    res.patch_counts = p.counts
    res.operations = len(p.operations)
    return res


def open_vindex(path: str | Path):
    from .vindex import Vindex

    p = Path(path)
    if not p.exists():
        raise VindexError(f"vindex not found: {path}")
    return Vindex.load(p)
