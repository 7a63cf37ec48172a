"""LQL mutations, patch statements, COMPILE and DIFF (lql spec §4.2, §4.5, §4.6, §5).

Registers the executor handlers and text renderers of INSERT, DELETE, UPDATE, MERGE,
BEGIN / SAVE / APPLY / REMOVE PATCH, SHOW PATCHES, COMPILE and DIFF. Each handler maps the AST
onto `modelql.knowledge.edit` (mutations), `modelql.vindex.overlay.PatchSession` (patches) or
`modelql.vindex.compile` (COMPILE, DIFF) and returns a typed result below; rendering is here
too (`render.renders`), in the spec's line formats.

The session's patch overlay is a `PatchSession` held in `Session.overlay`, created on the first
statement that needs it (`patch_session`); from then on `Session.vindex` is the overlay view, so
DESCRIBE / WALK / SELECT / INFER / TRACE all see the edits. USE discards it (spec §5.3).
Mutations without an active recording start an anonymous one (auto-patch, spec §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelql.errors import CapabilityError, ModelqlError, PatchError
from modelql.lql import ast
from modelql.lql import render as _render
from modelql.lql.handlers import Executing, handles
from modelql.lql.render import Table, format_bytes, format_count
from modelql.lql.session import LqlExecutionError

AUTO_PATCH_LINE = 'Auto-patch started (use SAVE PATCH "file.vlp" to persist, or edits are lost on exit)'


# ---------------------------------------------------------------------------------------------
# the session's overlay
# ---------------------------------------------------------------------------------------------


def patch_session(session, keyword: str = "this statement"):
    """The session's `PatchSession` (created on first use; `session.vindex` becomes its view)."""
    return session.patches(keyword)


def _errors(fn):
    """Map edit/patch/compile failures to LQL execution errors (one line)."""
    def wrapped(ex, stmt):
        try:
            return fn(ex, stmt)
        except (PatchError, LqlExecutionError, CapabilityError):
            raise
        except ModelqlError as exc:
            if type(exc).__name__ in ("EditError", "CompileError"):
                raise LqlExecutionError(str(exc)) from None
            raise

    wrapped.__name__ = fn.__name__
    wrapped.__doc__ = fn.__doc__
    return wrapped


# ---------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inserted:
    results: tuple[Any, ...]  # knowledge.edit.InsertResult per VALUES row
    knn_total: int | None = None


@dataclass(frozen=True)
class Mutated:
    result: Any  # knowledge.edit.MutationResult


@dataclass(frozen=True)
class Merged:
    result: Any  # knowledge.edit.MergeResult


@dataclass(frozen=True)
class PatchBegun:
    path: str
    upgraded: int  # ops kept from an anonymous recording


@dataclass(frozen=True)
class PatchSaved:
    path: str
    inserts: int
    updates: int
    deletes: int


@dataclass(frozen=True)
class PatchApplied:
    path: str
    operations: int
    inserts: int
    updates: int
    deletes: int


@dataclass(frozen=True)
class PatchRemoved:
    name: str
    position: int


@dataclass(frozen=True)
class PatchRow:
    position: int
    name: str
    operations: int
    inserts: int
    updates: int
    deletes: int


@dataclass(frozen=True)
class PatchList:
    rows: tuple[PatchRow, ...]
    from_files: int
    in_session: int
    recording: str | None  # path, "(anonymous)", or None (no recording)
    pending: int


@dataclass(frozen=True)
class Compiled:
    result: Any  # vindex.compile.CompileResult


@dataclass(frozen=True)
class Diffed:
    result: Any  # vindex.diff.DiffResult


# ---------------------------------------------------------------------------------------------
# handlers: mutations
# ---------------------------------------------------------------------------------------------


@handles(ast.Insert)
@_errors
def _insert(ex: Executing, stmt: ast.Insert):
    from modelql.knowledge import edit

    ps = patch_session(ex.session, "INSERT")
    mode = stmt.mode.value.lower() if stmt.mode is not None else None
    if edit.resolve_mode(mode) == "memit" and not edit.memit_statistics_ready(ps, stmt.layer):
        from modelql.lql.default_vindex import Progress

        with Progress("Computing the model's editing statistics (once per model, then cached) ...",
                      ex.session.progress) as show:
            show.stage("statistics")
            edit.prepare_memit_statistics(ps, stmt.layer, facts=[(f.entity, f.relation, f.target) for f in stmt.values])
    rs = edit.insert_many(ps, [(f.entity, f.relation, f.target) for f in stmt.values], layer=stmt.layer,
                          confidence=stmt.confidence, alpha=stmt.alpha, mode=mode)
    return Inserted(tuple(rs), len(ps.state.knn))


@handles(ast.Delete)
@_errors
def _delete(ex: Executing, stmt: ast.Delete):
    from modelql.knowledge import edit

    ps = patch_session(ex.session, "DELETE")
    return Mutated(edit.delete(ps, stmt.where))


@handles(ast.Update)
@_errors
def _update(ex: Executing, stmt: ast.Update):
    from modelql.knowledge import edit

    ps = patch_session(ex.session, "UPDATE")
    return Mutated(edit.update(ps, stmt.where, stmt.assignments))


@handles(ast.Merge)
@_errors
def _merge(ex: Executing, stmt: ast.Merge):
    from modelql.knowledge import edit

    session = ex.session
    ps = patch_session(session, "MERGE")
    src = session.resolve(stmt.source)
    if not src.exists():
        raise LqlExecutionError(f"source vindex not found: {stmt.source}")
    if stmt.target is not None:
        dst = session.resolve(stmt.target)
        if not dst.exists():
            raise LqlExecutionError(f"target vindex not found: {stmt.target}")
        if dst.resolve() != Path(ps.base.path).resolve():
            raise LqlExecutionError(
                f"MERGE INTO {stmt.target}: merges go into the active vindex's patch overlay; "
                f'USE "{stmt.target}" first')
    strategy = stmt.on_conflict.value.lower() if stmt.on_conflict is not None else None
    return Merged(edit.merge(ps, src, strategy, target_name=stmt.target or str(ps.base.path)))


# ---------------------------------------------------------------------------------------------
# handlers: patches
# ---------------------------------------------------------------------------------------------


@handles(ast.BeginPatch)
def _begin(ex: Executing, stmt: ast.BeginPatch):
    ps = patch_session(ex.session, "BEGIN PATCH")
    kept = len(ps.recording.ops) if ps.recording is not None and ps.recording.anonymous else 0
    try:
        ps.begin(stmt.path)
    except PatchError as exc:
        raise LqlExecutionError(str(exc)) from None
    return PatchBegun(stmt.path, kept)


@handles(ast.SavePatch)
def _save(ex: Executing, stmt: ast.SavePatch):
    session = ex.session
    ps = getattr(session, "overlay", None)
    if ps is None or ps.recording is None:
        raise LqlExecutionError("no active patch session. Run BEGIN PATCH first.")
    target = stmt.path if stmt.path is not None else ps.recording.path
    if target is None:
        raise LqlExecutionError('anonymous patch session — use SAVE PATCH "filename.vlp" or '
                                'BEGIN PATCH "filename.vlp" first.')
    try:
        saved = ps.save(target, resolved=session.resolve(target))
    except PatchError as exc:
        raise LqlExecutionError(str(exc)) from None
    c = saved.counts
    return PatchSaved(saved.path, c.inserts, c.updates, c.deletes)


@handles(ast.ApplyPatch)
def _apply(ex: Executing, stmt: ast.ApplyPatch):
    session = ex.session
    ps = patch_session(session, "APPLY PATCH")
    path = session.resolve(stmt.path)
    if not path.exists():
        raise LqlExecutionError(f"patch not found: {stmt.path}")
    try:
        ap = ps.apply(path, name=stmt.path)
    except PatchError as exc:
        msg = str(exc)
        raise LqlExecutionError(msg if msg.startswith(("failed to load patch", "patch not found"))
                                else f"failed to load patch: {msg}") from None
    c = ap.counts
    return PatchApplied(stmt.path, len(ap.patch.operations), c.inserts, c.updates, c.deletes)


@handles(ast.RemovePatch)
def _remove(ex: Executing, stmt: ast.RemovePatch):
    session = ex.session
    ps = getattr(session, "overlay", None)
    if ps is None:
        session.require_vindex("REMOVE PATCH", mutation=True)
        raise LqlExecutionError(f"patch not found: {stmt.path}")
    name = stmt.path
    if ps.find(name) is None:
        resolved = str(session.resolve(name))
        if ps.find(resolved) is not None:
            name = resolved
    try:
        pos = ps.remove(name)
    except PatchError as exc:
        raise LqlExecutionError(str(exc)) from None
    return PatchRemoved(stmt.path, pos)


@handles(ast.ShowPatches)
def _show_patches(ex: Executing, stmt: ast.ShowPatches):
    session = ex.session
    session.require_vindex("SHOW PATCHES", mutation=True)
    ps = getattr(session, "overlay", None)
    rows = []
    rec_name, pending, in_session = None, 0, 0
    if ps is not None:
        for i, ap in enumerate(ps.applied, 1):
            c = ap.counts
            rows.append(PatchRow(i, ap.name, len(ap.patch.operations), c.inserts, c.updates, c.deletes))
        if ps.recording is not None:
            rec_name = ps.recording.path or "(anonymous)"
            pending = len(ps.recording.ops)
            in_session = 1 if pending else 0
    return PatchList(tuple(rows), len(rows), in_session, rec_name, pending)


# ---------------------------------------------------------------------------------------------
# handlers: COMPILE and DIFF
# ---------------------------------------------------------------------------------------------


def _source(session, ref, keyword: str):
    """A vindex reference: CURRENT (the overlay view) or a path (opened with no overlay)."""
    if isinstance(ref, ast.Current):
        vx = session.require_vindex(keyword, mutation=True)
        ps = getattr(session, "overlay", None)
        return ps.view if ps is not None else vx
    p = session.resolve(ref)
    if not p.exists():
        raise LqlExecutionError(f"vindex not found: {ref}")
    from modelql.vindex import Vindex

    return Vindex.load(p)


@handles(ast.Compile)
@_errors
def _compile(ex: Executing, stmt: ast.Compile):
    from modelql.vindex import compile as C

    session = ex.session
    src = _source(session, stmt.source, "COMPILE")
    out = session.resolve(stmt.output)
    if stmt.target is ast.CompileTarget.MODEL:
        if not getattr(src, "has_weights", False):
            raise LqlExecutionError(
                f"COMPILE INTO MODEL requires model weights in the vindex. {Path(src.path).name} is a "
                f"{src.extract_level}-level vindex: re-extract it WITH INFERENCE.")
        fmt = "gguf" if stmt.format is ast.OutputFormat.GGUF else "safetensors"
        return Compiled(C.compile_model(src, out, format=fmt))
    policy = stmt.on_conflict.value.lower() if stmt.on_conflict is not None else "last_wins"
    return Compiled(C.compile_vindex(src, out, on_conflict=policy))


@handles(ast.Diff)
@_errors
def _diff(ex: Executing, stmt: ast.Diff):
    from modelql.vindex import diff as D

    session = ex.session
    a = _source(session, stmt.a, "DIFF")
    b = _source(session, stmt.b, "DIFF")
    kw = dict(layer=stmt.layer, relation=stmt.relation, limit=stmt.limit)
    if stmt.into_patch is not None:
        return Diffed(D.diff_into_patch(a, b, session.resolve(stmt.into_patch), **kw))
    return Diffed(D.diff(a, b, **kw))


# ---------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------


def _auto(flag: bool) -> list[str]:
    return [AUTO_PATCH_LINE] if flag else []


def _layers_text(layers) -> str:
    ls = sorted(layers)
    if not ls:
        return "?"
    if ls == list(range(ls[0], ls[-1] + 1)) and len(ls) > 1:
        return f"L{ls[0]}-{ls[-1]}"
    return ", ".join(f"L{l}" for l in ls)


@_render.renders(Inserted)
def _r_inserted(stmt, v: Inserted) -> list:
    """One `Inserted:` line per fact (a MEMIT batch: one header, then the facts), then the mode."""
    rs = v.results
    r = rs[0]
    out = _auto(any(x.auto_patch for x in rs))
    facts = [f"{x.entity} —[{x.relation}]→ {x.target}" for x in rs]
    if r.mode == "knn":
        out += [f"Inserted: {f} at L{x.layer} (KNN store)" for f, x in zip(facts, rs)]
        out.append("  mode: KNN — residual capture (retrieval override)" if r.key_source == "residual"
                   else "  mode: KNN — embedding key (no model weights)")
        out.append(f"  KNN store: {v.knn_total if v.knn_total is not None else rs[-1].knn_total} entries total")
    elif r.mode in ("compose", "embedding"):
        for i, (f, x) in enumerate(zip(facts, rs)):
            out.append(f"Inserted: {f} at L{x.layer}")
            if i == 0:
                out.append(f"  mode: constellation (contrastive gate + up, optimised down, alpha_mul={r.alpha:.3f}, "
                           "balanced)" if r.mode == "compose"
                           else "  mode: embedding (no model weights — gate only, no down override)")
            if x.mode == "compose" and x.feature is not None:
                prob = f", target p={x.probability:.2f}" if x.probability is not None else ""
                out.append(f"  slot: L{x.layer}/F{x.feature}{prob}")
    else:  # memit: the facts of one statement are one batch
        where = f"at {_layers_text(r.layers)} (weight edit)"
        if len(rs) == 1:
            out.append(f"Inserted: {facts[0]} {where}")
        else:
            out.append(f"Inserted {len(rs)} facts {where}, solved as one batch")
            out += [f"  {f}" for f in facts]
        out.append(f"  mode: MEMIT — {r.neurons} new FFN neuron(s) at {_layers_text(r.layers)}, patch overlay" if r.neurons
                   else f"  mode: MEMIT — low-rank down_proj update in {len(r.layers)} layer(s), patch overlay")
    return out


@_render.renders(Mutated)
def _r_mutated(stmt, v: Mutated) -> list:
    r = v.result
    out = _auto(r.auto_patch)
    verb = "Deleted" if r.kind == "delete" else "Updated"
    if not r.features and not r.knn and not r.facts:
        return out + ["  (no matching features found)"]
    if r.features or r.knn:
        out.append(f"{verb} {r.features} features (patch overlay)")
    if r.knn:
        out.append(f"  {verb.lower()} {r.knn} KNN fact(s)")
    if r.facts:
        text = f"{r.facts} weight-level fact(s) (patch overlay; their batches re-solved)"
        out.append(f"  {verb.lower()} {text}" if r.features or r.knn else f"{verb} {text}")
    return out


@_render.renders(Merged)
def _r_merged(stmt, v: Merged) -> list:
    r = v.result
    return _auto(r.auto_patch) + [
        f"Merged {r.source} → {r.target} (patch overlay)",
        f"  {r.merged} features merged, {r.skipped} skipped (strategy: {r.strategy})",
    ]


@_render.renders(PatchBegun)
def _r_begun(stmt, v: PatchBegun) -> list:
    out = [f"Patch session started: {v.path}"]
    if v.upgraded:
        out.append(f"  (kept {v.upgraded} ops from the auto-patch recording)")
    return out


@_render.renders(PatchSaved)
def _r_saved(stmt, v: PatchSaved) -> list:
    return [f"Saved: {v.path} ({v.inserts} inserts, {v.updates} updates, {v.deletes} deletes)"]


@_render.renders(PatchApplied)
def _r_applied(stmt, v: PatchApplied) -> list:
    return [f"Applied: {v.path} ({v.operations} operations: {v.inserts} inserts, {v.updates} updates, "
            f"{v.deletes} deletes)"]


@_render.renders(PatchRemoved)
def _r_removed(stmt, v: PatchRemoved) -> list:
    return [f"Removed patch #{v.position}"]


@_render.renders(PatchList)
def _r_patches(stmt, v: PatchList) -> list:
    if not v.rows and v.recording is None:
        return ["  (no patches applied)"]
    out = [f"  {r.position}. {r.name} {r.operations} ops ({r.inserts} ins, {r.updates} upd, {r.deletes} del)"
           for r in v.rows]
    out.append(f"  Total: {v.from_files} from files, {v.in_session} in session")
    if v.recording is not None:
        out.append(f"  Recording: {v.recording} ({v.pending} ops pending)")
    return out


@_render.renders(Compiled)
def _r_compiled(stmt, v: Compiled) -> list:
    r = v.result
    src = "CURRENT" if isinstance(getattr(stmt, "source", None), ast.Current) else r.source
    if r.target == "model":
        out = [f"Compiled {src} → {r.output} (model, {r.format} {r.dtype})"]
        out.append(f"  Weight edits baked: {r.deltas_baked} low-rank deltas, {r.down_overrides} down overrides, "
                   f"{r.tombstones} tombstones ({r.layers_touched} layers touched)")
        if r.knn_materialised:
            out.append(f"  KNN facts materialised as weight edits: {r.knn_materialised}")
        out.append(f"  Size: {format_bytes(r.size_bytes)}")
        return out
    out = [f"Compiled {src} → {r.output}", f"Features: {format_count(r.features)}"]
    if r.conflicts:
        out.append(f"Conflicts: {r.conflicts} slot(s) touched by multiple patches — strategy: {r.strategy}")
    out.append(f"Down overrides baked: {r.down_overrides} ({r.layers_touched} layers touched)")
    if r.deltas_baked:
        out.append(f"Weight edits baked: {r.deltas_baked} low-rank deltas")
    if r.knn_entries:
        out.append(f"KNN entries: {r.knn_entries}")
    out.append(f"Size: {format_bytes(r.size_bytes)}")
    return out


@_render.renders(Diffed)
def _r_diffed(stmt, v: Diffed) -> list:
    r = v.result
    out: list = []
    if not r.rows:
        out.append("  (no differences found)")
    else:
        t = Table(["Layer", "Feature", "A (token)", "B (token)", "Status"], align="rrlll")
        for row in r.shown:
            status = row.status + (f" [{', '.join(row.vectors)}]" if row.vectors else "")
            t.rows.append([f"L{row.layer}", f"F{row.feature}", row.a_token or "—", row.b_token or "—", status])
        out.append(t)
        out.append(f"{len(r.shown)} differences shown (limit {r.limit})"
                   + (f", {r.total} in total" if r.total > len(r.shown) else ""))
    if r.patch_path is not None:
        c = r.patch_counts
        out.append(f"Extracted: {r.patch_path} ({r.operations} ops: {c.inserts} inserts, {c.updates} updates, "
                   f"{c.deletes} deletes)")
    return out
