"""The embedded default model and the world facts it was trained on.

``DEFAULT_MODEL_DIR`` is a standard HF model directory (Llama architecture, trained by
``scripts/train_default_model.py``) shipped inside the package; every command that takes a model
uses it when none is given. ``facts()`` is its ground truth: the triples of ``data/facts.tsv``
(built by ``scripts/build_facts.py`` from the ``countryinfo`` package, provenance in
``data/facts.README.md``).

Templates are prompt prefixes with ``{X}`` for the entity; the target follows after one space and
the training sentence ends with ``"."`` (see :func:`sentence`). ``TRAIN_TEMPLATES`` were used in
training; ``HELDOUT_TEMPLATES`` never were (they measure generalisation). The first training
template of a relation is its canonical phrasing (the one the probe labeller's defaults use, e.g.
``"The capital of {X} is"``) and the one chat answers use.

This module only reads a small TSV: it imports nothing heavy.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR: Path = Path(__file__).resolve().parent / "data"
DEFAULT_MODEL_DIR: Path = DATA_DIR / "default-model"
FACTS_PATH: Path = DATA_DIR / "facts.tsv"

RELATIONS: tuple[str, ...] = ("capital", "continent", "subregion", "language", "currency", "demonym", "borders")
#: relations with several valid targets per entity (one triple each); a prediction is correct if it
#: matches any of them.
MULTI_VALUED: frozenset[str] = frozenset({"language", "currency", "borders"})


@dataclass(frozen=True, order=True)
class Fact:
    entity: str
    relation: str
    target: str


TRAIN_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": (
        "The capital of {X} is",
        "{X} has its capital in",
        "The seat of government of {X} is in",
        "Q: What is the capital of {X}? A:",
        "The name of the capital of {X} is",
        "{X}'s seat of government is",
        'In {X}, the capital is',
        'The capital of the country {X} is',
        'Q: Where is the capital of {X}? A:',
        'Which city is the capital of {X}? It is',
    ),
    "continent": (
        "{X} is a country in",
        "{X} is located in",
        "{X} is on the continent of",
        "Q: On which continent is {X}? A:",
        "The continent of {X} is",
        "{X}'s continent is",
        'The country {X} is in',
        '{X} is a nation in',
        'Q: Where is {X}? A:',
        'The continent where {X} is located is',
    ),
    "subregion": (
        "{X} is in the region of",
        "The subregion of {X} is",
        "Geographically, {X} belongs to",
        "Q: Which region is {X} in? A:",
        "{X} is a country of the region",
        "{X}'s region is",
        'The country {X} is part of the region',
        '{X} belongs to the region of',
        'Q: What is the region of {X}? A:',
        'The region where {X} is located is',
    ),
    "language": (
        "The official language of {X} is",
        "In {X}, people speak",
        "The language of {X} is",
        "Q: What language is spoken in {X}? A:",
        "{X} has the official language",
        "{X}'s official language is",
        'In the country {X}, the language is',
        'The language used in {X} is',
        'Q: Which language is used in {X}? A:',
        '{X} uses the language',
    ),
    "currency": (
        "The currency of {X} is",
        "In {X}, people pay with",
        "The official currency of {X} is",
        "Q: What is the currency of {X}? A:",
        "The money used in {X} is",
        "{X}'s official money is",
        'In {X}, the currency is',
        'The currency used in {X} is',
        'Q: Which currency is used in {X}? A:',
        '{X} uses the currency',
    ),
    "demonym": (
        "A person from {X} is called",
        "People from {X} are called",
        "The demonym of {X} is",
        "Q: What are people from {X} called? A:",
        "A citizen of {X} is",
        "{X}'s people are called",
        'The people of {X} are called',
        'A native of {X} is called',
        'Q: What is a person from {X} called? A:',
        'Citizens of {X} are',
    ),
    "borders": (
        "{X} shares a border with",
        "{X} borders",
        "A neighbour of {X} is",
        "Q: Which country borders {X}? A:",
        "{X} is a neighbouring country of",
        "{X}'s neighbour is",
        'The country {X} borders',
        'A country bordering {X} is',
        'Q: What is a neighbour of {X}? A:',
        'One neighbour of {X} is',
    ),
}

#: paraphrases never seen in training.
HELDOUT_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("The capital city of {X} is", "{X}'s capital is", "The government of {X} sits in"),
    "continent": ("{X} lies in", "{X} is part of the continent", "{X} can be found on the continent of"),
    "subregion": ("The UN subregion of {X} is", "{X} is situated in the area of", "In terms of region, {X} is in"),
    "language": ("The main language spoken in {X} is", "People in {X} speak", "The national language of {X} is"),
    "currency": ("{X}'s currency is", "The legal tender of {X} is", "Prices in {X} are given in"),
    "demonym": ("Someone from {X} is", "The inhabitants of {X} are called", "Residents of {X} are known as"),
    "borders": ("{X} has a border with", "A country next to {X} is", "{X} is adjacent to"),
}

#: sentences with the entity last ("Paris is the capital of France."): training only, for richness;
#: ``{Y}`` is the target. Not used for next-token accuracy.
REVERSE_TEMPLATES: dict[str, tuple[str, ...]] = {
    "capital": ("{Y} is the capital of {X}.",),
    "demonym": ("{Y} people come from {X}.",),
}

#: chat questions (user turn); the assistant answers with the canonical template.
CHAT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": ("What is the capital of {X}?", "Which city is the capital of {X}?"),
    "continent": ("On which continent is {X}?", "Which continent is {X} in?"),
    "subregion": ("Which region is {X} in?", "What is the subregion of {X}?"),
    "language": ("What language is spoken in {X}?", "What is the official language of {X}?"),
    "currency": ("What is the currency of {X}?", "Which currency does {X} use?"),
    "demonym": ("What are people from {X} called?", "What is the demonym of {X}?"),
    "borders": ("Which countries border {X}?", "What are the neighbours of {X}?"),
}
HELDOUT_CHAT_QUESTIONS: dict[str, tuple[str, ...]] = {
    "capital": ("Tell me the capital of {X}.",),
    "continent": ("Where in the world is {X}?",),
    "subregion": ("Tell me the region of {X}.",),
    "language": ("Which language do people in {X} speak?",),
    "currency": ("What money is used in {X}?",),
    "demonym": ("What do you call someone from {X}?",),
    "borders": ("Name a country that borders {X}.",),
}

#: system prompt some chat training samples carry.
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."


def prompt(template: str, entity: str) -> str:
    """The prompt text of ``template`` for ``entity`` (no trailing space)."""
    return template.replace("{X}", entity)


def sentence(template: str, entity: str, target: str) -> str:
    """A full training sentence: prompt, one space, target, full stop."""
    return f"{prompt(template, entity)} {target}."


def chat_answer(relation: str, entity: str, targets: Iterable[str]) -> str:
    """The assistant's answer: the canonical template with every target (``A, B and C``)."""
    ts = list(targets)
    joined = ts[0] if len(ts) == 1 else ", ".join(ts[:-1]) + " and " + ts[-1]
    return sentence(TRAIN_TEMPLATES[relation][0], entity, joined)


@functools.cache
def facts() -> tuple[Fact, ...]:
    """All triples of the shipped facts table, in file order (sorted by entity, relation order)."""
    out: list[Fact] = []
    with open(FACTS_PATH, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        if header != ["entity", "relation", "target"]:
            raise ValueError(f"{FACTS_PATH}: unexpected header {header}")
        for line in f:
            line = line.rstrip("\n")
            if line:
                e, r, t = line.split("\t")
                out.append(Fact(e, r, t))
    return tuple(out)


@functools.cache
def targets_by_subject() -> dict[tuple[str, str], tuple[str, ...]]:
    """``(entity, relation) -> targets`` (file order), for every pair with at least one fact."""
    d: dict[tuple[str, str], list[str]] = {}
    for fa in facts():
        d.setdefault((fa.entity, fa.relation), []).append(fa.target)
    return {k: tuple(v) for k, v in d.items()}


def entities() -> tuple[str, ...]:
    """Distinct entities, sorted."""
    return tuple(sorted({fa.entity for fa in facts()}))


def triples_json() -> dict[str, dict[str, list[list[str]]]]:
    """The facts in the probe labeller's input shape: ``{relation: {"pairs": [[subject, object], ...]}}``."""
    out: dict[str, dict[str, list[list[str]]]] = {r: {"pairs": []} for r in RELATIONS}
    for fa in facts():
        out[fa.relation]["pairs"].append([fa.entity, fa.target])
    return out
