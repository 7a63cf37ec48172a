"""The entities an edit must leave alone: the vocabulary's names nearest to the edited ones.

A weight-level edit written at the subject's last token (`memit_subject`) also moves every other
key that shares the edited keys' directions. On a real model the keys of names of one kind share
a large common part ("a country's name"), and the generic-text statistics hold few such names, so
the least-squares update spends that common part freely: 20 capital edits on SmolLM2-135M left
other countries' capital recall at a near-tie with " the" (locality 51 %). Adding the keys of the
edited entities' nearest neighbours to the preservation term makes the common part expensive and
the update uses what is specific to each edited entity (locality 95 % on the same batch,
`knowledge.edit_record`).

Neighbours come from the model itself, not from a facts table: whole-word capitalised tokens of
its vocabulary ranked by input-embedding cosine to the edited entities' tokens (for "France",
"Chile", … the model's own embedding puts other countries first). Cheap (one matrix product over
the vocabulary), works for any relation and any model with a tokenizer.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..runtime.model import Model

#: neighbours added to the preservation term per batch (capped by what the vocabulary holds)
NEIGHBOURS = 100


def _name_tokens(model: Model) -> tuple[list[str], torch.Tensor]:
    """Texts of the vocabulary and the mask of whole-word capitalised names (≥ 3 letters),
    cached on the model."""
    state = model.__dict__.setdefault("_memit_state", {})
    got = state.get("name_tokens")
    if got is None:
        tok = model.tokenizer
        texts = [tok.decode([i]) for i in range(model.spec.vocab_size)]
        ok = torch.tensor([len(t) >= 4 and t[0] == " " and t[1].isupper() and t[1:].isalpha() for t in texts])
        got = state["name_tokens"] = (texts, ok)
    return got


def neighbour_entities(model: Model, entities: Sequence[str], n: int = NEIGHBOURS) -> list[str]:
    """The `n` vocabulary names nearest (input-embedding cosine, best over the edited entities)
    to `entities`, none of them an edited entity or part of one's name."""
    if n <= 0 or not entities:
        return []
    tok = model.tokenizer
    emb = model.embed.float()
    texts, ok = _name_tokens(model)
    ok = ok[: emb.shape[0]]
    queries = []
    for e in entities:
        ids = [i for i in tok.encode(" " + e, add_special_tokens=False) if i < emb.shape[0]]
        if ids:
            queries.append(emb[ids].mean(0))
    if not queries:
        return []
    unit = emb / emb.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    q = torch.stack(queries)
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    score = (unit[: len(ok)] @ q.T).max(-1).values
    score[~ok] = -2.0
    edited = [e.casefold() for e in entities]
    out: list[str] = []
    for i in score.argsort(descending=True).tolist():
        if score[i] <= -2.0:
            break
        w = texts[i].strip()
        c = w.casefold()
        if any(c == e or c in e.split() or c in e for e in edited) or w in out:
            continue
        out.append(w)
        if len(out) == n:
            break
    return out
