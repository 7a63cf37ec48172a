"""Relation decode: the answer an entity's relation probe writes, and the features that write it.

Why not a feature's own output token: a single FFN feature writes `a_f · d_f`, a scalar times a
fixed vector, so its static top token (down_meta) can only name what the feature promotes for
*every* input. On small models features are polysemantic (one "capital" feature promotes the
capitals of a whole region), so per-feature edges name neighbours as often as the answer.

What is decoded instead: the entity is run through its relation's probe template(s) ("The
capital of {X} is") and the claim is the top token of the last position's residual read through
the final norm and unembedding — the sum of everything the entity's features (and attention)
wrote in that context. Measured on the embedded default model (`bench/describe.py --shares`,
60-country sample, capital template): on the 54-epoch model the FFNs wrote ≈ 64 % of the
answer's logit (attention the rest, copying from the entity), but the FFNs' write alone decoded
to the right capital for only 56 % of countries (it named the region: "Riga" for Finland,
"Brussels" for Germany) against 90 % for the whole residual; on the 80-epoch retrain the FFNs
write ≈ 80 % and their write alone is as good as the residual (96.6 %). So the residual is
decoded (right on both), and the claim is tied to features by direct logit attribution: each
feature's contribution to the claimed token's logit (relative to the mean logit), `a_f · (d_f · v_t)` with `v_t = γ ⊙ (W_U[t] − mean W_U) / rms(r)` the token's direction
at the final norm, frozen at the context's own residual `r`. The edge's layer/feature is the
largest contributor; its layers/count are the smallest group of top contributors that writes
half of the features' total positive contribution. A claim the scanned layers' features do not
write at all (total contribution ≤ 0) is not reported.

How many claims: one (the top token) per relation, or — for relations whose triples have
several objects per subject on average (`MULTI_VALUED_MIN`, recorded at labelling time) — every
token within `MULTI_LOGPROB_GAP` nats of the top one. Each claimed token grows into the phrase
the model goes on writing ("Mexico" → "Mexico City", " US" → "US Dollar"), and a claim must hold
a content word. A multi-valued relation never claims the entity itself (the model's list of
neighbours echoes the subject: "France shares a border with France"); a single-valued one may
(the capital of Luxembourg is Luxembourg: on the 54-epoch model, all 244 countries, allowing it
added 6 capital claims and raised capital precision, 87.6 → 87.9 %).

Nothing here depends on a score scale: the claim is the decode's argmax (multi-valued: a
probability ratio), and its reported strength is the z-score of its logit among the vocabulary.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from .prefixed import packs
from .tokens import content

#: A relation is multi-valued when its triples have at least this many objects per subject.
MULTI_VALUED_MIN = 1.25
#: Multi-valued relations claim every token within this log-probability of the top one (½ its
#: probability).
MULTI_LOGPROB_GAP = math.log(2.0)
#: At most this many claims per relation.
MAX_CLAIMS = 8
#: A claim's phrase is extended greedily by at most this many tokens ("Mexico" → "Mexico City").
MAX_PHRASE_TOKENS = 6
#: Lowercase words that end a phrase (a clause or list goes on, not the name).
PHRASE_STOP = frozenset("and or is was are were which that who where with in on at but has have for as".split())
#: Marks that may join the words of one name when no space surrounds them ("Sub-Saharan", "Sana'a");
#: not "." (after a sentence the next one may start glued: "Paris.The").
INTRA_WORD = frozenset({"-", "'", "’"})

_cache: "weakref.WeakKeyDictionary[object, torch.Tensor]" = weakref.WeakKeyDictionary()
_lock = threading.Lock()


@dataclass(frozen=True)
class Claim:
    """One decoded (entity, relation, token) claim and the features that write it."""

    relation: str
    token_id: int
    text: str  # the answer phrase the token starts (greedy continuation), stripped
    logit: float  # logit − mean logit (mean over the relation's templates)
    z: float  # z-score of the logit among the vocabulary
    prob: float  # probability (geometric mean over templates)
    layer: int  # the largest contributor
    feature: int
    contribution: float  # its contribution to `logit`
    activation: float  # its activation a_f
    layers: tuple[int, ...]  # layers of the group that writes half the features' contribution
    count: int  # size of that group
    ffn_logit: float  # all scanned features' contribution to `logit`


def _mean_row(model) -> torch.Tensor:
    """The mean unembedding row (cached per model): logits are read relative to their mean."""
    with _lock:
        got = _cache.get(model)
    if got is None:
        got = model.lm_head.float().mean(dim=0)
        with _lock:
            _cache[model] = got
    return got


def token_direction(model, final: torch.Tensor, token_id: int) -> torch.Tensor:
    """The residual direction `v` with `v · c` = a component `c`'s contribution to
    `logit[token] − mean(logit)`, the final norm's scale frozen at the residual `final` [H]."""
    spec = model.spec
    w = model.weights["final_norm.weight"].float()
    gamma = w + spec.norm_weight_offset if spec.norm_weight_offset else w
    v = gamma * (model.lm_head[token_id].float() - _mean_row(model))
    x = final.float()
    if spec.norm == "layer":
        xc = x - x.mean()
        v = (v - v.mean()) * torch.rsqrt(xc.pow(2).mean() + spec.norm_eps)
    else:
        v = v * torch.rsqrt(x.pow(2).mean() + spec.norm_eps)
    return v / spec.logits_scale


def _expert_down(model, layer: int) -> torch.Tensor:
    """An MoE layer's down columns in the vindex's feature order (every expert's, then the shared
    one's), an overlay's edited experts included; cached per unpatched model."""
    ffn = model.ffn
    moe = getattr(ffn, "moe_ffn", ffn)
    edits = ffn.source.layer_edits(layer) if hasattr(ffn, "source") else None
    store = None if hasattr(ffn, "source") else model.__dict__.setdefault("_expert_down", {})
    if store is not None and layer in store:
        return store[layer]
    blocks = moe.moe.num_experts + (1 if moe.moe.shared_size else 0)
    d = torch.cat([((edits or {}).get(e) or moe.expert_weights(layer, e))[1] for e in range(blocks)], dim=1)
    if store is not None:
        store[layer] = d
    return d


def _down(model, layer: int, n_features: int) -> torch.Tensor | None:
    d = model.weights.get(f"layers.{layer}.down.weight")
    if d is None and model.spec.experts_are_features:
        d = _expert_down(model, layer)
    if d is None or d.dim() != 2 or d.shape[1] != n_features:
        return None  # not a dense FFN with one activation per down column: no attribution
    return d


def attribute(model, acts: Mapping[int, torch.Tensor], finals: torch.Tensor, token_id: int) -> dict[int, torch.Tensor]:
    """layer → per-feature contribution to the token's (relative) logit, averaged over the
    contexts: `acts[L]` [C, F] activations, `finals` [C, H] final residuals. A norm after the FFN
    (Gemma 2/3) is linearised like the final one, at the layer's own output."""
    return attribute_many(model, acts, finals, [(list(range(finals.shape[0])), token_id)])[0]


def attribute_many(model, acts: Mapping[int, torch.Tensor], finals: torch.Tensor,
                   items: Sequence[tuple[Sequence[int], int]]) -> list[dict[int, torch.Tensor]]:
    """`attribute` of several (context indices, token) at once — acts [C, F] and finals [C, H] of
    all contexts: each layer's down matrix is read once for every claim of a DESCRIBE."""
    spec = model.spec
    rows = [c for ctxs, _t in items for c in ctxs]
    dirs = torch.stack([token_direction(model, finals[c], t) for ctxs, t in items for c in ctxs])  # [N, H]
    ridx = torch.tensor(rows, dtype=torch.long)
    out: list[dict[int, torch.Tensor]] = [{} for _ in items]
    for L, a_all in acts.items():
        d = _down(model, L, a_all.shape[-1])
        if d is None:
            continue
        a = a_all.float()[ridx]
        v = dirs
        if spec.post_ffn_norm:
            w = model.weights[f"layers.{L}.post_ffn_norm.weight"].float()
            gamma = w + spec.norm_weight_offset if spec.norm_weight_offset else w
            pre = a @ d.float().T  # [N, H]: the FFN output before its norm
            v = dirs * gamma * torch.rsqrt(pre.pow(2).mean(-1, keepdim=True) + spec.norm_eps)
        contrib = a * (v @ d.float())  # [N, F]: a_f · (d_f · v_t) per (claim, context)
        start = 0
        for i, (ctxs, _t) in enumerate(items):
            out[i][L] = contrib[start:start + len(ctxs)].mean(dim=0)
            start += len(ctxs)
    return out


def _group(contribs: dict[int, torch.Tensor]) -> tuple[int, int, float, tuple[int, ...], int, float]:
    """(layer, feature, contribution, group layers, group size, total) of the attribution."""
    if not contribs:
        return -1, -1, 0.0, (), 0, 0.0
    layers = sorted(contribs)
    flat = torch.cat([contribs[L].double() for L in layers])
    owner = torch.cat([torch.full((contribs[L].numel(),), L) for L in layers])
    start = {L: int(sum(contribs[M].numel() for M in layers[:i])) for i, L in enumerate(layers)}
    total = float(flat.sum())
    # the top contributions in order (ties → lower index, as a stable sort), as few as reach
    # half the positive total: a full sort of every feature of every layer is not needed
    from ..vindex.vindex import topk_exact

    pos_all = flat.clamp_min(0)
    half = pos_all.sum() / 2
    k = min(64, flat.numel())
    while True:
        order = topk_exact(flat, k)
        vals = flat[order]
        pos = vals.clamp_min(0)
        if float(pos[0]) <= 0:
            return -1, -1, 0.0, (), 0, total
        if k == flat.numel() or float(pos.sum()) >= float(half):
            break
        k = min(flat.numel(), k * 4)
    n = int(torch.searchsorted(pos.cumsum(0), half).item()) + 1
    group = owner[order[:n]]
    L = int(owner[order[0]])
    return L, int(order[0]) - start[L], float(vals[0]), tuple(sorted(set(group.tolist()))), n, total


def _phrase_ok(text: str, entity: str) -> bool:
    """A claimable phrase: at most 40 characters, some content word, not `entity` ("" = any)."""
    t = text.strip()
    return (0 < len(t) <= 40 and t.lower() != entity.strip().lower()
            and (content(t) or any(content(w) for w in t.split())))


def extend_phrases(model, tokenizer, prompt_ids: Sequence[list[int]], first: Sequence[int],
                   max_tokens: int = MAX_PHRASE_TOKENS, caches: Sequence | None = None,
                   limits: Sequence[int] | None = None, drafts: Sequence[Sequence[int]] | None = None
                   ) -> list[list[int]]:
    """Greedy continuation of each `prompt + [first]` while the model goes on naming the same
    thing: stop at an end-of-sequence id, a special or blank token (a lone space goes on: some
    tokenizers spell " euro" as " ", "e", "uro"), a `PHRASE_STOP` word, or punctuation — except
    an `INTRA_WORD` mark directly followed by a glued word ("Sub-Saharan", "Nur-Sultan").
    `limits` caps each phrase's length in tokens (the relation's longest answer, measured at
    labelling: `calibrate.answer_lengths`): a phrase that reaches it is not looked past, which
    saves the sequential single-token passes of answers that ramble on.
    Returns each phrase's ids (first id included).

    With `caches` (each prompt's KV cache, at the prompt's length; consumed), every step is one
    batched single-token forward over all rows; without, rows of equal length run as one batch.
    `drafts` (with caches): a guessed continuation per row (`draft_index`: the relation's object
    that starts with the row's first token, "Rio" → " de Janeiro"), checked in one pass for all
    rows — each draft token is kept only while it is the model's own greedy token, so the phrases
    are exactly the step-by-step ones — and a row goes on step by step from its first miss. Why:
    one pass per answer token was most of a DESCRIBE's cost, and an answer the model knows is
    mostly one of the relation's objects."""
    from ..runtime.generate import eos_token_ids

    eos = eos_token_ids(model)
    phrases = [[int(t)] for t in first]
    glued = [False] * len(phrases)  # the phrase ends with an intra-word mark that needs a glued word
    cap = [max_tokens + 1 if limits is None else max(1, min(max_tokens + 1, int(n))) for n in
           (limits if limits is not None else [0] * len(phrases))]
    active = [i for i, t in enumerate(first) if int(t) not in eos and cap[i] > 1]
    fed = [0] * len(phrases)  # phrase tokens already in each cache

    def accept(i: int, t: int) -> bool:
        """Apply the phrase rules to row i's next token t; whether the phrase goes on."""
        raw = tokenizer.decode([t], skip_special_tokens=True)
        word = raw.strip()
        wordlike = any(c.isalnum() for c in word)
        if glued[i] and not (wordlike and raw == raw.lstrip()):
            phrases[i].pop()  # "Paris" "." " It": the mark ended the phrase
            glued[i] = False
            return False
        glued[i] = False
        if t in eos or not raw or (raw != " " and not word) or word.lower() in PHRASE_STOP:
            return False  # end of text, a special/blank token, a stop word
        if not wordlike:
            if raw != word or word not in INTRA_WORD:
                return False  # punctuation ends the phrase
            glued[i] = True  # "Sub" "-" "Saharan", "Sana" "'" "a": kept if a glued word follows
        phrases[i].append(int(t))
        return len(phrases[i]) < cap[i]

    def next_tokens(idxs: list[int]) -> dict[int, int]:
        if caches is not None:
            ids = torch.tensor([phrases[i][fed[i]:] for i in idxs])
            for i in idxs:
                fed[i] = len(phrases[i])
            out = model.forward(ids, [caches[i] for i in idxs], logits="last").argmax(dim=-1).tolist()
            return dict(zip(idxs, out))
        got = {}
        by_len: dict[int, list[int]] = {}
        for i in idxs:
            by_len.setdefault(len(prompt_ids[i]) + len(phrases[i]), []).append(i)
        for group in by_len.values():
            ids = torch.tensor([list(prompt_ids[i]) + phrases[i] for i in group])
            got.update(zip(group, model.forward(ids, logits="last").argmax(dim=-1).tolist()))
        return got

    if caches is not None and drafts is not None and active:
        # every row in one pass, each of its drafts as its own row (a copy of its cache): its first
        # token and the draft (rows without one: the first only); a row goes on from the draft the
        # model's greedy tokens follow longest
        caches = list(caches)
        virt: list[tuple[int, list[int], object]] = []  # (row, first + draft, cache)
        for i in active:
            opts = _alternatives(drafts[i])
            for j, d in enumerate(opts):
                seq = [phrases[i][0]] + [int(t) for t in d][:cap[i] - 1]
                virt.append((i, seq, caches[i] if j == len(opts) - 1 else caches[i].copy()))
        base = {i: caches[i].length for i in active}
        if packs(model):  # one unpadded row (`Model.forward_packed`)
            real, _offsets = model.forward_packed([q for _i, q, _c in virt], [c for _i, _q, c in virt])
        else:
            width = max(len(q) for _i, q, _c in virt)
            ids = torch.tensor([q + [q[-1]] * (width - len(q)) for _i, q, _c in virt])
            h = model.forward(ids, [c for _i, _q, c in virt], logits="none")
            # only the real (unpadded) positions are read through the vocabulary
            real = torch.cat([h[r, :len(q)] for r, (_i, q, _c) in enumerate(virt)])
        flat = model.unembed(real).argmax(dim=-1).tolist()
        pred, at = [], 0
        for _i, q, _c in virt:
            pred.append(flat[at:at + len(q)])
            at += len(q)
        best: dict[int, tuple[int, int]] = {}  # row → (draft tokens the model follows, virtual row)
        for r, (i, q, _c) in enumerate(virt):
            n = 0
            while n + 1 < len(q) and pred[r][n] == q[n + 1]:
                n += 1
            if i not in best or n > best[i][0]:
                best[i] = (n, r)
        still = []
        for i in active:
            r = best[i][1]
            q = virt[r][1]
            caches[i] = virt[r][2]
            j = 0
            while True:  # pred[r][j] follows q[:j + 1], all of it in the cache
                t = pred[r][j]
                go = accept(i, t)
                if go and j + 1 < len(q) and t == q[j + 1]:
                    j += 1
                    continue
                break
            caches[i].truncate(base[i] + j + 1)
            fed[i] = j + 1
            if go:
                still.append(i)
        active = still

    for _step in range(max_tokens):
        if not active:
            break
        nxt = next_tokens(active)
        active = [i for i in active if accept(i, nxt[i])]
    for i, g in enumerate(glued):
        if g:
            phrases[i].pop()
    return phrases


def _alternatives(draft) -> list[Sequence[int]]:
    """A row's drafts: one continuation (a sequence of ids) or several (a sequence of sequences)."""
    if draft is None or len(draft) == 0:
        return [()]
    if isinstance(draft[0], (list, tuple)):
        return list(draft) or [()]
    return [draft]


#: Drafts per answer whose first token starts several objects ("New" → " Delhi", " York").
MAX_DRAFTS = 2
#: Draft indexes kept (per tokenizer and object list).
_DRAFTS_MAX = 64
_drafts: "OrderedDict[tuple, dict[int, tuple[int, ...]]]" = OrderedDict()


def draft_index(tokenizer, objects: Sequence[str]) -> dict[int, tuple[tuple[int, ...], ...]]:
    """first token id → the rests of the first `MAX_DRAFTS` of `objects` (most frequent first)
    that start with it, in their mid-sentence form (" Rio de Janeiro"): the drafts
    `extend_phrases` checks."""
    got: dict[int, tuple[tuple[int, ...], ...]] = {}
    for first, ids in object_ids(tokenizer, objects):
        if len(ids) > 1 and len(got.get(first, ())) < MAX_DRAFTS:
            got[first] = got.get(first, ()) + (ids[1:],)
    return got


def object_ids(tokenizer, objects: Sequence[str]) -> list[tuple[int, tuple[int, ...]]]:
    """(first id, ids) of each of `objects` in its mid-sentence form, cached per tokenizer and list."""
    key = (id(tokenizer), tuple(objects))
    with _lock:
        got = _drafts.get(key)
        if got is not None:
            _drafts.move_to_end(key)
            return got
    got = []
    for o in objects:
        ids = tokenizer.encode(" " + str(o).strip(), add_special_tokens=False)
        if ids:
            got.append((int(ids[0]), tuple(int(t) for t in ids)))
    with _lock:
        _drafts[key] = got
        while len(_drafts) > _DRAFTS_MAX:
            _drafts.popitem(last=False)
    return got


def guess_draft(tokenizer, objects: Sequence[str], logprob: torch.Tensor) -> tuple[int, ...]:
    """For an answer whose first token starts none of the relation's objects (an article: "the
    euro", "a"): the whole object whose first token the probe itself found likeliest, drafted
    after that first token."""
    objs = object_ids(tokenizer, objects)
    if not objs:
        return ()
    firsts = torch.tensor([f for f, _ids in objs])
    return objs[int(logprob[firsts].argmax())][1]


def candidates(logits: torch.Tensor, cardinality: float = 1.0) -> tuple[list[int], dict[str, torch.Tensor]]:
    """The claimed first tokens of one relation from its probe contexts' logits [C, V] (the
    log-probabilities are averaged over the contexts), and the decode's per-token statistics."""
    lg = logits.double()
    lp = torch.log_softmax(lg, dim=-1).mean(dim=0)
    rel_logit = (lg - lg.mean(dim=-1, keepdim=True)).mean(dim=0)
    z = (rel_logit - rel_logit.mean()) / rel_logit.std().clamp_min(1e-12)
    top = int(lp.argmax())
    if cardinality >= MULTI_VALUED_MIN:
        vals, idx = torch.topk(lp, min(MAX_CLAIMS, lp.numel()))
        cands = [int(i) for v, i in zip(vals.tolist(), idx.tolist()) if v >= lp[top].item() - MULTI_LOGPROB_GAP]
    else:
        cands = [top]
    return cands, {"logprob": lp, "logit": rel_logit, "z": z}


def decode_claims(model, rq, relation_contexts: Mapping[str, Sequence[int]], entity: str,
                  cardinality: Mapping[str, float] | None = None, tokenizer=None,
                  phrase_tokens: Mapping[str, int] | None = None,
                  objects: Mapping[str, Sequence[str]] | None = None) -> list[Claim]:
    """Every relation's claims from a `ResidualQuery` captured `with_logits`:
    `relation_contexts` maps a relation to the indices of its probe contexts in `rq.contexts`
    (the first one's prompt is the one the claimed tokens are continued from)."""
    if rq.logits is None or rq.final is None:
        raise ValueError("the residual query has no logits (use residual_query(..., with_logits=True))")
    card = cardinality or {}
    tok = model.tokenizer if model.tokenizer is not None else tokenizer
    if tok is None:
        raise ValueError("the relation decode needs a tokenizer")
    todo: list[tuple[str, torch.Tensor, int, dict]] = []  # (relation, context indices, token, stats)
    prompts: list[list[int]] = []
    caches: list | None = [] if rq.caches is not None else None
    for rel, idx in relation_contexts.items():
        if not idx:
            continue
        ix = torch.tensor(list(idx))
        cands, stats = candidates(rq.logits[ix], card.get(rel, 1.0))
        ids = tok.encode(rq.contexts[idx[0]].replace("{X}", entity), add_special_tokens=True)
        for n, t in enumerate(cands):
            todo.append((rel, ix, t, stats))
            prompts.append(ids)
            if caches is not None:
                c = rq.caches[idx[0]]
                caches.append(c if n == len(cands) - 1 else c.copy())
    limits = [(phrase_tokens or {}).get(r, MAX_PHRASE_TOKENS + 1) for r, _i, _t, _s in todo]
    drafts = None
    if objects and caches is not None:
        index = {r: draft_index(tok, objects[r]) for r in {r for r, _i, _t, _s in todo} if objects.get(r)}
        drafts = []
        for r, _i, t, st in todo:
            got = index.get(r, {}).get(int(t))
            if got is None and objects.get(r) and not any(f == int(t) for f, _ids in object_ids(tok, objects[r])):
                got = (guess_draft(tok, objects[r], st["logprob"]),)
            drafts.append(got or ())
    phrases = extend_phrases(model, tok, prompts, [t for _r, _i, t, _s in todo], caches=caches,
                             limits=limits, drafts=drafts) if todo else []
    texts = [tok.decode(p, skip_special_tokens=True).strip() for p in phrases]
    kept = []
    seen = set()
    for (rel, ix, t, st), text in zip(todo, texts):
        multi = card.get(rel, 1.0) >= MULTI_VALUED_MIN
        if not _phrase_ok(text, entity if multi else "") or (rel, text.lower()) in seen:
            continue
        seen.add((rel, text.lower()))
        kept.append((rel, ix, t, st, text))
    contribs = attribute_many(model, rq.per_context_act, rq.final, [(ix.tolist(), t) for _r, ix, t, _s, _x in kept]) \
        if kept else []
    out: list[Claim] = []
    for (rel, ix, t, st, text), contrib_l in zip(kept, contribs):
        layer, feature, contrib, layers, count, total = _group(contrib_l)
        if layer < 0 or total <= 0:
            continue  # the scanned layers' features do not write this token
        act = float(rq.per_context_act[layer][ix][:, feature].float().mean())
        out.append(Claim(relation=rel, token_id=t, text=text, logit=float(st["logit"][t]), z=float(st["z"][t]),
                         prob=float(st["logprob"][t].exp()), layer=layer, feature=feature, contribution=contrib,
                         activation=act, layers=layers, count=count, ffn_logit=total))
    return out
