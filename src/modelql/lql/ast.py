"""The LQL abstract syntax tree: one frozen dataclass per statement form.

Every statement parses (``modelql.lql.parse``) into exactly one of the classes below; a
``Pipe`` joins two of them. The AST is the contract between the parser and the executor:
the executor is a dispatcher (``match stmt: case Describe(...): knowledge.describe(...)``),
so each class carries everything its knowledge function needs, already typed:

* strings are decoded (escapes resolved), integers are ``int``, the spec's ``number``
  positions (CONFIDENCE, ALPHA, FLOOR, CEILING, lambda) are ``float``;
* a WHERE/SET ``value`` is a ``Value``: ``str | int | float | tuple[Value, ...]`` (negative
  numbers included, a parenthesised list is a tuple);
* clause sets of the spec (``{ X | Y }``) become fields with ``None`` / ``False`` / the
  documented default when the clause is absent; a repeated clause overrides the earlier one;
* field names are identifiers as written, or reserved words lowercased (``LAYER`` -> ``layer``).

Equality is structural, so ``parse(to_lql(stmt)) == stmt`` is the printer's contract.
Nothing here imports beyond the standard library.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import ClassVar, Union

__all__ = [
    # value types
    "Value", "Range", "Current", "CURRENT", "VindexRef", "Condition", "Assignment", "Nearest",
    "OrderBy", "Fact",
    # enums
    "Band", "Verbosity", "WalkMode", "InsertMode", "MergeConflict", "CompileConflict",
    "CompileTarget", "OutputFormat", "ExtractLevel", "Component", "SelectSource", "Op",
    "Positions",
    # statements
    "Statement", "UseVindex", "UseModel", "UseRemote", "Extract", "Compile", "Diff", "Stats",
    "Walk", "Infer", "Select", "Describe", "ExplainWalk", "ExplainInfer", "Trace", "Insert",
    "Delete", "Update", "Merge", "Rebalance", "CompactMinor", "CompactMajor", "ShowRelations",
    "ShowLayers", "ShowFeatures", "ShowEntities", "ShowModels", "ShowPatches",
    "ShowCompactStatus", "BeginPatch", "SavePatch", "ApplyPatch", "RemovePatch", "Pipe",
    # statement groups
    "STATEMENT_TYPES", "LIFECYCLE", "QUERIES", "MUTATIONS", "PATCH_STATEMENTS", "INTROSPECTION",
]


# ──────────────────────────────────────────────────────────────────────────────────────────
# Enums. Each member's value is its canonical LQL spelling (what the printer writes), except
# where noted.
# ──────────────────────────────────────────────────────────────────────────────────────────


class Band(enum.Enum):
    """A layer band (``band`` in the grammar): which layers DESCRIBE / EXPLAIN INFER scan."""

    ALL = "ALL LAYERS"
    SYNTAX = "SYNTAX"
    KNOWLEDGE = "KNOWLEDGE"
    OUTPUT = "OUTPUT"


class Verbosity(enum.Enum):
    """DESCRIBE / SHOW RELATIONS output mode; BRIEF is the default."""

    BRIEF = "BRIEF"
    VERBOSE = "VERBOSE"
    RAW = "RAW"


class WalkMode(enum.Enum):
    """WALK ... MODE m (only changes the header label; HYBRID is the default)."""

    HYBRID = "HYBRID"
    PURE = "PURE"
    DENSE = "DENSE"


class InsertMode(enum.Enum):
    """INSERT ... MODE m: KNN (retrieval override), COMPOSE (feature-slot install) or MEMIT
    (modelql: weight-level edit of the down projection). No MODE clause = None: the executor
    applies the default mode (``modelql.knowledge.edit.DEFAULT_MODE``)."""

    KNN = "KNN"
    COMPOSE = "COMPOSE"
    MEMIT = "MEMIT"


class MergeConflict(enum.Enum):
    """MERGE ... ON CONFLICT s (KEEP_SOURCE is the default)."""

    KEEP_SOURCE = "KEEP_SOURCE"
    KEEP_TARGET = "KEEP_TARGET"
    HIGHEST_CONFIDENCE = "HIGHEST_CONFIDENCE"


class CompileConflict(enum.Enum):
    """COMPILE ... INTO VINDEX ... ON CONFLICT s."""

    LAST_WINS = "LAST_WINS"
    HIGHEST_CONFIDENCE = "HIGHEST_CONFIDENCE"
    FAIL = "FAIL"


class CompileTarget(enum.Enum):
    """COMPILE ... INTO MODEL | VINDEX."""

    MODEL = "MODEL"
    VINDEX = "VINDEX"


class OutputFormat(enum.Enum):
    """COMPILE ... FORMAT f."""

    SAFETENSORS = "SAFETENSORS"
    GGUF = "GGUF"


class ExtractLevel(enum.Enum):
    """EXTRACT level; values are the vindex ``extract_level`` strings (vindex-format §9).

    ``WITH INFERENCE`` and ``WITH WEIGHTS`` both give INFERENCE; no WITH clause gives BROWSE.
    """

    BROWSE = "browse"
    ATTENTION = "attention"
    INFERENCE = "inference"
    ALL = "all"


class Component(enum.Enum):
    """EXTRACT ... COMPONENTS c, ... (accepted; modelql ignores it like LARQL)."""

    FFN_GATE = "FFN_GATE"
    FFN_DOWN = "FFN_DOWN"
    FFN_UP = "FFN_UP"
    EMBEDDINGS = "EMBEDDINGS"
    ATTN_OV = "ATTN_OV"
    ATTN_QK = "ATTN_QK"


class SelectSource(enum.Enum):
    """SELECT ... FROM EDGES | FEATURES | ENTITIES."""

    EDGES = "EDGES"
    FEATURES = "FEATURES"
    ENTITIES = "ENTITIES"


class Op(enum.Enum):
    """A comparison operator of a WHERE condition."""

    EQ = "="
    NE = "!="
    GT = ">"
    LT = "<"
    GE = ">="
    LE = "<="
    LIKE = "LIKE"
    IN = "IN"


class Positions(enum.Enum):
    """TRACE ... POSITIONS ALL | LAST (a bare POSITIONS means LAST)."""

    LAST = "LAST"
    ALL = "ALL"


# ──────────────────────────────────────────────────────────────────────────────────────────
# Small value types
# ──────────────────────────────────────────────────────────────────────────────────────────

#: A literal in a WHERE condition or an UPDATE assignment.
Value = Union[str, int, float, tuple["Value", ...]]


@dataclass(frozen=True, slots=True)
class Range:
    """An inclusive layer range ``start-end`` (``start <= end`` is guaranteed by the parser)."""

    start: int
    end: int

    def __contains__(self, layer: object) -> bool:
        return isinstance(layer, int) and self.start <= layer <= self.end

    def layers(self) -> range:
        """The layers of the range as a Python ``range``."""
        return range(self.start, self.end + 1)


@dataclass(frozen=True, slots=True)
class Current:
    """The ``CURRENT`` vindex reference (the session's effective, overlay-applied vindex)."""


#: The one ``Current`` value.
CURRENT = Current()

#: COMPILE's source and DIFF's operands: a path, or CURRENT.
VindexRef = Union[str, Current]


@dataclass(frozen=True, slots=True)
class Condition:
    """``field op value`` in a WHERE clause."""

    field: str
    op: Op
    value: Value


@dataclass(frozen=True, slots=True)
class Assignment:
    """``field = value`` in UPDATE ... SET."""

    field: str
    value: Value


@dataclass(frozen=True, slots=True)
class Nearest:
    """SELECT ... NEAREST TO "entity" AT LAYER n."""

    entity: str
    layer: int


@dataclass(frozen=True, slots=True)
class OrderBy:
    """SELECT ... ORDER BY field [ASC | DESC] (ascending unless DESC)."""

    field: str
    descending: bool = False


# ──────────────────────────────────────────────────────────────────────────────────────────
# Statements
# ──────────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Statement:
    """Base class of every statement (and of ``Pipe``).

    ``keyword`` (a class attribute) names the statement form as a user writes it
    (``"DESCRIBE"``, ``"USE REMOTE"``, ``"SHOW PATCHES"``), e.g. for "not available yet"
    messages; ``str(stmt)`` is its canonical LQL text (``printer.to_lql``).
    """

    keyword: ClassVar[str] = ""

    def __str__(self) -> str:
        from modelql.lql.printer import to_lql

        return to_lql(self)


# ── Lifecycle ────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class UseVindex(Statement):
    """``USE "path"`` — a vindex directory or ``hf://owner/repo[@revision]``."""

    path: str


@dataclass(frozen=True, slots=True)
class UseModel(Statement):
    """``USE MODEL "id|path" [AUTO_EXTRACT]``."""

    model: str
    auto_extract: bool = False


@dataclass(frozen=True, slots=True)
class UseRemote(Statement):
    """``USE REMOTE "url"``."""

    url: str


@dataclass(frozen=True, slots=True)
class Extract(Statement):
    """``EXTRACT MODEL "id" INTO "dir" {COMPONENTS ... | LAYERS a-b | WITH level}``."""

    model: str
    output: str
    components: tuple[Component, ...] | None = None
    layers: Range | None = None
    level: ExtractLevel = ExtractLevel.BROWSE


@dataclass(frozen=True, slots=True)
class Compile(Statement):
    """``COMPILE vref INTO MODEL|VINDEX "out" [FORMAT f] [ON CONFLICT s]`` (ON CONFLICT: VINDEX)."""

    source: VindexRef
    target: CompileTarget
    output: str
    format: OutputFormat | None = None
    on_conflict: CompileConflict | None = None


@dataclass(frozen=True, slots=True)
class Diff(Statement):
    """``DIFF a b {LAYER n | RELATION "r" | LIMIT n} [INTO PATCH "p"]``."""

    a: VindexRef
    b: VindexRef
    layer: int | None = None
    relation: str | None = None
    limit: int | None = None
    into_patch: str | None = None


@dataclass(frozen=True, slots=True)
class Stats(Statement):
    """``STATS ["path"]``."""

    path: str | None = None


# ── Queries ──────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Walk(Statement):
    """``WALK "prompt" {TOP n | LAYERS a-b|ALL | MODE m | COMPARE}`` (LAYERS ALL = None)."""

    prompt: str
    top: int | None = None
    layers: Range | None = None
    mode: WalkMode | None = None
    compare: bool = False


@dataclass(frozen=True, slots=True)
class Infer(Statement):
    """``INFER "prompt" {TOP n | COMPARE}``."""

    prompt: str
    top: int | None = None
    compare: bool = False


@dataclass(frozen=True, slots=True)
class Select(Statement):
    """``SELECT fields FROM source [NEAREST TO ...] [WHERE ...] [ORDER BY ...] [LIMIT n]``.

    ``fields`` is ``()`` for ``*``.
    """

    source: SelectSource
    fields: tuple[str, ...] = ()
    nearest: Nearest | None = None
    where: tuple[Condition, ...] = ()
    order_by: OrderBy | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class Describe(Statement):
    """``DESCRIBE "entity" {band | AT LAYER n | RELATIONS ONLY | VERBOSE | BRIEF | RAW}``."""

    entity: str
    band: Band | None = None
    layer: int | None = None
    relations_only: bool = False
    verbosity: Verbosity = Verbosity.BRIEF


@dataclass(frozen=True, slots=True)
class ExplainWalk(Statement):
    """``EXPLAIN WALK "prompt" {LAYERS a-b | VERBOSE | TOP n}``."""

    prompt: str
    layers: Range | None = None
    verbose: bool = False
    top: int | None = None


@dataclass(frozen=True, slots=True)
class ExplainInfer(Statement):
    """``EXPLAIN INFER "prompt" {LAYERS a-b | band | VERBOSE | TOP n | RELATIONS ONLY | WITH ATTENTION}``."""

    prompt: str
    layers: Range | None = None
    band: Band | None = None
    verbose: bool = False
    top: int | None = None
    relations_only: bool = False
    with_attention: bool = False


@dataclass(frozen=True, slots=True)
class Trace(Statement):
    """``TRACE "prompt" {FOR "tok" | DECOMPOSE | LAYERS a-b | POSITIONS [ALL|LAST] | SAVE "file"}``.

    ``answer`` is the FOR token; ``positions`` is None when POSITIONS is absent.
    """

    prompt: str
    answer: str | None = None
    decompose: bool = False
    layers: Range | None = None
    positions: Positions | None = None
    save: str | None = None


# ── Mutations ────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Fact:
    """One ``("entity", "relation", "target")`` row of INSERT ... VALUES."""

    entity: str
    relation: str
    target: str


@dataclass(frozen=True, slots=True)
class Insert(Statement):
    """``INSERT INTO EDGES (entity, relation, target) VALUES ("e", "r", "t") [, ("e2", "r2", "t2")
    ...] {AT LAYER n | CONFIDENCE x | ALPHA x | MODE [=] KNN|COMPOSE|MEMIT}``. Several rows are
    one batch (modelql: MEMIT solves them together, which beats one statement per fact). Absent
    numbers and an absent MODE are None (the executor applies the defaults)."""

    values: tuple[Fact, ...]
    layer: int | None = None
    confidence: float | None = None
    alpha: float | None = None
    mode: InsertMode | None = None


@dataclass(frozen=True, slots=True)
class Delete(Statement):
    """``DELETE FROM EDGES WHERE ...`` (``where`` is never empty)."""

    where: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Update(Statement):
    """``UPDATE EDGES SET f = v, ... WHERE ...``."""

    assignments: tuple[Assignment, ...]
    where: tuple[Condition, ...]


@dataclass(frozen=True, slots=True)
class Merge(Statement):
    """``MERGE "src" [INTO "dst"] [ON CONFLICT s]`` (None: KEEP_SOURCE)."""

    source: str
    target: str | None = None
    on_conflict: MergeConflict | None = None


@dataclass(frozen=True, slots=True)
class Rebalance(Statement):
    """``REBALANCE {UNTIL CONVERGED | MAX n | FLOOR [=] x | CEILING [=] x}``."""

    until_converged: bool = False
    max_iterations: int | None = None
    floor: float | None = None
    ceiling: float | None = None


@dataclass(frozen=True, slots=True)
class CompactMinor(Statement):
    """``COMPACT MINOR``."""


@dataclass(frozen=True, slots=True)
class CompactMajor(Statement):
    """``COMPACT MAJOR [ALL | FULL] [WITH LAMBDA = x]`` (``lambda_``: ``lambda`` is a Python keyword)."""

    full: bool = False
    lambda_: float | None = None


# ── Introspection ────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class ShowRelations(Statement):
    """``SHOW RELATIONS {AT LAYER n | WITH EXAMPLES | VERBOSE | BRIEF | RAW}``."""

    layer: int | None = None
    with_examples: bool = False
    verbosity: Verbosity = Verbosity.BRIEF


@dataclass(frozen=True, slots=True)
class ShowLayers(Statement):
    """``SHOW LAYERS [[RANGE] a-b]``."""

    range: Range | None = None


@dataclass(frozen=True, slots=True)
class ShowFeatures(Statement):
    """``SHOW FEATURES n [WHERE ...] [LIMIT k]``."""

    layer: int
    where: tuple[Condition, ...] = ()
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class ShowEntities(Statement):
    """``SHOW ENTITIES [AT LAYER n | n] [LIMIT k]``."""

    layer: int | None = None
    limit: int | None = None


@dataclass(frozen=True, slots=True)
class ShowModels(Statement):
    """``SHOW MODELS``."""


@dataclass(frozen=True, slots=True)
class ShowPatches(Statement):
    """``SHOW PATCHES``."""


@dataclass(frozen=True, slots=True)
class ShowCompactStatus(Statement):
    """``SHOW COMPACT STATUS``."""


# ── Patches ──────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class BeginPatch(Statement):
    """``BEGIN PATCH "p.vlp"``."""

    path: str


@dataclass(frozen=True, slots=True)
class SavePatch(Statement):
    """``SAVE PATCH ["p.vlp"]`` (the path is a modelql addition)."""

    path: str | None = None


@dataclass(frozen=True, slots=True)
class ApplyPatch(Statement):
    """``APPLY PATCH "p.vlp"``."""

    path: str


@dataclass(frozen=True, slots=True)
class RemovePatch(Statement):
    """``REMOVE PATCH "p.vlp"``."""

    path: str


# ── Pipe ─────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True, slots=True)
class Pipe(Statement):
    """``A |> B``: run ``left``, then ``right``; an error in ``left`` aborts ``right``.

    The grammar allows exactly one pipe, so neither side is itself a ``Pipe``.
    """

    left: Statement
    right: Statement


_KEYWORDS: dict[type[Statement], str] = {
    UseVindex: "USE", UseModel: "USE MODEL", UseRemote: "USE REMOTE", Extract: "EXTRACT",
    Compile: "COMPILE", Diff: "DIFF", Stats: "STATS", Walk: "WALK", Infer: "INFER",
    Select: "SELECT", Describe: "DESCRIBE", ExplainWalk: "EXPLAIN WALK",
    ExplainInfer: "EXPLAIN INFER", Trace: "TRACE", Insert: "INSERT", Delete: "DELETE",
    Update: "UPDATE", Merge: "MERGE", Rebalance: "REBALANCE", CompactMinor: "COMPACT MINOR",
    CompactMajor: "COMPACT MAJOR", ShowRelations: "SHOW RELATIONS", ShowLayers: "SHOW LAYERS",
    ShowFeatures: "SHOW FEATURES", ShowEntities: "SHOW ENTITIES", ShowModels: "SHOW MODELS",
    ShowPatches: "SHOW PATCHES", ShowCompactStatus: "SHOW COMPACT STATUS",
    BeginPatch: "BEGIN PATCH", SavePatch: "SAVE PATCH", ApplyPatch: "APPLY PATCH",
    RemovePatch: "REMOVE PATCH", Pipe: "|>",
}
for _cls, _word in _KEYWORDS.items():
    _cls.keyword = _word
del _cls, _word


# ──────────────────────────────────────────────────────────────────────────────────────────
# Statement groups (for capability checks in the executor)
# ──────────────────────────────────────────────────────────────────────────────────────────

LIFECYCLE: tuple[type[Statement], ...] = (
    UseVindex, UseModel, UseRemote, Extract, Compile, Diff, Stats,
)
QUERIES: tuple[type[Statement], ...] = (
    Walk, Infer, Select, Describe, ExplainWalk, ExplainInfer, Trace,
)
MUTATIONS: tuple[type[Statement], ...] = (
    Insert, Delete, Update, Merge, Rebalance, CompactMinor, CompactMajor,
)
PATCH_STATEMENTS: tuple[type[Statement], ...] = (
    BeginPatch, SavePatch, ApplyPatch, RemovePatch, ShowPatches,
)
INTROSPECTION: tuple[type[Statement], ...] = (
    ShowRelations, ShowLayers, ShowFeatures, ShowEntities, ShowModels, ShowCompactStatus,
)
#: Every concrete statement class (``Pipe`` excluded).
STATEMENT_TYPES: tuple[type[Statement], ...] = (
    LIFECYCLE + QUERIES + MUTATIONS + PATCH_STATEMENTS + INTROSPECTION
)
