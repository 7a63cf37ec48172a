"""Browse queries without attention: WALK, SELECT (EDGES / FEATURES / ENTITIES / NEAREST TO),
SHOW RELATIONS and STATS (lql.md §4.2–4.3, server-api.md §4, algorithms §3–4).

Every function takes an opened `Vindex` and returns typed rows (`knowledge.rows`).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from ..errors import DescribeError, ModelqlError, SelectError
from .describe import resolve_mode, scan_layers
from .labels import FeatureLabels, labels_for
from .queries import entity_vector, residual_query, walk_vector
from .rows import (BandStats, ClusterRow, Condition, EntityRow, FeatureRow, ProbeRelationRow, RelationRow,
                   RelationsResult, SelectResult, Stats, WalkResult, WalkRow)
from .tokens import content, entity_like

DEFAULT_WALK_TOP = 10
EDGE_WALK_K = 500
SELECT_LIMIT = 20
FEATURES_LIMIT = 34
ENTITIES_LIMIT = 50
RELATION_MIN_C = 0.2
RELATIONS_TOP = 30
RELATIONS_TOP_VERBOSE = 50
SOURCES = ("edges", "features", "entities")
OPS = ("=", "!=", ">", "<", ">=", "<=", "LIKE", "IN")


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _label(labs: FeatureLabels, layer: int, feature: int, probe_only: bool = False) -> tuple[str | None, str | None]:
    got = labs.get(layer, feature)
    if got is None or (probe_only and got[1] != "probe"):
        return None, None
    return got


def _also(meta, n: int = 3) -> tuple[str, ...]:
    top = meta.top_token.strip().lower()
    out = []
    for t, _i, _v in meta.top_k:
        t = t.strip()
        if t and t.lower() != top and t not in out:
            out.append(t)
        if len(out) >= n:
            break
    return tuple(out)


def _feature_row(vindex, labs, layer: int, f: int, meta, score: float | None = None,
                 probe_only: bool = False) -> FeatureRow:
    rel, src = _label(labs, layer, f, probe_only)
    walked = score is not None
    return FeatureRow(
        layer=layer, feature=f, token=meta.top_token, token_id=meta.top_token_id, c_score=meta.c_score,
        score=score if walked else meta.c_score, score_kind="gate" if walked else "c_score",
        also=_also(meta), top_tokens=tuple(t for t, _i, _v in meta.top_k), relation=rel, source=src,
        gate_score=score, expert=_expert(vindex, layer, f),
    )


def _expert(vindex, layer: int, feature: int) -> int | None:
    """The expert a MoE layer's feature belongs to (None: a dense layer, or a vindex without experts)."""
    expert_of = getattr(vindex, "expert_of", None)
    if expert_of is None or feature < 0 or layer < 0:
        return None
    return expert_of(layer, feature)[0]


def _norm_cond(c) -> Condition:
    if isinstance(c, Condition):
        cond = c
    elif isinstance(c, (tuple, list)) and len(c) == 3:
        cond = Condition(str(c[0]), str(c[1]), c[2])
    else:  # duck-typed (e.g. the LQL AST's Condition with an Op enum)
        op = getattr(c, "op", None)
        cond = Condition(str(getattr(c, "field")), str(getattr(op, "value", op)), getattr(c, "value"))
    op = cond.op.upper()
    if op not in OPS:
        raise SelectError(f"unsupported operator {cond.op!r} in WHERE {cond.field}")
    return Condition(cond.field.lower(), op, cond.value)


def _like(pattern: str, text: str) -> bool:
    """SQL LIKE with `%` as the only wildcard, case-insensitive."""
    regex = "^" + ".*".join(re.escape(p) for p in str(pattern).lower().split("%")) + "$"
    return re.match(regex, text.lower(), re.S) is not None


def _cmp_num(op: str, a: float, b: Any, eps: float = 0.0) -> bool:
    if op == "IN":
        vals = b if isinstance(b, (tuple, list)) else (b,)
        return any(_cmp_num("=", a, v, eps) for v in vals)
    try:
        bv = float(b)
    except (TypeError, ValueError):
        raise SelectError(f"expected a number, got {b!r}") from None
    if op == "=":
        return abs(a - bv) <= eps
    if op == "!=":
        return abs(a - bv) > eps
    if op == ">":
        return a > bv
    if op == "<":
        return a < bv
    if op == ">=":
        return a >= bv
    if op == "<=":
        return a <= bv
    raise SelectError(f"operator {op} is not valid for numbers")


def _cmp_text(op: str, text: str | None, value: Any, mode: str = "substring") -> bool:
    """Text match: `=` is a case-insensitive substring (or mutual containment for relations)."""
    t = (text or "").lower()
    if op == "IN":
        vals = value if isinstance(value, (tuple, list)) else (value,)
        return any(_cmp_text("=", text, v, mode) for v in vals)
    v = str(value).lower()
    if op == "LIKE":
        return bool(text) and _like(v, t)
    if mode == "relation":
        hit = bool(t) and (v in t or t in v)
    elif mode == "exact":
        hit = t == v
    else:
        hit = v in t
    if op == "=":
        return hit
    if op == "!=":
        return bool(t) and not hit if mode == "relation" else not hit
    raise SelectError(f"operator {op} is not valid for text")


# ---------------------------------------------------------------------------------------------
# WALK
# ---------------------------------------------------------------------------------------------


def walk(vindex, prompt: str, top: int | None = None, layers: Iterable[int] | None = None,
         labels: FeatureLabels | None = None) -> WalkResult:
    """WALK / EXPLAIN WALK / `/v1/walk`: gate KNN of the prompt's last token embedding (no attention).

    `layers` is intersected with the loaded layers (default all). Rows are layer ascending, then
    |gate| descending; hits without metadata are dropped.
    """
    t0 = time.perf_counter()
    k = DEFAULT_WALK_TOP if top is None else int(top)
    if k < 1:
        raise ModelqlError("TOP must be at least 1")
    q, tid = walk_vector(vindex, prompt)
    scanned = scan_layers(vindex, layers=layers) if layers is not None else vindex.layers()
    labs = labels if labels is not None else labels_for(vindex)
    rows = []
    for h in vindex.walk(q, scanned, k):
        rel, src = _label(labs, h.layer, h.feature)
        rows.append(WalkRow(layer=h.layer, feature=h.feature, gate_score=h.score, target=h.meta.top_token,
                            target_id=h.meta.top_token_id, c_score=h.meta.c_score,
                            top_tokens=tuple(t for t, _i, _v in h.meta.top_k), relation=rel, source=src))
    return WalkResult(prompt=prompt, token=vindex.token_text(tid), token_id=tid, layers=tuple(scanned), top=k,
                      rows=tuple(rows), latency_ms=(time.perf_counter() - t0) * 1e3)


# ---------------------------------------------------------------------------------------------
# SELECT
# ---------------------------------------------------------------------------------------------

_ORDER_FIELDS = {"confidence": "c_score", "c_score": "c_score", "layer": "layer", "score": "score",
                 "gate_score": "score", "feature": "feature"}


def _order(rows: list[FeatureRow], order_by: str | None, descending: bool) -> list[FeatureRow]:
    if order_by is None:
        return rows
    key = _ORDER_FIELDS.get(order_by.lower())
    if key is None:
        raise SelectError(f"cannot ORDER BY {order_by!r} (use confidence, c_score, layer or score)")
    return sorted(rows, key=lambda r: getattr(r, key), reverse=descending)


def select(
    vindex,
    source: str = "edges",
    where: Sequence[Any] = (),
    *,
    order_by: str | None = None,
    descending: bool = False,
    limit: int | None = None,
    nearest: tuple[str, int] | None = None,
    mode: str | None = "embedding",
    probe_only: bool = False,
    model=None,
    labels: FeatureLabels | None = None,
) -> SelectResult:
    """SELECT … FROM EDGES | FEATURES | ENTITIES [NEAREST TO "e" AT LAYER n] [WHERE …] [ORDER BY …] [LIMIT n].

    `where`: `Condition(field, op, value)`s (or `(field, op, value)` tuples, or any object with
    `.field/.op/.value`). Fields: entity/token (top-token substring), relation (label; `=` is
    mutual containment, LIKE takes `%`), layer, feature, expert (a MoE layer's features: the
    expert they belong to; dense layers match no expert condition), score/confidence/c_score
    (c_score; `=` within 0.001).

    EDGES with both entity and relation: the entity is walked (K = 500 per layer) and hits
    whose label matches are kept, scored by signed gate score — with `mode` "embedding" (the
    reference) or "residual"/"auto" (x_L per layer, needs weights). NEAREST TO: gate KNN of the
    entity vector (or its x_L) at one layer. Otherwise metadata is scanned (score = c_score).
    `total` counts matches before LIMIT.
    """
    t0 = time.perf_counter()
    src = source.lower()
    if src not in SOURCES:
        raise SelectError(f"unknown SELECT source {source!r} (use EDGES, FEATURES or ENTITIES)")
    conds = [_norm_cond(c) for c in where]
    labs = labels if labels is not None else labels_for(vindex)
    fields = {c.field for c in conds}
    known = {"entity", "token", "relation", "layer", "feature", "expert", "score", "confidence", "c_score"}
    unknown = fields - known
    if unknown:
        raise SelectError(f"unknown field {sorted(unknown)[0]!r} in WHERE (use entity, relation, layer, feature, "
                          "expert, confidence)")
    if src == "entities":
        return _select_entities(vindex, conds, limit, t0)

    def matches(row: FeatureRow, skip_score: bool = False) -> bool:
        for c in conds:
            if c.field in ("entity", "token"):
                if not _cmp_text(c.op, row.token, c.value):
                    return False
            elif c.field == "relation":
                if not _cmp_text(c.op, row.relation, c.value, mode="relation"):
                    return False
            elif c.field == "layer":
                if not _cmp_num(c.op, row.layer, c.value):
                    return False
            elif c.field == "feature":
                if not _cmp_num(c.op, row.feature, c.value):
                    return False
            elif c.field == "expert":
                if row.expert is None or not _cmp_num(c.op, row.expert, c.value):
                    return False
            elif not skip_score and not _cmp_num(c.op, row.c_score, c.value, eps=0.001):
                return False
        return True

    layer_filter = _layer_set(vindex, conds)
    feature_filtered = "feature" in fields
    default_limit = (len(vindex.layers()) if feature_filtered else
                     SELECT_LIMIT if src == "edges" else
                     (max(vindex.num_features(l) for l in layer_filter) if "layer" in fields and layer_filter
                      else FEATURES_LIMIT))
    n = default_limit if limit is None else int(limit)
    walked, used_mode = False, None
    rows: list[FeatureRow] = []
    if nearest is not None:
        ent, layer = nearest
        q, used_mode = _entity_query(vindex, ent, [layer], mode, model)
        if limit is None:
            n = SELECT_LIMIT
        if layer not in vindex.layers():
            raise DescribeError(f"layer {layer} is not loaded")
        if q is not None:
            for h in vindex.gate_knn(layer, q[layer], n):
                meta = vindex.feature_meta(layer, h.feature)
                if meta is not None:
                    rows.append(_feature_row(vindex, labs, layer, h.feature, meta, h.score, probe_only))
        walked = True
        rows = [r for r in rows if matches(r, skip_score=True)]
        score_conds = [c for c in conds if c.field in ("score", "confidence", "c_score")]
        rows = _order(rows, order_by, descending)
        rows = [r for r in rows if all(_cmp_num(c.op, r.c_score, c.value, 0.001) for c in score_conds)]
        return SelectResult("edges" if src == "edges" else src, tuple(rows[:n]), len(rows), walked=True,
                            mode=used_mode, limit=n, latency_ms=(time.perf_counter() - t0) * 1e3)
    ent_c = next((c for c in conds if c.field in ("entity", "token") and c.op == "="), None)
    rel_c = next((c for c in conds if c.field == "relation"), None)
    if src == "edges" and ent_c is not None and rel_c is not None:
        layers = sorted(layer_filter)
        q, used_mode = _entity_query(vindex, str(ent_c.value), layers, mode, model)
        walked = True
        other = [c for c in conds if c is not ent_c]
        if q is not None:
            for L in layers:
                for h in vindex.gate_knn(L, q[L], EDGE_WALK_K):
                    meta = vindex.feature_meta(L, h.feature)
                    if meta is None:
                        continue
                    row = _feature_row(vindex, labs, L, h.feature, meta, h.score, probe_only)
                    if _matches_conds(row, other):
                        rows.append(row)
        rows.sort(key=lambda r: -r.score)
    else:
        for L in sorted(layer_filter):
            top, _c, present = vindex.meta_arrays(L)
            feats = np.nonzero(present)[0].tolist()
            for f in feats:
                meta = vindex.feature_meta(L, f)
                if meta is None:
                    continue
                row = _feature_row(vindex, labs, L, f, meta, None, probe_only)
                if matches(row, skip_score=True):
                    rows.append(row)
    if src == "edges":
        rows = _patch_rows(vindex, conds, rows) + rows
    rows = _order(rows, order_by, descending)
    score_conds = [c for c in conds if c.field in ("score", "confidence", "c_score")]
    rows = [r for r in rows if all(_cmp_num(c.op, r.c_score, c.value, 0.001) for c in score_conds)]
    return SelectResult(src, tuple(rows[:n]), len(rows), walked=walked, mode=used_mode, limit=n,
                        latency_ms=(time.perf_counter() - t0) * 1e3)


def _patch_rows(vindex, conds: list[Condition], rows: list[FeatureRow]) -> list[FeatureRow]:
    """The overlay's live facts (any edit mode, `vindex.patch_facts`) matching the WHERE, as rows
    whose source is their patch; a feature-level insert already listed as its slot is not repeated.
    `entity` conditions compare with the fact's entity (not a feature's top token)."""
    from ..vindex.patch_facts import overlay_facts

    facts = overlay_facts(vindex)
    if not facts:
        return []
    have = {(r.layer, r.feature) for r in rows}
    out = []
    for f in facts:
        if f.feature is not None and (f.layer, f.feature) in have:
            continue
        conf = 1.0 if f.confidence is None else float(f.confidence)
        row = FeatureRow(layer=-1 if f.layer is None else f.layer, feature=-1 if f.feature is None else f.feature,
                         token=f.target, token_id=int(f.target_id or 0), c_score=conf, score=conf,
                         score_kind="c_score", relation=f.relation, source="patch", entity=f.entity,
                         patch=f"{f.patch} ({f.mode})")
        ok = True
        for c in conds:
            if c.field in ("entity", "token"):
                ok = _cmp_text(c.op, f.entity, c.value) if c.field == "entity" else _cmp_text(c.op, f.target, c.value)
            elif c.field == "relation":
                ok = _cmp_text(c.op, f.relation, c.value, mode="relation")
            elif c.field == "layer":
                ok = f.layer is not None and _cmp_num(c.op, f.layer, c.value)
            elif c.field == "feature":
                ok = f.feature is not None and _cmp_num(c.op, f.feature, c.value)
            elif c.field == "expert":
                e = _expert(vindex, row.layer, row.feature)
                ok = e is not None and _cmp_num(c.op, e, c.value)
            if not ok:
                break
        if ok:
            out.append(row)
    return out


def _matches_conds(row: FeatureRow, conds: list[Condition]) -> bool:
    for c in conds:
        if c.field in ("entity", "token") and not _cmp_text(c.op, row.token, c.value):
            return False
        if c.field == "relation" and not _cmp_text(c.op, row.relation, c.value, mode="relation"):
            return False
        if c.field == "layer" and not _cmp_num(c.op, row.layer, c.value):
            return False
        if c.field == "feature" and not _cmp_num(c.op, row.feature, c.value):
            return False
        if c.field == "expert" and (row.expert is None or not _cmp_num(c.op, row.expert, c.value)):
            return False
    return True


def _layer_set(vindex, conds: list[Condition]) -> list[int]:
    loaded = vindex.layers()
    out = []
    for L in loaded:
        if all(_cmp_num(c.op, L, c.value) for c in conds if c.field == "layer"):
            out.append(L)
    return out


def _entity_query(vindex, entity: str, layers: Sequence[int], mode: str | None, model):
    """Per-layer query vectors for an entity: {layer: q} and the mode used (None if not found)."""
    m = resolve_mode(vindex, mode)
    if m == "embedding":
        q = entity_vector(vindex, entity)
        return (None if q is None else {L: q for L in layers}), m
    rq = residual_query(vindex, entity, model=model, layers=layers)
    return (None if rq is None else {L: rq.x[L] for L in layers}), m


def _select_entities(vindex, conds: list[Condition], limit: int | None, t0: float) -> SelectResult:
    layers = _layer_set(vindex, conds)
    ent_conds = [c for c in conds if c.field in ("entity", "token")]
    agg: dict[str, list] = {}
    for L in layers:
        top, cs, present = vindex.meta_arrays(L)
        for f in np.nonzero(present)[0].tolist():
            tid = int(top[f])
            tok = vindex.token_text(tid)
            if not entity_like(tok):
                continue
            if not all(_cmp_text(c.op, tok, c.value) for c in ent_conds):
                continue
            a = agg.get(tok)
            if a is None:
                agg[tok] = a = [0, float("-inf"), set()]
            a[0] += 1
            a[1] = max(a[1], float(cs[f]))
            a[2].add(L)
    rows = [EntityRow(t, n, mx, tuple(sorted(ls))) for t, (n, mx, ls) in agg.items()]
    rows.sort(key=lambda r: (-r.features, -r.max_score, r.entity))
    n = ENTITIES_LIMIT if limit is None else int(limit)
    return SelectResult("entities", tuple(rows[:n]), len(rows), limit=n,
                        latency_ms=(time.perf_counter() - t0) * 1e3)


def entities(vindex, layer: int | None = None, limit: int | None = None) -> SelectResult:
    """SHOW ENTITIES [n]: `select(vindex, "entities")` restricted to one layer."""
    where = [Condition("layer", "=", layer)] if layer is not None else []
    return select(vindex, "entities", where, limit=limit)


def features(vindex, layer: int, where: Sequence[Any] = (), limit: int | None = None) -> SelectResult:
    """SHOW FEATURES n: the features of one layer (default LIMIT = number of layers)."""
    if layer not in vindex.layers():
        raise SelectError(f"no features at layer {layer}")
    conds = [Condition("layer", "=", layer)] + [_norm_cond(c) for c in where]
    conds = [Condition("entity", c.op, c.value) if c.field == "token" else c for c in conds]
    n = len(vindex.layers()) if limit is None else limit
    return select(vindex, "features", conds, limit=n)


# ---------------------------------------------------------------------------------------------
# SHOW RELATIONS / /v1/relations
# ---------------------------------------------------------------------------------------------


def relations(vindex, layer: int | None = None, *, verbose: bool = False, top: int | None = None,
              with_examples: bool = True, labels: FeatureLabels | None = None) -> RelationsResult:
    """Probe-confirmed relations (label → feature count), and the top output tokens of the
    knowledge band (or `layer`): content tokens with c_score ≥ 0.2, aggregated by token, sorted
    by feature count (30 rows, 50 when `verbose`, or `top`)."""
    t0 = time.perf_counter()
    labs = labels if labels is not None else labels_for(vindex)
    by_rel: dict[str, list[int]] = {}
    for (l, _f), r in labs.probe.items():
        by_rel.setdefault(r, []).append(l)
    probe_rows = sorted((ProbeRelationRow(r, len(ls), min(ls), max(ls)) for r, ls in by_rel.items()),
                        key=lambda x: (-x.count, x.name))
    if layer is not None:
        scanned = scan_layers(vindex, layer=layer)
        rng = (layer, layer)
    else:
        scanned = scan_layers(vindex, band="knowledge")
        rng = tuple(vindex.bands.knowledge)
    agg: dict[str, dict] = {}
    for L in scanned:
        top_ids, cs, present = vindex.meta_arrays(L)
        for f in np.nonzero(present & (cs >= RELATION_MIN_C))[0].tolist():
            tok = vindex.token_text(int(top_ids[f]))
            if not content(tok):
                continue
            key = tok.lower()
            a = agg.get(key)
            if a is None:
                agg[key] = a = dict(name=tok, count=0, max=float("-inf"), layers=set(), ex=Counter(), rel=Counter())
            a["count"] += 1
            a["max"] = max(a["max"], float(cs[f]))
            a["layers"].add(L)
            rel = labs.label(L, f)
            if rel:
                a["rel"][rel] += 1
            if with_examples:
                meta = vindex.feature_meta(L, f)
                if meta is not None:
                    for t in _also(meta):
                        if content(t):
                            a["ex"][t] += 1
    rows = [RelationRow(name=a["name"], count=a["count"], max_score=a["max"], min_layer=min(a["layers"]),
                        max_layer=max(a["layers"]), layers=tuple(sorted(a["layers"])),
                        examples=tuple(t for t, _n in a["ex"].most_common(3)),
                        relation=a["rel"].most_common(1)[0][0] if a["rel"] else None)
            for a in agg.values()]
    rows.sort(key=lambda r: (-r.count, -r.max_score, r.name.lower()))
    cap = top if top is not None else (RELATIONS_TOP_VERBOSE if verbose else RELATIONS_TOP)
    clusters = tuple(
        ClusterRow(c, lab, labs.cluster_counts[c] if c < len(labs.cluster_counts) else 0,
                   tuple(labs.cluster_top_tokens[c]) if c < len(labs.cluster_top_tokens) else ())
        for c, lab in enumerate(labs.cluster_labels)
    )
    return RelationsResult(probe_relations=tuple(probe_rows), probe_count=len(labs.probe), tokens=tuple(rows[:cap]),
                           total=len(rows), layer_range=rng, clusters=clusters,
                           latency_ms=(time.perf_counter() - t0) * 1e3)


# ---------------------------------------------------------------------------------------------
# STATS
# ---------------------------------------------------------------------------------------------


def stats(vindex, labels: FeatureLabels | None = None) -> Stats:
    """STATS / `/v1/stats`: sizes, bands (resolved per [F§2.2], never hard-coded) with feature
    counts and metadata coverage, label and cluster counts, directory size."""
    labs = labels if labels is not None else labels_for(vindex)
    loaded = vindex.layers()
    counts = {L: vindex.num_features(L) for L in loaded}
    with_meta = {}
    for L in loaded:
        _t, _c, present = vindex.meta_arrays(L)
        with_meta[L] = int(present.sum())
    per_layer = Counter(counts.values()).most_common(1)[0][0] if counts else 0
    band_rows = []
    for name in ("syntax", "knowledge", "output"):
        lo, hi = vindex.bands.get(name)
        ls = [L for L in loaded if lo <= L <= hi]
        band_rows.append(BandStats(name, lo, hi, sum(counts[L] for L in ls), sum(with_meta[L] for L in ls)))
    size = 0
    for p in Path(vindex.path).iterdir():
        try:
            if p.is_file():
                size += p.stat().st_size
        except OSError:
            pass
    knn = 0
    knn_path = Path(vindex.path) / "knn_store.bin"
    if knn_path.exists():
        try:
            from ..vindex.format import read_knn_store

            knn = len(read_knn_store(knn_path)[1])
        except Exception:  # a broken store is reported elsewhere; STATS stays usable
            knn = 0
    unmapped = sum(1 for lab in labs.cluster_labels if not lab or re.fullmatch(r"cluster-\d+", lab))
    return Stats(
        path=str(vindex.path), model=vindex.model, family=vindex.family, layers=vindex.num_layers,
        loaded_layers=tuple(loaded), features=sum(counts.values()), features_per_layer=per_layer,
        hidden_size=vindex.hidden_size, intermediate_size=vindex.index.intermediate_size,
        vocab_size=vindex.vocab_size, extract_level=vindex.extract_level, dtype=vindex.dtype,
        embed_scale=vindex.embed_scale,
        layer_bands={n: tuple(vindex.bands.get(n)) for n in ("syntax", "knowledge", "output")},
        bands_source=vindex.bands.source, band_stats=tuple(band_rows), has_weights=bool(vindex.has_weights),
        clusters=len(labs.cluster_labels), cluster_labels=len(set(labs.cluster_labels)), unmapped_clusters=unmapped,
        probe_labels=len(labs.probe), probe_relations=len(set(labs.probe.values())), index_bytes=size,
        knn_entries=knn,
    )
