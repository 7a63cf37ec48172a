"""The Python interpretability surface over the runtime's named hook points.

Everything here composes hook dicts (`name -> fn(tensor, name) -> tensor | None`) and runs the
ordinary forward pass with them, so what is measured is exactly what generation computes.
Hook names follow TransformerLens (see `runtime.model`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..errors import ModelqlError
from ..ffn.base import Hook, Hooks
from .model import Model

PromptLike = str | Sequence[int] | torch.Tensor


def padded(seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    """Right-padded [B, T] ids. Causal attention never lets a pad token influence an earlier
    position, so reading only real positions makes padding exact."""
    width = max(len(s) for s in seqs)
    out = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s)
    return out


def batch_activations(model: Model, seqs: Sequence[Sequence[int]], name: str, hooks: Hooks | None = None,
                      chunk: int = 64) -> list[torch.Tensor]:
    """The activation at hook `name` for each token sequence ([len(seq), D] each, float32),
    run `chunk` sequences per padded batch."""
    out: list[torch.Tensor] = []
    for i in range(0, len(seqs), chunk):
        part = seqs[i : i + chunk]
        got = {}

        def cap(t, n):
            got["t"] = t

        model.forward(padded(part), hooks={**(hooks or {}), name: cap}, logits="none")
        out += [got["t"][j, : len(s)].float() for j, s in enumerate(part)]
    return out


class LastTokenRerun:
    """Sequences whose prefixes (all but the last token) run once into KV caches, so a loop that
    changes only what happens at each sequence's last token (an edit vector added there, optimised
    step by step) re-runs one token per sequence instead of the whole batch. Exact: causal
    attention never lets the last token change an earlier position."""

    def __init__(self, model: Model, seqs: Sequence[Sequence[int]]):
        if any(len(s) < 1 for s in seqs):
            raise ModelqlError("every sequence needs at least one token")
        from .model import KVCache

        self.model = model
        self.lengths = [len(s) - 1 for s in seqs]
        self.caches = [KVCache() for _ in seqs]
        self.last = torch.tensor([[s[-1]] for s in seqs], dtype=torch.long)
        if any(self.lengths):
            # autograd mode (no graph) so that later in-graph writes may reuse these tensors
            with torch.no_grad():
                model.forward(padded([s[:-1] or [0] for s in seqs]), caches=self.caches, logits="none", grad=True)
        for c, n in zip(self.caches, self.lengths):
            c.truncate(n)

    def logits(self, hooks: Hooks | None = None, grad: bool = False) -> torch.Tensor:
        """[B, V] float32 logits at each sequence's last token (hooks see [B, 1, D] tensors)."""
        try:
            return self.model.forward(self.last, caches=self.caches, hooks=hooks, logits="last", grad=grad)
        finally:
            for c, n in zip(self.caches, self.lengths):
                c.truncate(n)
                c.k, c.v = [t.detach() for t in c.k], [t.detach() for t in c.v]


def last_activations(model: Model, prompts: Sequence[str | Sequence[int]], name: str) -> torch.Tensor:
    """[len(prompts), D]: the activation at hook `name` at each prompt's last token."""
    seqs = [model.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    return torch.stack([a[-1] for a in batch_activations(model, seqs, name)])


def hook_names(model: Model) -> list[str]:
    """Every hook point of this model, in forward order."""
    spec = model.spec
    names = ["hook_embed"] + (["hook_pos_embed"] if spec.learned_positions else [])
    for i in range(spec.num_layers):
        b = f"blocks.{i}."
        names += [b + "hook_resid_pre", b + "ln1.hook_normalized"]
        names += [b + "attn.hook_q", b + "attn.hook_k", b + "attn.hook_v", b + "attn.hook_z"]
        names += [b + "hook_attn_out", b + "hook_resid_mid", b + "ln2.hook_normalized"]
        if spec.moe is not None:  # routing, and every expert's features as one wide layer
            names += [b + "mlp.hook_expert_ids", b + "mlp.hook_expert_weights", b + "mlp.hook_post"]
        else:
            names.append(b + "mlp.hook_pre")
            if spec.gated_ffn:
                names.append(b + "mlp.hook_pre_linear")
            names.append(b + "mlp.hook_post")
        names += [b + "hook_mlp_out", b + "hook_resid_post"]
    return names + ["ln_final.hook_normalized"]


def to_ids(model: Model, prompt: PromptLike) -> torch.Tensor:
    """[1, T] token ids of a prompt (text is encoded with the model's tokenizer, BOS per model)."""
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise ModelqlError("this model has no tokenizer: pass token ids")
        ids = model.tokenizer.encode(prompt)
        if not ids:
            raise ModelqlError("the prompt encodes to no tokens")
        return torch.tensor([ids])
    ids = torch.as_tensor(prompt, dtype=torch.long)
    return ids[None] if ids.dim() == 1 else ids


def _select(model: Model, names: Iterable[str] | Callable[[str], bool] | None) -> list[str]:
    all_names = hook_names(model)
    if names is None:
        return all_names
    if callable(names):
        return [n for n in all_names if names(n)]
    wanted = list(names)
    unknown = sorted(set(wanted) - set(all_names))
    if unknown:
        raise ModelqlError(f"unknown hook point {unknown[0]!r}")
    return wanted


def run_with_hooks(model: Model, prompt: PromptLike, hooks: Hooks) -> torch.Tensor:
    """Logits [T, V] of one prompt with the given hooks active."""
    return model.forward(to_ids(model, prompt), hooks=hooks)[0]


def run_with_cache(
    model: Model, prompt: PromptLike, names: Iterable[str] | Callable[[str], bool] | None = None,
    hooks: Hooks | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits [T, V] and the activations at the chosen hook points (batch dim dropped).

    Extra `hooks` run first, so a cache can record an ablated or steered run.
    """
    cache: dict[str, torch.Tensor] = {}

    def make(name: str, inner: Hook | None) -> Hook:
        def capture(t: torch.Tensor, n: str) -> torch.Tensor | None:
            out = inner(t, n) if inner else None
            cache[n] = (t if out is None else out)[0].detach().clone()
            return out

        return capture

    hooks = dict(hooks or {})
    combined = {n: make(n, hooks.pop(n, None)) for n in _select(model, names)}
    combined.update(hooks)
    logits = model.forward(to_ids(model, prompt), hooks=combined)[0]
    return logits, cache


def compose(*hook_sets: Hooks) -> dict[str, Hook]:
    """Merge hook dicts; hooks on the same point run in the order given."""
    merged: dict[str, list[Hook]] = {}
    for hs in hook_sets:
        for name, fn in hs.items():
            merged.setdefault(name, []).append(fn)

    def chain(fns: list[Hook]) -> Hook:
        def run(t: torch.Tensor, n: str) -> torch.Tensor:
            for fn in fns:
                out = fn(t, n)
                t = t if out is None else out
            return t

        return run

    return {name: fns[0] if len(fns) == 1 else chain(fns) for name, fns in merged.items()}


def zero_ablate(layer: int, component: str = "mlp") -> dict[str, Hook]:
    """Remove a layer's attention or FFN contribution to the residual stream."""
    point = {"mlp": "hook_mlp_out", "attn": "hook_attn_out"}.get(component)
    if point is None:
        raise ModelqlError(f"component must be 'mlp' or 'attn', not {component!r}")
    return {f"blocks.{layer}.{point}": lambda t, n: torch.zeros_like(t)}


def ablate_features(layer: int, features: Sequence[int]) -> dict[str, Hook]:
    """Zero single FFN features (their activation after the nonlinearity)."""
    idx = torch.as_tensor(list(features), dtype=torch.long)

    def fn(t: torch.Tensor, n: str) -> torch.Tensor:
        t = t.clone()
        t[..., idx] = 0
        return t

    return {f"blocks.{layer}.mlp.hook_post": fn}


def steer(layer: int, vector: torch.Tensor, alpha: float = 1.0, point: str = "hook_resid_pre",
          positions: Sequence[int] | None = None) -> dict[str, Hook]:
    """Add alpha·vector to the residual stream at a layer (all positions, or the given ones)."""
    v = torch.as_tensor(vector)

    def fn(t: torch.Tensor, n: str) -> torch.Tensor:
        add = (alpha * v).to(t.dtype)
        if positions is None:
            return t + add
        t = t.clone()
        t[:, list(positions)] += add
        return t

    return {f"blocks.{layer}.{point}": fn}


def activation_patch(
    model: Model, donor: PromptLike, recipient: PromptLike, names: Sequence[str],
    positions: Sequence[int] | None = None,
) -> torch.Tensor:
    """Recipient logits [T, V] with the donor's activations written in at `names`.

    Positions index both prompts (default: the last position of each), so prompts of different
    lengths can be patched at their final token.
    """
    _, donor_cache = run_with_cache(model, donor, names)
    r_ids = to_ids(model, recipient)
    d_len = next(iter(donor_cache.values())).shape[0]
    src = list(positions) if positions is not None else [d_len - 1]
    dst = list(positions) if positions is not None else [r_ids.shape[1] - 1]

    def make(name: str) -> Hook:
        def fn(t: torch.Tensor, n: str) -> torch.Tensor:
            t = t.clone()
            t[0, dst] = donor_cache[name][src].to(t.dtype)
            return t

        return fn

    return model.forward(r_ids, hooks={n: make(n) for n in names})[0]


@dataclass(frozen=True)
class LensRow:
    layer: int
    token_id: int
    token: str
    prob: float


def logit_lens(model: Model, prompt: PromptLike, layer: int | None = None, k: int = 5,
               position: int = -1) -> list[list[LensRow]]:
    """Top-k next-token predictions read from the residual after each layer (or one layer).

    The residual after layer L is passed through the final norm and unembedding, as the model's
    own output head would read it; the last layer's row equals the model's real prediction.
    """
    layers = range(model.spec.num_layers) if layer is None else [layer]
    names = [f"blocks.{i}.hook_resid_post" for i in layers]
    _, cache = run_with_cache(model, prompt, names)
    out = []
    for i, name in zip(layers, names):
        probs = torch.softmax(model.unembed(cache[name][position][None]).double(), dim=-1)[0]
        top = torch.topk(probs, k)
        out.append([
            LensRow(i, int(t), model.tokenizer.decode([int(t)]) if model.tokenizer else str(int(t)), float(p))
            for p, t in zip(top.values, top.indices)
        ])
    return out
