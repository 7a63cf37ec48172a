"""The remote backend (lql spec §4.9): `USE REMOTE "http://host:port"` and the statements it forwards.

After USE REMOTE the session holds a `modelql.client.KnowledgeClient` (its own `X-Session-Id`,
so INSERT and patches touch only this session's overlay on the server). Each forwarded
statement maps its AST onto one client call, which returns the same typed rows local execution
returns, so `lql.render` shows them in the same line formats:

DESCRIBE → GET /v1/describe (variant=lql: LQL's DESCRIBE semantics), WALK / EXPLAIN WALK →
GET /v1/walk, SELECT … FROM EDGES → POST /v1/select, SHOW RELATIONS → GET /v1/relations,
STATS → GET /v1/stats, INFER → POST /v1/infer, EXPLAIN INFER → POST /v1/explain-infer,
INSERT → POST /v1/insert, APPLY PATCH (the file is read here and sent inline) / SHOW PATCHES /
REMOVE PATCH → /v1/patches*.

DELETE / UPDATE → POST /v1/edges/match (the server runs the WHERE resolution local LQL runs) then
POST /v1/patches/apply with the same `.vlp` ops as an inline patch named `delete-N` / `update-N`.

Anything the knowledge API cannot express (TRACE, SHOW LAYERS/FEATURES/ENTITIES,
MERGE, COMPILE, DIFF, BEGIN/SAVE PATCH, SELECT from FEATURES/ENTITIES or NEAREST TO, WHERE fields
the route has no parameter for, …) raises `CapabilityError` naming the statement.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from modelql.errors import CapabilityError
from modelql.lql import ast
from modelql.lql import render as _render
from modelql.lql.render import format_count

USE_TIMEOUT = 30.0  # the connect check (spec §4.2)
STATEMENT_TIMEOUT = 300.0  # edits run the model on the server
DESCRIBE_LIMIT = 10_000

#: AST class -> handler(executor, stmt) for a remote session
HANDLERS: dict[type, Callable[[Any, Any], Any]] = {}

#: statements that always run locally, whatever the backend (they replace or list backends)
LOCAL = frozenset({ast.UseVindex, ast.UseModel, ast.UseRemote, ast.Extract, ast.ShowModels})


def handles(*classes):
    def register(fn):
        for cls in classes:
            HANDLERS[cls] = fn
        return fn

    return register


def supported() -> str:
    return ", ".join(sorted({cls.keyword for cls in HANDLERS}))


def unsupported(keyword: str) -> CapabilityError:
    return CapabilityError(f"{keyword} is not supported on a remote backend (the knowledge API has no route for "
                           f"it). Supported: {supported()}")


# -- results -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UsedRemote:
    url: str
    model: str
    layers: int
    features: int
    session: str


@dataclass(frozen=True)
class RemoteStats:
    url: str
    stats: Any  # client.ServerStats


@dataclass(frozen=True)
class RemotePatchRow:
    position: int
    name: str
    operations: int
    base_model: str | None


@dataclass(frozen=True)
class RemotePatchList:
    url: str
    rows: tuple[RemotePatchRow, ...]


@_render.renders(UsedRemote)
def _r_used(stmt, u: UsedRemote) -> list:
    return [f"Connected: {u.model} ({u.layers} layers, {format_count(u.features)} features)", f"  Remote: {u.url}"]


@_render.renders(RemoteStats)
def _r_stats(stmt, r: RemoteStats) -> list:
    s = r.stats
    out = [f"Model: {s.model} ({s.family}, extract level {s.extract_level}, {s.dtype})",
           f"Features: {format_count(s.features)} ({format_count(s.features_per_layer)} x {s.layers} layers)",
           f"Dimensions: hidden {s.hidden_size}, vocab {s.vocab_size}"]
    if s.knn_entries:
        out.append(f"  KNN store: {s.knn_entries} entries")
    if s.layer_bands:
        out.append("By layer band:")
        for name in ("syntax", "knowledge", "output"):
            if name in s.layer_bands:
                lo, hi = s.layer_bands[name]
                out.append(f"  {name.capitalize()} (L{lo}-{hi})")
    loaded = ", ".join(k for k, v in s.loaded.items() if v) or "nothing"
    out.append(f"Serving: {s.mode} mode ({loaded}); {s.patches_active} patch(es) active")
    out.append(f"Remote: {r.url}")
    return out


@_render.renders(RemotePatchList)
def _r_patches(stmt, v: RemotePatchList) -> list:
    if not v.rows:
        return ["  (no patches applied)"]
    out = [f"  {r.position}. {r.name} {r.operations} ops" for r in v.rows]
    out.append(f"  Total: {len(v.rows)} on {v.url}")
    return out


@dataclass(frozen=True)
class RemoteMutated:
    result: Any  # knowledge.edit.MutationResult
    patch: str | None  # the inline patch's name on the server (None: nothing matched, nothing sent)
    resolved: int = 0  # facts of matched weight-level edits re-solved into the session's unsaved edits


@_render.renders(RemoteMutated)
def _r_mutated(stmt, v: RemoteMutated) -> list:
    from modelql.lql.editing import Mutated

    out = list(_render.RENDERERS[Mutated](stmt, Mutated(v.result)))
    if v.patch is not None and v.resolved:
        out.append(f"  patch: {v.patch} (server session overlay); {v.resolved} fact(s) of the edited batches "
                   "re-solved into the session's unsaved edits")
    elif v.patch is not None:
        out.append(f'  patch: {v.patch} (server session overlay; REMOVE PATCH "{v.patch}" undoes it)')
    return out


# -- USE REMOTE --------------------------------------------------------------------------------------


def use_remote(session, url: str) -> UsedRemote:
    """Connect (GET /v1/stats, 30 s timeout) and make the server the session's backend."""
    from modelql.client import KnowledgeClient
    from modelql.errors import RemoteError

    try:
        client = KnowledgeClient(url, timeout=USE_TIMEOUT, session_id="lql-" + secrets.token_hex(8))
    except RemoteError as exc:
        raise CapabilityError(str(exc)) from None
    try:
        st = client.stats()
    except BaseException:
        client.close()
        raise
    client.set_timeout(STATEMENT_TIMEOUT)
    session.reset()
    session.backend = "remote"
    session.remote_url = client.base_url
    session.remote = client
    return UsedRemote(client.base_url, st.model, st.layers, st.features, client.session_id)


def client(ex):
    return ex.session.remote


# -- forwarded statements ------------------------------------------------------------------------------


def _band(band) -> str | None:
    if band is None:
        return None
    return "all" if band is ast.Band.ALL else band.value.lower()


@handles(ast.Describe)
def _describe(ex, stmt: ast.Describe):
    return client(ex).describe(stmt.entity, band=_band(stmt.band) or "all", verbose=True, limit=DESCRIBE_LIMIT,
                               relations_only=stmt.relations_only, layer=stmt.layer, variant="lql")


def _layers(rng) -> list[int] | None:
    return list(rng.layers()) if rng is not None else None


@handles(ast.Walk)
def _walk(ex, stmt: ast.Walk):
    return client(ex).walk(stmt.prompt, top=stmt.top or 10, layers=_layers(stmt.layers))


@handles(ast.ExplainWalk)
def _explain_walk(ex, stmt: ast.ExplainWalk):
    return client(ex).walk(stmt.prompt, top=stmt.top or (10 if stmt.verbose else 5), layers=_layers(stmt.layers))


def _select_args(where) -> dict:
    args: dict[str, Any] = {}
    for c in where:
        op, v = c.op.value, c.value
        if c.field in ("entity", "token") and op in ("=", "LIKE"):
            args["entity"] = str(v).replace("%", "")
        elif c.field == "relation" and op in ("=", "LIKE"):
            args["relation"] = str(v).replace("%", "")
        elif c.field == "layer" and op == "=":
            args["layer"] = int(v)
        elif c.field == "feature" and op in ("=", "IN"):
            args["features"] = [int(x) for x in (v if isinstance(v, (list, tuple)) else [v])]
        elif c.field in ("confidence", "c_score") and op in (">=", ">"):
            args["min_confidence"] = float(v)
        else:
            raise CapabilityError(f"SELECT on a remote backend: WHERE {c.field} {op} … has no /v1/select parameter "
                                  f"(supported: entity =/LIKE, relation =/LIKE, layer =, feature =/IN, "
                                  f"confidence >=)")
    return args


@handles(ast.Select)
def _select(ex, stmt: ast.Select):
    if stmt.nearest is not None:
        raise CapabilityError("SELECT … NEAREST TO is not supported on a remote backend (no route for it)")
    src = stmt.source.value.lower()
    if src != "edges":
        raise CapabilityError(f"SELECT … FROM {src.upper()} is not supported on a remote backend "
                              f"(/v1/select reads EDGES)")
    args = _select_args(stmt.where)
    order = stmt.order_by
    if order is not None:
        field = {"score": "gate_score", "confidence": "confidence", "c_score": "c_score", "layer": "layer",
                 "gate_score": "gate_score"}.get(order.field)
        if field is None:
            raise CapabilityError(f"SELECT … ORDER BY {order.field} is not supported on a remote backend")
        args.update(order_by=field, order="desc" if order.descending else "asc")
    return client(ex).select(limit=stmt.limit if stmt.limit is not None else 20, **args)


@handles(ast.ShowRelations)
def _relations(ex, stmt: ast.ShowRelations):
    if stmt.layer is not None:
        raise CapabilityError("SHOW RELATIONS AT LAYER is not supported on a remote backend (/v1/relations scans "
                              "the knowledge band)")
    return client(ex).relations()


@handles(ast.Stats)
def _stats(ex, stmt: ast.Stats):
    if stmt.path is not None:  # STATS "path" reports on a local vindex, whatever the backend
        return _local_stats(ex, stmt)
    return RemoteStats(ex.session.remote_url, client(ex).stats())


def _local_stats(ex, stmt):
    from modelql.lql.session import LqlExecutionError
    from modelql.vindex import Vindex
    from modelql import knowledge

    p = ex.session.resolve(stmt.path)
    if not p.exists():
        raise LqlExecutionError(f"vindex not found: {stmt.path}")
    return knowledge.stats(Vindex.load(p))


@handles(ast.Infer)
def _infer(ex, stmt: ast.Infer):
    return client(ex).infer(stmt.prompt, top=stmt.top or 5, mode="compare" if stmt.compare else "walk")


@handles(ast.ExplainInfer)
def _explain_infer(ex, stmt: ast.ExplainInfer):
    if stmt.layers is not None:
        raise CapabilityError("EXPLAIN INFER … LAYERS is not supported on a remote backend (use a band)")
    return client(ex).explain_infer(stmt.prompt, top=1, per_layer=stmt.top or (5 if stmt.verbose else 3),
                                    band=_band(stmt.band) or "all", relations_only=stmt.relations_only,
                                    with_attention=stmt.with_attention)


@handles(ast.Insert)
def _insert(ex, stmt: ast.Insert):
    from modelql.lql.editing import Inserted

    c = client(ex)
    # LQL's default is the MEMIT edit; /v1/insert's (LARQL's) is a fast KNN insert: say which
    mode = stmt.mode.value.lower() if stmt.mode is not None else "memit"
    kw = dict(layer=stmt.layer, confidence=stmt.confidence, alpha=stmt.alpha, mode=mode)
    if len(stmt.values) == 1:
        f = stmt.values[0]
        rs = [c.insert(f.entity, f.relation, f.target, **kw)]
    else:
        rs = c.insert_many([(f.entity, f.relation, f.target) for f in stmt.values], **kw)
    total = rs[-1].knn_total
    if total is None and rs[0].mode == "knn":  # a server without the knn_total extension
        total = c.stats().knn_entries
    return Inserted(tuple(rs), total)


@handles(ast.ApplyPatch)
def _apply(ex, stmt: ast.ApplyPatch):
    from modelql.lql.editing import PatchApplied
    from modelql.lql.session import LqlExecutionError
    from modelql.vindex.patch import count_ops, read_patch

    path = ex.session.resolve(stmt.path)
    if not path.exists():
        raise LqlExecutionError(f"patch not found: {stmt.path}")
    patch = read_patch(path)
    counts = count_ops(patch.operations)
    got = client(ex).apply_patch(patch=json.loads(Path(path).read_text(encoding="utf-8")), name=stmt.path)
    return PatchApplied(stmt.path, got.operations, counts.inserts, counts.updates, counts.deletes)


def _where(where) -> list[tuple[str, str, Any]]:
    return [(c.field, c.op.value, list(c.value) if isinstance(c.value, tuple) else c.value) for c in where]


def _mutation(ex, keyword: str, where, build, refacts=None):
    """DELETE / UPDATE over the knowledge API: the server resolves the WHERE with the function local
    LQL runs (`POST /v1/edges/match` → `edit.match`), `build(matches)` makes the same `.vlp` ops
    (`knowledge.mutations`), and they are applied as one inline patch in this session's overlay.
    A matched weight-level edit is dropped by that patch; `refacts(edit)` are the facts then
    re-solved on the server (`POST /v1/insert`, into the session's unsaved edits), as locally."""
    from modelql.knowledge.edit import MutationResult

    c = client(ex)
    m = c.match_edges(_where(where))
    if m.recorded:
        raise CapabilityError(
            f"{keyword} on a remote backend: {m.recorded} unsaved edit(s) of this session write the matched "
            f"edges, and a patch sent now would stack beneath them (no effect); "
            f'REMOVE PATCH "(unsaved edits)" first, or run the {keyword} locally')
    resolve = [(e, refacts(e)) for e in m.edits]
    if any(facts and len(e.layers) != 1 for e, facts in resolve):
        raise CapabilityError(f"{keyword} on a remote backend: a matched weight-level edit spans several "
                              f"layers, which POST /v1/insert cannot re-solve; run the {keyword} locally")
    ops, knn = build(m)
    slots = tuple((s.layer, s.feature) for s in m.slots)
    result = MutationResult(keyword.lower(), len(m.slots), knn, slots, facts=m.facts)
    if not ops:
        return RemoteMutated(result, None)
    ex.session.remote_edits = getattr(ex.session, "remote_edits", 0) + 1
    name = f"{keyword.lower()}-{ex.session.remote_edits}"
    from modelql.knowledge.mutations import patch_json

    c.apply_patch(patch=patch_json(m, ops, f"LQL {keyword} (remote session {c.session_id})"), name=name)
    for e, facts in resolve:
        if facts:
            c.insert_many(facts, mode="memit", layer=e.layers[0], confidence=e.confidence)
    return RemoteMutated(result, name, resolved=sum(len(f) for _, f in resolve))


@handles(ast.Delete)
def _delete(ex, stmt: ast.Delete):
    from modelql.knowledge.mutations import delete_ops

    return _mutation(ex, "DELETE", stmt.where, lambda m: (delete_ops(m), len(m.knn_entities)),
                     lambda e: e.kept())


@handles(ast.Update)
def _update(ex, stmt: ast.Update):
    from modelql.knowledge.edit import parse_assignments
    from modelql.knowledge.mutations import update_ops

    sets = parse_assignments(stmt.assignments)
    c = client(ex)

    def token_id(text: str) -> int:  # `edit.target_id` on the server's tokenizer
        ids = c.encode(" " + text)
        return int(ids[0]) if ids else 0

    return _mutation(ex, "UPDATE", stmt.where, lambda m: update_ops(m, sets, token_id),
                     lambda e: e.updated(sets.get("target")))


@handles(ast.ShowPatches)
def _show_patches(ex, stmt):
    rows = client(ex).patches().patches
    return RemotePatchList(ex.session.remote_url,
                           tuple(RemotePatchRow(i, p.name, p.operations, p.base_model) for i, p in enumerate(rows, 1)))


@handles(ast.RemovePatch)
def _remove(ex, stmt: ast.RemovePatch):
    from modelql.lql.editing import PatchRemoved

    c = client(ex)
    names = [p.name for p in c.patches().patches]
    pos = names.index(stmt.path) + 1 if stmt.path in names else 0
    c.remove_patch(stmt.path)
    return PatchRemoved(stmt.path, pos)


__all__ = ["HANDLERS", "LOCAL", "RemoteMutated", "UsedRemote", "RemoteStats", "RemotePatchList", "RemotePatchRow", "use_remote",
           "unsupported", "supported"]
