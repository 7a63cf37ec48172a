"""The token predicates of DESCRIBE (algorithms §5)."""

from __future__ import annotations

import pytest

from modelql.knowledge.tokens import STOP_WORDS, content, entity_like, readable


@pytest.mark.parametrize("tok, ok", [
    ("Paris", True), (" Paris ", True), ("a", True), ("New York", True), ("l'Île", True),
    ("", False), ("   ", False), ("x" * 31, False), ("x" * 30, True),
    ("東京", False), ("日本a", False), ("ab日本", True),  # half the chars ASCII alnum is enough
    ("!!", False), ("--", True), ("ÉÉa", False),
])
def test_readable(tok, ok):
    assert readable(tok) is ok


@pytest.mark.parametrize("tok, ok", [
    ("Paris", True), ("Berlin", True), ("euro", True), ("New York", True), ("O'Neil", True),
    ("ab", False),  # too short
    ("x" * 26, False), ("x" * 25, True),
    ("the", False), ("The", False), ("which", False), ("because", False), ("del", False),
    ("iPhone", False),  # lowercase followed by uppercase
    ("McDonald", False), ("NASA", True), ("B2B", True),  # 2 letters ≥ ⌊2·3/3⌋
    ("123", False), ("1a2", False), ("Zürich", True),
])
def test_content(tok, ok):
    assert content(tok) is ok


def test_stop_list_is_the_reference_list():
    assert len(STOP_WORDS) == 82
    assert {"the", "par", "aux", "che", "del", "because"} <= STOP_WORDS


@pytest.mark.parametrize("tok, ok", [
    ("France", True), ("Paris", True), ("The", False), ("Which", False), ("Three", False),
    ("paris", False), ("Ab", False), ("New York", False), ("R2D2", False), ("Éire", False),
])
def test_entity_like(tok, ok):
    assert entity_like(tok) is ok
