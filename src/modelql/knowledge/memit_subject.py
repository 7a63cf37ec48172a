"""MEMIT at the subject's last token: weight-level edits of a pretrained model.

Used when causal tracing (`edit_site`) finds the fact written at the subject's last token by a
window of mid layers (every pretrained model measured so far), as in Meng et al. (2022):

1. δ, one per fact, added to the residual after the last edited layer L at the subject's last
   token of the fact's prompt, the prompt alone and after `contexts` short generic texts the
   model sampled itself (`generic_text.context_prefixes`), optimised through the layers above L
   so every target token is predicted (teacher-forced), with ROME's KL term keeping the
   distribution after "{X} is a" (the subject's other attributes) and ‖δ‖ bounded;
2. for each edited layer l (in order) the least-squares update of down_proj
   ΔW_l = R Kᵀ (λ C_l + K Kᵀ)⁻¹, R = (z − h_L) / (remaining layers), K = each fact's key at l
   (the FFN activation at the subject's last token, averaged over the contexts), C_l = E[k kᵀ]
   over the model's own sampled generic text (`generic_text.corpus`) plus μ times the same moment
   over the keys of the edited entities' nearest neighbours (`knowledge.neighbours`: the other
   names of their kind, which share most of their keys; without them 20 capital edits on
   SmolLM2-135M cost half the other countries' capitals).

Because the key is the subject's state, other entities' prompts do not share it (the locality
failure of last-token keys on a real model: every "The capital of X is" shares its last-token
key) and every phrasing that mentions the subject reads the edited state (paraphrases and the
chat template). Figures: `knowledge.edit_record`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..runtime.interp import padded
from ..runtime.model import KVCache, Model
from .delta_ffn import DeltaFfn, DownDelta
from .edit_cache import base_ffn, stored_path
from . import generic_text as G
from .edit_site import subject_span
from .memit_sites import clamp_rows
from .neighbours import neighbour_entities


@dataclass(frozen=True)
class SubjectRow:
    fact: int
    ids: list[int]  # prompt + target[:-1]
    subj: int  # the subject's last token
    loss_pos: list[int]  # positions predicting the target tokens
    targets: list[int]


def canonical_template(relation: str) -> str:
    return "The " + relation.replace("-", " ").replace("_", " ") + " of {X} is"


def _rows(model: Model, requests, prefixes: Sequence[str]) -> list[SubjectRow]:
    tok = model.tokenizer
    rows = []
    for i, r in enumerate(requests):
        target = tok.encode(" " + r.target.strip(), add_special_tokens=False)
        prompt = canonical_template(r.relation).replace("{X}", r.entity)
        for ctx in ("",) + tuple(prefixes):
            text = f"{ctx}. {prompt}" if ctx else prompt
            ids, _s, e = subject_span(model, text, r.entity)
            n = len(ids)
            rows.append(SubjectRow(i, ids + target[:-1], e - 1, list(range(n - 1, n - 1 + len(target))), target))
    return rows


class _Captured(Exception):
    """Raised by the last hook `_multi` needs: the layers above it are not run."""


def _multi(model: Model, seqs: Sequence[Sequence[int]], names: Sequence[str], chunk: int = 32
           ) -> dict[str, list[torch.Tensor]]:
    """Per hook of `names`, its activation [T, ·] for each sequence; the forward stops once every
    hook has fired (the edit's keys sit in mid layers: a third of the model's cost)."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(seqs), chunk):
        part = seqs[i : i + chunk]
        got: dict[str, torch.Tensor] = {}

        def cap(t, n):
            got[n] = t.clone()
            if len(got) == len(names):
                raise _Captured

        try:
            model.forward(padded(part), hooks={n: cap for n in names}, logits="none")
        except _Captured:
            pass
        for n in names:
            out[n] += [got[n][j, : len(s)].float() for j, s in enumerate(part)]
    return out


def generic_covariance(model: Model, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """E[k kᵀ] of each layer's FFN keys over the model's sampled generic text, all missing
    layers in one pass; cached in memory and on disk (base weights)."""
    cache = model.__dict__.setdefault("_memit_gcov", {})
    missing = []
    for l in layers:
        if l in cache:
            continue
        try:
            cache[l] = torch.load(stored_path(model, f"gcov-{G.corpus_tag()}-L{l}"), weights_only=True)
        except Exception:  # noqa: BLE001 — not computed yet
            missing.append(l)
    if missing:
        seqs = G.corpus(model)
        with base_ffn(model):
            acts = _multi(model, seqs, [f"blocks.{l}.mlp.hook_post" for l in missing])
        from ..fsutil import atomic_open

        for l in missing:
            k = torch.cat(acts[f"blocks.{l}.mlp.hook_post"]).double()
            cache[l] = (k.T @ k / k.shape[0]).float()
            path = stored_path(model, f"gcov-{G.corpus_tag()}-L{l}")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                with atomic_open(path, "wb", encoding=None) as f:
                    torch.save(cache[l], f)
            except OSError:
                pass
    return {l: cache[l] for l in layers}


def generic_ready(model: Model, layers: Sequence[int]) -> bool:
    cache = model.__dict__.get("_memit_gcov", {})
    return all(l in cache or stored_path(model, f"gcov-{G.corpus_tag()}-L{l}").is_file() for l in layers)


def _resid_after(model: Model, seqs: list[list[int]], layer: int) -> torch.Tensor:
    got = {}

    def cap(t, n):
        got["h"] = t.detach().clone()

    model.forward(padded(seqs), hooks={f"blocks.{layer}.hook_resid_post": cap}, logits="none")
    return got["h"]


def _run_from(model: Model, h: torch.Tensor, layer: int) -> torch.Tensor:
    """The residual after the last layer, from `h` after layer `layer` (grad flows)."""
    caches = [KVCache() for _ in range(h.shape[0])]
    for c in caches:
        c.reserve(model.spec, model.dtype, h.shape[1])
    for l in range(layer + 1, model.spec.num_layers):
        h = model.block(l, h, caches, None, {})
    return h


def target_deltas(model: Model, requests, rows: list[SubjectRow], layer: int, p) -> torch.Tensor:
    """δ [facts, H] at layer `layer`'s output at each fact's subject (module docstring, step 1)."""
    n = len(requests)
    seqs = [r.ids for r in rows]
    h0 = _resid_after(model, seqs, layer)
    ridx = torch.arange(len(rows))
    spos = torch.tensor([r.subj for r in rows])
    owner = torch.tensor([r.fact for r in rows])
    h_norm = torch.zeros(n)
    for k, r in enumerate(rows):
        h_norm[r.fact] = max(float(h_norm[r.fact]), float(h0[k, r.subj].norm()))
    lrow = torch.tensor([k for k, r in enumerate(rows) for _ in r.loss_pos])
    lpos = torch.tensor([q for r in rows for q in r.loss_pos])
    ltgt = torch.tensor([t for r in rows for t in r.targets])
    lw = torch.tensor([1.0 / (len(r.targets) * sum(x.fact == r.fact for x in rows)) for r in rows
                       for _ in r.loss_pos])
    kl_on = bool(p.kl_weight)
    if kl_on:
        ess = [subject_span(model, f"{r.entity} is a", r.entity) for r in requests]
        eseqs = [e[0] for e in ess]
        e0 = _resid_after(model, eseqs, layer)
        epos = torch.tensor([e[2] - 1 for e in ess])
        elast = torch.tensor([len(e[0]) - 1 for e in ess])
        with torch.no_grad():
            base_ess = torch.log_softmax(model.unembed(_run_from(model, e0, layer)[torch.arange(n), elast]), -1)
    delta = torch.zeros(n, model.spec.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=p.lr * float(h_norm.mean()))
    for _ in range(p.steps):
        opt.zero_grad()
        add = torch.zeros_like(h0).index_put((ridx, spos), delta[owner].to(h0.dtype))
        out = _run_from(model, h0 + add, layer)
        logp = torch.log_softmax(model.unembed(out[lrow, lpos]), -1).gather(-1, ltgt[:, None])[:, 0]
        per_fact = torch.zeros(n).index_add(0, owner[lrow], logp.detach() * lw)
        if p.stop_prob and float(per_fact.exp().min()) >= p.stop_prob:
            break
        loss = -(logp * lw).sum() / n
        if kl_on:
            eadd = torch.zeros_like(e0).index_put((torch.arange(n), epos), delta.to(e0.dtype))
            elp = torch.log_softmax(model.unembed(_run_from(model, e0 + eadd, layer)[torch.arange(n), elast]), -1)
            loss = loss + p.kl_weight * F.kl_div(elp, base_ess, log_target=True, reduction="batchmean")
        loss = loss + p.weight_decay * (delta.norm(dim=-1) ** 2 / (h_norm**2 + 1e-8)).mean()
        loss.backward()
        opt.step()
        clamp_rows(delta, p.clamp_norm * h_norm)
    return delta.detach()


def _at_subject(model: Model, rows: list[SubjectRow], names: Sequence[str], n: int,
                canon: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Per fact, the activation at each hook of `names` at the subject's last token, averaged
    over the fact's rows (contexts); the residual (`hook_resid_post`) at the canonical rows
    `canon` only, when given (the value is written for the prompt itself)."""
    acts = _multi(model, [r.ids for r in rows], names)
    out = {}
    for name in names:
        use = [k for k in range(len(rows)) if canon is None or "resid" not in name or k in set(canon)]
        a = torch.stack([acts[name][k][rows[k].subj] for k in use])
        owner = torch.tensor([rows[k].fact for k in use])
        s = torch.zeros(n, a.shape[1]).index_add(0, owner, a)
        out[name] = s / torch.bincount(owner, minlength=n)[:, None]
    return out


def subject_edit(model: Model, requests, layers: Sequence[int], p,
                 progress: Callable[[str, int, int], None] | None = None):
    """Low-rank down_proj deltas (one per layer of `layers`) stating every request."""
    layers = tuple(sorted(layers))
    report = progress or (lambda stage, i, n: None)
    cov = generic_covariance(model, layers)
    prefixes = G.context_prefixes(model, p.contexts)
    rows = _rows(model, requests, prefixes)
    nb_cov = neighbour_moments(model, requests, layers, prefixes, p.neighbours)
    canon = [k for k, r in enumerate(rows) if k == 0 or rows[k - 1].fact != r.fact]
    top = max(layers)
    n = len(requests)
    saved = model.ffn
    work = DeltaFfn(saved)
    model.ffn = work
    parts: list = []
    try:
        todo = list(range(n))
        for rnd in range(max(1, p.rounds)):
            report("rounds", rnd, p.rounds)
            reqs = [requests[i] for i in todo]
            sub = [SubjectRow(todo.index(r.fact), r.ids, r.subj, r.loss_pos, r.targets)
                   for r in rows if r.fact in todo]
            sub_canon = [k for k, r in enumerate(sub) if k == 0 or sub[k - 1].fact != r.fact]
            delta = target_deltas(model, reqs, sub, top, p)
            resid_name = f"blocks.{top}.hook_resid_post"
            z = _at_subject(model, [sub[k] for k in sub_canon], [resid_name], len(reqs))[resid_name] + delta
            for i, l in enumerate(layers):
                key_name = f"blocks.{l}.mlp.hook_post"
                got = _at_subject(model, sub, [key_name, resid_name], len(reqs), canon=sub_canon)
                cur = got[resid_name]
                resid = (z - cur) / (len(layers) - i)
                keys = got[key_name].double()
                c = cov[l].double()
                if l in nb_cov:
                    c = c + p.neighbour_weight * nb_cov[l]
                if p.exact:
                    # the minimum-disturbance update that writes every key exactly: ΔW K = R with
                    # the least E‖ΔW k‖² over generic keys k (and, weighted, the neighbours' keys),
                    # v = C⁻¹K (KᵀC⁻¹K)⁻¹
                    c = c + p.cov_ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
                    ck = torch.linalg.solve(c, keys.T)
                    g = keys @ ck
                    g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
                    v = torch.linalg.solve(g, ck.T).T.float()
                else:
                    a = p.mom2_weight * c + keys.T @ keys
                    v = torch.linalg.solve(a, keys.T).float()
                d = DownDelta(l, resid.T.contiguous(), v, tuple(requests))
                work.add(d)
                parts.append(d)
            if rnd + 1 >= p.rounds:
                break
            todo = [i for i in todo if not _states(model, rows[canon[i]])]
            if not todo:
                break
    finally:
        model.ffn = saved
    return [DownDelta(l, torch.cat([d.u for d in ds], 1), torch.cat([d.v for d in ds], 1), tuple(requests))
            for l in sorted({d.layer for d in parts}) for ds in [[d for d in parts if d.layer == l]]]


def neighbour_rows(model: Model, requests, prefixes: Sequence[str], n: int) -> list[SubjectRow]:
    """The edited entities' `n` nearest neighbours (`knowledge.neighbours`) in each edited
    relation's prompt, alone and after `prefixes`: what an edit must leave alone nearest to it."""
    names = neighbour_entities(model, [r.entity for r in requests], n)
    fake = [_Neighbour(x, rel, "x") for rel in sorted({r.relation for r in requests}) for x in names]
    return _rows(model, fake, prefixes)


def neighbour_moments(model: Model, requests, layers: Sequence[int], prefixes: Sequence[str], n: int
                      ) -> dict[int, torch.Tensor]:
    """Per layer, E[k kᵀ] of the keys at the subject's last token of the edited entities' nearest
    neighbours (`knowledge.neighbours`), in each edited relation's prompt after the same generic
    prefixes as the edit's own keys; {} when `n` is 0. Taken on the model before this edit."""
    rows = neighbour_rows(model, requests, prefixes, n)
    if not rows:
        return {}
    hooks = [f"blocks.{l}.mlp.hook_post" for l in layers]
    acts = _multi(model, [r.ids for r in rows], hooks)
    out = {}
    for l, name in zip(layers, hooks):
        k = torch.stack([a[r.subj] for a, r in zip(acts[name], rows)]).double()
        out[l] = k.T @ k / k.shape[0]
    return out


@dataclass(frozen=True)
class _Neighbour:
    entity: str
    relation: str
    target: str


def _states(model: Model, row: SubjectRow) -> bool:
    """Does the model (as currently edited) predict every target token of `row` (teacher-forced)?"""
    logits = model.forward(torch.tensor([row.ids]), logits="all")[0]
    return all(int(logits[q].argmax()) == t for q, t in zip(row.loss_pos, row.targets))
