"""Where a last-token edit writes and what it must write there: the edit sites of a batch
(`EditSites`: each phrasing of each fact, and after the target's first j tokens for token j) and
the residual change δ per site that makes the model state its token (`target_deltas`).

Shared by the two last-token solvers: MEMIT's down_proj update (`memit`) and new neurons
(`memit_neurons`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import ModelqlError
from ..runtime.interp import LastTokenRerun, batch_activations, padded
from ..runtime.model import Model
from .delta_ffn import EditRequest

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


def _prompt_ids(model: Model, template: str, entity: str) -> list[int]:
    """Token ids of a phrasing with the entity filled in; its last token is the key position."""
    return model.tokenizer.encode(template.replace("{X}", entity))


@dataclass(frozen=True)
class EditSites:
    """Where a batch writes. A fact whose target is n tokens long gets n δs, one per target token
    j (a last-layer edit at the prompt's last token cannot reach the tokens after it): row k is a
    phrasing of the fact followed by the target's first j tokens, its key is its last position,
    and there the model must predict target token j."""

    seqs: list[list[int]]  # row → token ids
    owner: list[int]  # row → δ
    want: list[int]  # δ → the token id it must make the model predict
    fact: list[int]  # δ → request index
    first: list[bool]  # δ → it is the target's first token

    @property
    def rows(self) -> torch.Tensor:
        return torch.tensor(self.owner)

    def subset(self, keep: set[int]) -> EditSites:
        """The rows of the δs in `keep`, δs renumbered in order."""
        new = {o: i for i, o in enumerate(o for o in range(len(self.want)) if o in keep)}
        rows = [k for k, o in enumerate(self.owner) if o in keep]
        return EditSites([self.seqs[k] for k in rows], [new[self.owner[k]] for k in rows],
                         [self.want[o] for o in new], [self.fact[o] for o in new], [self.first[o] for o in new])

    def conflicting(self) -> set[int]:
        """Later-token δs that no last-position key can satisfy together: two facts whose targets
        continue the same token differently (" Port" → "-au-Prince" / " Louis"); the key there is
        mostly that token."""
        prev = {o: self.seqs[k][-1] for k, o in enumerate(self.owner) if not self.first[o]}
        wants: dict[int, set[tuple[int, int]]] = {}
        for o, t in prev.items():
            wants.setdefault(t, set()).add((self.fact[o], self.want[o]))
        return {o for o, t in prev.items()
                if len({w for _, w in wants[t]}) > 1 and len({f for f, _ in wants[t]}) > 1}

    def unmet(self, model: Model) -> set[int]:
        """The δs some row of which the model does not complete with the δ's token yet (argmax
        after the row, teacher-forced)."""
        bad: set[int] = set()
        for i in range(0, len(self.seqs), 64):
            part = self.seqs[i : i + 64]
            h = model.forward(padded(part), logits="none")
            top = model.unembed(h[torch.arange(len(part)), [len(s) - 1 for s in part]]).argmax(-1)
            bad |= {self.owner[i + j] for j in range(len(part)) if int(top[j]) != self.want[self.owner[i + j]]}
        return bad


def edit_sites(model: Model, requests: Sequence[EditRequest], templates) -> EditSites:
    """The sites of `requests` in their phrasings (`templates[request]`), fact-major."""
    tok = model.tokenizer
    sites = EditSites([], [], [], [], [])
    for i, r in enumerate(requests):
        target_ids = tok.encode(" " + r.target.strip(), add_special_tokens=False)
        if not target_ids:
            raise ModelqlError(f"target {r.target!r} encodes to no tokens")
        prompts = [_prompt_ids(model, tpl, r.entity) for tpl in templates[r]]
        for j, t in enumerate(target_ids):
            o = len(sites.want)
            sites.want.append(t)
            sites.fact.append(i)
            sites.first.append(j == 0)
            for ids in prompts:
                sites.seqs.append(ids + target_ids[:j])
                sites.owner.append(o)
    return sites


def _at(model: Model, sites: EditSites, name: str, per_row: bool = True) -> torch.Tensor:
    """Activation at hook `name` at each row's key position ([rows, D]), or its mean over each
    δ's rows ([δs, D]) when not `per_row`."""
    acts = torch.stack([a[-1] for a in batch_activations(model, sites.seqs, name)])
    if per_row:
        return acts
    out = torch.zeros(len(sites.want), acts.shape[1])
    out.index_add_(0, sites.rows, acts)
    return out / torch.bincount(sites.rows, minlength=len(sites.want))[:, None]


def clamp_rows(delta: torch.Tensor, limit: torch.Tensor) -> None:
    """Scale each row of δ [n, H] down to norm ≤ limit [n], in place (the δ optimisers' trust region)."""
    with torch.no_grad():
        norms = delta.norm(dim=-1, keepdim=True)
        delta.mul_(torch.where(norms > limit[:, None], limit[:, None] / norms, torch.ones_like(norms)))


def target_deltas(model: Model, requests: Sequence[EditRequest], sites: EditSites, layer: int,
                   p) -> torch.Tensor:
    """δ [δs, H] at layer `layer`'s output, optimised jointly (the losses are separable, so this
    equals optimising each alone): every row must predict its δ's token, "{X} is" keeps its
    distribution (KL, when `kl_weight`, first-token δs only), and ‖δ‖ stays bounded."""
    n = len(sites.want)
    rows = sites.rows
    batch = LastTokenRerun(model, sites.seqs)
    want = torch.tensor(sites.want)[rows]
    weights = 1.0 / torch.bincount(rows, minlength=n)[rows].float()  # each δ's rows weigh 1 together
    h_norm = _at(model, sites, f"blocks.{layer}.hook_resid_post", per_row=False).norm(dim=-1)
    firsts = [o for o in range(n) if sites.first[o]]
    kl_on = bool(p.kl_weight and firsts)
    if kl_on:
        ess = LastTokenRerun(model, [_prompt_ids(model, "{X} is", requests[sites.fact[o]].entity) for o in firsts])
        ess_owner = torch.tensor(firsts)
        base_ess = torch.log_softmax(ess.logits(), -1)
    delta = torch.zeros(n, model.spec.hidden_size, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=p.lr * float(h_norm.mean()))
    name = f"blocks.{layer}.hook_mlp_out"

    def add(who: torch.Tensor) -> Callable:
        return lambda t, _n: t + delta[who].to(t.dtype)[:, None]

    for _ in range(p.steps):
        opt.zero_grad()
        logp = torch.log_softmax(batch.logits({name: add(rows)}, grad=True), -1)
        got = logp.gather(-1, want[:, None])[:, 0]
        if p.stop_prob and float(got.detach().min().exp()) >= p.stop_prob:
            break  # every row already predicts its token confidently
        kl = torch.zeros(())
        if kl_on:
            ess_lp = torch.log_softmax(ess.logits({name: add(ess_owner)}, grad=True), -1)
            kl = F.kl_div(ess_lp, base_ess, log_target=True, reduction="sum")
        decay = (delta.norm(dim=-1) ** 2 / (h_norm**2 + 1e-8)).sum()
        (-(got * weights).sum() + p.kl_weight * kl + p.weight_decay * decay).backward()
        opt.step()
        clamp_rows(delta, p.clamp_norm * h_norm)
    return delta.detach()
