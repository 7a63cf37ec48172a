"""Generic text a model samples itself: the statistics behind a weight-level edit and its fluency guard.

MEMIT regularises an edit by the second moment of the FFN keys over "generic text" (the original
uses 100k Wikipedia articles). A local model has no such corpus at hand, and the embedded facts
table is not generic text for a real model (it protects facts the model does not hold in that
form and costs > 1 h of forward passes on a 135M model). So the text is the model's own: a few
hundred continuations sampled (temperature 1, top-k 40, fixed seed) from short openers of stories,
code, recipes, letters and lists. It is by construction the activation distribution the model
lives in, needs nothing shipped or downloaded, and takes seconds (one batched decode). Cached as
token ids per model weights fingerprint.

Sampled from 24 openers (16 generic, 8 encyclopedic), 4 samples of 64 tokens each.

The fluency guard's prompts (`GUARD_PROMPTS`) are separate from the sampling openers and from
the benchmark's fluency prompts, so neither statistics nor guard are fitted to what is measured.
"""

from __future__ import annotations

import json
from typing import Sequence

import torch

from ..runtime.model import KVCache, Model
from .edit_cache import base_ffn, stored_path

OPENERS = (
    "Once upon a time", "The recipe calls for", "def main():", "Yesterday I went to", "In this article we",
    "The best way to learn", "Dear friend,", "import numpy as np", "The weather today", "Step 1:",
    "She said that", "Here is a list of", "The history of", "I think that", "How to make", "class Node:",
    # encyclopedic openers (MEMIT's statistics come from Wikipedia): text about places, people and
    # organisations puts their names' keys into the statistics, so an edit of one entity is not
    # written along what all such names share
    "The country is known for", "The city was founded", "According to the encyclopedia,", "The president of the",
    "The river flows through", "The university is located in", "During the war,", "The company was founded in",
)
SAMPLES_PER_OPENER = 4
SAMPLE_TOKENS = 64

GUARD_PROMPTS = (
    "The little girl walked into the forest and", "for i in range(10):", "To make a cake, first",
    "The meeting was moved to", "He opened the window because", "Water boils at",
    "The main reason people exercise is", "def add(a, b):",
)
GUARD_TOKENS = 10


def corpus_tag() -> str:
    """Names the sampling configuration in the cache file names (a change re-samples)."""
    return f"o{len(OPENERS)}s{SAMPLES_PER_OPENER}t{SAMPLE_TOKENS}"


def _encode(model: Model, text: str) -> list[int]:
    ids = model.tokenizer.encode(text)
    if not ids:
        ids = [model.spec.bos_token_id or 0]
    return ids


def sample(model: Model, openers: Sequence[str] = OPENERS, per_opener: int = SAMPLES_PER_OPENER,
           tokens: int = SAMPLE_TOKENS, seed: int = 0) -> list[list[int]]:
    """`per_opener` continuations of `tokens` tokens after each opener (prompt included), sampled
    in one batched decode."""
    gen = torch.Generator().manual_seed(seed)
    seqs: list[list[int]] = []
    caches: list[KVCache] = []
    last: list[torch.Tensor] = []
    for o in openers:
        ids = _encode(model, o)
        cs = [KVCache() for _ in range(per_opener)]
        logits = model.forward(torch.tensor([ids] * per_opener), caches=cs, logits="last")
        caches += cs
        last.append(logits)
        seqs += [list(ids) for _ in range(per_opener)]
    logits = torch.cat(last)
    room = model.spec.max_position - max(len(s) for s in seqs)  # a small model's context window
    for _ in range(max(0, min(tokens, room))):
        top = torch.topk(logits.float(), min(40, logits.shape[-1]), dim=-1)
        pick = torch.multinomial(torch.softmax(top.values, -1), 1, generator=gen)
        nxt = top.indices.gather(-1, pick)
        for s, t in zip(seqs, nxt[:, 0].tolist()):
            s.append(int(t))
        logits = model.forward(nxt, caches=caches, logits="last")
    return seqs


def corpus(model: Model) -> list[list[int]]:
    """The model's sampled generic text (token ids), cached in memory and in
    $MODELQL_CACHE/memit/<weights fingerprint>-corpus.json. Sampled with the base FFN."""
    state = model.__dict__.setdefault("_memit_state", {})
    got = state.get("corpus")
    if got is not None:
        return got
    path = stored_path(model, f"corpus-{corpus_tag()}").with_suffix(".json")
    try:
        got = [list(map(int, s)) for s in json.loads(path.read_text())]
    except Exception:  # noqa: BLE001 — missing or damaged: sample again
        with base_ffn(model):
            got = sample(model)
        try:
            from ..fsutil import atomic_write_json

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, got)
        except OSError:
            pass
    state["corpus"] = got
    return got


def context_prefixes(model: Model, n: int, words: int = 8) -> tuple[str, ...]:
    """`n` short generic texts to put before an edit's prompt (MEMIT's context templates, which
    MEMIT also samples from the model): the first `words` tokens of evenly spaced corpus samples."""
    if n <= 0:
        return ()
    seqs = corpus(model)
    step = max(1, len(seqs) // n)
    out = []
    for s in seqs[step // 2 :: step][:n]:
        text = model.tokenizer.decode(s[:words]).strip().replace("\n", " ")
        out.append(text)
    return tuple(out)


def greedy(model: Model, prompts: Sequence[str] = GUARD_PROMPTS, tokens: int = GUARD_TOKENS) -> list[list[int]]:
    """Greedy continuations (`tokens` ids each) of `prompts`, one batched decode."""
    caches: list[KVCache] = []
    last = []
    for p in prompts:
        c = KVCache()
        last.append(model.forward(torch.tensor([_encode(model, p)]), caches=[c], logits="last"))
        caches.append(c)
    logits = torch.cat(last)
    out: list[list[int]] = [[] for _ in prompts]
    for i in range(tokens):
        nxt = logits.argmax(-1)
        for s, t in zip(out, nxt.tolist()):
            s.append(int(t))
        if i + 1 < tokens:
            logits = model.forward(nxt[:, None], caches=caches, logits="last")
    return out
