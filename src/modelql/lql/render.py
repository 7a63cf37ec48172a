"""Typed LQL results -> output: plain text lines (spec §4) and rich tables (the REPL).

``blocks(executed)`` turns one ``Executed(statement, value)`` into a list of blocks — a ``str``
line or a ``Table`` — once; ``lines()`` lays them out as plain text (batch mode, tests) and
``renderables()`` as rich objects (the REPL). So both renderings always show the same content.
The spec fixes content (which lines, columns, fields, in which order, with which number
formats); padding is ours.

``error_lines(exc)`` is the one place errors become text: ``Error: <message>`` on one line for
execution errors (never a traceback); a syntax error keeps its caret lines.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from modelql.lql import ast
from modelql.lql import results as R

__all__ = [
    "Table", "blocks", "lines", "text", "renderables", "error_lines", "error_message",
    "format_count", "format_bytes", "RENDERERS",
]


# ---------------------------------------------------------------------------------------------
# number formats (spec §4.7)
# ---------------------------------------------------------------------------------------------


def format_count(n: int) -> str:
    """``n ≥ 10⁶`` → ``x.xxM``; ``n ≥ 10³`` → ``x.xK``; else the integer."""
    if n >= 1_000_000:
        return f"{n / 1_000_000:.2f}M"
    if n >= 1_000:
        return f"{n / 1_000:.1f}K"
    return str(n)


def format_bytes(n: int) -> str:
    """``≥ 2³⁰`` → ``x.xx GB``; ``≥ 2²⁰`` → ``x.x MB``; ``≥ 1024`` → ``x.x KB``; else ``n B``."""
    if n >= 1 << 30:
        return f"{n / (1 << 30):.2f} GB"
    if n >= 1 << 20:
        return f"{n / (1 << 20):.1f} MB"
    if n >= 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n} B"


def _gate(g: float) -> str:
    return f"{g:+.1f}"


def _pct(p: float) -> str:
    return f"{p * 100:.2f}%"


def _ms(ms: float) -> str:
    return f"{ms:.1f}ms"


def _layers_span(lo: int, hi: int) -> str:
    return f"L{lo}" if lo == hi else f"L{lo}-{hi}"


def _list(items: Sequence[str], n: int) -> str:
    return "[" + ", ".join(items[:n]) + "]"


# ---------------------------------------------------------------------------------------------
# blocks
# ---------------------------------------------------------------------------------------------


@dataclass
class Table:
    """Rows of cells under named columns. ``align``: "l" or "r" per column. ``header=False``
    renders aligned rows without a header (DESCRIBE's edge lists)."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    align: str = ""
    indent: int = 2
    header: bool = True

    def aligned(self) -> str:
        return (self.align + "l" * len(self.columns))[: len(self.columns)]


Block = "str | Table"
Renderer = Callable[[ast.Statement, Any], list]

#: result type -> renderer(statement, value) -> blocks.
RENDERERS: dict[type, Renderer] = {}


def renders(*types: type):
    def register(fn: Renderer) -> Renderer:
        for t in types:
            RENDERERS[t] = fn
        return fn

    return register


def blocks(executed: R.Executed) -> list:
    """The blocks of one executed statement."""
    value = executed.value
    for cls in type(value).__mro__:
        fn = RENDERERS.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            return fn(executed.statement, value)
    return [str(value)]  # an unknown result type: never fail at display time


def lines(executed: R.Executed) -> list[str]:
    """Plain-text lines of one executed statement."""
    out: list[str] = []
    for b in blocks(executed):
        out.extend(_table_lines(b) if isinstance(b, Table) else str(b).split("\n"))
    return out


def text(results: Sequence[R.Executed]) -> str:
    """All results as one text (a statement's lines, results separated by nothing)."""
    return "\n".join(line for r in results for line in lines(r))


def _width(s: str) -> int:
    from rich.cells import cell_len

    return cell_len(s)


def _pad(s: str, width: int, how: str) -> str:
    gap = " " * max(0, width - _width(s))
    return gap + s if how == "r" else s + gap


def _table_lines(t: Table) -> list[str]:
    align = t.aligned()
    rows = [list(r) + [""] * (len(t.columns) - len(r)) for r in t.rows]
    all_rows = ([list(t.columns)] if t.header else []) + rows
    if not all_rows:
        return []
    widths = [max(_width(r[i]) for r in all_rows) for i in range(len(t.columns))]
    pad = " " * t.indent

    def fmt(r: list[str]) -> str:
        cells = [_pad(c, w, a) for c, w, a in zip(r, widths, align)]
        return (pad + "  ".join(cells)).rstrip()

    out = []
    if t.header:
        out.append(fmt(list(t.columns)))
        out.append(pad + "  ".join("-" * w for w in widths))
    out.extend(fmt(r) for r in rows)
    return out


def renderables(executed: R.Executed) -> list:
    """Rich renderables of one executed statement (tables as ``rich.table.Table``)."""
    from rich import box
    from rich.table import Table as RichTable
    from rich.text import Text

    out = []
    for b in blocks(executed):
        if isinstance(b, Table):
            if not b.header:
                out.extend(Text(line) for line in _table_lines(b))
                continue
            rt = RichTable(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1))
            for name, a in zip(b.columns, b.aligned()):
                rt.add_column(name, justify="right" if a == "r" else "left", overflow="fold")
            for row in b.rows:
                rt.add_row(*[Text(c) for c in row])
            out.append(rt)
        else:
            out.append(Text(str(b)))
    return out


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def error_message(exc: BaseException) -> str:
    """The display text of an error: a syntax error keeps its caret lines; everything else is
    one line."""
    from modelql.errors import ModelqlError
    from modelql.lql.parser import LqlSyntaxError

    if isinstance(exc, LqlSyntaxError):
        return str(exc)
    if isinstance(exc, ModelqlError):
        msg = " ".join(part.strip() for part in str(exc).splitlines() if part.strip())
        return msg or type(exc).__name__
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            return f"{exc.filename}: {exc.strerror}"
        return str(exc) or type(exc).__name__
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    detail = " ".join(str(exc).split())
    return f"internal error: {type(exc).__name__}" + (f": {detail}" if detail else "")


def error_lines(exc: BaseException) -> list[str]:
    """``Error: <message>`` (plus a syntax error's source line and caret)."""
    msg = error_message(exc).split("\n")
    return [f"Error: {msg[0]}"] + msg[1:]


# ---------------------------------------------------------------------------------------------
# lifecycle
# ---------------------------------------------------------------------------------------------


def _used_line(u: R.UsedVindex) -> str:
    extra = ""
    if u.relation_types:
        extra = f", relations: {u.relation_types} types"
        if u.probe_confirmed:
            extra += f", {u.probe_confirmed} probe-confirmed"
    return (f"Using: {u.path} ({u.num_layers} layers, {format_count(u.features)} features, "
            f"model: {u.model}{extra})")


@renders(R.UsedVindex)
def _r_used(stmt, u: R.UsedVindex) -> list:
    out = [_used_line(u)]
    if u.default:
        out.append("  (the embedded default model's vindex)")
    return out


def _model_note(model: str) -> str:
    name = os.path.basename(model.rstrip("/")) or "model"
    return (f"  Dense inference only (INFER, TRACE, STATS). Browse statements need a vindex: "
            f'EXTRACT MODEL "{model}" INTO "{name}.vindex"')


@renders(R.UsedModel)
def _r_used_model(stmt, u: R.UsedModel) -> list:
    return [
        f"Using model: {u.model} ({u.num_layers} layers, hidden={u.hidden_size}, "
        f"{format_bytes(u.weight_bytes)}, live weights)",
        _model_note(u.model),
    ]


@renders(R.Extracted)
def _r_extracted(stmt, e: R.Extracted) -> list:
    return [
        f"Loading model: {e.model}",
        f"Model loaded ({e.num_layers} layers, hidden={e.hidden_size}). Extracting to {e.path}...",
        f"  down_meta: {e.seconds_down_meta:.1f}s",
        f"  total: {e.seconds:.1f}s ({format_bytes(e.bytes_written)} written, level {e.level})",
        f"Extraction complete: {e.path}",
        _used_line(e.used),
    ]


def _stats_blocks(s) -> list:
    out = [
        f"Model: {s.model} ({s.family}, extract level {s.extract_level}, {s.dtype})",
        f"Features: {format_count(s.features)} ({format_count(s.features_per_layer)} x "
        f"{len(s.loaded_layers)} layers)",
        f"Dimensions: hidden {s.hidden_size}, intermediate {s.intermediate_size}, vocab {s.vocab_size}",
        "Knowledge Graph:",
    ]
    if s.clusters or s.probe_labels:
        if s.clusters:
            out.append(f"  Relation clusters: {s.clusters} ({s.cluster_labels} labels, "
                       f"{s.unmapped_clusters} unmapped)")
        out.append(f"  Probe-labelled features: {s.probe_labels} ({s.probe_relations} relation types)")
    else:
        out.append("  (no relation clusters found)")
    if s.knn_entries:
        out.append(f"  KNN store: {s.knn_entries} entries")
    out.append(f"By layer band ({s.bands_source}):")
    for b in s.band_stats:
        cov = f" ({100 * b.with_meta / b.features:.1f}% with metadata)" if b.features else ""
        out.append(f"  {b.name.capitalize()} (L{b.lo}-{b.hi}): {format_count(b.features)} features{cov}")
    out.append(f"Weights: {'yes (INFER, TRACE available)' if s.has_weights else 'no (browse only)'}")
    out.append(f"Index size: {format_bytes(s.index_bytes)}")
    out.append(f"Path: {s.path}")
    return out


@renders(R.ModelStats)
def _r_model_stats(stmt, m: R.ModelStats) -> list:
    u = m.model
    return [
        f"Model: {u.model} ({u.family})",
        f"Layers: {u.num_layers}, hidden {u.hidden_size}, intermediate {u.intermediate_size}, "
        f"vocab {u.vocab_size}",
        f"Weights: {format_bytes(u.weight_bytes)} (live, dense)",
        f"Path: {u.path}",
        _model_note(u.model),
    ]


# ---------------------------------------------------------------------------------------------
# session introspection
# ---------------------------------------------------------------------------------------------


@renders(R.LayersResult)
def _r_layers(stmt, r: R.LayersResult) -> list:
    if not r.rows:
        return ["  (no layers loaded)"]
    t = Table(["Layer", "Features", "WithMeta", "TopToken"], align="rrrl")
    for row in r.rows:
        top = f"{row.top_token} ({row.top_token_count})" if row.top_token else ""
        t.rows.append([f"L{row.layer}", format_count(row.features), format_count(row.with_meta), top])
    return [t]


@renders(R.ModelsResult)
def _r_models(stmt, r: R.ModelsResult) -> list:
    if not r.rows:
        return [f"  (no vindexes in {r.directory})"]
    t = Table(["Model", "Size", "Layers", "Status"], align="lrrl")
    for m in r.rows:
        t.rows.append([m.name, format_bytes(m.size_bytes), str(m.num_layers) if m.num_layers else "",
                       m.status])
    return [t]


# ---------------------------------------------------------------------------------------------
# knowledge results (registered lazily: the row classes live in modelql.knowledge.rows)
# ---------------------------------------------------------------------------------------------


def _walk_blocks(stmt, w) -> list:
    if isinstance(stmt, ast.ExplainWalk):
        head = f'Walk trace for "{w.prompt}" (token "{w.token}", {len(w.layers)} layers):'
        out = [head]
        per_layer = w.top
        ndown = 5 if stmt.verbose else 3
        for layer, rows in w.by_layer().items():
            for r in rows[:per_layer]:
                out.append(f"  L{layer}: F{r.feature} → {r.target} (gate={_gate(r.gate_score)}, "
                           f"down={_list(r.top_tokens, ndown)})")
        if not w.rows:
            out.append("  (no features found)")
        out.append(_ms(w.latency_ms))
        return out
    mode = getattr(stmt, "mode", None) or ast.WalkMode.HYBRID
    label = {ast.WalkMode.HYBRID: "hybrid (default)", ast.WalkMode.PURE: "pure (sparse KNN only)",
             ast.WalkMode.DENSE: "dense (full matmul)"}[mode]
    per_layer = 5 if getattr(stmt, "compare", False) else 3
    out = [f'Feature scan for "{w.prompt}" (token "{w.token}", {len(w.layers)} layers, mode={label})']
    t = Table(["", "", "", "", ""], align="llrll", header=False)
    for layer, rows in w.by_layer().items():
        for r in rows[:per_layer]:
            t.rows.append([f"L{layer}:", f"F{r.feature}", f"gate={_gate(r.gate_score)}", f'top="{r.target}"',
                           f"down={_list(r.top_tokens, 3)}"])
    out.append(t if t.rows else "  (no features found)")
    out.append(_ms(w.latency_ms))
    out.append("Note: an embedding-only scan of the gates; no attention was run (INFER runs the full model).")
    return out


_SECTION_TITLES = {"syntax": "Syntax", "knowledge": "Edges", "output": "Output"}


def _edge_where(e) -> str:
    """L<layer>, the patch of an overlay fact, and a low-confidence mark."""
    where = f"patch {e.patch}" if getattr(e, "patch", None) else f"L{e.layer}"
    if getattr(e, "confident", None) is False and getattr(e, "decoded", False):
        where += f" (low confidence, p={e.confidence:.2f})" if getattr(e, "confidence", None) is not None \
            else " (low confidence)"
    return where


def _describe_blocks(stmt, d) -> list:
    out = [d.entity]
    if not d.found:
        return out + ["  (not found)"]
    verbosity = getattr(stmt, "verbosity", ast.Verbosity.BRIEF)
    sections = d.sections(verbosity.value.lower())
    note = getattr(d, "note", None)
    if not d.edges or not sections:
        return out + ["  (no edges found)"] + ([f"  note: {note}"] if note else [])
    mode = f", {d.mode} query" if d.mode and d.mode != "embedding" else ""
    out.append(f"  signal: {d.signal} ({len(d.edges)} edges, max gate {d.max_gate:.1f}{mode})")
    if note:
        out.append(f"  note: {note}")
    for sec in sections:
        out.append(f"  {_SECTION_TITLES.get(sec.band, sec.band.capitalize())} ({_layers_span(sec.lo, sec.hi)}):")
        if verbosity is ast.Verbosity.BRIEF:
            t = Table(["", "", "", ""], align="llrl", indent=4, header=False)
            for e in sec.edges:
                t.rows.append([e.relation or "", f"→ {e.target}", f"{e.gate:.1f}", _edge_where(e)])
        else:
            cols = ["", "", "", "", "", ""] if verbosity is ast.Verbosity.VERBOSE else ["", "", "", "", ""]
            t = Table(cols, align=("l" if verbosity is ast.Verbosity.VERBOSE else "") + "lrlrl", indent=4,
                      header=False)
            for e in sec.edges:
                row = [f"→ {e.target}", f"{e.gate:.1f}", _layers_span(e.layer_min, e.layer_max), f"{e.count}x",
                       f"[also: {', '.join(e.also)}]" if e.also else ""]
                if verbosity is ast.Verbosity.VERBOSE:
                    row.insert(0, f"[{e.relation}]" if e.relation else "[—]")
                t.rows.append(row)
        out.append(t)
        if sec.total > len(sec.edges):
            more = sec.total - len(sec.edges)
            hint = " (VERBOSE shows up to 30)" if verbosity is ast.Verbosity.BRIEF else ""
            out.append(f"    … {more} more{hint}")
    return out


def _score(row) -> str:
    if getattr(row, "score_kind", "c_score") == "gate":
        return f"{row.score:+.2f}"
    return f"{row.score:.4f}"


def _column(r, attr: str) -> str:
    if attr == "layer":
        return f"L{r.layer}"
    if attr == "feature":
        return f"F{r.feature}"
    if attr == "score":
        return _score(r)
    if attr == "c_score":
        return f"{r.c_score:.4f}"
    if attr in ("also", "top_tokens"):
        return ", ".join(getattr(r, attr, ()) or ())
    v = getattr(r, attr, None)
    return "" if v is None else str(v)


def _select_footer(s) -> str:
    n = len(s.rows)
    if s.total > n:
        return f"{n} of {s.total} rows (LIMIT {s.limit})"
    return f"{n} row{'s' if n != 1 else ''}"


def _select_blocks(stmt, s) -> list:
    if isinstance(stmt, ast.ShowFeatures):
        if not s.rows:
            return [f"  (no features match at layer {stmt.layer})"]
        t = Table(["Feature", "TopToken", "Score", "DownOutputs"], align="rlrl")
        for r in s.rows:
            t.rows.append([f"F{r.feature}", r.token, f"{r.c_score:.4f}", ", ".join(r.top_tokens[:5])])
        return [t, _select_footer(s)]
    if s.source == "entities":
        out = []
        if isinstance(stmt, ast.ShowEntities):
            where = f" at layer {stmt.layer}" if stmt.layer is not None else " across all layers"
            out.append(f"Distinct entities{where} ({s.total} total, showing top {min(s.limit, len(s.rows))}):")
        if not s.rows:
            return out + ["  (no entities found)"]
        t = Table(["Entity", "Features", "MaxScore"], align="lrr")
        for r in s.rows:
            t.rows.append([r.entity, str(r.features), f"{r.max_score:.4f}"])
        out.append(t)
        if not isinstance(stmt, ast.ShowEntities):
            out.append(_select_footer(s))
        return out
    if not s.rows:
        return ["  (no rows)"]
    fields = getattr(stmt, "fields", ())
    if fields:  # SELECT col, col FROM ...: exactly those columns, in that order
        from modelql.lql.executor import SELECT_COLUMNS

        t = Table([f.capitalize() for f in fields],
                  align="".join("r" if SELECT_COLUMNS.get(f) in ("layer", "feature", "expert", "score", "c_score")
                                else "l"
                                for f in fields))
        for r in s.rows:
            t.rows.append([_column(r, SELECT_COLUMNS.get(f, f)) for f in fields])
        return [t, _select_footer(s)]
    full = s.source == "features" or getattr(stmt, "nearest", None) is not None
    relation_filtered = any(c.field == "relation" for c in getattr(stmt, "where", ()))
    show_also = full or s.has_also
    show_rel = full or s.has_relation or relation_filtered
    show_expert = any(getattr(r, "expert", None) is not None for r in s.rows)  # a MoE vindex
    cols = ["Layer"] + (["Expert"] if show_expert else []) + ["Feature", "Token"] + (["Also"] if show_also else []) \
        + (["Relation"] if show_rel else []) + ["Score"]
    t = Table(cols, align="r" + ("r" if show_expert else "") + "rl" + ("l" if show_also else "")
              + ("l" if show_rel else "") + "r")
    for r in s.rows:
        row = [f"L{r.layer}"] + ([f"E{r.expert}" if r.expert is not None else ""] if show_expert else []) \
            + [f"F{r.feature}", r.token]
        if show_also:
            row.append(", ".join(r.also))
        if show_rel:
            row.append(r.relation or "")
        row.append(_score(r))
        t.rows.append(row)
    return [t, _select_footer(s)]


def _relations_blocks(stmt, r) -> list:
    verbosity = getattr(stmt, "verbosity", ast.Verbosity.BRIEF)
    out: list = []
    if verbosity is not ast.Verbosity.RAW and r.probe_relations:
        out.append(f"Probe-confirmed relations ({r.probe_count} labels):")
        t = Table(["Relation", "Features", "Layers"], align="lrl")
        rows = r.probe_relations[:30] if verbosity is ast.Verbosity.BRIEF else r.probe_relations
        for p in rows:
            t.rows.append([p.name, str(p.count), _layers_span(p.min_layer, p.max_layer)])
        out.append(t)
    if verbosity is not ast.Verbosity.BRIEF or not r.probe_relations:
        if r.tokens:
            lo, hi = r.layer_range
            out.append(f"Top output tokens ({_layers_span(lo, hi)}):")
            examples = getattr(stmt, "with_examples", False)
            t = Table(["Token", "Count", "Score", "Layers"] + (["Examples"] if examples else []), align="lrrll")
            cap = 50 if verbosity is ast.Verbosity.VERBOSE else 30
            for row in r.tokens[:cap]:
                cells = [row.name, str(row.count), f"{row.max_score:.4f}", _layers_span(row.min_layer, row.max_layer)]
                if examples:
                    cells.append(("e.g. " + ", ".join(row.examples)) if row.examples else "")
                t.rows.append(cells)
            out.append(t)
    if not out:
        return ["  (no relations found)"]
    return out


def _trace_rows_by_position(tr) -> dict[int, list]:
    by: dict[int, list] = {}
    for row in tr.rows:
        by.setdefault(row.position, []).append(row)
    return by


def _token(tok: str) -> str:
    """A prediction token for a table cell: stripped, or quoted when it is only whitespace."""
    return tok.strip() or repr(tok)


def _layer_name(layer: int) -> str:
    return "emb" if layer < 0 else f"L{layer}"


def _trace_blocks(stmt, tr) -> list:
    out = [f'Trace: "{tr.prompt}" ({len(tr.tokens)} tokens, {tr.num_layers} layers, {_ms(tr.elapsed_ms)})']
    by = _trace_rows_by_position(tr)
    decompose = getattr(stmt, "decompose", False)
    for pos, rows in by.items():
        if len(by) > 1:
            tok = tr.tokens[pos] if 0 <= pos < len(tr.tokens) else ""
            out.append(f"Position {pos} ({tok!r}):")
        if tr.answer is not None:
            out.append(f"Answer trajectory for '{tr.answer}':")
            t = Table(["Layer", "Rank", "Prob", "Attn", "FFN", "Who"], align="rrrrrl")
            for r in rows:
                t.rows.append([_layer_name(r.layer), str(r.answer_rank), _pct(r.answer_prob or 0.0),
                               f"{r.attn_logit or 0.0:+.2f}", f"{r.ffn_logit or 0.0:+.2f}", r.who or ""])
            out.append(t)
        if decompose:
            t = Table(["Layer", "|attn_Δ|", "|ffn_Δ|", "|residual|", "attn%"], align="rrrrr")
            for r in rows:
                t.rows.append([_layer_name(r.layer), f"{r.attn_norm:.2f}", f"{r.ffn_norm:.2f}",
                               f"{r.resid_norm:.2f}", f"{r.attn_share:.1f}%"])
            out.append(t)
        if tr.answer is None and not decompose:
            t = Table(["Layer", "Top-1", "Prob", "|attn_Δ|", "|ffn_Δ|"], align="rlrrr")
            for r in rows:
                t.rows.append([_layer_name(r.layer), _token(r.top_token), _pct(r.top_prob), f"{r.attn_norm:.2f}",
                               f"{r.ffn_norm:.2f}"])
            out.append(t)
    return out


@renders(R.TraceSaved)
def _r_trace_saved(stmt, s: R.TraceSaved) -> list:
    tr = s.trace
    return [f'Trace: "{tr.prompt}" ({len(tr.tokens)} tokens, {tr.num_layers} layers, {_ms(tr.elapsed_ms)})',
            f"Saved {s.chains} token chains to {s.path}"]


def _register_knowledge() -> None:
    """Register the renderers of modelql.knowledge's result types (imported lazily)."""
    try:
        from modelql.knowledge import rows
    except ImportError:  # pragma: no cover
        return
    RENDERERS.setdefault(rows.WalkResult, _walk_blocks)
    RENDERERS.setdefault(rows.DescribeResult, _describe_blocks)
    RENDERERS.setdefault(rows.SelectResult, _select_blocks)
    RENDERERS.setdefault(rows.RelationsResult, _relations_blocks)
    RENDERERS.setdefault(rows.Stats, lambda stmt, s: _stats_blocks(s))


def _pred_token(tok: str) -> str:
    """A prediction token keeps its leading space (spec §4.8); whitespace-only ones are quoted."""
    return tok if tok.strip() else repr(tok)


def _prediction_rows(preds, override=None) -> list[str]:
    out = []
    for i, p in enumerate(preds, 1):
        if i == 1 and override is not None:
            m = override.model_top1
            out.append(f"{i:2d}. {_pred_token(p.token)} (100.00%, source=knn_override/post_logits, "
                       f"cos={override.cosine:.2f}, L{override.layer}, model_top1={_pred_token(m.token)} "
                       f"({m.prob * 100:.2f}%))")
        else:
            out.append(f"{i:2d}. {_pred_token(p.token)} ({_pct(p.prob)})")
    return out


_OVERRIDE_NOTE = ("  note: the KNN override is a post-logits sidecar ({entity} —[{relation}]→ {target}); "
                  "the residual stream is unchanged")


def _fired_line(f, ndown: int = 3) -> str:
    label = f"[{f.relation}] " if f.relation else ""
    contrib = getattr(f, "contribution", None)
    return (f"  L{f.layer}: {label}F{f.feature} gate={_gate(f.gate)} → {f.top_token} "
            f"{_list(f.top_tokens, ndown)}" + (f" logit+={contrib:.2f}" if contrib is not None else ""))


def _infer_blocks(stmt, r) -> list:
    if isinstance(stmt, ast.ExplainInfer):
        return _explain_infer_blocks(stmt, r)
    out: list = []
    if r.mode == "dense" and not r.trace and r.dense is None:
        out.append("Predictions (dense — no vindex):")
        out += _prediction_rows(r.predictions)
        out.append(_ms(r.elapsed_ms))
        out.append("Tip: USE a vindex (or USE MODEL \"...\" AUTO_EXTRACT) to see which features fired.")
        return out
    out.append("Predictions (walk FFN):")
    out += _prediction_rows(r.predictions, r.override)
    if r.override is not None:
        o = r.override
        out.append(_OVERRIDE_NOTE.format(entity=o.entity, relation=o.relation, target=o.target))
    out.append(_ms(r.elapsed_ms))
    if r.dense is not None:
        out.append("Predictions (dense):")
        out += _prediction_rows(r.dense)
        out.append(_ms(r.dense_ms or 0.0))
    if r.trace:
        out.append("")
        out.append("Inference trace (features that fired with attention):")
        out += [_fired_line(f) for f in r.trace]
    return out


def _explain_infer_blocks(stmt, r) -> list:
    band = ""
    if stmt.band is not None:
        band = " (" + ("all layers" if stmt.band is ast.Band.ALL else stmt.band.value.lower()) + ")"
    out: list = [f'Inference trace for "{r.prompt}"{band}:']
    if r.predictions:
        p = r.predictions[0]
        if r.override is not None:
            o = r.override
            out.append(f"Prediction: {_pred_token(o.target)} (100.00%, source=knn_override/post_logits, "
                       f"cos={o.cosine:.2f}, L{o.layer}) in {_ms(r.elapsed_ms)}")
            out.append(f"  the override is not part of the trace below (model top-1: {_pred_token(p.token)} "
                       f"({_pct(p.prob)}))")
        else:
            out.append(f"Prediction: {_pred_token(p.token)} ({_pct(p.prob)}) in {_ms(r.elapsed_ms)}")
    out.append("")
    if stmt.with_attention:
        for a in r.attention:
            f = a.feature
            what = (f.relation or f.top_token) if f is not None else "-"
            gate = _gate(f.gate) if f is not None else ""
            out.append(f"  L{a.layer} {what} {gate} {_pred_token(a.attended_token).strip() or repr(a.attended_token)}"
                       f"({a.attention_weight * 100:.0f}%) → {_pred_token(a.lens_token)} ({a.lens_prob * 100:.1f}%)")
        return out
    ndown = 5 if stmt.verbose else 3
    out += [_fired_line(f, ndown) for f in r.trace]
    if not r.trace:
        out.append("  (no features fired in the selected layers)")
    return out


#: renderers of result types whose modules import torch: matched by qualified name, so
#: importing this module stays light.
_BY_NAME: dict[str, Renderer] = {
    "modelql.knowledge.trace.Trace": _trace_blocks,
    "modelql.knowledge.infer.InferResult": _infer_blocks,
}


_register_knowledge()
