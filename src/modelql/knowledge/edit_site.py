"""Where a model keeps a fact: the key position and layers of its weight-level edits, measured.

Causal tracing (Meng et al., 2022) over the edit's own prompts: the subject's token embeddings
are corrupted with Gaussian noise (3× the embedding matrix's std, a few fixed-seed draws), and
the clean FFN outputs of a window of `width` consecutive layers are restored at one position;
the window's effect is how much of the clean answer's probability that restores,
(p_restored − p_corrupt) / (p_clean − p_corrupt), averaged over prompts and draws. Traced at two
positions: the subject's last token (MEMIT's site on GPT-style models: mid layers' FFNs write the
subject's attributes there and later attention copies them to the prediction) and the prompt's
last token (where a small model trained on one template recalls instead).

The site is the position whose best window restores more, at that window (windows holding
layer 0 excluded, see `trace`). `width` is a sixth of
the model's layers (MEMIT edits 5 of GPT-J's 28), at least one. Measured once per model on its
first weight-level edit's prompts and cached (memory and $MODELQL_CACHE/memit/), so every later
edit of that model uses the same layers (and their cached statistics).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..runtime.interp import padded
from ..runtime.model import Model
from .edit_cache import base_ffn, stored_path

NOISE_SCALE = 3.0
NOISE_DRAWS = 3
TRACE_PROMPTS = 6


@dataclass(frozen=True)
class EditSite:
    key: str  # "subject" | "last"
    layers: tuple[int, ...]
    subject_effect: tuple[float, ...]  # per window start, at the subject's last token
    last_effect: tuple[float, ...]  # per window start, at the prompt's last token
    prompts: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return asdict(self)


def subject_span(model: Model, text: str, entity: str) -> tuple[list[int], int, int]:
    """(token ids of `text`, first and one-past-last position of `entity`'s tokens in it)."""
    tok = model.tokenizer
    ids = tok.encode(text)
    at = text.find(entity)
    if at < 0:
        return ids, len(ids) - 1, len(ids)
    before = tok.encode(text[:at].rstrip()) if text[:at].strip() else []
    upto = tok.encode(text[: at + len(entity)])
    start = min(len(before), len(ids) - 1)
    end = max(start + 1, min(len(upto), len(ids)))
    return ids, start, end


def window_width(model: Model) -> int:
    return max(1, round(model.spec.num_layers / 6))


def _trace_prompt(model: Model, ids: list[int], start: int, end: int, width: int, gen: torch.Generator,
                  ) -> tuple[list[float], list[float]] | None:
    n_layers = model.spec.num_layers
    pos_s, pos_l = end - 1, len(ids) - 1
    clean: dict[int, torch.Tensor] = {}

    def grab(t, name):
        clean[int(name.split(".")[1])] = t[0].detach().clone()

    hooks = {f"blocks.{l}.hook_mlp_out": grab for l in range(n_layers)}
    logits = model.forward(torch.tensor([ids]), hooks=hooks, logits="last")[0]
    answer = int(logits.argmax())
    p_clean = float(torch.softmax(logits.float(), -1)[answer])
    starts = list(range(n_layers - width + 1))
    # rows: per draw, [corrupt only] + [subject window w] + [last window w]
    per = 1 + 2 * len(starts)
    rows = NOISE_DRAWS * per
    std = float(model.embed.float().std()) * NOISE_SCALE
    noise = torch.randn(NOISE_DRAWS, end - start, model.spec.hidden_size, generator=gen) * std
    noise = noise.repeat_interleave(per, 0)

    def corrupt(t, _n):
        t = t.clone()
        t[:, start:end] = t[:, start:end] + noise.to(t.dtype)
        return t

    restore_at: dict[int, list[tuple[int, int]]] = {l: [] for l in range(n_layers)}
    for d in range(NOISE_DRAWS):
        for i, w in enumerate(starts):
            for l in range(w, w + width):
                restore_at[l].append((d * per + 1 + i, pos_s))
                restore_at[l].append((d * per + 1 + len(starts) + i, pos_l))

    def restore(t, name):
        l = int(name.split(".")[1])
        t = t.clone()
        for r, p in restore_at[l]:
            t[r, p] = clean[l][p].to(t.dtype)
        return t

    hooks = {"hook_embed": corrupt, **{f"blocks.{l}.hook_mlp_out": restore for l in range(n_layers)}}
    out = model.forward(padded([ids] * rows), hooks=hooks, logits="all")[:, pos_l]
    probs = torch.softmax(out.float(), -1)[:, answer].reshape(NOISE_DRAWS, per).mean(0)
    p_bad = float(probs[0])
    if p_clean - p_bad < 0.05:
        return None  # the noise does not hide the subject: this prompt says nothing
    eff = ((probs[1:] - p_bad) / (p_clean - p_bad)).tolist()
    return eff[: len(starts)], eff[len(starts):]


def trace(model: Model, prompts: Sequence[tuple[str, str]], width: int | None = None, seed: int = 0) -> EditSite:
    """Causal trace over `(text, entity)` prompts → the edit site (module docstring)."""
    width = width or window_width(model)
    gen = torch.Generator().manual_seed(seed)
    subj: list[list[float]] = []
    last: list[list[float]] = []
    used = []
    for text, entity in list(prompts)[:TRACE_PROMPTS]:
        ids, start, end = subject_span(model, text, entity)
        got = _trace_prompt(model, ids, start, end, width, gen)
        if got is not None:
            subj.append(got[0])
            last.append(got[1])
            used.append(text)
    n_win = model.spec.num_layers - width + 1
    if not subj:
        s_eff, l_eff = [0.0] * n_win, [0.0] * n_win
    else:
        s_eff = torch.tensor(subj).mean(0).tolist()
        l_eff = torch.tensor(last).mean(0).tolist()
    # a window with the first layer is never chosen: restoring FFN 0's output at the subject puts
    # back the clean token's identity itself (it dominates the residual there; 0.98 on SmolLM2-135M),
    # which says where the token is embedded, not where its facts are written
    cands = range(1 if n_win > 1 else 0, n_win)
    best_s = max(cands, key=lambda i: s_eff[i])
    best_l = max(cands, key=lambda i: l_eff[i])
    if subj and s_eff[best_s] >= l_eff[best_l]:
        key, w0 = "subject", best_s
    else:
        key, w0 = "last", best_l if subj else n_win - 1
    return EditSite(key, tuple(range(w0, w0 + width)), tuple(round(x, 4) for x in s_eff),
                    tuple(round(x, 4) for x in l_eff), tuple(used))


def edit_site(model: Model, prompts: Sequence[tuple[str, str]]) -> EditSite:
    """The model's edit site: cached in memory and in $MODELQL_CACHE/memit/<fingerprint>-site.json;
    traced over `prompts` (the first edit's own) when neither holds it."""
    state = model.__dict__.setdefault("_memit_state", {})
    got = state.get("site")
    if got is not None:
        return got
    path = stored_path(model, "site").with_suffix(".json")
    try:
        d = json.loads(path.read_text())
        got = EditSite(d["key"], tuple(d["layers"]), tuple(d["subject_effect"]), tuple(d["last_effect"]),
                       tuple(d.get("prompts", ())))
    except Exception:  # noqa: BLE001 — not measured yet (or damaged): trace now
        with base_ffn(model):
            got = trace(model, prompts)
        try:
            from ..fsutil import atomic_write_json

            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, got.to_json())
        except OSError:
            pass
    state["site"] = got
    return got


def site_cached(model: Model) -> bool:
    return "site" in model.__dict__.get("_memit_state", {}) or stored_path(model, "site").with_suffix(".json").is_file()
