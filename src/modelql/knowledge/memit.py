"""Weight-level knowledge edits of the down projection, MEMIT style (Meng et al., 2022).

A fact (entity, relation, target) is stored by the FFN as a key → value pair: the key is the FFN
activation `h` (input of `down_proj`) at the key position, the value is what `down_proj`
writes into the residual there. The key position is the prompt's last token, not MEMIT's
original choice (the entity's last token): on the embedded 4-layer model a shift of the
subject's state barely reaches the prediction, a shift at the last token always does
(measurements in `knowledge.edit`'s docstring). An edit at the last layer's last position
cannot reach the tokens generated after it, so a target of n tokens is n key → value pairs:
after the phrasing, the target's first token; after the phrasing and the target's first j
tokens, token j (`EditSites`). Editing a fact means finding, for each of them,

1. a target residual `z` at the last edited layer L: the current residual at the key position
   plus a vector δ optimised (through the real forward pass) so the model predicts the
   token after every phrasing of the relation, with a bound on ‖δ‖ (stopping early once every
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

ΔW_l = u vᵀ with u = R [H, k] and v = (λC + μP + KKᵀ)⁻¹ K [F, k] (k = target tokens × phrasings) is
stored low-rank (`DownDelta`), so a batch is a rank-k patch per layer that the overlay adds at
run time and COMPILE bakes into `down_proj`. C_l and P_l depend only on the base weights: they
are cached in memory and in $MODELQL_CACHE/memit/ (keyed by a hash of the weights), so only the
first weight-level INSERT on a model pays for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import CapabilityError, ModelqlError
from ..ffn.moe import find_moe
from ..runtime.interp import batch_activations
from ..runtime.model import Model
from .delta_ffn import DeltaFfn, DownDelta, EditRequest
from .edit_cache import base_ffn as _base_ffn
from .edit_cache import stored as _stored
from .edit_cache import stored_path as _stored_path
from . import memit_neurons
from .memit_sites import (EditSites, _at, _prompt_ids, context_prefixes, edit_sites, relation_templates,
                          target_deltas, with_contexts)
from .memit_subject import generic_covariance, generic_ready, subject_edit


@dataclass(frozen=True)
class MemitParams:
    """Hyper-parameters. `None` fields take the default of the edit site's key position
    (`KEY_DEFAULTS`): the last-token values were chosen by the editing benchmark on the embedded
    model, the subject values by the same benchmark on SmolLM2-135M-Instruct (bench/edit.py)."""

    layers: tuple[int, ...] | None = None  # None: the layers the causal trace chose (`edit_site`)
    key: str | None = None  # "subject" | "last"; None: the causal trace's choice
    steps: int | None = None
    stop_prob: float | None = None  # stop optimising δ once every row predicts its token(s) with at least this probability
    lr: float | None = None  # Adam step size as a fraction of the mean residual norm ‖h_L‖
    kl_weight: float | None = None  # ROME's essence-drift KL; off for last-token keys
    weight_decay: float | None = None
    clamp_norm: float | None = None  # ‖δ‖ ≤ clamp_norm · ‖h_L‖
    mom2_weight: float | None = None  # λ
    cov_sentences: int = 4000
    preserve_weight: float | None = None  # μ: weight of the known facts' keys (preservation_moment; last-token keys)
    exact: bool | None = None  # solve ΔW K = R exactly (min-norm under λC + μP, subject keys: under C) instead of the ridge form
    per_phrasing: bool = True  # one key per (fact, phrasing) instead of the mean key per fact
    context_prefixes: int = 0  # also every phrasing after this many generic sentences (ROME's contexts)
    context_in_delta: bool = True  # the prefixed phrasings are in δ's loss too (else only key columns)
    context_in_preserve: bool = True  # the known facts' keys are taken after the same prefixes too
    rounds: int | None = None  # re-solve, from the edited model, the requests whose phrasings do not all predict the target yet
    contexts: int | None = None  # subject keys: sampled generic prefixes per prompt (MEMIT's context templates)
    # refuse a batch changing more than this share of the guard prompts' continuations (≥ 1: off);
    # None: $MODELQL_EDIT_FLUENCY_BOUND, else the key's default: FLUENCY_BOUND for subject keys, off
    # for last-token keys (the embedded model, trained on the facts table only, continues any text
    # with facts, which an edit rightly changes: 5 of the 8 guard prompts after its 2-fact test batch)
    fluency_bound: float | None = None
    neighbours: int | None = None  # nearest vocabulary names whose keys are preserved (`knowledge.neighbours`); not by the last-token update
    neighbour_weight: float | None = None  # μ of their E[k kᵀ] beside the generic C
    cov_ridge: float | None = None  # exact solve: C + ridge · mean(diag C) · I
    # "neurons" (new gated neurons, `memit_neurons`) | "update" (ΔW_down) | "auto": neurons, except the
    # last-token update on a dense layer (its statistics are the embedded facts table's, which it was tuned on)
    solver: str | None = None

    def resolved(self, key: str) -> MemitParams:
        import dataclasses

        import os

        d = dict(KEY_DEFAULTS[key])
        if self.fluency_bound is None and os.environ.get("MODELQL_EDIT_FLUENCY_BOUND"):
            try:
                d["fluency_bound"] = float(os.environ["MODELQL_EDIT_FLUENCY_BOUND"])
            except ValueError:
                raise ModelqlError("MODELQL_EDIT_FLUENCY_BOUND must be a number (a share, e.g. 0.25)") from None
        return dataclasses.replace(self, key=key, **{k: v for k, v in d.items() if getattr(self, k) is None})



FLUENCY_BOUND = 0.25
KEY_DEFAULTS: dict[str, dict] = {
    "last": dict(contexts=0, steps=30, stop_prob=0.99, lr=0.1, kl_weight=0.0, weight_decay=1e-3, clamp_norm=4.0,
                 mom2_weight=1000.0, preserve_weight=25000.0, rounds=3, fluency_bound=1.0, exact=False,
                 neighbours=100, neighbour_weight=0.0, cov_ridge=1e-4, solver="auto"),
    "subject": dict(steps=20, stop_prob=0.9, lr=0.1, kl_weight=0.0625, weight_decay=0.5, clamp_norm=1.0,
                    mom2_weight=15000.0, preserve_weight=0.0, rounds=1, fluency_bound=FLUENCY_BOUND, exact=True,
                    contexts=2, neighbours=100, neighbour_weight=10.0, cov_ridge=1e-2, solver="neurons"),
}


def default_layers(model: Model) -> tuple[int, ...]:
    """Edit layers: the last layer, whose FFN input at the last token already holds the answer
    the model is about to give. Paraphrases the model answers alike share that key (the edit
    generalises to them) while other entities' prompts, about to give other answers, do not
    (locality); on the embedded model this beat the middle layer on both (knowledge/edit.py has
    the measurements)."""
    return (model.spec.num_layers - 1,)


def _cov_name(layer: int, n: int) -> str:
    return f"cov-L{layer}-n{n}"


def _preserve_name(layer: int, n_prefixes: int) -> str:
    return f"preserve-last-L{layer}" + (f"-c{n_prefixes}" if n_prefixes else "")


WARMUP_PROMPTS = tuple((f"The capital of {x} is", x) for x in ("France", "Japan", "Canada", "Italy", "Egypt", "Peru"))


def site_for(model: Model, requests: Sequence[EditRequest] = (), layers: Sequence[int] | None = None,
             params: MemitParams | None = None) -> tuple[str, tuple[int, ...]]:
    """(key position, layers) of an edit: explicit layers/key win; else the model's causal trace
    (`edit_site`, measured once per model over the first edit's own prompts; `WARMUP_PROMPTS`
    when statistics are prepared before any edit)."""
    from .edit_site import edit_site

    p = params or MemitParams()
    explicit = tuple(layers or p.layers or ())
    if explicit and p.key:
        return p.key, explicit
    prompts = [(canonical_text(r.relation, r.entity), r.entity) for r in requests] or list(WARMUP_PROMPTS)
    site = edit_site(model, prompts)
    return (p.key or site.key), (explicit or site.layers)


def canonical_text(relation: str, entity: str) -> str:
    return "The " + relation.replace("-", " ").replace("_", " ") + " of " + entity + " is"


def statistics_ready(model: Model, layers: Sequence[int] | None = None, params: MemitParams | None = None) -> bool:
    """Whether an edit finds its base-weight statistics (and the model's traced edit site)
    cached in memory or on disk; if not, the model's first edit computes them, which takes a
    while (`prepare_statistics`)."""
    from .edit_site import site_cached

    p = params or MemitParams()
    if not (layers or p.layers) and not site_cached(model):
        return False
    key, layers = site_for(model, (), layers, p)
    if _neurons(model, p.resolved(key)):
        return memit_neurons.generic_ready(model, max(layers))
    if key == "subject":
        return generic_ready(model, layers)
    n_pre = p.context_prefixes if p.context_in_preserve else 0
    mem_c, mem_p = model.__dict__.get("_memit_covariance", {}), model.__dict__.get("_memit_preserve", {})
    return all(((l, p.cov_sentences) in mem_c or _stored_path(model, _cov_name(l, p.cov_sentences)).is_file())
               and ((l, n_pre) in mem_p or _stored_path(model, _preserve_name(l, n_pre)).is_file())
               for l in layers)


def prepare_statistics(model: Model, layers: Sequence[int] | None = None, params: MemitParams | None = None,
                       requests: Sequence[EditRequest] = ()) -> None:
    """Compute (or load) the edit site and the statistics an edit needs, so that a caller can
    show progress around the one slow step of a model's first edit."""

    p = params or MemitParams()
    key, layers = site_for(model, requests, layers, p)
    if _neurons(model, p.resolved(key)):
        memit_neurons.generic_inputs(model, max(layers))
        return
    if key == "subject":
        generic_covariance(model, layers)
        return
    prefixes = context_prefixes(p.context_prefixes) if p.context_in_preserve else ()
    for l in layers:
        covariance(model, l, p.cov_sentences)
        preservation_moment(model, l, prefixes)


def covariance(model: Model, layer: int, n: int) -> torch.Tensor:
    """E[h hᵀ] of layer `layer`'s FFN activations over the facts' training sentences.

    Cached on the model and on disk: it depends only on the base weights, not on the edits.
    """
    cache = model.__dict__.setdefault("_memit_covariance", {})
    if (layer, n) not in cache:
        def compute() -> torch.Tensor:
            with _base_ffn(model):
                return _covariance(model, layer, n)

        cache[(layer, n)] = _stored(model, _cov_name(layer, n), compute)
    return cache[(layer, n)]


def _covariance(model: Model, layer: int, n: int) -> torch.Tensor:
    from ..defaults import TRAIN_TEMPLATES, facts, sentence

    sents = []
    for i, f in enumerate(facts()):
        tpl = TRAIN_TEMPLATES[f.relation][i % len(TRAIN_TEMPLATES[f.relation])]
        sents.append(model.tokenizer.encode(sentence(tpl, f.entity, f.target)))
    hs = torch.cat(batch_activations(model, sents[:n], f"blocks.{layer}.mlp.hook_post")).double()
    return (hs.T @ hs / hs.shape[0]).float()


def _preservation_rows(model: Model, pairs, prefixes: Sequence[str] = ()) -> list[list[int]]:
    """Token ids whose last position's key an edit must leave alone: each (entity, relation)
    of the facts table in every training phrasing but the first. (Adding the positions inside
    the pairs' multi-token answers, which continuation keys resemble, measured worse: 11 against
    8 locality misses at 100 edits.)"""
    from ..defaults import TRAIN_TEMPLATES

    return [_prompt_ids(model, tpl, e) for e, r in pairs
            for tpl in with_contexts(TRAIN_TEMPLATES.get(r, ())[1:], prefixes)]


def _width(model: Model, layer: int) -> int:
    """Features of a layer's keys: an MoE layer's are all its experts' (`MoeFfn.num_features`)."""
    if not model.spec.experts_are_features:
        return model.spec.intermediate_size
    return find_moe(model.ffn).num_features(layer)


def _keys_of(model: Model, layer: int, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
    if not seqs:
        return torch.zeros(0, _width(model, layer))
    return torch.stack([a[-1] for a in batch_activations(model, seqs, f"blocks.{layer}.mlp.hook_post", chunk=256)])


def preservation_moment(model: Model, layer: int, prefixes: Sequence[str] = ()) -> tuple[torch.Tensor, int]:
    """(Σ k kᵀ, count) over the keys the edit must leave alone (`_preservation_rows`: every
    (entity, relation) of the embedded facts table in every training phrasing but the first).
    The first is the canonical prompt the benchmark measures locality on, so locality is
    measured on a phrasing outside this set. Cached (memory, disk)."""
    cache = model.__dict__.setdefault("_memit_preserve", {})
    key = (layer, len(prefixes))
    if key not in cache:
        def compute() -> torch.Tensor:
            from ..defaults import facts

            rows = _preservation_rows(model, sorted({(f.entity, f.relation) for f in facts()}), prefixes)
            with _base_ffn(model):
                k = _keys_of(model, layer, rows).double()
            return torch.cat([(k.T @ k).flatten(), torch.tensor([float(k.shape[0])], dtype=torch.float64)])

        flat = _stored(model, _preserve_name(layer, len(prefixes)), compute)
        f = _width(model, layer)
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
        k = _keys_of(model, layer, _preservation_rows(model, edited, prefixes)).double()
    return (total - k.T @ k) / max(1, n - k.shape[0])


def _solve_round(model: Model, work: DeltaFfn, requests: Sequence[EditRequest], layers: Sequence[int],
                 sites: EditSites, keyed: EditSites, prefixes, p: MemitParams) -> list[DownDelta]:
    """One MEMIT pass over the δs of `sites` (δ's loss rows) / `keyed` (their key rows) on the
    model as `work` currently edits it: δ at the last edited layer, then each layer's
    least-squares update (added to `work` as it is solved)."""
    resid_name = f"blocks.{max(layers)}.hook_resid_post"
    delta = target_deltas(model, requests, sites, max(layers), p)
    at = lambda nm: _at(model, keyed, nm, p.per_phrasing)  # noqa: E731
    cur = at(resid_name)
    z = cur + (delta[keyed.rows] if p.per_phrasing else delta)
    out: list[DownDelta] = []
    for i, layer in enumerate(sorted(layers)):
        if i:
            cur = at(resid_name)  # the layers solved so far moved it
        resid = (z - cur) / (len(layers) - i)  # [k, H]
        keys = at(f"blocks.{layer}.mlp.hook_post")  # [k, F]
        cov = covariance(model, layer, p.cov_sentences)
        a = p.mom2_weight * cov.double() + keys.double().T @ keys.double()
        if p.preserve_weight:
            a = a + p.preserve_weight * _preservation_term(
                model, layer, requests, prefixes if p.context_in_preserve else ())
        if p.exact:
            # minimum-‖ΔW‖_A update that writes every edit key's residual exactly
            # (ΔW K = R): v = A⁻¹K (Kᵀ A⁻¹ K)⁻¹, A = λC + μP without the KKᵀ term
            a = a - keys.double().T @ keys.double()
            ak = torch.linalg.solve(a, keys.double().T)  # [F, k]
            g = keys.double() @ ak
            g = g + 1e-6 * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
            v = torch.linalg.solve(g, ak.T).T.float()  # [F, k]
        else:
            v = torch.linalg.solve(a, keys.double().T).float()  # [F, k]
        d = DownDelta(layer, resid.T.contiguous(), v, tuple(requests))
        work.add(d)
        out.append(d)
    return out
def memit_edit(model: Model, requests: Sequence[EditRequest], layers: Sequence[int] | None = None,
               params: MemitParams | None = None, progress: Callable[[str, int, int], None] | None = None,
               ) -> list[DownDelta]:
    """Low-rank down_proj deltas (one per edited layer) that make the model state every request.

    Up to `rounds` passes, each from the model as the passes before it edited it. The first
    writes every target's first token, and the later target tokens the unedited model does not
    complete (teacher-forced: most it does, a known capital's second token after its first, and
    every key written costs locality), except the `conflicting` ones. Later passes re-write
    the first tokens some phrasing still gets wrong (the preservation term shrinks an update, so
    one pass can leave a fact short: a single France → Madrid), and, for a single fact, its later
    tokens too ("Rio de Janeiro" needs them). Re-writing later tokens in a batch broke 100-edit
    batches (efficacy 58–84%, locality 35–68% over the variants measured). The passes' updates
    are summed into one rank-k delta per layer.

    The model is left as it was: deltas are computed with a temporary `DeltaFfn` on top of the
    installed backend, so edits already in the overlay are respected.
    """
    if not requests:
        return []
    if model.tokenizer is None:
        raise CapabilityError("weight-level edits need the model's tokenizer")
    p = params or MemitParams()
    key, layers = site_for(model, requests, layers, p)
    p = p.resolved(key)
    if any(not 0 <= l < model.spec.num_layers for l in layers):
        raise ModelqlError(f"edit layers {layers} are outside 0..{model.spec.num_layers - 1}")
    if key == "subject":
        solve = memit_neurons.neuron_edit if _neurons(model, p) else subject_edit
        return fluency_guard(model, solve(model, requests, layers, p, progress), p.fluency_bound)
    if _neurons(model, p):
        deltas = memit_neurons.last_token_neuron_edit(model, requests, layers, p, progress)
        return fluency_guard(model, deltas, p.fluency_bound)
    prefixes = context_prefixes(p.context_prefixes)
    key_templates = {r: with_contexts(relation_templates(r.relation), prefixes) for r in requests}
    templates = key_templates if p.context_in_delta else {r: relation_templates(r.relation) for r in requests}
    report = progress or (lambda stage, i, n: None)

    saved = model.ffn
    work = DeltaFfn(saved)
    model.ffn = work
    parts: list[DownDelta] = []
    try:
        sites, keyed = edit_sites(model, requests, templates), edit_sites(model, requests, key_templates)
        firsts = {o for o, first in enumerate(sites.first) if first}
        # later passes: first tokens, and later tokens only for a single fact (see the docstring)
        again = set(range(len(sites.want))) if len(requests) == 1 else firsts
        todo = firsts | (keyed.unmet(model) - sites.conflicting())
        for i in range(max(1, p.rounds)):
            report("rounds", i, p.rounds)
            parts += _solve_round(model, work, requests, layers, sites.subset(todo), keyed.subset(todo), prefixes, p)
            unmet = keyed.unmet(model) & again if i + 1 < p.rounds else set()
            # every δ of a fact not yet met, the met ones too: they hold the fact's other keys in place
            todo = {o for o in again if keyed.fact[o] in {keyed.fact[u] for u in unmet}}
            if not todo:
                break
    finally:
        model.ffn = saved
    return fluency_guard(model, [DownDelta(l, torch.cat([d.u for d in ds], 1), torch.cat([d.v for d in ds], 1),
                                           tuple(requests))
                                 for l in sorted({d.layer for d in parts})
                                 for ds in [[d for d in parts if d.layer == l]]], p.fluency_bound)


def _neurons(model: Model, p: MemitParams) -> bool:
    """Does the edit add neurons (`memit_neurons`) rather than update down_proj? "auto" adds them
    except at the last token of a dense layer: a ΔW on a mixture of experts' concatenated down
    columns acts only through the experts a token routes to (on a tiny trained Mixtral it stated
    the edit but broke the other capitals), while the dense last-token update keeps the embedded
    model's measured figures."""
    if p.solver not in ("neurons", "update", "auto"):
        raise ModelqlError(f"unknown solver {p.solver!r} (neurons, update or auto)")
    if p.solver == "update" or not memit_neurons.supported(model):
        return False
    return p.solver == "neurons" or p.key == "subject" or model.spec.experts_are_features


class FluencyGuardError(ModelqlError):
    """A weight-level edit batch would change the model's continuations of generic text beyond
    the bound: reported, not applied."""

    def __init__(self, changed: int, total: int, bound: float, examples: Sequence[tuple[str, str, str]]):
        self.changed, self.total, self.bound, self.examples = changed, total, bound, tuple(examples)
        ex = "; ".join(f"{p!r}: {a!r} → {b!r}" for p, a, b in self.examples[:2])
        super().__init__(f"edit not applied: it changes the greedy continuation of {changed} of {total} generic "
                         f"prompts (bound {bound:.0%}; raise it with fluency_bound): {ex}")


def fluency_guard(model: Model, deltas: list[DownDelta], bound: float) -> list[DownDelta]:
    """`deltas` if, installed on the model as it is, they change the first `GUARD_TOKENS` greedy
    tokens of at most `bound` of the guard prompts (`generic_text.GUARD_PROMPTS`: stories, code,
    recipes); else `FluencyGuardError`. A bound ≥ 1 switches the guard off."""
    if bound >= 1 or not deltas:
        return deltas
    from .generic_text import GUARD_PROMPTS, greedy

    before = greedy(model)
    saved = model.ffn
    model.ffn = DeltaFfn(saved, deltas)
    try:
        after = greedy(model)
    finally:
        model.ffn = saved
    diff = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    if len(diff) > bound * len(before):
        dec = model.tokenizer.decode
        raise FluencyGuardError(len(diff), len(before), bound,
                                [(GUARD_PROMPTS[i], dec(before[i]), dec(after[i])) for i in diff])
    return deltas
