"""AST -> canonical LQL text.

``to_lql(stmt)`` writes a statement the way the spec's EBNF spells it: keywords upper case,
clauses in EBNF order, defaults left out, strings double-quoted with escapes (so a statement
is always one line), floats in plain decimal notation. Its contract, tested for every
statement form: ``parse(to_lql(stmt)) == stmt`` for every ``stmt`` that ``parse`` produces.

An AST that no LQL text could produce (a negative TOP, a non-finite float, a field name that
is not an identifier, an empty WHERE ...) raises ``ValueError``.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from typing import Callable

from modelql.lql import ast

__all__ = ["to_lql", "quote", "format_value"]

_QUOTE_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r", "\0": "\\0"}
_NEEDS_ESCAPE = re.compile(r'[\\"\n\t\r\0]')
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def quote(text: str) -> str:
    """``text`` as a double-quoted LQL string literal."""
    return '"' + _NEEDS_ESCAPE.sub(lambda m: _QUOTE_ESCAPES[m.group()], text) + '"'


def _float(x: float, *, signed: bool = False) -> str:
    if not math.isfinite(x):
        raise ValueError(f"LQL has no literal for {x!r}")
    negative = math.copysign(1.0, x) < 0
    if negative and not signed:
        raise ValueError(f"a negative number ({x!r}) is only valid in a WHERE/SET value")
    text = format(Decimal(repr(abs(x))), "f")
    if "." not in text:
        text += ".0"
    return "-" + text if negative else text


def _uint(n: int) -> str:
    if type(n) is not int or n < 0:
        raise ValueError(f"expected a non-negative int, got {n!r}")
    return str(n)


def format_value(value: ast.Value) -> str:
    """A WHERE/SET value as LQL text (negative numbers and tuples included)."""
    if type(value) is str:
        return quote(value)
    if type(value) is int:
        return str(value)
    if type(value) is float:
        return _float(value, signed=True)
    if type(value) is tuple:
        return "(" + ", ".join(format_value(v) for v in value) + ")"
    raise ValueError(f"not an LQL value: {value!r}")


def _field(name: str) -> str:
    from modelql.lql.parser import KEYWORDS

    if not _IDENT.match(name):
        raise ValueError(f"not a valid field name: {name!r}")
    if name.upper() in KEYWORDS and name != name.lower():
        raise ValueError(f"field {name!r} is a keyword; keyword field names are lower case")
    return name


def _range(r: ast.Range) -> str:
    if r.start > r.end:
        raise ValueError(f"invalid range {r.start}-{r.end}")
    return f"{_uint(r.start)}-{_uint(r.end)}"


def _vref(ref: ast.VindexRef) -> str:
    return "CURRENT" if isinstance(ref, ast.Current) else quote(ref)


def _where(conditions: tuple[ast.Condition, ...]) -> str:
    if not conditions:
        raise ValueError("a WHERE clause needs at least one condition")
    return "WHERE " + " AND ".join(
        f"{_field(c.field)} {c.op.value} {format_value(c.value)}" for c in conditions
    )


class _Words(list):
    """A statement under construction: words and clauses joined by spaces."""

    def add(self, *parts: str) -> None:
        self.extend(parts)

    def text(self) -> str:
        return " ".join(self)


# ── one writer per statement class ──────────────────────────────────────────────────────


def _use_vindex(s: ast.UseVindex) -> str:
    return f"USE {quote(s.path)}"


def _use_model(s: ast.UseModel) -> str:
    return f"USE MODEL {quote(s.model)}" + (" AUTO_EXTRACT" if s.auto_extract else "")


def _use_remote(s: ast.UseRemote) -> str:
    return f"USE REMOTE {quote(s.url)}"


_LEVEL_WORD = {
    ast.ExtractLevel.INFERENCE: "INFERENCE",
    ast.ExtractLevel.ALL: "ALL",
    ast.ExtractLevel.ATTENTION: "ATTENTION",
}


def _extract(s: ast.Extract) -> str:
    w = _Words(["EXTRACT", "MODEL", quote(s.model), "INTO", quote(s.output)])
    if s.components is not None:
        if not s.components:
            raise ValueError("COMPONENTS needs at least one component")
        w.add("COMPONENTS", ", ".join(c.value for c in s.components))
    if s.layers is not None:
        w.add("LAYERS", _range(s.layers))
    if s.level is not ast.ExtractLevel.BROWSE:
        w.add("WITH", _LEVEL_WORD[s.level])
    return w.text()


def _compile(s: ast.Compile) -> str:
    w = _Words(["COMPILE", _vref(s.source), "INTO", s.target.value, quote(s.output)])
    if s.format is not None:
        w.add("FORMAT", s.format.value)
    if s.on_conflict is not None:
        if s.target is not ast.CompileTarget.VINDEX:
            raise ValueError("ON CONFLICT is only valid for COMPILE INTO VINDEX")
        w.add("ON", "CONFLICT", s.on_conflict.value)
    return w.text()


def _diff(s: ast.Diff) -> str:
    w = _Words(["DIFF", _vref(s.a), _vref(s.b)])
    if s.layer is not None:
        w.add("LAYER", _uint(s.layer))
    if s.relation is not None:
        w.add("RELATION", quote(s.relation))
    if s.limit is not None:
        w.add("LIMIT", _uint(s.limit))
    if s.into_patch is not None:
        w.add("INTO", "PATCH", quote(s.into_patch))
    return w.text()


def _stats(s: ast.Stats) -> str:
    return "STATS" if s.path is None else f"STATS {quote(s.path)}"


def _walk(s: ast.Walk) -> str:
    w = _Words(["WALK", quote(s.prompt)])
    if s.top is not None:
        w.add("TOP", _uint(s.top))
    if s.layers is not None:
        w.add("LAYERS", _range(s.layers))
    if s.mode is not None:
        w.add("MODE", s.mode.value)
    if s.compare:
        w.add("COMPARE")
    return w.text()


def _infer(s: ast.Infer) -> str:
    w = _Words(["INFER", quote(s.prompt)])
    if s.top is not None:
        w.add("TOP", _uint(s.top))
    if s.compare:
        w.add("COMPARE")
    return w.text()


def _select(s: ast.Select) -> str:
    fields = ", ".join(_field(f) for f in s.fields) if s.fields else "*"
    w = _Words(["SELECT", fields, "FROM", s.source.value])
    if s.nearest is not None:
        w.add("NEAREST", "TO", quote(s.nearest.entity), "AT", "LAYER", _uint(s.nearest.layer))
    if s.where:
        w.add(_where(s.where))
    if s.order_by is not None:
        w.add("ORDER", "BY", _field(s.order_by.field))
        if s.order_by.descending:
            w.add("DESC")
    if s.limit is not None:
        w.add("LIMIT", _uint(s.limit))
    return w.text()


def _describe(s: ast.Describe) -> str:
    w = _Words(["DESCRIBE", quote(s.entity)])
    if s.band is not None:
        w.add(s.band.value)
    if s.layer is not None:
        w.add("AT", "LAYER", _uint(s.layer))
    if s.relations_only:
        w.add("RELATIONS", "ONLY")
    if s.verbosity is not ast.Verbosity.BRIEF:
        w.add(s.verbosity.value)
    return w.text()


def _explain_walk(s: ast.ExplainWalk) -> str:
    w = _Words(["EXPLAIN", "WALK", quote(s.prompt)])
    if s.layers is not None:
        w.add("LAYERS", _range(s.layers))
    if s.verbose:
        w.add("VERBOSE")
    if s.top is not None:
        w.add("TOP", _uint(s.top))
    return w.text()


def _explain_infer(s: ast.ExplainInfer) -> str:
    w = _Words(["EXPLAIN", "INFER", quote(s.prompt)])
    if s.layers is not None:
        w.add("LAYERS", _range(s.layers))
    if s.band is not None:
        w.add(s.band.value)
    if s.verbose:
        w.add("VERBOSE")
    if s.top is not None:
        w.add("TOP", _uint(s.top))
    if s.relations_only:
        w.add("RELATIONS", "ONLY")
    if s.with_attention:
        w.add("WITH", "ATTENTION")
    return w.text()


def _trace(s: ast.Trace) -> str:
    w = _Words(["TRACE", quote(s.prompt)])
    if s.answer is not None:
        w.add("FOR", quote(s.answer))
    if s.decompose:
        w.add("DECOMPOSE")
    if s.layers is not None:
        w.add("LAYERS", _range(s.layers))
    if s.positions is not None:
        w.add("POSITIONS", s.positions.value)
    if s.save is not None:
        w.add("SAVE", quote(s.save))
    return w.text()


def _insert(s: ast.Insert) -> str:
    w = _Words([
        "INSERT INTO EDGES (entity, relation, target) VALUES",
        ", ".join(f"({quote(f.entity)}, {quote(f.relation)}, {quote(f.target)})" for f in s.values),
    ])
    if s.layer is not None:
        w.add("AT", "LAYER", _uint(s.layer))
    if s.confidence is not None:
        w.add("CONFIDENCE", _float(float(s.confidence)))
    if s.alpha is not None:
        w.add("ALPHA", _float(float(s.alpha)))
    if s.mode is not None:
        w.add("MODE", s.mode.value)
    return w.text()


def _delete(s: ast.Delete) -> str:
    return f"DELETE FROM EDGES {_where(s.where)}"


def _update(s: ast.Update) -> str:
    if not s.assignments:
        raise ValueError("UPDATE needs at least one assignment")
    sets = ", ".join(f"{_field(a.field)} = {format_value(a.value)}" for a in s.assignments)
    return f"UPDATE EDGES SET {sets} {_where(s.where)}"


def _merge(s: ast.Merge) -> str:
    w = _Words(["MERGE", quote(s.source)])
    if s.target is not None:
        w.add("INTO", quote(s.target))
    if s.on_conflict is not None:
        w.add("ON", "CONFLICT", s.on_conflict.value)
    return w.text()


def _rebalance(s: ast.Rebalance) -> str:
    w = _Words(["REBALANCE"])
    if s.until_converged:
        w.add("UNTIL", "CONVERGED")
    if s.max_iterations is not None:
        w.add("MAX", _uint(s.max_iterations))
    if s.floor is not None:
        w.add("FLOOR", _float(float(s.floor)))
    if s.ceiling is not None:
        w.add("CEILING", _float(float(s.ceiling)))
    return w.text()


def _compact_minor(s: ast.CompactMinor) -> str:
    return "COMPACT MINOR"


def _compact_major(s: ast.CompactMajor) -> str:
    w = _Words(["COMPACT", "MAJOR"])
    if s.full:
        w.add("FULL")
    if s.lambda_ is not None:
        w.add("WITH", "LAMBDA", "=", _float(float(s.lambda_)))
    return w.text()


def _show_relations(s: ast.ShowRelations) -> str:
    w = _Words(["SHOW", "RELATIONS"])
    if s.layer is not None:
        w.add("AT", "LAYER", _uint(s.layer))
    if s.with_examples:
        w.add("WITH", "EXAMPLES")
    if s.verbosity is not ast.Verbosity.BRIEF:
        w.add(s.verbosity.value)
    return w.text()


def _show_layers(s: ast.ShowLayers) -> str:
    return "SHOW LAYERS" if s.range is None else f"SHOW LAYERS {_range(s.range)}"


def _show_features(s: ast.ShowFeatures) -> str:
    w = _Words(["SHOW", "FEATURES", _uint(s.layer)])
    if s.where:
        w.add(_where(s.where))
    if s.limit is not None:
        w.add("LIMIT", _uint(s.limit))
    return w.text()


def _show_entities(s: ast.ShowEntities) -> str:
    w = _Words(["SHOW", "ENTITIES"])
    if s.layer is not None:
        w.add("AT", "LAYER", _uint(s.layer))
    if s.limit is not None:
        w.add("LIMIT", _uint(s.limit))
    return w.text()


def _begin_patch(s: ast.BeginPatch) -> str:
    return f"BEGIN PATCH {quote(s.path)}"


def _save_patch(s: ast.SavePatch) -> str:
    return "SAVE PATCH" if s.path is None else f"SAVE PATCH {quote(s.path)}"


def _apply_patch(s: ast.ApplyPatch) -> str:
    return f"APPLY PATCH {quote(s.path)}"


def _remove_patch(s: ast.RemovePatch) -> str:
    return f"REMOVE PATCH {quote(s.path)}"


def _pipe(s: ast.Pipe) -> str:
    if isinstance(s.left, ast.Pipe) or isinstance(s.right, ast.Pipe):
        raise ValueError("LQL allows a single pipe (A |> B)")
    return f"{to_lql(s.left)} |> {to_lql(s.right)}"


_WRITERS: dict[type, Callable[..., str]] = {
    ast.UseVindex: _use_vindex,
    ast.UseModel: _use_model,
    ast.UseRemote: _use_remote,
    ast.Extract: _extract,
    ast.Compile: _compile,
    ast.Diff: _diff,
    ast.Stats: _stats,
    ast.Walk: _walk,
    ast.Infer: _infer,
    ast.Select: _select,
    ast.Describe: _describe,
    ast.ExplainWalk: _explain_walk,
    ast.ExplainInfer: _explain_infer,
    ast.Trace: _trace,
    ast.Insert: _insert,
    ast.Delete: _delete,
    ast.Update: _update,
    ast.Merge: _merge,
    ast.Rebalance: _rebalance,
    ast.CompactMinor: _compact_minor,
    ast.CompactMajor: _compact_major,
    ast.ShowRelations: _show_relations,
    ast.ShowLayers: _show_layers,
    ast.ShowFeatures: _show_features,
    ast.ShowEntities: _show_entities,
    ast.ShowModels: lambda s: "SHOW MODELS",
    ast.ShowPatches: lambda s: "SHOW PATCHES",
    ast.ShowCompactStatus: lambda s: "SHOW COMPACT STATUS",
    ast.BeginPatch: _begin_patch,
    ast.SavePatch: _save_patch,
    ast.ApplyPatch: _apply_patch,
    ast.RemovePatch: _remove_patch,
    ast.Pipe: _pipe,
}


def to_lql(stmt: ast.Statement, *, semicolon: bool = False) -> str:
    """The canonical LQL text of ``stmt`` (one line; with a trailing ``;`` if asked)."""
    try:
        writer = _WRITERS[type(stmt)]
    except KeyError:
        raise ValueError(f"not an LQL statement: {stmt!r}") from None
    text = writer(stmt)
    return text + ";" if semicolon else text
