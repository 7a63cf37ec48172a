"""Weight-level edits as new FFN neurons keyed on the subject: the default for subject keys.

MEMIT's update of down_proj (`memit_subject`) is linear in the FFN activations, so every token
whose keys overlap the edited subjects' picks up part of the edit. On SmolLM2-135M, 20 capital
edits written that way kept efficacy and locality but changed the greedy continuation of half
the generic prompts (stories, code, recipes): the overlap cannot be whitened away with the
statistics a local model can afford.

Here each fact gets one new neuron in the top edit layer L (the causal trace's choice):

1. δ, the residual change after layer L at the subject's last token that makes the model state
   the fact (`memit_subject.target_deltas`, unchanged);
2. the neuron's gate is a linear read-out of the FFN input x at L that is +1 at the subject's
   last token (the fact's prompt after the sampled generic prefixes, the prompt in the model's
   chat template, and the name after a few openers) and -1 on everything it must leave
   alone: every token of the model's own sampled generic text (`generic_text.corpus`), a
   thousand vocabulary words each opening a prompt (the first position is an outlier), the
   edited entities' nearest vocabulary names (`knowledge.neighbours`), the other tokens of the
   positive prompts and the batch's other subjects. Weighted ridge least squares, classes
   weighing alike. Scaled by `GATE_SCALE`, a negative read-out switches the neuron off
   (SiLU(-9) ≈ -1e-3);
3. up = the mean positive input over its squared norm (≈ 1 on the subject), down = δ divided by
   the neuron's activation on the fact's prompt.

Measured on SmolLM2-135M-Instruct through the product path (bench/edit.py --model, 20
counterfactual edits together, against the down_proj update it replaces): capitals, greedy
generic continuations unchanged 50 → 100 %, locality 97.4 → 100 %, held-out paraphrases the
model knew 82.8 → 81.0 %, perplexity −1.9 → ±0.0 %; official languages, fluency 50 → 100 %,
locality 86.7 → 100 %; identical after COMPILE in transformers (`knowledge.edit_record`).
Replacing 20 little-used neurons instead of adding them cost 10 % fluency, so the edit adds
neurons: COMPILE grows the FFN by their number (zero rows in the other layers).

A model that recalls at the prompt's last token instead (the causal trace's "last" key) gets the
same neurons keyed there when its layer is a mixture of experts (`last_token_neuron_edit`): a
down_proj update acts only through the experts a token routes to. In a mixture of experts the
neurons ride every routed expert, so the layer adds them times the chosen experts' summed weight.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import ChatTemplateError
from ..ffn.base import activation
from ..runtime.model import Model
from . import generic_text as G
from . import memit_sites as S
from .delta_ffn import DownDelta, routed_weight
from .edit_cache import base_ffn, stored, stored_path
from .edit_site import subject_span
from .memit_subject import SubjectRow, _multi, _rows, canonical_template, neighbour_rows, target_deltas
from .neighbours import neighbour_entities

GATE_SCALE = 30.0
GATE_RIDGE = 1e-3
# never the name alone: at a prompt's first position a δ does not carry (the attention sink; measured
# on SmolLM2: "France's capital city is" kept its answer with the gate fully on), while a gate
# trained to fire there fires on whatever word opens a prompt
MENTION_OPENERS = ("We talked about", "I read a book about", "Tell me about")


def supported(model: Model) -> bool:
    """Neurons need the gated FFN form (act(gate·x) ⊙ up·x) to compile into: a dense layer's, or
    every routed expert's of a mixture of experts (not Gemma 4's experts beside a dense FFN)."""
    moe = model.spec.moe
    return bool(model.spec.gated_ffn) and (moe is None or not moe.beside_dense)


def _inputs(model: Model, seqs: Sequence[Sequence[int]], layer: int) -> list[torch.Tensor]:
    name = f"blocks.{layer}.ln2.hook_normalized"
    return _multi(model, seqs, [name])[name]


FIRST_WORDS = 1000


def _stats_name(layer: int) -> str:
    return f"ninputs-{G.corpus_tag()}-w{FIRST_WORDS}-L{layer}"


def _first_words(model: Model, n: int) -> list[list[int]]:
    """`n` vocabulary words, each alone as a prompt (token ids). The first position's state is an
    outlier (the attention sink) that the sampled text holds only a couple of dozen of, so a gate
    fitted without them can fire on whatever word opens a prompt ("Water boils at")."""
    tok = model.tokenizer
    if n <= 0:
        return []
    step = max(1, tok.vocab_size // (8 * n))
    words, seen = [], set()
    for i in range(0, tok.vocab_size, step):
        w = tok.decode([i]).strip()
        if len(w) >= 3 and w.isalpha() and w.casefold() not in seen:
            seen.add(w.casefold())
            words.append(tok.encode(w))
            if len(words) == n:
                break
    return words


def generic_inputs(model: Model, layer: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(XᵀX, Σx, n) of layer `layer`'s FFN inputs over every token of the model's sampled generic
    text: all a gate's least squares needs of them. Base weights; cached in memory and on disk."""
    cache = model.__dict__.setdefault("_neuron_inputs", {})
    if layer not in cache:
        def compute() -> torch.Tensor:
            with base_ffn(model):
                x = torch.cat(_inputs(model, G.corpus(model), layer)).double()
                words = _first_words(model, FIRST_WORDS)
                if words:
                    x = torch.cat([x, torch.stack([w[-1] for w in _inputs(model, words, layer)]).double()])
            return torch.cat([x.T @ x, x.sum(0)[None], torch.full((1, x.shape[1]), float(len(x)))])

        cache[layer] = stored(model, _stats_name(layer), compute)
    t = cache[layer]
    h = t.shape[1]
    return t[:h], t[h], int(t[h + 1, 0])


def generic_ready(model: Model, layer: int) -> bool:
    return layer in model.__dict__.get("_neuron_inputs", {}) or stored_path(model, _stats_name(layer)).is_file()


def _positives(model: Model, requests, rows: list[SubjectRow], prefixes: Sequence[str]
               ) -> tuple[list[list[int]], list[int], list[int]]:
    """(token ids, subject's last position, fact) of every context whose subject must fire."""
    seqs, at, owner = [r.ids for r in rows], [r.subj for r in rows], [r.fact for r in rows]
    tok = model.tokenizer
    for i, r in enumerate(requests):
        texts = [f"{c} {r.entity}".strip() for c in (*prefixes, *MENTION_OPENERS)]
        if tok.has_chat_template:
            prompt = canonical_template(r.relation).replace("{X}", r.entity)
            try:
                texts.append(tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=False))
            except ChatTemplateError:  # a template that wants more than one user turn
                pass
        for t in texts:
            ids, _s, e = subject_span(model, t, r.entity)
            seqs.append(ids)
            at.append(e - 1)
            owner.append(i)
    return seqs, at, owner


def _gate(pos: torch.Tensor, gram: torch.Tensor, total: torch.Tensor, count: int) -> torch.Tensor:
    """Weighted ridge least squares g·x ≈ +1 on `pos`, -1 on the negatives given by their
    (XᵀX, Σx, n); the classes weigh alike."""
    w = count / len(pos)
    a = w * pos.T @ pos + gram
    a = a + GATE_RIDGE * a.diagonal().mean() * torch.eye(a.shape[0], dtype=a.dtype)
    return torch.linalg.solve(a, w * pos.sum(0) - total)


def neuron_edit(model: Model, requests, layers: Sequence[int], p,
                progress: Callable[[str, int, int], None] | None = None) -> list[DownDelta]:
    """One `DownDelta` of len(requests) new neurons at max(layers) stating every request."""
    report = progress or (lambda stage, i, n: None)
    top = max(layers)
    n = len(requests)
    prefixes = G.context_prefixes(model, p.contexts)
    rows = _rows(model, requests, prefixes)
    report("target", 0, 1)
    delta = target_deltas(model, requests, rows, top, p)  # [n, H]
    report("keys", 0, 1)
    seqs, at, owner = _positives(model, requests, rows, prefixes)
    xs = _inputs(model, seqs, top)
    pos = torch.stack([x[q] for x, q in zip(xs, at)]).double()
    own = torch.tensor(owner)
    around = [torch.cat([x[:q], x[q + 1:]]) for x, q in zip(xs, at)]
    gram, total, count = generic_inputs(model, top)
    nrows = neighbour_rows(model, requests, prefixes, p.neighbours)
    near = [x[r.subj][None] for x, r in zip(_inputs(model, [r.ids for r in nrows], top), nrows)]
    neg = torch.cat([*near, *around]).double()
    gram, total, count = gram + neg.T @ neg, total + neg.sum(0), count + len(neg)
    canon = {}
    for k, r in enumerate(rows):
        canon.setdefault(r.fact, k)  # the first row of a fact is its prompt alone
    return [_fit_neurons(model, top, requests, delta, pos, own, [canon[i] for i in range(n)], (gram, total, count), report)]


def _fit_neurons(model: Model, layer: int, requests, delta: torch.Tensor, pos: torch.Tensor, own: torch.Tensor,
                 canon: Sequence[int], negatives: tuple[torch.Tensor, torch.Tensor, int], report) -> DownDelta:
    """One neuron per row of δ [k, H]: its gate reads +1 on its positives (`pos` rows owned by
    it), -1 on the `negatives` (XᵀX, Σx, n) and on the other neurons' positives; its down column
    writes δ at the positive `canon[i]` (through the summed routing weight there, in a MoE layer,
    as every routed expert carries the neuron)."""
    gram, total, count = negatives
    act = activation(model.spec.activation)
    gates, ups, downs = [], [], []
    for i in range(len(delta)):
        report("neurons", i, len(delta))
        mine, rest = pos[own == i], pos[own != i]
        g = _gate(mine, gram + rest.T @ rest, total + rest.sum(0), count + len(rest))
        m = mine.mean(0)
        u = m / (m @ m)
        x0 = pos[canon[i]]
        a = act(torch.tensor(GATE_SCALE * float(x0 @ g))) * float(x0 @ u)
        w = routed_weight(model.ffn, layer, x0.float()[None])
        gates.append(GATE_SCALE * g)
        ups.append(u)
        downs.append(delta[i].double() / (float(a) * (1.0 if w is None else float(w))))
    return DownDelta(layer, torch.stack(downs).T.float().contiguous(), None, tuple(requests),
                     gate=torch.stack(gates).float(), up=torch.stack(ups).float())


def last_token_neuron_edit(model: Model, requests, layers: Sequence[int], p,
                           progress: Callable[[str, int, int], None] | None = None) -> list[DownDelta]:
    """Neurons keyed on the prompt's last token, for models that recall there (the causal trace's
    "last" key): one per edit site (`memit_sites.EditSites`: a fact's first target token after
    each phrasing, a later token after the phrasing and the tokens before it). The gate fires on
    the site's phrasings' last token and reads -1 on generic text, on the same phrasings of the
    edited entities' nearest vocabulary names (what locality measures: their prompts end alike),
    on the phrasings' other tokens and on the other sites."""
    report = progress or (lambda stage, i, n: None)
    top = max(layers)
    templates = {r: S.with_contexts(S.relation_templates(r.relation), S.context_prefixes(p.context_prefixes))
                 for r in requests}
    sites = S.edit_sites(model, requests, templates)
    report("target", 0, 1)
    delta = S.target_deltas(model, requests, sites, top, p)  # [δs, H]
    report("keys", 0, 1)
    xs = _inputs(model, sites.seqs, top)
    pos = torch.stack([x[-1] for x in xs]).double()
    around = [x[:-1] for x in xs]
    names = neighbour_entities(model, [r.entity for r in requests], p.neighbours) if p.neighbours else []
    near_ids = [S._prompt_ids(model, t, x) for r in {r.relation: r for r in requests}.values()
                for t in S.relation_templates(r.relation) for x in names]
    near = [x[-1:] for x in _inputs(model, near_ids, top)] if near_ids else []
    neg = torch.cat([*near, *around]).double()
    gram, total, count = generic_inputs(model, top)
    canon = [sites.owner.index(o) for o in range(len(sites.want))]  # each site's first phrasing
    return [_fit_neurons(model, top, requests, delta, pos, sites.rows, canon,
                     (gram + neg.T @ neg, total + neg.sum(0), count + len(neg)), report)]
