"""Precision and recall of DESCRIBE's labelled edges against a facts table.

An edge is a *claim* when it carries a relation label that is one of the table's relations:
`(entity, relation, target)`. A claim is correct when its target matches a form of one of the
entity's targets for that relation (its lowercase text, or for multi-word targets one of their
≥ 4-char content words — the probe labeller's matching rule, algorithms §6.1), or, for a
multi-word claim (DESCRIBE's decoded phrases), when it is a whole-word prefix of the target
("Saint Kitts" of "Saint Kitts and Nevis", as "Saint" alone already is).

* precision(r) = correct claims labelled r / claims labelled r (micro-averaged over entities);
* recall(r) = facts (entity, r, target) matched by some claim labelled r / facts with relation r.

Used by `bench/describe.py` and the tests.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

from ..vindex.clusters import forms
from .rows import DescribeResult


@dataclass
class RelationScore:
    relation: str
    claims: int = 0
    correct: int = 0
    facts: int = 0
    found: int = 0

    @property
    def precision(self) -> float | None:
        return self.correct / self.claims if self.claims else None

    @property
    def recall(self) -> float | None:
        return self.found / self.facts if self.facts else None


@dataclass
class DescribeScore:
    """Per-relation and overall scores of one DESCRIBE configuration over a set of entities."""

    label: str
    relations: dict[str, RelationScore]
    entities: int
    edges: int  # all edges over all entities
    unlabelled: int  # edges without a relation from the table
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def total(self) -> RelationScore:
        t = RelationScore("all")
        for r in self.relations.values():
            t.claims += r.claims
            t.correct += r.correct
            t.facts += r.facts
            t.found += r.found
        return t

    @property
    def median_ms(self) -> float:
        xs = sorted(self.latencies_ms)
        return xs[len(xs) // 2] if xs else 0.0

    @property
    def p90_ms(self) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else 0.0


def facts_by_entity(facts: Iterable) -> dict[str, dict[str, list[str]]]:
    """{entity: {relation: [targets]}} from objects with .entity/.relation/.target (or triples)."""
    out: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for f in facts:
        e, r, t = (f.entity, f.relation, f.target) if hasattr(f, "entity") else f
        out[e][r].append(t)
    return {e: dict(rs) for e, rs in out.items()}


def matches(claim: str, target_forms: set[str]) -> bool:
    """`claim` (lowercase, stripped) names the target whose `forms()` are given."""
    if claim in target_forms:
        return True
    return " " in claim and any(f.startswith(claim + " ") for f in target_forms)


def score_result(result: DescribeResult, truth: Mapping[str, Sequence[str]], relations: Sequence[str],
                 acc: dict[str, RelationScore]) -> tuple[int, int]:
    """Add one entity's DESCRIBE result to `acc`; returns (edges, unlabelled edges)."""
    rels = set(relations)
    target_forms = {r: [forms(t) for t in truth.get(r, ())] for r in relations}
    found: dict[str, set[int]] = defaultdict(set)
    unlabelled = 0
    for e in result.edges:
        r = e.relation
        if r not in rels:
            unlabelled += 1
            continue
        tok = e.target.strip().lower()
        s = acc[r]
        s.claims += 1
        hit = [i for i, fs in enumerate(target_forms[r]) if matches(tok, fs)]
        if hit:
            s.correct += 1
            found[r].update(hit)
    for r in relations:
        acc[r].facts += len(target_forms[r])
        acc[r].found += len(found[r])
    return len(result.edges), unlabelled


def score_describe(describe_fn, entities: Sequence[str], facts: Mapping[str, Mapping[str, Sequence[str]]],
                   relations: Sequence[str], label: str = "") -> DescribeScore:
    """Run `describe_fn(entity) -> DescribeResult` over `entities` and score every result."""
    acc = {r: RelationScore(r) for r in relations}
    edges = unl = 0
    lat = []
    for ent in entities:
        t0 = time.perf_counter()
        res = describe_fn(ent)
        lat.append((time.perf_counter() - t0) * 1e3)
        n, u = score_result(res, facts.get(ent, {}), relations, acc)
        edges += n
        unl += u
    return DescribeScore(label=label, relations=acc, entities=len(entities), edges=edges, unlabelled=unl,
                         latencies_ms=lat)
