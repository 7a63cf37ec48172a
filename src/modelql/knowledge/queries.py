"""Query vectors (algorithms §4) and modelql's residual query mode.

* **entity vector** `q = mean_{id ∈ enc(e, False), id < V} s·E[id]` — the reference's DESCRIBE /
  SELECT query: one embedding compared against every layer's gates.
* **walk vector** `q = s·E[last id of enc(prompt, True)]` — WALK, one token, no attention.
* **residual query** (modelql): the entity is run through a few short contexts and the FFN
  input `x_L` (`blocks.{L}.ln2.hook_normalized`) is captured at each context's last token for
  every layer, so layer L's gates are queried with what layer L actually reads (§15.2). The FFN
  activations `act(G x) ⊙ U x` (`blocks.{L}.mlp.hook_post`) are captured alongside.

The model is loaded once per `Vindex` (from the vindex's own weights) and kept while the vindex
lives; pass `model=` to use one already loaded.
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..errors import CapabilityError, EmptyPromptError, ModelqlError
from .prefix_cache import prefix_state
from .prefix_cache import shared as _shared
from .prefixed import packs

#: Neutral contexts of the residual mode, captured at the entity's last token: "{X}" (sentence
#: start, after BOS) and "about {X}" (mid-sentence, with the tokenizer's leading-space form).
DEFAULT_CONTEXTS: tuple[str, ...] = ("{X}", "about {X}")

#: Positions a query's caches are allocated beyond its prompt (the relation decode continues answers).
PHRASE_ROOM = 8

_models: "weakref.WeakKeyDictionary[object, object]" = weakref.WeakKeyDictionary()
_models_lock = threading.Lock()


def entity_ids(vindex, entity: str) -> list[int]:
    """`enc(entity, add_special_tokens=False)` restricted to ids < V."""
    V = vindex.vocab_size
    return [i for i in vindex.tokenizer.encode(entity, add_special_tokens=False) if 0 <= i < V]


def entity_vector(vindex, entity: str) -> torch.Tensor | None:
    """The reference's entity vector (mean of the scaled embeddings of its ids); None when the
    entity tokenises to nothing ("(not found)")."""
    ids = entity_ids(vindex, entity)
    if not ids:
        return None
    E = vindex.embeddings()
    return E[torch.tensor(ids)].mean(dim=0) * vindex.embed_scale


def walk_vector(vindex, prompt: str) -> tuple[torch.Tensor, int]:
    """(`s·E[last id]`, last id) of `enc(prompt, True)`; raises `EmptyPromptError("empty prompt")`."""
    V = vindex.vocab_size
    ids = [i for i in vindex.tokenizer.encode(prompt, add_special_tokens=True) if 0 <= i < V]
    if not prompt.strip() or not ids:
        raise EmptyPromptError("empty prompt")
    tid = ids[-1]
    return vindex.embedding(tid, scaled=True), tid


def model_for(vindex, model=None):
    """The runtime model of `vindex` (loaded from its weights once, then cached), or `model`.

    Raises `CapabilityError` when the vindex has no weights and none was given.
    """
    if model is not None:
        return model
    with _models_lock:
        m = _models.get(vindex)
        if m is None:
            if not getattr(vindex, "has_weights", False):
                raise CapabilityError(
                    f"residual mode needs model weights: {vindex.path.name} is a "
                    f"{vindex.extract_level}-level vindex (re-extract with --level inference, or use mode embedding)"
                )
            m = vindex.load_model()
            _models[vindex] = m
    return m


@dataclass(frozen=True)
class ResidualQuery:
    """Per-layer FFN inputs and activations of an entity in each of its contexts."""

    entity: str
    contexts: tuple[str, ...]
    per_context: dict[int, torch.Tensor]  # layer → x_L per context [C, H]
    per_context_act: dict[int, torch.Tensor]  # layer → FFN activations per context [C, F]
    logits: torch.Tensor | None = None  # next-token logits per context [C, V] (with_logits)
    final: torch.Tensor | None = None  # last block's output (before the final norm) per context [C, H]
    caches: tuple | None = None  # with_logits: each context's KV cache, at its own length
    ids: tuple[tuple[int, ...], ...] = ()  # each context's token ids
    token_logprobs: dict = field(default_factory=dict)  # context → log p of its tokens after the first

    @property
    def x(self) -> dict[int, torch.Tensor]:
        """layer → mean x_L over the contexts [H]."""
        return {L: v.mean(dim=0) for L, v in self.per_context.items()}

    @property
    def act(self) -> dict[int, torch.Tensor]:
        """layer → mean FFN activation over the contexts [F]."""
        return {L: v.mean(dim=0) for L, v in self.per_context_act.items()}


def residual_query(vindex, entity: str, model=None, contexts: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None, with_logits: bool = False,
                   token_logprobs: Sequence[int] = (), use_prefix: bool = True) -> ResidualQuery | None:
    """Run `entity` through `contexts` and capture `x_L` and the FFN activations at the last
    token of each context (`{X}` is replaced by the entity; the default contexts end with it).
    `with_logits` also keeps each context's next-token logits and final residual (what the
    relation decode of DESCRIBE reads and attributes, `knowledge.decode`) and each context's KV
    cache (to continue its answer); `token_logprobs` (context indices) keeps the log-probability of
    each of those contexts' tokens after the first (the entity familiarity of `knowledge.calibrate`).

    `use_prefix=False` runs every context from its first token (the reference the prefix reuse is
    tested against). Returns None when the entity tokenises to nothing.
    """
    if not entity.strip() or not entity_ids(vindex, entity):
        return None
    m = model_for(vindex, model)
    tok = m.tokenizer if m.tokenizer is not None else vindex.tokenizer
    ctxs = tuple(contexts) if contexts else DEFAULT_CONTEXTS
    n_layers = m.spec.num_layers
    wanted = sorted(set(range(n_layers) if layers is None else (l for l in layers if 0 <= l < n_layers)))
    names = set()
    for L in wanted:
        names.add(f"blocks.{L}.ln2.hook_normalized")
        names.add(f"blocks.{L}.mlp.hook_post")
    final_name = f"blocks.{n_layers - 1}.hook_resid_post"
    if with_logits:
        names.add(final_name)
    encoded: list[tuple[str, list[int]]] = []
    for ctx in ctxs:
        if "{X}" not in ctx:
            raise ModelqlError(f"context {ctx!r} has no {{X}} placeholder")
        ids = tok.encode(ctx.replace("{X}", entity), add_special_tokens=True)
        if ids:
            encoded.append((ctx, ids))
    if not encoded:
        return None
    # every context's entity-independent head (its template's text before {X}: a two-shot
    # prompt's examples) is run once per model and its KV reused (`prefix_state`); one forward
    # pass then runs the rest of every context: shorter ones are padded at the end by repeating
    # their last token (causal attention keeps the padding out of every real position) and each
    # row is read at its own last token; the caches are cut back to the real lengths, so the
    # relation decode can continue a probe's answer from them (`knowledge.decode.extend_phrases`)
    heads = [prefix_state(m, tok, c.split("{X}")[0]) if use_prefix else None for c, _ids in encoded]
    reuse = [_shared(h.ids, ids) if h is not None else 0 for h, (_c, ids) in zip(heads, encoded)]
    lens = [len(ids) for _c, ids in encoded]
    tails = [ids[n:] for n, (_c, ids) in zip(reuse, encoded)]
    cache: dict[str, torch.Tensor] = {}
    hook_names = [n for n in names if n != final_name]
    packed = packs(m)
    if packed:  # one unpadded row holding every tail (`Model.forward_packed`)
        ends_l, at = [], 0
        for t in tails:
            at += len(t)
            ends_l.append(at - 1)
        ends = torch.tensor(ends_l)

        def grab(t: torch.Tensor, n: str) -> None:
            cache[n] = t[0, ends].detach().float().clone()

        caches = [h.fork(n, len(t) + PHRASE_ROOM) if n else m.new_cache() for h, n, t in zip(heads, reuse, tails)]
        out, offsets = m.forward_packed(tails, caches, hooks={n: grab for n in hook_names})
        h_last = out[ends]
        rows_of = [out[o:o + len(t)] for o, t in zip(offsets, tails)]
    else:
        width = max(len(t) for t in tails)
        rows = torch.arange(len(encoded))
        last = torch.tensor([len(t) for t in tails]) - 1

        def grab(t: torch.Tensor, n: str) -> None:
            cache[n] = t[rows, last].detach().float().clone()

        caches = [h.fork(n, width + PHRASE_ROOM) if n else m.new_cache() for h, n in zip(heads, reuse)]
        ids = torch.tensor([t + [t[-1]] * (width - len(t)) for t in tails])
        h = m.forward(ids, caches, hooks={n: grab for n in hook_names}, logits="none")
        h_last = h[rows, last]
        rows_of = [h[i, :len(t)] for i, t in enumerate(tails)]
    logits = finals = None
    # the probes' last positions and the scored contexts' positions go through one unembedding
    # (the vocabulary matrix is the largest weight a pass reads)
    scored = [i for i in (token_logprobs or ()) if 0 <= i < len(encoded) and lens[i] > 1]
    parts = [h_last] if with_logits else []
    for i in scored:
        n = reuse[i]
        hs = torch.cat([heads[i].hidden[:n], rows_of[i]]) if n else rows_of[i]
        parts.append(hs[: lens[i] - 1])
    all_logits = m.unembed(torch.cat(parts)) if parts else None
    at = 0
    if with_logits:
        logits = all_logits[: len(encoded)].detach().float()
        at = len(encoded)
        finals = h_last.detach().float().clone()
        for c, n in zip(caches, lens):
            c.truncate(n)
    token_lp = {}
    for i in scored:
        lp = torch.log_softmax(all_logits[at:at + lens[i] - 1].double(), dim=-1)
        at += lens[i] - 1
        nxt = torch.tensor(encoded[i][1][1:])
        token_lp[encoded[i][0]] = lp[torch.arange(lens[i] - 1), nxt].tolist()
    xs = {L: cache[f"blocks.{L}.ln2.hook_normalized"] for L in wanted}
    acts = {L: cache[f"blocks.{L}.mlp.hook_post"] for L in wanted}
    used = [c for c, _ids in encoded]
    return ResidualQuery(
        entity=entity, contexts=tuple(used), per_context=xs, per_context_act=acts, logits=logits, final=finals,
        caches=tuple(caches) if with_logits else None, ids=tuple(tuple(ids) for _c, ids in encoded),
        token_logprobs=token_lp,
    )
