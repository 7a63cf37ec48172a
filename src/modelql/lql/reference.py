"""The LQL reference: every statement's syntax (read from the EBNF comments of `grammar.lark`, the
one source of truth for the syntax), what it does and an example. `HELP [statement]` prints it,
the REPL's `help` lists it, and `docs/lql.md` is generated from it:

    python -m modelql.lql.reference > docs/lql.md

`HELP` is a modelql meta-statement recognised before parsing (`help_request`), so the parser
accepts and rejects exactly what LARQL's does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from typing import ClassVar

from modelql import extensions
from modelql.lql import ast


@dataclass(frozen=True)
class Entry:
    name: str        # the HELP topic: "DESCRIBE", "INSERT", "SHOW", ...
    rule: str        # the grammar rule whose EBNF comment is the syntax
    what: str
    example: str


ENTRIES: tuple[Entry, ...] = (
    Entry("USE", "use", "Choose the backend: a vindex directory, a model (its vindex extracted on first use with "
          "AUTO_EXTRACT) or a modelql / LARQL server. A failed USE stops a script.",
          'USE "smollm2.vindex";  USE REMOTE "http://127.0.0.1:8080";'),
    Entry("EXTRACT", "extract", "Decompile a model's FFN into a vindex (the `modelql extract` command).",
          'EXTRACT MODEL "models/smol" INTO "smol.vindex" WITH INFERENCE;'),
    Entry("STATS", "stats", "Summary of the vindex in use (or of the one named): layers, features, bands, labels.",
          "STATS;"),
    Entry("DESCRIBE", "describe", "What the model knows about an entity: the edges (targets, relations, gate "
          "scores) its vector activates, grouped by layer band.", 'DESCRIBE "France" VERBOSE;'),
    Entry("WALK", "walk", "The features a prompt's last token activates, per layer.", 'WALK "Paris" TOP 5;'),
    Entry("EXPLAIN", "explain", "EXPLAIN WALK: WALK with the features' down outputs; EXPLAIN INFER: the features "
          "behind each layer of an inference.", 'EXPLAIN INFER "The capital of France is" TOP 3;'),
    Entry("INFER", "infer", "Run the model on a prompt and show the next-token predictions (KNN facts override).",
          'INFER "The capital of France is" TOP 3;'),
    Entry("TRACE", "trace", "Follow a target token through the layers (attention vs FFN contributions).",
          'TRACE "The capital of France is" FOR "Paris";'),
    Entry("SELECT", "select", "Query feature metadata as rows: FROM EDGES / FEATURES / ENTITIES, with WHERE, "
          "ORDER BY, LIMIT and NEAREST TO.", 'SELECT layer, feature, target FROM EDGES WHERE relation = "capital" '
          "LIMIT 5;"),
    Entry("SHOW", "show", "List relations, layers, a layer's features, entities, models or active patches.",
          "SHOW RELATIONS;  SHOW LAYERS 0-3;  SHOW PATCHES;"),
    Entry("INSERT", "insert", "Add facts (entity, relation, target) to the model. Default mode: modelql's weight-level MEMIT edit (on a "
          "pretrained model, whose facts sit at the subject, one new gated FFN neuron per fact that fires on that entity "
          "only, in a mixture of experts one in every routed expert; COMPILE grows the FFN by their number); MODE KNN is LARQL's "
          "retrieval override (no weights change; the fact is recalled in INFER and in generation when the prompt names its entity), "
          "MODE COMPOSE installs a feature slot.",
          'INSERT INTO EDGES (entity, relation, target) VALUES ("France", "capital", "Lyon") MODE KNN;'),
    Entry("DELETE", "delete", "Remove the edges (feature slots, KNN facts, inserted facts) a WHERE selects.",
          'DELETE FROM EDGES WHERE entity = "France" AND relation = "capital";'),
    Entry("UPDATE", "update", "Change fields (target, relation, confidence) of the edges a WHERE selects.",
          'UPDATE EDGES SET target = "Paris" WHERE entity = "France" AND relation = "capital";'),
    Entry("MERGE", "merge", "Merge another vindex's features into this one's overlay.",
          'MERGE "other.vindex" ON CONFLICT HIGHEST_CONFIDENCE;'),
    Entry("BEGIN PATCH", "begin_patch", "Start recording edits into a named .vlp patch (SAVE PATCH writes it, "
          "APPLY PATCH stacks a saved one, REMOVE PATCH unstacks it).",
          'BEGIN PATCH "facts.vlp"; INSERT ...; SAVE PATCH;'),
    Entry("COMPILE", "compile", "Bake the base and its patches into a new vindex, or a standard model directory "
          "(safetensors or GGUF) that loads in transformers.", 'COMPILE CURRENT INTO MODEL "edited-model";'),
    Entry("DIFF", "diff", "The differences between two vindexes (or CURRENT), optionally as a patch.",
          'DIFF "a.vindex" CURRENT INTO PATCH "changes.vlp";'),
    Entry("REBALANCE", "rebalance", "Rescale inserted features' gates between a floor and a ceiling.",
          "REBALANCE UNTIL CONVERGED;"),
    Entry("COMPACT", "compact", "Fold the overlay into fewer slots (minor) or into the weights (major).",
          "COMPACT minor;"),
)

_SYNTAX_START = re.compile(r"^//\s*([a-z_]+)\s*=")


def _syntax_blocks() -> dict[str, str]:
    """rule → its EBNF comment lines in grammar.lark (with their indented continuation lines)."""
    from modelql.lql.parser import grammar_text

    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in grammar_text().splitlines():
        if _SYNTAX_START.match(line):
            current = [line[2:].strip()]
            for rule in re.findall(r"([a-z_]+)\s*=", line[2:]):  # `begin_patch = ...;  save_patch = ...`
                out[rule] = current
        elif current is not None and re.match(r"//\s{2,}[^\s(]", line) and not line.startswith("// ="):
            current.append(line[2:].rstrip())
        else:
            current = None
    return {k: "\n".join(v) for k, v in out.items() if v}


def syntax(entry: Entry) -> str:
    blocks = _syntax_blocks()
    text = blocks.get(entry.rule, "")
    if entry.rule == "begin_patch":
        text = "\n".join(dict.fromkeys([text, blocks.get("apply_patch", "")]))
    return text


def find(topic: str) -> Entry | None:
    words = topic.upper().split()
    if not words:
        return None
    if words[0] in ("SAVE", "APPLY", "REMOVE", "PATCH", "PATCHES"):
        words = ["BEGIN"]
    return next((e for e in ENTRIES if e.name.split(" ")[0] == words[0]), None)


@dataclass(frozen=True)
class Help(ast.Statement):
    """`HELP [topic]` (not produced by the parser: see `help_request`)."""

    keyword: ClassVar[str] = "HELP"
    topic: str = ""

    def __str__(self) -> str:
        return f"HELP {self.topic}".rstrip() + ";"


def run_help(text: str):
    """The `Executed` of `text` if it is a HELP statement, else None (raises for an unknown topic)."""
    topic = help_request(text)
    if topic is None:
        return None
    from modelql.lql.results import Executed

    return Executed(Help(topic), help_text(topic))


@dataclass(frozen=True)
class HelpText:
    """The value a HELP statement returns (rendered as its text)."""

    text: str

    def __str__(self) -> str:
        return self.text


def help_text(topic: str | None = None) -> HelpText:
    """`HELP` (every statement, one line each), `HELP <statement>` (syntax, what, example) or
    `HELP EXTENSIONS` (what modelql adds to LARQL's LQL)."""
    if topic is None or not topic.strip():
        width = max(len(e.name) for e in ENTRIES)
        lines = ["LQL statements (HELP <statement> for its syntax; HELP EXTENSIONS for modelql's additions):"]
        lines += [f"  {e.name:<{width}}  {e.what.split('. ')[0].rstrip('.')}" for e in ENTRIES]
        return HelpText("\n".join(lines))
    if topic.strip().upper() == "EXTENSIONS":
        ext = extensions.by_area("LQL")
        return HelpText("modelql extensions of LQL:\n" + "\n".join(f"  {e.name}: {e.what}" for e in ext))
    e = find(topic)
    if e is None:
        names = ", ".join(x.name for x in ENTRIES)
        from modelql.errors import LqlExecutionError

        raise LqlExecutionError(f"no help for {topic.strip()!r} (statements: {names})")
    return HelpText(f"{e.name}: {e.what}\n\nSyntax:\n  " + syntax(e).replace("\n", "\n  ")
                    + f"\n\nExample:\n  {e.example}")


_HELP = re.compile(r"\s*help\b\s*(?P<topic>[A-Za-z _]*?)\s*;?\s*", re.IGNORECASE)


def help_request(text: str) -> str | None:
    """The topic ('' for none) when `text` is a HELP statement, else None."""
    stripped = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
    m = _HELP.fullmatch(stripped)
    return None if m is None else m.group("topic")


def markdown() -> str:
    """docs/lql.md."""
    out = ["# LQL reference", "",
           "Generated from `modelql.lql.reference` (syntax from the EBNF comments of `grammar.lark`): "
           "`python -m modelql.lql.reference > docs/lql.md`. The same text is printed by `HELP <statement>` "
           "in `modelql lql` and `modelql repl`.", "",
           "Statements end with `;`. Keywords are case-insensitive; strings are `\"...\"` or `'...'`; `--` starts "
           "a comment. `A |> B` runs A then B. In a script, a failing statement prints `Error: ...` and the "
           "script continues, except after a failed `USE`, which stops it.", "",
           "Notation: `{ X | Y }` any of the clauses in any order; `[ X ]` optional; CAPS keywords; "
           "`\"lower\"` contextual words.", ""]
    for e in ENTRIES:
        out += [f"## {e.name}", "", e.what, "", "```", syntax(e), "```", "", "Example:", "", "```sql", e.example,
                "```", ""]
    out += ["## Extensions", "", "What modelql adds to LARQL's LQL (the parser accepts and rejects exactly what "
            "LARQL's does; these clauses are accepted by both and only modelql acts on them):", "",
            extensions.markdown_table("LQL"), ""]
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    print(markdown(), end="")
