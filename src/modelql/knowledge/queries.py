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
from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import CapabilityError, EmptyPromptError, ModelqlError

#: Neutral contexts of the residual mode, captured at the entity's last token: "{X}" (sentence
#: start, after BOS) and "about {X}" (mid-sentence, with the tokenizer's leading-space form).
DEFAULT_CONTEXTS: tuple[str, ...] = ("{X}", "about {X}")

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

    @property
    def x(self) -> dict[int, torch.Tensor]:
        """layer → mean x_L over the contexts [H]."""
        return {L: v.mean(dim=0) for L, v in self.per_context.items()}

    @property
    def act(self) -> dict[int, torch.Tensor]:
        """layer → mean FFN activation over the contexts [F]."""
        return {L: v.mean(dim=0) for L, v in self.per_context_act.items()}


def residual_query(vindex, entity: str, model=None, contexts: Sequence[str] | None = None,
                   layers: Sequence[int] | None = None, with_logits: bool = False) -> ResidualQuery | None:
    """Run `entity` through `contexts` and capture `x_L` and the FFN activations at the last
    token of each context (`{X}` is replaced by the entity; the default contexts end with it).
    `with_logits` also keeps each context's next-token logits and final residual (what the
    relation decode of DESCRIBE reads and attributes, `knowledge.decode`).

    Returns None when the entity tokenises to nothing.
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
    # one forward pass per token length (the runtime batches equal-length rows without padding)
    by_len: dict[int, list[int]] = {}
    for i, (_c, ids) in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    xs: dict[int, list] = {L: [None] * len(encoded) for L in wanted}
    acts: dict[int, list] = {L: [None] * len(encoded) for L in wanted}
    logits: list = [None] * len(encoded)
    finals: list = [None] * len(encoded)
    for idxs in by_len.values():
        cache: dict[str, torch.Tensor] = {}

        def grab(t: torch.Tensor, n: str, _cache=cache) -> None:
            _cache[n] = t[:, -1].detach().float().clone()

        out = m.forward(torch.tensor([encoded[i][1] for i in idxs]), hooks={n: grab for n in names},
                        logits="last" if with_logits else "none")
        for row, i in enumerate(idxs):
            if with_logits:
                logits[i] = out[row].detach().float()
                finals[i] = cache[final_name][row]
            for L in wanted:
                xs[L][i] = cache[f"blocks.{L}.ln2.hook_normalized"][row]
                acts[L][i] = cache[f"blocks.{L}.mlp.hook_post"][row]
    used = [c for c, _ids in encoded]
    return ResidualQuery(
        entity=entity, contexts=tuple(used),
        per_context={L: torch.stack(v) for L, v in xs.items()},
        per_context_act={L: torch.stack(v) for L, v in acts.items()},
        logits=torch.stack(logits) if with_logits else None,
        final=torch.stack(finals) if with_logits else None,
    )
