"""Weight-level knowledge edits of the down projection, MEMIT style (Meng et al., 2022).

A fact (entity, relation, target) is stored by the FFN as a key → value pair: the key is the FFN
activation `h` (input of `down_proj`) at the key position, the value is what `down_proj`
writes into the residual there. The key position is the prompt's last token (`KEY_POSITION`;
MEMIT's original choice, the entity's last token, is kept as an option): on the embedded
4-layer model a shift of the subject's state barely reaches the prediction, a shift at the
last token always does (measurements in `knowledge.edit`'s docstring). Editing a fact means
finding, for each request,

1. a target residual `z` at the last edited layer L: the current residual at the key position
   plus a vector δ optimised (through the real forward pass) so the model predicts the
   target after every phrasing of the relation, with a bound on ‖δ‖ (stopping early once every
   phrasing is confident). ROME's KL term keeping "{X} is" predictions unchanged is kept as an
   option (`kl_weight`) but off by default: it guards the subject's state, where subject keys
   add δ; a last-token δ is added after "{X} is" too, where it can only fight the target
   direction (on the embedded model it cost 8 points of efficacy, see `knowledge.edit`);
2. for each edited layer l (in order), the least-squares update of `down_proj` that moves the
   residual a share of the remaining way to `z` for all requests at once while disturbing the
   keys of other text as little as possible:

       ΔW_l = R Kᵀ (λ C_l + μ P_l + K Kᵀ)⁻¹,   R = (z − h_L) / (remaining layers),   K = keys at l

   where C_l = E[h hᵀ] over generic text (here: the training sentences of the facts table) and
   P_l = E[k kᵀ] over the keys of the facts the model already knows (every (entity, relation)
   of the facts table in its training phrasings but the canonical one, minus the edited pairs):
   a targeted preservation term in the spirit of AlphaEdit's null-space projection, because
   other entities' prompts of the same relation share most of their last-token key. Each
   phrasing of each request is its own key column (not the mean key), so the update fits
   every phrasing and generalises better to unseen ones.

ΔW_l = u vᵀ with u = R [H, k] and v = (λC + μP + KKᵀ)⁻¹ K [F, k] (k = facts × phrasings) is
stored low-rank (`DownDelta`), so a batch is a rank-k patch per layer that the overlay adds at
run time and COMPILE bakes into `down_proj`. C_l and P_l depend only on the base weights: they
are cached in memory and in $MODELQL_CACHE/memit/ (keyed by a hash of the weights), so only the
first weight-level INSERT on a model pays for them.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import CapabilityError, ModelqlError
from ..ffn.base import FfnBackend, Hooks
from ..runtime.model import Model


@dataclass(frozen=True)
class EditRequest:
    entity: str
    relation: str
    target: str


@dataclass(frozen=True)
class DownDelta:
    """A low-rank update of one layer's down_proj: ΔW = u @ v.T (u [H, r], v [F, r])."""

    layer: int
    u: torch.Tensor
    v: torch.Tensor
    facts: tuple[EditRequest, ...] = ()

    def dense(self) -> torch.Tensor:
        return self.u @ self.v.T


@dataclass(frozen=True)
class MemitParams:
    """Hyper-parameters, chosen by the editing benchmark on the embedded model (bench/edit.py)."""

    layers: tuple[int, ...] | None = None  # None: the model's default edit layers
    steps: int = 30
    stop_prob: float = 0.9  # stop optimising δ once every target token has at least this probability
    lr: float = 0.1  # Adam step size as a fraction of the mean residual norm ‖h_L‖
    kl_weight: float = 0.0  # ROME's essence-drift KL (for subject keys, e.g. 0.0625); off for last-token keys
    weight_decay: float = 1e-3
    clamp_norm: float = 4.0  # ‖δ‖ ≤ clamp_norm · ‖h_L‖
    mom2_weight: float = 1000.0  # λ
    cov_sentences: int = 4000
    preserve_weight: float = 25000.0  # μ: weight of the known facts' keys (preservation_moment)
    exact: bool = False  # solve ΔW K = R exactly (min-norm under λC + μP) instead of the ridge form
    per_phrasing: bool = True  # one key per (fact, phrasing) instead of the mean key per fact
    context_prefixes: int = 0  # also every phrasing after this many generic sentences (ROME's contexts)
    context_in_delta: bool = True  # the prefixed phrasings are in δ's loss too (else only key columns)
    context_in_preserve: bool = True  # the known facts' keys are taken after the same prefixes too
    rounds: int = 3  # re-solve, from the edited model, the requests whose phrasings do not all predict the target yet


class DeltaFfn:
    """An FFN backend adding low-rank down_proj deltas on top of another backend."""

    def __init__(self, base: FfnBackend, deltas: Sequence[DownDelta] = ()):
        self.base = base
        self.by_layer: dict[int, list[DownDelta]] = {}
        for d in deltas:
            self.add(d)

    def add(self, delta: DownDelta) -> None:
        self.by_layer.setdefault(delta.layer, []).append(delta)

    def forward(self, layer: int, x: torch.Tensor, hooks: Hooks | None = None) -> torch.Tensor:
        deltas = self.by_layer.get(layer)
        if not deltas:
            return self.base.forward(layer, x, hooks)
        name = f"blocks.{layer}.mlp.hook_post"
        seen: dict[str, torch.Tensor] = {}
        inner = hooks.get(name) if hooks else None

        def capture(t: torch.Tensor, n: str):
            out = inner(t, n) if inner else None
            seen["h"] = t if out is None else out
            return out

        y = self.base.forward(layer, x, {**(hooks or {}), name: capture})
        h = seen["h"]
        for d in deltas:
            y = y + (h @ d.v.to(h.dtype)) @ d.u.to(h.dtype).T
        return y


def default_layers(model: Model) -> tuple[int, ...]:
    """Edit layers. Last-token keys (the default): the last layer, whose FFN input at the last
    token already holds the answer the model is about to give. Paraphrases the model answers
    alike share that key (the edit generalises to them) while other entities' prompts, about to
    give other answers, do not (locality); on the embedded model this beat the middle layer on
    both (knowledge/edit.py has the measurements). Subject keys: early-middle FFNs, where subject
    keys are formed."""
    n = model.spec.num_layers
    if KEY_POSITION == "last":
        return (n - 1,)
    lo = n // 8
    hi = min(lo + 4, max(lo, n // 2 - 1))
    return tuple(range(lo, hi + 1))


def context_prefixes(n: int) -> tuple[str, ...]:
    """`n` short generic sentences to put before a phrasing (ROME's context templates): training
    sentences of the facts table about other relations, picked evenly through the table, so the
    edit must hold when the prompt does not start the text."""
    if n <= 0:
        return ()
    from ..defaults import TRAIN_TEMPLATES, facts, sentence

    pool = [f for f in facts() if f.relation != "capital"]
    step = max(1, len(pool) // n)
    picks = pool[step // 2 :: step][:n]
    return tuple(sentence(TRAIN_TEMPLATES[f.relation][0], f.entity, f.target) for f in picks)


def with_contexts(templates: Sequence[str], prefixes: Sequence[str]) -> tuple[str, ...]:
    """The phrasings, then each phrasing after each prefix."""
    return tuple(templates) + tuple(f"{c} {t}" for c in prefixes for t in templates)


def relation_templates(relation: str) -> tuple[str, ...]:
    """Phrasings of a relation with `{X}` for the entity: the embedded facts' training templates
    when the relation is known there, else one generic phrasing."""
    from ..defaults import TRAIN_TEMPLATES

    return TRAIN_TEMPLATES.get(relation, (f"The {relation} of {{X}} is",))


KEY_POSITION = "last"  # "last": the prompt's last token (measured default); "subject": the entity's last token


def _subject_position(model: Model, template: str, entity: str) -> tuple[list[int], int]:
    """Token ids of the prompt and the index of the key token in them (see KEY_POSITION)."""
    tok = model.tokenizer
    before, _, _ = template.partition("{X}")
    ids = tok.encode(template.replace("{X}", entity))
    if KEY_POSITION == "last":
        return ids, len(ids) - 1
    upto = tok.encode(before + entity)
    return ids, min(len(upto), len(ids)) - 1


def _padded(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-padded [B, T] ids. Causal attention never lets a pad token influence an earlier
    position, so reading only real positions makes padding exact."""
    width = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def _capture(model: Model, seqs: Sequence[Sequence[int]], name: str, hooks: Hooks | None = None,
             chunk: int = 64) -> list[torch.Tensor]:
    """The activation at hook `name` for each sequence ([len(seq), D] each), batched."""
    out: list[torch.Tensor] = []
    for i in range(0, len(seqs), chunk):
        part = seqs[i : i + chunk]
        got = {}

        def cap(t, n):
            got["t"] = t

        model.forward(_padded(part), hooks={**(hooks or {}), name: cap}, logits="none")
        out += [got["t"][j, : len(s)].float() for j, s in enumerate(part)]
    return out


def _fingerprint(model: Model) -> str:
    """sha256 of the model's weights (names, shapes, and an evenly strided sample of ≤ 64k values
    per tensor, so a multi-GB model hashes in well under a second): the key of the on-disk
    statistics. Any retraining or fine-tune moves the sampled values too."""
    fp = model.__dict__.get("_memit_fingerprint")
    if fp is None:
        import hashlib

        h = hashlib.sha256()
        for name in sorted(model.weights):
            t = model.weights[name].detach()
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            flat = t.reshape(-1)
            h.update(flat[:: max(1, flat.numel() // 65536)].float().contiguous().numpy().tobytes())
        fp = model.__dict__["_memit_fingerprint"] = h.hexdigest()[:16]
    return fp


def _stored(model: Model, name: str, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
    """`compute()` cached in $MODELQL_CACHE/memit/<weights fingerprint>-<name>.pt, so a server or
    a new session pays for the base-weight statistics once per model, not once per INSERT
    (written to a temp file and renamed; an unreadable cache file is recomputed)."""
    from ..fsutil import atomic_open
    from ..lql.default_vindex import cache_dir

    path = cache_dir() / "memit" / f"{_fingerprint(model)}-{name}.pt"
    try:
        return torch.load(path, weights_only=True)
    except Exception:  # noqa: BLE001 — a missing or damaged cache entry is simply recomputed
        pass
    value = compute()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb", encoding=None) as f:
            torch.save(value, f)
    except OSError:
        pass  # a read-only cache only costs time
    return value


@contextmanager
def _base_ffn(model: Model):
    """Run `model` with its dense FFN for the block: the statistics below are of the base weights
    (that is what their cache key says), whatever overlay or pending edit `model` runs with."""
    saved = model.ffn
    model.ffn = model.dense_ffn or saved
    try:
        yield model
    finally:
        model.ffn = saved


def covariance(model: Model, layer: int, n: int) -> torch.Tensor:
    """E[h hᵀ] of layer `layer`'s FFN activations over the facts' training sentences.

    Cached on the model and on disk: it depends only on the base weights, not on the edits.
    """
    cache = model.__dict__.setdefault("_memit_covariance", {})
    if (layer, n) not in cache:
        def compute() -> torch.Tensor:
            with _base_ffn(model):
                return _covariance(model, layer, n)

        cache[(layer, n)] = _stored(model, f"cov-L{layer}-n{n}", compute)
    return cache[(layer, n)]


def _covariance(model: Model, layer: int, n: int) -> torch.Tensor:
    from ..defaults import TRAIN_TEMPLATES, facts, sentence

    sents = []
    for i, f in enumerate(facts()):
        tpl = TRAIN_TEMPLATES[f.relation][i % len(TRAIN_TEMPLATES[f.relation])]
        sents.append(model.tokenizer.encode(sentence(tpl, f.entity, f.target)))
    hs = torch.cat(_capture(model, sents[:n], f"blocks.{layer}.mlp.hook_post")).double()
    return (hs.T @ hs / hs.shape[0]).float()


def _preservation_prompts(pairs, prefixes: Sequence[str] = ()) -> list[tuple[tuple[str, str], str]]:
    from ..defaults import TRAIN_TEMPLATES

    return [((e, r), tpl) for e, r in pairs
            for tpl in with_contexts(TRAIN_TEMPLATES.get(r, ())[1:], prefixes)]


def _keys_of(model: Model, layer: int, prompts: Sequence[tuple[tuple[str, str], str]]) -> torch.Tensor:
    seqs, where = [], []
    for (e, _r), tpl in prompts:
        ids, pos = _subject_position(model, tpl, e)
        seqs.append(ids)
        where.append(pos)
    if not seqs:
        return torch.zeros(0, model.spec.intermediate_size)
    acts = _capture(model, seqs, f"blocks.{layer}.mlp.hook_post", chunk=256)
    return torch.stack([a[pos] for a, pos in zip(acts, where)])


def preservation_moment(model: Model, layer: int, prefixes: Sequence[str] = ()) -> tuple[torch.Tensor, int]:
    """(Σ k kᵀ, count) over the keys the edit must leave alone: the FFN activation at the key
    position of the prompts of every (entity, relation) in the embedded facts table, in every
    training phrasing but the first. The first is the canonical prompt the benchmark measures
    locality on, so locality is measured on a phrasing outside this set. Cached (memory, disk)."""
    cache = model.__dict__.setdefault("_memit_preserve", {})
    key = (layer, KEY_POSITION, len(prefixes))
    if key not in cache:
        def compute() -> torch.Tensor:
            from ..defaults import facts

            prompts = _preservation_prompts(sorted({(f.entity, f.relation) for f in facts()}), prefixes)
            with _base_ffn(model):
                k = _keys_of(model, layer, prompts).double()
            return torch.cat([(k.T @ k).flatten(), torch.tensor([float(k.shape[0])], dtype=torch.float64)])

        tag = f"-c{len(prefixes)}" if prefixes else ""
        flat = _stored(model, f"preserve-{KEY_POSITION}-L{layer}{tag}", compute)
        f = model.spec.intermediate_size
        cache[key] = (flat[:-1].reshape(f, f), int(flat[-1]))
    return cache[key]


def _preservation_term(model: Model, layer: int, requests: Sequence[EditRequest],
                       prefixes: Sequence[str] = ()) -> torch.Tensor:
    """E[k kᵀ] over the preservation keys without the rows of the edited (entity, relation)s
    (their old answer is what the edit replaces)."""
    from ..defaults import facts

    total, n = preservation_moment(model, layer, prefixes)
    known = {(f.entity, f.relation) for f in facts()}
    edited = sorted({(r.entity, r.relation) for r in requests} & known)
    with _base_ffn(model):
        k = _keys_of(model, layer, _preservation_prompts(edited, prefixes)).double()
    return (total - k.T @ k) / max(1, n - k.shape[0])


def _at_keys(model: Model, requests: Sequence[EditRequest], templates, name: str) -> torch.Tensor:
    """[Σ phrasings, D]: activation at hook `name` at the key position of every phrasing of every
    request (request-major)."""
    seqs, where = [], []
    for r in requests:
        for tpl in templates[r]:
            ids, pos = _subject_position(model, tpl, r.entity)
            where.append(pos)
            seqs.append(ids)
    acts = _capture(model, seqs, name)
    return torch.stack([a[pos] for a, pos in zip(acts, where)])


def _at_subject(model: Model, requests: Sequence[EditRequest], templates, name: str) -> torch.Tensor:
    """[n, D]: activation at hook `name` at the entity's last token, mean over each request's phrasings."""
    seqs, where = [], []
    for r in requests:
        for tpl in templates[r]:
            ids, pos = _subject_position(model, tpl, r.entity)
            where.append((len(seqs), pos))
            seqs.append(ids)
    acts = _capture(model, seqs, name)
    rows, k = [], 0
    for r in requests:
        m = len(templates[r])
        rows.append(torch.stack([acts[i][pos] for i, pos in where[k : k + m]]).mean(0))
        k += m
    return torch.stack(rows)


def _target_deltas(model: Model, requests: Sequence[EditRequest], layer: int, templates,
                   p: MemitParams) -> torch.Tensor:
    """δ [n, H] at layer L's output (entity's last token), optimised jointly for all requests
    (the losses are separable, so this equals optimising each alone): every phrasing must
    predict the target, "{X} is" keeps its distribution (KL, when `kl_weight`), and ‖δ‖ stays bounded."""
    tok = model.tokenizer
    rows, pos, spans, owner = [], [], [], []
    ess_rows, ess_pos = [], []
    for i, r in enumerate(requests):
        target_ids = tok.encode(" " + r.target.strip(), add_special_tokens=False)
        if not target_ids:
            raise ModelqlError(f"target {r.target!r} encodes to no tokens")
        for tpl in templates[r]:
            ids, at = _subject_position(model, tpl, r.entity)
            rows.append(ids + target_ids[:-1])
            pos.append(at)
            spans.append((len(ids) - 1, target_ids))
            owner.append(i)
        ids, at = _subject_position(model, "{X} is", r.entity)
        ess_rows.append(ids)
        ess_pos.append(at)
    n = len(requests)
    batch, ess = _padded(rows), _padded(ess_rows)
    owner_t = torch.tensor(owner)
    pos_t, ess_pos_t = torch.tensor(pos), torch.tensor(ess_pos)
    gather_rows = torch.tensor([b for b, (s, t) in enumerate(spans) for _ in t])
    gather_cols = torch.tensor([s + j for s, t in spans for j in range(len(t))])
    gather_tok = torch.tensor([x for _, t in spans for x in t])
    weights = torch.tensor([1.0 / (len(t) * len(templates[requests[owner[b]]])) for b, (_, t) in enumerate(spans) for _ in t])
    ess_last = torch.tensor([len(r) - 1 for r in ess_rows])
    base_ess = None
    if p.kl_weight:
        with torch.no_grad():
            base_ess = torch.log_softmax(model.forward(ess)[torch.arange(n), ess_last].float(), -1)
    h_norm = _at_subject(model, requests, templates, f"blocks.{layer}.hook_resid_post").norm(dim=-1)
    delta = torch.zeros(n, model.spec.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=p.lr * float(h_norm.mean()))
    name = f"blocks.{layer}.hook_mlp_out"

    def add(rows_t: torch.Tensor, at: torch.Tensor, who: torch.Tensor) -> Callable:
        def fn(t, _n):
            return t.index_put((rows_t, at), t[rows_t, at] + delta[who].to(t.dtype))

        return fn

    all_rows, ess_idx = torch.arange(len(rows)), torch.arange(n)
    for _ in range(p.steps):
        opt.zero_grad()
        logits = model.forward(batch, hooks={name: add(all_rows, pos_t, owner_t)}, grad=True)
        logp = torch.log_softmax(logits[gather_rows, gather_cols].float(), -1)
        nll = -(logp.gather(-1, gather_tok[:, None])[:, 0] * weights).sum()
        kl = torch.zeros(())
        if p.kl_weight:
            ess_logits = model.forward(ess, hooks={name: add(ess_idx, ess_pos_t, ess_idx)}, grad=True)
            ess_lp = torch.log_softmax(ess_logits[ess_idx, ess_last].float(), -1)
            kl = F.kl_div(ess_lp, base_ess, log_target=True, reduction="sum")
        decay = (delta.norm(dim=-1) ** 2 / (h_norm**2 + 1e-8)).sum()
        if p.stop_prob and float(logp.detach().gather(-1, gather_tok[:, None]).min().exp()) >= p.stop_prob:
            break  # every phrasing already predicts every target token confidently
        (nll + p.kl_weight * kl + p.weight_decay * decay).backward()
        opt.step()
        with torch.no_grad():
            limit = (p.clamp_norm * h_norm)[:, None]
            norms = delta.norm(dim=-1, keepdim=True)
            delta.mul_(torch.where(norms > limit, limit / norms, torch.ones_like(norms)))
    return delta.detach()


def _unmet(model: Model, requests: Sequence[EditRequest], templates) -> list[EditRequest]:
    """The requests for which some phrasing's top-1 next token is not the target's first token."""
    tok = model.tokenizer
    seqs, owner, want = [], [], []
    for i, r in enumerate(requests):
        first = tok.encode(" " + r.target.strip(), add_special_tokens=False)[0]
        for tpl in templates[r]:
            seqs.append(_subject_position(model, tpl, r.entity)[0])
            owner.append(i)
            want.append(first)
    top: list[int] = []
    for i in range(0, len(seqs), 64):
        part = seqs[i : i + 64]
        logits = model.forward(_padded(part))
        top += [int(logits[j, len(s) - 1].argmax()) for j, s in enumerate(part)]
    bad = {owner[k] for k in range(len(seqs)) if top[k] != want[k]}
    return [r for i, r in enumerate(requests) if i in bad]


def _solve_round(model: Model, work: DeltaFfn, requests: Sequence[EditRequest], layers: Sequence[int],
                 key_templates, templates, prefixes, p: MemitParams) -> list[DownDelta]:
    """One MEMIT pass over `requests` on the model as `work` currently edits it: δ at the last
    edited layer, then each layer's least-squares update (added to `work` as it is solved)."""
    resid_name = f"blocks.{max(layers)}.hook_resid_post"
    delta = _target_deltas(model, requests, max(layers), templates, p)
    if p.per_phrasing:
        owner = torch.tensor([i for i, r in enumerate(requests) for _ in key_templates[r]])
        at = lambda nm: _at_keys(model, requests, key_templates, nm)  # noqa: E731
        z = at(resid_name) + delta[owner]
    else:
        at = lambda nm: _at_subject(model, requests, key_templates, nm)  # noqa: E731
        z = at(resid_name) + delta
    out: list[DownDelta] = []
    for i, layer in enumerate(sorted(layers)):
        cur = at(resid_name)
        resid = (z - cur) / (len(layers) - i)  # [n, H]
        keys = at(f"blocks.{layer}.mlp.hook_post")  # [n, F]
        cov = covariance(model, layer, p.cov_sentences)
        a = p.mom2_weight * cov.double() + keys.double().T @ keys.double()
        if p.preserve_weight:
            a = a + p.preserve_weight * _preservation_term(
                model, layer, requests, prefixes if p.context_in_preserve else ())
        if p.exact:
            # minimum-‖ΔW‖_A update that writes every edit key's residual exactly
            # (ΔW K = R): v = A⁻¹K (Kᵀ A⁻¹ K)⁻¹, A = λC + μP without the KKᵀ term
            a = a - keys.double().T @ keys.double()
            ak = torch.linalg.solve(a, keys.double().T)  # [F, n]
            g = keys.double() @ ak
            g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
            v = torch.linalg.solve(g, ak.T).T.float()  # [F, n]
        else:
            v = torch.linalg.solve(a, keys.double().T).float()  # [F, n]
        d = DownDelta(layer, resid.T.contiguous(), v, tuple(requests))
        work.add(d)
        out.append(d)
    return out


def memit_edit(model: Model, requests: Sequence[EditRequest], layers: Sequence[int] | None = None,
               params: MemitParams | None = None, progress: Callable[[str, int, int], None] | None = None,
               ) -> list[DownDelta]:
    """Low-rank down_proj deltas (one per edited layer) that make the model state every request.

    The preservation term shrinks an update, so one pass can leave a fact short of its target
    (on the embedded model a single edit such as France → Madrid, while batches of 50 were all
    met). Up to `rounds` passes: each re-optimises δ from the model as already edited, for the
    requests some phrasing of which does not predict the target yet; the passes' updates are
    summed into one rank-k delta per layer.

    The model is left as it was: deltas are computed with a temporary `DeltaFfn` on top of the
    installed backend, so edits already in the overlay are respected.
    """
    if not requests:
        return []
    if model.tokenizer is None:
        raise CapabilityError("weight-level edits need the model's tokenizer")
    p = params or MemitParams()
    layers = tuple(layers or p.layers or default_layers(model))
    if any(not 0 <= l < model.spec.num_layers for l in layers):
        raise ModelqlError(f"edit layers {layers} are outside 0..{model.spec.num_layers - 1}")
    prefixes = context_prefixes(p.context_prefixes)
    key_templates = {r: with_contexts(relation_templates(r.relation), prefixes) for r in requests}
    templates = key_templates if p.context_in_delta else {r: relation_templates(r.relation) for r in requests}
    report = progress or (lambda stage, i, n: None)

    saved = model.ffn
    work = DeltaFfn(saved)
    model.ffn = work
    parts: list[DownDelta] = []
    try:
        pending = list(requests)
        for i in range(max(1, p.rounds)):
            report("rounds", i, p.rounds)
            parts += _solve_round(model, work, pending, layers, key_templates, templates, prefixes, p)
            pending = _unmet(model, pending, key_templates) if i + 1 < p.rounds else []
            if not pending:
                break
    finally:
        model.ffn = saved
    return [DownDelta(l, torch.cat([d.u for d in ds], 1), torch.cat([d.v for d in ds], 1), tuple(requests))
            for l in sorted({d.layer for d in parts}) for ds in [[d for d in parts if d.layer == l]]]
