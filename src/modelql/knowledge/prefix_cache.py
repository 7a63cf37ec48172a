"""The KV state of a prompt's entity-independent head, computed once per model and reused.

Why: DESCRIBE runs an entity through every relation's probe, and the calibrated probes of a real
model are often two-shot prompts ("The capital of Spain is Madrid. The capital of Peru is Lima.
The capital of {X} is"): ≈ 20 tokens of examples before the entity's 2–5. Every token is a pass
through every layer, so re-running the examples per entity made most of DESCRIBE's cost. The
head's keys/values (and its last residuals, for per-token log-probabilities) do not depend on the
entity: they are computed once per (model, weights version, head text), and each query forks
them and runs only its own tail.

Exact by construction: the reused positions are the longest common prefix of the head's ids and
the whole prompt's ids (the tokenizer may merge across the {X} boundary; positions past the
common prefix are recomputed), and a causal model's state at those positions depends on those
tokens only. The weights version is the FFN backend object and its overlay epoch: an overlay's
edits (and a MEMIT delta installed as the FFN) change it, so a stale head is never reused.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

#: Heads kept per model (least recently used evicted).
MAX_HEADS = 64

_SAME_PATH = {"hook_embed": lambda t, n: None}

_states: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class PrefixState:
    """A head's ids, its KV cache at their length and the last block's output per position [P, H]."""

    ids: tuple[int, ...]
    cache: object  # runtime.model.KVCache
    hidden: torch.Tensor

    def fork(self, n: int, room: int = 0):
        """A new cache holding the head's first `n` positions, with room for `room` more."""
        from ..runtime.model import KVCache

        src = self.cache
        c = KVCache()
        cap = n + max(1, room)
        for store, dst in ((src.k, c.k), (src.v, c.v)):
            for t in store:
                new = t.new_zeros((t.shape[0], cap, t.shape[2]))
                new[:, :n] = t[:, :n]
                dst.append(new)
        c.length = n
        return c


def weights_version(model) -> tuple:
    """What a cached head's state depends on besides the tokens: the FFN backend in use and, for
    an overlay's patched FFN, its edit epoch."""
    ffn = model.__dict__.get("ffn")
    src = getattr(ffn, "source", None)
    return id(ffn), getattr(src, "epoch", None), getattr(getattr(src, "session", None), "epoch", None)


def prefix_state(model, tok, head: str) -> PrefixState | None:
    """The state of `head` (a template's text before {X}, BOS included as the tokenizer adds it),
    computed on first use; None when it tokenises to nothing."""
    ids = tuple(tok.encode(head.rstrip(), add_special_tokens=True)) if head.strip() else \
        tuple(tok.encode("", add_special_tokens=True))
    if not ids:
        return None
    key = (ids, weights_version(model))
    with _lock:
        per = _states.setdefault(model, OrderedDict())
        got = per.get(key)
        if got is not None:
            per.move_to_end(key)
            return got
    cache = model.new_cache()
    # a hook (doing nothing) keeps a low-bit model on the float path the queries' hooked runs take
    hidden = model.forward(torch.tensor([list(ids)]), cache, hooks=_SAME_PATH, logits="none")[0].detach()
    got = PrefixState(ids, cache, hidden)
    with _lock:
        per = _states.setdefault(model, OrderedDict())
        per[key] = got
        while len(per) > MAX_HEADS:
            per.popitem(last=False)
    return got


def shared(head: Sequence[int], ids: Sequence[int]) -> int:
    """How many leading positions of `ids` the head's state can stand for: their common prefix,
    leaving at least the last token of `ids` to run (its residual is what a query reads)."""
    n = 0
    for a, b in zip(head, ids):
        if a != b:
            break
        n += 1
    return min(n, len(ids) - 1)


__all__ = ["PrefixState", "prefix_state", "shared", "weights_version", "MAX_HEADS"]
