"""The LQL executor: a dispatch table from AST classes onto ``modelql.knowledge`` / ``modelql.vindex``.

``Executor(session).execute(stmt)`` runs one statement (or a ``Pipe``) and returns a list of
``Executed(statement, value)``: ``value`` is a typed result (``knowledge.rows`` for queries,
``lql.results`` for session statements). No query logic lives here: each handler turns the
AST's fields into a call's arguments and returns what the call returns. Rendering is
``lql.render``'s job. On a remote backend (USE REMOTE) statements go to ``lql.remote``'s handlers
instead, which call the knowledge server through ``modelql.client`` and return the same rows.

Statements whose capability belongs to another issue (INSERT and the patch statements,
COMPILE, DIFF, MERGE, ...) parse and raise ``CapabilityError("<KEYWORD> is not
available yet")``; so does a statement whose knowledge function has not landed.

``run_batch(script)`` is batch mode (spec §2): split, parse each piece, execute the good ones
in one shared session, keep going after a failure; it returns one ``Outcome`` per piece.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from modelql.errors import CapabilityError, ModelqlError
from modelql.lql import ast
from modelql.lql.results import (
    Executed, Extracted, LayerRow, LayersResult, ModelRow, ModelsResult, ModelStats, TraceSaved,
)
from modelql.lql.handlers import HANDLERS, NOT_YET, handles, knowledge, not_available
from modelql.lql.session import LqlExecutionError, NoBackendError, Session
from modelql.lql import editing as _editing  # noqa: F401 — the mutation, patch, COMPILE and DIFF handlers register themselves

__all__ = [
    "Executor", "Outcome", "run_batch", "CapabilityError", "LqlExecutionError", "NoBackendError",
    "HANDLERS", "NOT_YET", "not_available",
]

# ---------------------------------------------------------------------------------------------
# the executor
# ---------------------------------------------------------------------------------------------


class Executor:
    """Runs statements against a ``Session`` (a fresh default one if none is given)."""

    def __init__(self, session: Session | None = None) -> None:
        self.session = session if session is not None else Session()

    def execute(self, stmt: ast.Statement, emit: Callable[[Executed], None] | None = None) -> list[Executed]:
        """Run ``stmt``; returns its results in order (a pipe: the left's, then the right's).

        ``emit`` is called with each result as soon as it exists (so a pipe's left output is
        shown before its right side runs). Raises a ``ModelqlError`` on failure; an error in a
        pipe's left side aborts the right side.
        """
        out: list[Executed] = []

        def add(item: Executed) -> None:
            out.append(item)
            if emit is not None:
                emit(item)

        if isinstance(stmt, ast.Pipe):
            self._run_one(stmt.left, add)
            self._run_one(stmt.right, add)
        else:
            self._run_one(stmt, add)
        return out

    def run(self, text: str, emit: Callable[[Executed], None] | None = None) -> list[Executed]:
        """Parse one statement (``parse``) and execute it."""
        from modelql.lql.parser import parse

        return self.execute(parse(text), emit)

    def _run_one(self, stmt: ast.Statement, add: Callable[[Executed], None]) -> None:
        cls = type(stmt)
        if self.session.backend == "remote":
            from modelql.lql import remote

            if cls not in remote.LOCAL:
                handler = remote.HANDLERS.get(cls)
                if handler is None:
                    raise remote.unsupported(stmt.keyword)
                add(Executed(stmt, handler(self, stmt)))
                return
        if cls in NOT_YET:
            raise not_available(stmt.keyword)
        handler = HANDLERS.get(cls)
        if handler is None:
            raise not_available(stmt.keyword)
        value = handler(self, stmt)
        add(Executed(stmt, value))

    # -- helpers for handlers ------------------------------------------------------------------

    def vindex(self, stmt: ast.Statement):
        return self.session.require_vindex(stmt.keyword)


# ---------------------------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------------------------


@handles(ast.UseVindex)
def _use(ex: Executor, stmt: ast.UseVindex):
    return ex.session.use_vindex(stmt.path)


@handles(ast.UseModel)
def _use_model(ex: Executor, stmt: ast.UseModel):
    session = ex.session
    if not stmt.auto_extract:
        return session.use_model(stmt.model)
    from modelql.lql import default_vindex as dv

    model_dir = session.model_path(stmt.model)
    if model_dir == dv.default_model_dir():
        path = dv.default_vindex_path(progress=session.progress)
        return session.use_vindex(path, default=True)
    path = dv.ensure_vindex(model_dir, progress=session.progress)
    return session.use_vindex(path)


@handles(ast.UseRemote)
def _use_remote(ex: Executor, stmt: ast.UseRemote):
    from modelql.lql.remote import use_remote

    return use_remote(ex.session, stmt.url)


@handles(ast.Extract)
def _extract(ex: Executor, stmt: ast.Extract):
    if stmt.layers is not None:
        raise not_available("EXTRACT ... LAYERS")
    from modelql.lql.default_vindex import Progress
    from modelql.vindex import extract

    session = ex.session
    model_dir = session.model_path(stmt.model)
    out = session.resolve(stmt.output)
    with Progress(f"Extracting {stmt.model} into {out} ...", session.progress) as show:
        result = extract(model_dir, out, level=stmt.level.value, on_layer=show.layer)
    used = session.use_vindex(out)
    return Extracted(
        model=stmt.model, path=str(out), level=result.level, num_layers=result.num_layers,
        hidden_size=session.vindex.hidden_size, seconds=result.seconds,
        seconds_down_meta=result.seconds_down_meta, bytes_written=result.bytes_written, used=used,
    )


@handles(ast.Stats)
def _stats(ex: Executor, stmt: ast.Stats):
    session = ex.session
    if stmt.path is not None:  # modelql: report on that vindex without switching
        p = session.resolve(stmt.path)
        if not p.exists():
            raise LqlExecutionError(f"vindex not found: {stmt.path}")
        from modelql.vindex import Vindex

        return knowledge("stats")(Vindex.load(p))
    backend = session.ensure_backend()
    if backend == "model":
        return ModelStats(session.used_model)
    return knowledge("stats")(ex.vindex(stmt))


# ---------------------------------------------------------------------------------------------
# queries
# ---------------------------------------------------------------------------------------------

_DEFAULT_WALK_TOP = 10


def _layers(rng: ast.Range | None) -> list[int] | None:
    return list(rng.layers()) if rng is not None else None


@handles(ast.Walk)
def _walk(ex: Executor, stmt: ast.Walk):
    vx = ex.vindex(stmt)
    return knowledge("walk")(vx, stmt.prompt, top=stmt.top or _DEFAULT_WALK_TOP, layers=_layers(stmt.layers))


@handles(ast.ExplainWalk)
def _explain_walk(ex: Executor, stmt: ast.ExplainWalk):
    vx = ex.vindex(stmt)
    top = stmt.top or (10 if stmt.verbose else 5)
    return knowledge("walk")(vx, stmt.prompt, top=top, layers=_layers(stmt.layers))


@handles(ast.Describe)
def _describe(ex: Executor, stmt: ast.Describe):
    vx = ex.vindex(stmt)
    band = None
    if stmt.band is not None:
        band = "all" if stmt.band is ast.Band.ALL else stmt.band.value.lower()
    return knowledge("describe")(
        vx, stmt.entity, band=band, layer=stmt.layer, relations_only=stmt.relations_only)


def _conditions(where: Iterable[ast.Condition]):
    from modelql.knowledge.rows import Condition

    return [Condition(c.field, c.op.value, c.value) for c in where]


#: SELECT ... FROM EDGES | FEATURES columns: the name → the row attribute it shows. `target` is the
#: token a feature writes (the column INSERT INTO EDGES fills), `entity` / `token` the same column.
SELECT_COLUMNS = {"layer": "layer", "feature": "feature", "token": "token", "entity": "token", "target": "token",
                  "relation": "relation", "also": "also", "score": "score", "confidence": "c_score",
                  "c_score": "c_score", "top_tokens": "top_tokens", "expert": "expert"}


def select_where(where: Iterable[ast.Condition]):
    """WHERE conditions for `knowledge.select`: `target` names the token column, as in INSERT."""
    from modelql.knowledge.rows import Condition

    return [Condition("token" if c.field == "target" else c.field, c.op.value, c.value) for c in where]


@handles(ast.Select)
def _select(ex: Executor, stmt: ast.Select):
    from modelql.errors import SelectError

    vx = ex.vindex(stmt)
    if stmt.source is not ast.SelectSource.ENTITIES:
        unknown = [f for f in stmt.fields if f not in SELECT_COLUMNS]
        if unknown:
            raise SelectError(f"unknown column {unknown[0]!r} (use {', '.join(SELECT_COLUMNS)} or *)")
    nearest = (stmt.nearest.entity, stmt.nearest.layer) if stmt.nearest is not None else None
    order = stmt.order_by
    return knowledge("select")(
        vx, stmt.source.value.lower(), select_where(stmt.where),
        order_by=order.field if order is not None else None,
        descending=order.descending if order is not None else False,
        limit=stmt.limit, nearest=nearest,
    )


@handles(ast.ShowRelations)
def _show_relations(ex: Executor, stmt: ast.ShowRelations):
    vx = ex.vindex(stmt)
    return knowledge("relations")(
        vx, layer=stmt.layer, verbose=stmt.verbosity is ast.Verbosity.VERBOSE, with_examples=stmt.with_examples)


@handles(ast.ShowFeatures)
def _show_features(ex: Executor, stmt: ast.ShowFeatures):
    vx = ex.vindex(stmt)
    return knowledge("features")(vx, stmt.layer, _conditions(stmt.where), limit=stmt.limit)


@handles(ast.ShowEntities)
def _show_entities(ex: Executor, stmt: ast.ShowEntities):
    vx = ex.vindex(stmt)
    return knowledge("entities")(vx, layer=stmt.layer, limit=stmt.limit)


@handles(ast.ShowLayers)
def _show_layers(ex: Executor, stmt: ast.ShowLayers):
    vx = ex.vindex(stmt)
    import numpy as np

    rows = []
    for layer in vx.layers():
        if stmt.range is not None and layer not in stmt.range:
            continue
        top, _c, present = vx.meta_arrays(layer)
        ids = np.asarray(top)[np.asarray(present, dtype=bool)]
        token, count = "", 0
        if ids.size:
            values, counts = np.unique(ids, return_counts=True)
            best = int(np.argmax(counts))  # ties -> lowest id (np.unique sorts)
            token, count = vx.token_text(int(values[best])), int(counts[best])
        rows.append(LayerRow(layer, vx.num_features(layer), int(ids.size), token, count))
    return LayersResult(tuple(rows), vx.num_layers)


@handles(ast.ShowModels)
def _show_models(ex: Executor, stmt: ast.ShowModels):
    from modelql.vindex.format import IndexJson

    from modelql.errors import VindexError

    directory = ex.session.cwd or Path.cwd()
    rows = []
    try:
        entries = sorted(directory.iterdir(), key=lambda p: p.name)
    except OSError as exc:
        raise LqlExecutionError(f"cannot list {directory}: {exc.strerror or exc}") from None
    for p in entries:
        if not p.is_dir() or not (p / "index.json").is_file():
            continue
        size = sum(f.stat().st_size for f in p.iterdir() if f.is_file())
        try:
            idx = IndexJson.read(p)
            rows.append(ModelRow(p.name, str(p), size, idx.num_layers, idx.model, idx.extract_level, "ready"))
        except (VindexError, OSError) as exc:
            rows.append(ModelRow(p.name, str(p), size, 0, "", "", f"unreadable: {exc}"))
    return ModelsResult(str(directory), tuple(rows))


# ---------------------------------------------------------------------------------------------
# inference
# ---------------------------------------------------------------------------------------------


@handles(ast.Infer)
def _infer(ex: Executor, stmt: ast.Infer):
    from modelql.knowledge.infer import infer

    session = ex.session
    model = session.model("INFER")
    if session.backend == "model":  # dense only: no vindex, no overlay (spec §4.4)
        return infer(model, stmt.prompt, top=stmt.top or 5, mode="dense")
    return infer(model, stmt.prompt, top=stmt.top or 5, mode="walk", compare=stmt.compare, vindex=session.vindex,
                 knn=session.knn_entries())


@handles(ast.ExplainInfer)
def _explain_infer(ex: Executor, stmt: ast.ExplainInfer):
    from modelql.knowledge.infer import explain_infer

    session = ex.session
    vx = session.require_vindex("EXPLAIN INFER")
    model = session.model("EXPLAIN INFER")
    band = None
    if stmt.band is not None:
        band = "all" if stmt.band is ast.Band.ALL else stmt.band.value.lower()
    return explain_infer(model, stmt.prompt, vindex=vx, layers=_layers(stmt.layers), band=band,
                         top=stmt.top or (5 if stmt.verbose else 3), relations_only=stmt.relations_only,
                         with_attention=stmt.with_attention, knn=session.knn_entries())


@handles(ast.Trace)
def _trace(ex: Executor, stmt: ast.Trace):
    positions = "all" if stmt.positions is ast.Positions.ALL else "last"
    if stmt.save is not None and positions != "all":
        raise LqlExecutionError(
            "TRACE SAVE requires POSITIONS ALL so the saved trace contains complete token chains")
    from modelql.knowledge.trace import trace

    model = ex.session.model("TRACE")
    layers = stmt.layers.layers() if stmt.layers is not None else None
    result = trace(model, stmt.prompt, for_token=stmt.answer, layers=layers, positions=positions)
    if stmt.save is None:
        return result
    path = ex.session.resolve(stmt.save)
    from modelql.viz import save_trace  # .png / .html pictures, else JSON

    save_trace(result, path)
    return TraceSaved(result, str(path), len(result.tokens))


# ---------------------------------------------------------------------------------------------
# batch mode
# ---------------------------------------------------------------------------------------------


USE_STATEMENTS = (ast.UseVindex, ast.UseModel, ast.UseRemote)


@dataclass
class Outcome:
    """One piece of a batch: its text, the statement (None if it did not parse), the results
    it produced (a failing pipe keeps its left side's), and the error if it failed."""

    piece: Any  # batch.Piece
    statement: ast.Statement | None
    results: list[Executed] = field(default_factory=list)
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


def run_batch(
    script: str,
    session: Session | None = None,
    *,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_result: Callable[[Executed], None] | None = None,
) -> list[Outcome]:
    """Run every statement of ``script`` in one session; continue after errors (spec §2), except
    after a failed USE: what follows was written for the backend it names, and running it against
    the previous one (the default model, at the start) would edit and COMPILE the wrong model. The
    script then stops with one more outcome saying how many statements did not run.

    ``on_result`` sees each result as it is produced and ``on_outcome`` each finished piece
    (for streaming output). Errors are ``ModelqlError``s or, for bugs, any other ``Exception``
    (re-raised instead when ``MODELQL_DEBUG`` is set); KeyboardInterrupt is not caught.
    """
    from modelql.lql.parser import parse_pieces

    executor = Executor(session)
    outcomes = []
    from modelql.lql.reference import run_help

    pieces = list(parse_pieces(script))
    for i, (piece, parsed) in enumerate(pieces):
        if outcomes and outcomes[-1].error is not None and isinstance(outcomes[-1].statement, USE_STATEMENTS):
            failed = outcomes[-1].piece
            outcome = Outcome(piece, None, error=LqlExecutionError(
                f"script stopped: the USE at line {failed.line} failed, so the {len(pieces) - i} statement(s) "
                f"after it were not run"))
            outcomes.append(outcome)
            if on_outcome is not None:
                on_outcome(outcome)
            break
        t0 = time.perf_counter()
        try:
            helped = run_help(piece.text)  # HELP: a modelql meta-statement, not LQL (the parser stays LARQL's)
        except ModelqlError as exc:
            parsed, helped = exc, None
        if helped is not None:
            outcome = Outcome(piece, helped.statement, results=[helped])
            if on_result is not None:
                on_result(helped)
        elif isinstance(parsed, Exception):
            outcome = Outcome(piece, None, error=parsed)
        else:
            outcome = Outcome(piece, parsed)
            try:
                executor.execute(parsed, emit=lambda r, o=outcome: (o.results.append(r),
                                                                    on_result and on_result(r)))
            except ModelqlError as exc:
                outcome.error = exc
            except Exception as exc:  # a bug: reported as one line unless debugging
                if os.environ.get("MODELQL_DEBUG"):
                    raise
                outcome.error = exc
        outcome.seconds = time.perf_counter() - t0
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)
    return outcomes

