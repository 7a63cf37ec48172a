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


def head_of(template: str) -> str:
    """A template's entity-independent head: its text before {X} ("" when {X} comes first)."""
    return template.split("{X}")[0]


def last_states(model, tok, rows: Sequence[tuple[str, Sequence[int]]], *, capture: Sequence[str] = (),
                hooks: Callable[[list[int]], Mapping] | None = None, batch: int = BATCH,
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Run `rows` — (head text, the whole prompt's ids) — and return the final residual at each
    prompt's last token [N, H] and, per hook name in `capture`, the hooked tensor there [N, ...].
    `hooks(row_indices)` may add hooks for one batch (they see the batch's tail positions)."""
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
        caches = [states[rows[i][0]].fork(k, width) if k else model.new_cache() for i, k in zip(chunk, reuse)]
        r_idx = torch.arange(len(chunk))
        last = torch.tensor([len(t) for t in tails]) - 1
        got: dict[str, torch.Tensor] = {}

        def grab(t: torch.Tensor, name: str, _g=got, _r=r_idx, _l=last) -> None:
            _g[name] = t[_r, _l].detach().float().clone()

        hk = dict(hooks(chunk)) if hooks is not None else {}
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
        ids = torch.tensor([t + [t[-1]] * (width - len(t)) for t in tails])  # padded at the end: causal
        h = model.forward(ids, caches, hooks=hk or None, logits="none")
        h_last = h[r_idx, last].float()
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
