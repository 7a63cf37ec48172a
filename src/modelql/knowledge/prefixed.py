"""Batched last-position forwards of probe prompts whose entity-independent heads are run once.

Why: labelling (`knowledge.calibrate`, `labels.probe_features`, `label_check`) runs thousands of
prompts "head + subject + tail" where the head is a template's text before {X} — for a two-shot
template ≈ 20 of ≈ 25 tokens. Each row here forks its head's KV state (`prefix_cache.prefix_state`,
computed once per model and weights version) and only its own tail goes through the model, so a
batch of 64 two-shot prompts runs ≈ 320 token rows instead of ≈ 1,600. Rows of different heads
share one forward (each row attends over its own cache), which keeps the passes few: on a CPU
every pass reads all the weights, so a pass of a few hundred rows costs little more than one row.

Exact as the prefix reuse is (`prefix_cache.shared`: only the common prefix of the head's ids and
the row's ids is reused); the one difference a caller must know: hooks see the tail positions
only, so an ablation hook does not zero a feature in the head's positions.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

from .prefix_cache import prefix_state, shared

#: Rows per forward pass (tails of ≈ 5 tokens: a few hundred token rows per pass).
BATCH = 96


def packs(model) -> bool:
    """Whether `model` runs sequences packed in one unpadded row (`Model.forward_packed`)."""
    spec = getattr(model, "spec", None)
    return (hasattr(model, "forward_packed") and spec is not None and not spec.per_layer_input
            and not spec.learned_positions)


def head_of(template: str) -> str:
    """A template's entity-independent head: its text before {X} ("" when {X} comes first)."""
    return template.split("{X}")[0]


def last_states(model, tok, rows: Sequence[tuple[str, Sequence[int]]], *, capture: Sequence[str] = (),
                hooks: Callable[[list[int], list[tuple[int, int]] | None], Mapping] | None = None, batch: int = BATCH,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `rows` — (head text, the whole prompt's ids) — and return the final residual at each
    prompt's last token [N, H] and, per hook name in `capture`, the hooked tensor there [N, ...].
    `hooks(row_indices, spans)` may add hooks for one pass: they see its tail positions, as one
    packed row [1, N, ...] where row j holds positions `spans[j]` = (offset, length), or, for a
    model that cannot pack (`spans` None), as padded rows [B, T, ...] in `row_indices` order."""
    n = len(rows)
    finals: list[torch.Tensor | None] = [None] * n
    grabbed: dict[str, list[torch.Tensor | None]] = {c: [None] * n for c in capture}
    states = {h: prefix_state(model, tok, h) if h.strip() else None for h in {h for h, _ids in rows}}
    order = sorted(range(n), key=lambda i: len(rows[i][1]))
    for b in range(0, n, batch):
        chunk = order[b:b + batch]
        reuse, tails = [], []
        for i in chunk:
            head, ids = rows[i][0], list(rows[i][1])
            st = states[head]
            k = shared(st.ids, ids) if st is not None else 0
            reuse.append(k)
            tails.append(ids[k:])
        width = max(len(t) for t in tails)
        packed = packs(model)
        room = [len(t) for t in tails] if packed else [width] * len(tails)
        caches = [states[rows[i][0]].fork(k, r) if k else model.new_cache() for i, k, r in zip(chunk, reuse, room)]
        if packed:
            ends, at = [], 0
            spans = []
            for t in tails:
                spans.append((at, len(t)))
                at += len(t)
                ends.append(at - 1)
            where = (torch.zeros(len(chunk), dtype=torch.long), torch.tensor(ends))
        else:
            spans = None
            where = (torch.arange(len(chunk)), torch.tensor([len(t) for t in tails]) - 1)
        got: dict[str, torch.Tensor] = {}

        def grab(t: torch.Tensor, name: str, _g=got, _w=where) -> None:
            _g[name] = t[_w[0], _w[1]].detach().float().clone()

        hk = dict(hooks(chunk, spans)) if hooks is not None else {}
        for c in capture:
            if c in hk:
                inner = hk[c]

                def both(t, name, _inner=inner):
                    out = _inner(t, name)
                    grab(t if out is None else out, name)
                    return out

                hk[c] = both
            else:
                hk[c] = grab
        if packed:  # one unpadded row (`Model.forward_packed`)
            out, _offsets = model.forward_packed(tails, caches, hooks=hk or None)
            h_last = out[where[1]].float()
        else:
            ids = torch.tensor([t + [t[-1]] * (width - len(t)) for t in tails])  # padded at the end: causal
            h = model.forward(ids, caches, hooks=hk or None, logits="none")
            h_last = h[where[0], where[1]].float()
        for r, i in enumerate(chunk):
            finals[i] = h_last[r]
            for c in capture:
                grabbed[c][i] = got[c][r]
    empty = torch.zeros(0)
    return (torch.stack(finals) if n else empty), {c: torch.stack(v) if n else empty for c, v in grabbed.items()}


def last_logits(model, tok, rows: Sequence[tuple[str, Sequence[int]]], batch: int = BATCH) -> torch.Tensor:
    """Next-token logits [N, V] (float32) at each prompt's last token."""
    finals, _ = last_states(model, tok, rows, batch=batch)
    out = [model.unembed(finals[b:b + 256]).float() for b in range(0, finals.shape[0], 256)]
    return torch.cat(out) if out else torch.zeros(0)


__all__ = ["BATCH", "head_of", "last_states", "last_logits"]
