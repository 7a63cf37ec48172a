"""LQL parse throughput: statements/s over a mixed batch of 1,000 statements.

    python bench/lql.py [--statements 1000] [--repeat 7] [--warmup 2] [--seed 0]

The batch is generated deterministically (seeded) and mixes every statement kind of the spec
(USE, EXTRACT, COMPILE, DIFF, STATS, WALK, INFER, SELECT, DESCRIBE, EXPLAIN, TRACE, INSERT,
DELETE, UPDATE, MERGE, REBALANCE, COMPACT, SHOW ..., patches, pipes) with random optional
clauses, both quote styles, escapes, comments, negative numbers and mixed keyword case.

Rows: ``parse`` (one ``parse()`` per statement: lex + LALR parse + AST), ``parse_script``
(the whole batch as one script: split + parse), ``split`` (batch splitting alone) and
``to_lql`` (printing the ASTs back). Each is timed ``--repeat`` times after ``--warmup``
untimed rounds; the table shows the median and best rate. Also printed: the one-off cost of
building the LALR tables (in a fresh interpreter).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import argparse
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from typing import Callable

from modelql.lql import parse, parse_script, split_statements, to_lql

ENTITIES = ["France", "Germany", "Japan", "Atlantis", "Mount Everest", "Paris", "Zürich", "it's",
            "The Beatles", "東京"]
RELATIONS = ["capital", "language", "currency", "continent", "located in", "founded by"]
PROMPTS = ["The capital of France is", "The official language of Japan is", "Water boils at",
           "The Eiffel Tower is in", 'He said "hello"', "line one\nline two"]
FIELDS = ["entity", "relation", "layer", "feature", "confidence", "score", "token", "c_score"]


def _q(rng: random.Random, text: str) -> str:
    """A string literal in a random quote style (escaping what needs it)."""
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    if rng.random() < 0.7:
        return '"' + text.replace('"', '\\"') + '"'
    return "'" + text.replace("'", "\\'") + "'"


def _kw(rng: random.Random, word: str) -> str:
    r = rng.random()
    return word if r < 0.7 else word.lower() if r < 0.9 else word.capitalize()


def _range(rng: random.Random) -> str:
    a = rng.randint(0, 30)
    return f"{a}-{rng.randint(a, 33)}" if rng.random() < 0.8 else f"{a} - {rng.randint(a, 33)}"


def _value(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.35:
        return _q(rng, rng.choice(ENTITIES + RELATIONS))
    if r < 0.6:
        return str(rng.randint(-5, 8000))
    if r < 0.85:
        return f"{rng.uniform(-3, 3):.3f}"
    return "(" + ", ".join(_value(rng) for _ in range(rng.randint(0, 3))) + ")"


def _where(rng: random.Random) -> str:
    conds = [f"{rng.choice(FIELDS)} {rng.choice(['=', '!=', '>', '<', '>=', '<=', 'LIKE'])} {_value(rng)}"
             for _ in range(rng.randint(1, 3))]
    return "WHERE " + " AND ".join(conds)


def _clauses(rng: random.Random, options: list[str], *, shuffle: bool = True) -> str:
    """Some of the optional clauses, in any order (a clause set) or in the given order."""
    chosen = [c for c in options if rng.random() < 0.45]
    if shuffle:
        rng.shuffle(chosen)
    return "".join(" " + c for c in chosen)


def _insert(rng: random.Random) -> str:
    return (f"INSERT INTO EDGES (entity, relation, target) VALUES ({_q(rng, rng.choice(ENTITIES))}, "
            f"{_q(rng, rng.choice(RELATIONS))}, {_q(rng, rng.choice(ENTITIES))})"
            + _clauses(rng, [f"AT LAYER {rng.randint(0, 33)}", f"CONFIDENCE {rng.random():.2f}",
                             f"ALPHA {rng.random():.2f}", f"MODE {rng.choice(['KNN', '= COMPOSE'])}"]))


def _select(rng: random.Random) -> str:
    fields = "*" if rng.random() < 0.5 else ", ".join(rng.sample(FIELDS, rng.randint(1, 3)))
    text = f"SELECT {fields} FROM {rng.choice(['EDGES', 'FEATURES', 'ENTITIES'])}"
    if rng.random() < 0.2:
        text += f" NEAREST TO {_q(rng, rng.choice(ENTITIES))} AT LAYER {rng.randint(0, 33)}"
    if rng.random() < 0.7:
        text += " " + _where(rng)
    if rng.random() < 0.4:
        text += f" ORDER BY {rng.choice(FIELDS)}" + rng.choice(["", " ASC", " DESC"])
    if rng.random() < 0.6:
        text += f" LIMIT {rng.randint(1, 50)}"
    return text


def rng_choice(rng: random.Random, options: list[str]) -> str:
    return rng.choice(options)


GENERATORS: dict[str, Callable[[random.Random], str]] = {
    "USE": lambda r: rng_choice(r, [
        f"USE {_q(r, 'models/gemma3-4b.vindex')}", f"USE MODEL {_q(r, 'google/gemma-3-4b-it')} AUTO_EXTRACT",
        f"USE REMOTE {_q(r, 'http://127.0.0.1:8080')}"]),
    "EXTRACT": lambda r: f"EXTRACT MODEL {_q(r, 'm')} INTO {_q(r, 'm.vindex')}" + _clauses(r, [
        "COMPONENTS FFN_GATE, FFN_DOWN, EMBEDDINGS", f"LAYERS {_range(r)}",
        f"WITH {r.choice(['INFERENCE', 'ALL', 'WEIGHTS', 'ATTENTION'])}"]),
    "COMPILE": lambda r: rng_choice(r, [
        f"COMPILE CURRENT INTO VINDEX {_q(r, 'out.vindex')} ON CONFLICT {r.choice(['LAST_WINS', 'FAIL'])}",
        f"COMPILE {_q(r, 'a.vindex')} INTO MODEL {_q(r, 'out')} FORMAT SAFETENSORS"]),
    "DIFF": lambda r: f"DIFF {_q(r, 'a.vindex')} CURRENT" + _clauses(r, [
        f"LAYER {r.randint(0, 33)}", f"RELATION {_q(r, r.choice(RELATIONS))}", f"LIMIT {r.randint(1, 99)}"]),
    "STATS": lambda r: rng_choice(r, ["STATS", f"STATS {_q(r, 'other.vindex')}"]),
    "WALK": lambda r: f"WALK {_q(r, r.choice(PROMPTS))}" + _clauses(r, [
        f"TOP {r.randint(1, 20)}", f"LAYERS {_range(r)}", f"MODE {r.choice(['HYBRID', 'PURE', 'DENSE'])}",
        "COMPARE"]),
    "INFER": lambda r: f"INFER {_q(r, r.choice(PROMPTS))}" + _clauses(r, [f"TOP {r.randint(1, 9)}", "COMPARE"]),
    "SELECT": _select,
    "DESCRIBE": lambda r: f"DESCRIBE {_q(r, r.choice(ENTITIES))}" + _clauses(r, [
        r.choice(["ALL LAYERS", "SYNTAX", "KNOWLEDGE", "OUTPUT"]), f"AT LAYER {r.randint(0, 33)}",
        "RELATIONS ONLY", r.choice(["VERBOSE", "BRIEF", "RAW"])]),
    "EXPLAIN": lambda r: rng_choice(r, [
        f"EXPLAIN WALK {_q(r, r.choice(PROMPTS))}" + _clauses(r, [f"LAYERS {_range(r)}", "VERBOSE", "TOP 3"]),
        f"EXPLAIN INFER {_q(r, r.choice(PROMPTS))}" + _clauses(r, [
            f"LAYERS {_range(r)}", "KNOWLEDGE", "VERBOSE", "TOP 5", "RELATIONS ONLY", "WITH ATTENTION"])]),
    "TRACE": lambda r: f"TRACE {_q(r, r.choice(PROMPTS))}" + _clauses(r, [
        f"FOR {_q(r, 'Paris')}", "DECOMPOSE", f"LAYERS {_range(r)}", "POSITIONS ALL", f"SAVE {_q(r, 't.bin')}"]),
    "INSERT": _insert,
    "DELETE": lambda r: f"DELETE FROM EDGES {_where(r)}",
    "UPDATE": lambda r: f"UPDATE EDGES SET target = {_q(r, r.choice(ENTITIES))}, confidence = 0.5 {_where(r)}",
    "MERGE": lambda r: f"MERGE {_q(r, 'src.vindex')}" + _clauses(r, [
        f"INTO {_q(r, 'dst.vindex')}", f"ON CONFLICT {r.choice(['KEEP_SOURCE', 'KEEP_TARGET', 'HIGHEST_CONFIDENCE'])}"],
        shuffle=False),
    "REBALANCE": lambda r: "REBALANCE" + _clauses(r, ["UNTIL CONVERGED", "MAX 16", "FLOOR = 0.3", "CEILING 0.9"]),
    "COMPACT": lambda r: rng_choice(r, ["COMPACT MINOR", "COMPACT MAJOR FULL WITH LAMBDA = 0.001", "COMPACT MAJOR"]),
    "SHOW": lambda r: rng_choice(r, [
        "SHOW RELATIONS" + _clauses(r, [f"AT LAYER {r.randint(0, 33)}", "WITH EXAMPLES", "VERBOSE"]),
        f"SHOW LAYERS {_range(r)}", f"SHOW FEATURES {r.randint(0, 33)} {_where(r)} LIMIT 10",
        f"SHOW ENTITIES AT LAYER {r.randint(0, 33)} LIMIT 20", "SHOW MODELS", "SHOW PATCHES",
        "SHOW COMPACT STATUS"]),
    "PATCH": lambda r: rng_choice(r, [
        f"BEGIN PATCH {_q(r, 'facts.vlp')}", "SAVE PATCH", f"SAVE PATCH {_q(r, 'facts.vlp')}",
        f"APPLY PATCH {_q(r, 'facts.vlp')}", f"REMOVE PATCH {_q(r, 'facts.vlp')}"]),
    "PIPE": lambda r: f"WALK {_q(r, r.choice(PROMPTS))} TOP 5 |> DESCRIBE {_q(r, r.choice(ENTITIES))}",
}


def _recase(rng: random.Random, text: str) -> str:
    """Randomly lower-/capitalise the keywords outside string literals."""
    out, i = [], 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|[A-Z][A-Z_]+', text):
        out.append(text[i:m.start()])
        tok = m.group()
        out.append(tok if tok[0] in "\"'" else _kw(rng, tok))
        i = m.end()
    out.append(text[i:])
    return "".join(out)


def make_batch(n: int, seed: int) -> list[str]:
    """n statements, round-robin over the statement kinds, each with random clauses."""
    rng = random.Random(seed)
    kinds = list(GENERATORS)
    batch = []
    for i in range(n):
        text = _recase(rng, GENERATORS[kinds[i % len(kinds)]](rng))
        if rng.random() < 0.1:
            text = "-- statement %d\n" % i + text
        batch.append(text + (";" if rng.random() < 0.8 else ""))
    return batch


def timed(fn: Callable[[], object], repeat: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def build_cost() -> float:
    """Seconds to import modelql.lql and build the LALR tables, in a fresh interpreter."""
    code = ("import time; t=time.perf_counter(); from modelql.lql import parse; parse('STATS'); "
            "print(time.perf_counter()-t)")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return float(out.stdout.strip())
    except (subprocess.CalledProcessError, ValueError):
        return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--statements", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    batch = make_batch(args.statements, args.seed)
    asts = [parse(text) for text in batch]  # also proves the whole batch is valid
    script = "\n".join(s if s.endswith(";") else s + ";" for s in batch)
    assert parse_script(script) == asts
    kinds = Counter(type(a).__name__ for a in asts)
    chars = sum(len(s) for s in batch)
    print(f"batch: {len(batch)} statements, {chars / 1024:.1f} KiB, {len(kinds)} AST classes "
          f"(seed {args.seed}); {args.warmup} warm-up + {args.repeat} timed rounds each")

    def parse_each() -> None:
        for text in batch:
            parse(text)

    def print_each() -> None:
        for a in asts:
            to_lql(a)

    rows = []
    for label, fn in [
        ("parse (one call per statement)", parse_each),
        ("parse_script (one script)", lambda: parse_script(script)),
        ("split only", lambda: split_statements(script)),
        ("to_lql (print the ASTs)", print_each),
    ]:
        times = timed(fn, args.repeat, args.warmup)
        med, best = statistics.median(times), min(times)
        rows.append([label, f"{len(batch) / med:,.0f}", f"{len(batch) / best:,.0f}",
                     f"{med * 1e3:.1f}", f"{chars / med / 1e6:.2f}"])

    header = ["operation", "median stmts/s", "best stmts/s", "median ms/batch", "MB/s"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print()
    print("  ".join(h.ljust(widths[0]) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths))))
    for r in rows:
        print("  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
    print(f"\none-off: import modelql.lql + build the LALR tables = {build_cost() * 1e3:.0f} ms (fresh interpreter)")


if __name__ == "__main__":
    main()
