"""Token predicates of DESCRIBE and friends (algorithms §5): `readable`, `content`, the stop lists.

All predicates work on the stripped token text `t' = t.strip()` (metadata tokens are already
decoded with special tokens skipped and whitespace stripped, vindex-format §5.3).
"""

from __future__ import annotations

from functools import lru_cache

#: the lowercase stop list of `content` (algorithms §5), exactly as the reference has it.
STOP_WORDS: frozenset[str] = frozenset(
    """the and for but not you all can her was one our out are has his how its may new now old see way
    who did get let say she too use from have been will with this that they were some them than when
    what your each make like just over such take also into only very more does most about which their
    would there could other after being where these those first should because through before par aux
    che del""".split()
)

#: capitalised words that look like names but are not (SELECT FROM ENTITIES / SHOW ENTITIES).
#: The reference lists "The, For, And, This, Which, First, Three, ..."; ours is the capitalised
#: stop list plus common sentence starters, number and calendar words.
ENTITY_STOP_WORDS: frozenset[str] = frozenset(
    {w.capitalize() for w in STOP_WORDS}
    | set(
        """Three Four Five Six Seven Eight Nine Ten Two Second Third Last Next Many Much Every Any
        Here Then There Thus Yet While Since Until Although Though However Also Even Still Both
        Either Neither Why Because Whose Whom Upon Into Onto Within Without Between Under Above
        Below Among Against During Per Via Yes Not None Something Nothing Everything Anything
        Someone Everyone People Person Thing Things Monday Tuesday Wednesday Thursday Friday
        Saturday Sunday January February March April June July August September October November
        December Mr Mrs Miss Dr Question Answer User Assistant System""".split()
    )
)

_READABLE_EXTRA = frozenset(" -'.,")


@lru_cache(maxsize=1 << 16)  # a DESCRIBE asks about the same few thousand tokens ~30k times
def readable(token: str) -> bool:
    """`1 ≤ bytes(t') ≤ 30` and at least half the characters are ASCII alphanumerics or ` -'.,`."""
    t = token.strip()
    n_bytes = len(t.encode("utf-8"))
    if not 1 <= n_bytes <= 30:
        return False
    good = sum(1 for c in t if (c.isascii() and c.isalnum()) or c in _READABLE_EXTRA)
    return 2 * good >= len(t)


@lru_cache(maxsize=1 << 16)
def content(token: str) -> bool:
    """A token that can name a thing: readable, 3–25 chars, mostly ASCII letters, no camelCase
    seam (lowercase followed by uppercase), at least one letter, not a stop word."""
    t = token.strip()
    if not readable(t):
        return False
    n = len(t)
    if not 3 <= n <= 25:
        return False
    letters = sum(1 for c in t if c.isascii() and c.isalpha())
    if letters == 0 or letters < (2 * n) // 3:
        return False
    for a, b in zip(t, t[1:]):
        if a.islower() and b.isupper():
            return False
    return t.lower() not in STOP_WORDS


@lru_cache(maxsize=1 << 16)
def entity_like(token: str) -> bool:
    """A top token that looks like a named entity: first char an uppercase ASCII letter, ≥ 3 chars,
    all alphabetic, not a capitalised stop word."""
    t = token.strip()
    return (
        len(t) >= 3
        and t[0].isascii()
        and t[0].isupper()
        and t.isalpha()
        and t not in ENTITY_STOP_WORDS
    )


def same_token(a: str, b: str) -> bool:
    """Case-insensitive equality of two stripped tokens."""
    return a.strip().lower() == b.strip().lower()
