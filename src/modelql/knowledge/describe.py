"""DESCRIBE: what the model knows about an entity, as labelled edges (algorithms §5).

Two query modes:

* ``"embedding"`` — the reference's: the entity's mean scaled token embedding is compared with
  the gates of every scanned layer. With ``threshold=5.0`` (``REFERENCE_THRESHOLD``) and the
  default token filters this is LARQL's pipeline, for parity checks.
* ``"residual"`` — modelql's, the default when the vindex has weights: the entity is run through
  short contexts, each layer's FFN input `x_L` and activations captured at the context's last
  token (§15.2). Two kinds of contexts, two kinds of edges:

  - **relation probes** (a probe-labelled vindex: one per labelled relation, its probe template,
    e.g. "The capital of {X} is") give the *labelled claims*: the relation's answer is decoded
    from the residual at the probe's last position (final norm + unembedding: everything the
    entity's features and attention wrote), grown into the phrase the model goes on writing
    ("Mexico City"), and attributed to the features whose writes contribute most to its logit
    (`knowledge.decode`: why the residual and not one feature's static token). Such an edge is
    `decoded`, its source "probe"; a multi-valued relation (≥ 1.25 objects per subject in the
    labelling triples) claims every answer within ln 2 of the top one. Decoded claims come first
    in `edges`.
  - **neutral contexts** (`queries.DEFAULT_CONTEXTS`: "{X}", "about {X}") give per-feature edges
    as before: features ranked by their activation `act(g·x)·(u·x)` (the sign the up projection
    gives it, §15.3), named by their static down_meta top token; several contexts are combined
    per feature by their maximum (`combine="max"`). Such an edge keeps no label of a relation
    that was decoded (its static token names what the feature promotes for every input, not
    what this entity's context writes); one naming a claimed target is dropped for the claim.

Calibrated claims (a vindex labelled with a calibration, `knowledge.calibrate`): the probes are
the one template per relation the labeller chose by measured accuracy on this model (relations it
cannot answer are not probed, nor those whose confident claims on the calibration subjects were
mostly wrong: `Calibration.probed`; on SmolLM2-135M subregion and currency, 27 % and 22 % right),
and every claim carries `confidence` (its answer's probability)
and `confident` (the entity's familiarity and the probability clear the floors measured on
made-up names at labelling time). An entity below the familiarity floor ("asdfgh", "Frnace")
gets no confident claim, signal "unknown" and a one-line `note`; a lower-case or misspelt name of
a labelling subject gets a `suggestion`. Per-feature edges that carry a (cluster) label are
marked not confident: a feature's label names what it promotes for every input, not a claim about
this entity. Why: a probe template decodes to *some* answer for any string (the embedded model
gave "asdfgh" the capital Harare with signal "clean").

Overlay facts: on an overlay view, the facts its patches insert (any mode: feature, KNN,
weight-level MEMIT edits; `vindex.patch_facts`) come first, source "patch" and `patch` naming
the patch; a decoded claim of the same relation gives way to them, and a deleted fact is gone.

Thresholds (``threshold=None``, the default) are scale-free (§15.1): each candidate is scored by
its z-score within its own layer, `z = (s_f − mean(s)) / std(s)` over *all* F features of the
layer for this query (s = gate scores in embedding mode, activations in residual mode), and
must reach `z ≥ DEFAULT_MIN_Z`. z-scores do not depend on embedding scale or gate norms, so a
model whose raw scores never reach 5.0 (small embedding norms: Llama/Mistral, or the embedded
default model, where |g·q| < 1) still shows its edges. A numeric ``threshold`` switches to the
reference's absolute signed gate score.

Measured on the embedded default model (the 80-epoch retrain; ``python bench/describe.py
--sample 60``, its 60-country sample, and ``--modes residual/z`` over all 244 countries;
precision / recall of labelled edges; latency p50 per DESCRIBE, one torch thread, shared CPU):

=========  ==============  =======================  ======================  =====================
relation   embedding, 5.0  residual, static labels  residual, decoded       decoded, all 244
                           (before, 60)             claims (now, 60)        countries
=========  ==============  =======================  ======================  =====================
capital    — / 0 %         2.8 / 15.3 %             94.9 / 94.9 %           98.8 / 98.4 %
continent  — / 0 %         14.8 / 75.0 %            100 / 100 %             100 / 100 %
subregion  — / 0 %         8.4 / 58.3 %             100 / 100 %             100 / 100 %
language   — / 0 %         10.5 / 48.3 %            97.1 / 79.3 %           95.5 / 81.8 %
currency   — / 0 %         3.1 / 22.0 %             96.7 / 98.3 %           96.3 / 96.7 %
demonym    — / 0 %         2.3 / 10.3 %             96.7 / 100 %            95.9 / 100 %
borders    — / 0 %         6.3 / 20.5 %             67.2 / 54.8 %           69.8 / 51.1 %
all        — / 0 %         6.9 / 34.0 %             90.1 / 83.4 %           91.0 / 82.1 %
latency    2–6 ms          ≈ 110 ms                 ≈ 70–270 ms (load)      69 ms
=========  ==============  =======================  ======================  =====================

The current embedded model (10 phrasings, reworded training sentences), all 244 countries
(``python bench/describe.py --threads 1 --modes residual/z``): capital 99.2 / 98.8 %, continent and
subregion 100 / 100 %, language 95.6 / 77.4 %, currency 93.9 / 94.2 %, demonym 95.9 / 100 %, borders
67.2 / 54.6 %, all 89.5 / 82.3 %, p50 53 ms.
Calibrated (confident claims only, against the facts the model answers right; ``python
bench/describe.py --vindex V --calibrated``, floors per relation, 120 negatives): capital
99.2 / 98.8 %, continent and subregion 100 / 100 %, language 94.2 / 96.6 %, currency 94.2 / 96.6 %
(0 % recall when one made-up name set its floor), demonym 100 / 97.0 %, borders 34.1 / 98.2 % (a
multi-valued relation: the greedy continuation names one or two neighbours, DESCRIBE claims more);
20 made-up names → 0 confident claims.

SmolLM2-135M-Instruct Q4_1 (a real pretrained model; ``python bench/describe.py --vindex V
--calibrated --relations capital`` on its inference-level vindex labelled with the embedded facts):
the model's greedy plain-template continuation names the capital of 60 of 243 countries; over
those 60, DESCRIBE's confident capital claims are 90.9 % precise with 83.3 % recall (55 claims);
20 made-up names (not the calibration's) → 0 confident claims; "asdfgh", "Frnace", "france",
"Germny" → none, with a one-line note and the suggestion. (Over all 215 entities with some right
answer, without the restriction: 34.5 % / 83.3 %: it also claims capitals the plain template
gets wrong.) Labels checked causally (`modelql label`, a right prediction crediting the late
features that write the answer): 58 / 78 pass on SmolLM2-135M (74.4 %; 25 / 41 = 61.0 % when the
strongest activation was credited), 306 / 403 on the embedded model (75.9 %; was 72.0 %).
On the previous (54-epoch) model the same code measured capital 89.8 / 89.8 % (60) and
92.1 / 90.9 % (244), all relations 82.7 / 81.9 % (60), against 1.1 / 6.8 % and 6.4 / 26.5 % for
the static labels.

Cost: one padded forward pass runs every context (the 2 neutral ones and one probe per calibrated
relation), then one batched single-token pass per token of the longest answer phrase. Each
probe's entity-independent head (a two-shot prompt's examples: ≈ 20 of its ≈ 25 tokens on
SmolLM2-135M) is run once per model and its KV state reused (`knowledge.prefix_cache`, exact: the
reused positions are the common prefix of the ids), so the first pass runs ≈ 6 tokens per context
instead of ≈ 25; the claims' attributions share one pass over the down matrices
(`decode.attribute_many`); a phrase stops at its relation's answer length measured at labelling
(`calibrate.answer_lengths`); a packed pass's sequences attend in one block-masked call
(`Model.forward_packed`). Measured on SmolLM2-135M-Instruct Q4_1 (``python bench/describe.py
--vindex V --calibrated --latency 15 --threads 1``): 3 passes and 40 token rows per DESCRIBE at
p50 (5 relations probed), 795 ms of process CPU at one thread (was 1,169 ms: 7 relations, 59 rows,
one attention call per sequence per layer); at two threads 578 ms wall (load 3.5 on 2 cores).
What is left is the f32 matmuls: each pass streams the 425 MB of weights (≈ 75 ms at one
thread) and each token row costs ≈ 5 ms — the 300 ms target needs fewer bytes per pass (the
GGUF's low-bit kernels with DESCRIBE's hooks), not fewer Python steps.

The static-label column is the previous residual mode (each edge's target = its feature's
down_meta top token, label = the feature's probe label): FFN features are polysemantic (a
"capital" feature promotes the capitals of a whole region), so precision stays < 15 %.
``--shares`` shows who writes the answer: on the 54-epoch model the FFNs wrote 56–73 % of the
answer's logit and their write alone decoded to a true capital for only 56 % of countries (90 %
for the whole residual: attention, copying from the entity, picked the country out of the
region); on the 80-epoch model the FFNs write 76–88 % and their write alone is nearly as good
(capital 96.6 % either way). Decoding the whole residual and attributing it to features holds
on both. With static edges only, z ∈ [2, 4] changed recall by < 1 point and z = 6 lost 4
points: 4.0 is the default for per-feature edges; claims are not thresholded (the decode's top
answer is the claim; neither its logit z nor its probability separated right from wrong
answers on the 54-epoch model).

Per-feature edges are aggregated by target token (lowercase), labelled (probe label, else
cluster label); all edges are sorted claims first, then by gate (descending), and bucketed into
the band sections of their best layer.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

import torch

from ..errors import DescribeError
from .decode import Claim, decode_claims
from .labels import FeatureLabels, calibration_for, labels_for, relation_cardinality
from .queries import entity_vector, model_for, residual_query
from .rows import DescribeResult, Edge
from .tokens import content, readable, same_token

#: LARQL's absolute gate threshold (signed `g·q`), kept for parity (``threshold=5.0``).
REFERENCE_THRESHOLD = 5.0
#: Hits per layer (the reference's walk K).
DEFAULT_K = 20
#: The adaptive threshold, in per-layer z-score units (measured: see the module docstring).
DEFAULT_MIN_Z = 4.0
#: Coherence floor of the reference (a hit with no content co-outputs but readable ones needs
#: gate ≥ 20); in z units modelql uses `COHERENCE_FLOOR_Z`.
COHERENCE_FLOOR = 20.0
COHERENCE_FLOOR_Z = 8.0
#: signal banner bands: (clean, moderate) minimum max-gate, per unit
SIGNAL_BANDS = {"score": (20.0, 10.0), "z": (20.0, 10.0)}
KNN_GATE_PER_CONFIDENCE = 10.0

MODES = ("auto", "embedding", "residual")
BANDS = ("syntax", "knowledge", "output", "all")


def resolve_mode(vindex, mode: str | None) -> str:
    """`auto` (or None) → residual when the vindex has weights, else embedding."""
    m = (mode or "auto").lower()
    if m not in MODES:
        raise DescribeError(f"unknown DESCRIBE mode {mode!r} (use auto, embedding or residual)")
    if m == "auto":
        return "residual" if getattr(vindex, "has_weights", False) else "embedding"
    return m


def scan_layers(vindex, band: str | None = None, layer: int | None = None,
                layers: Iterable[int] | None = None) -> list[int]:
    """The layers a query scans: `layer` ⇒ {layer}; `layers` ⇒ those loaded; a band ⇒ the loaded
    layers of that band (`all` ⇒ every loaded layer); nothing ⇒ every loaded layer."""
    loaded = vindex.layers()
    if layer is not None:
        if layer not in loaded:
            raise DescribeError(f"layer {layer} is not loaded (loaded: {_range_text(loaded)})")
        return [layer]
    if layers is not None:
        want = set(layers)
        return [l for l in loaded if l in want]
    if band is None or band.lower() == "all":
        return loaded
    b = band.lower()
    if b not in BANDS:
        raise DescribeError(f"unknown band {band!r} (use syntax, knowledge, output or all)")
    lo, hi = vindex.bands.get(b)
    return [l for l in loaded if lo <= l <= hi]


def _range_text(ls: Sequence[int]) -> str:
    if not ls:
        return "none"
    return f"{ls[0]}-{ls[-1]}" if list(ls) == list(range(ls[0], ls[-1] + 1)) else ", ".join(map(str, ls))


def _contexts(vindex, contexts) -> tuple[list[str], dict[str, str]]:
    """Residual-mode contexts as (texts, {text: relation}): plain strings are neutral contexts;
    `(template, relation)` pairs are relation probes whose hits must carry that relation's label.
    None ⇒ the neutral defaults plus, for a probe-labelled vindex, its probe templates."""
    from .labels import probe_templates
    from .queries import DEFAULT_CONTEXTS

    if contexts is None:
        items: list = list(DEFAULT_CONTEXTS) + [(t, r) for r, ts in probe_templates(vindex).items() for t in ts]
    else:
        items = list(contexts)
    texts, rel = [], {}
    for c in items:
        if isinstance(c, (tuple, list)):
            t, r = str(c[0]), str(c[1])
            rel[t] = r
        else:
            t = str(c)
        if t not in texts:
            texts.append(t)
    return texts, rel


def section_of(vindex, layer: int) -> str:
    """The DESCRIBE section of a layer: knowledge if the knowledge band holds it (so models whose
    bands all cover every layer show one Edges section), else syntax, else output, else knowledge."""
    b = vindex.bands
    for name in ("knowledge", "syntax", "output"):
        lo, hi = b.get(name)
        if lo <= layer <= hi:
            return name
    return "knowledge"


def signal_label(max_gate: float, unit: str) -> str:
    clean, moderate = SIGNAL_BANDS[unit]
    if max_gate >= clean:
        return "clean"
    if max_gate >= moderate:
        return "moderate"
    return "diffuse"


@dataclass
class _Hit:
    layer: int
    feature: int
    score: float  # raw signed gate score g·q (residual mode: g·x_L)
    z: float
    gate: float  # in the result's unit


def _layer_hits(scores: torch.Tensor, ranking: torch.Tensor, layer: int, k: int, unit: str,
                raw: torch.Tensor) -> list[_Hit]:
    """Top-k of `ranking` by |value| (ties → lower index), with z-scores of `ranking`."""
    from ..vindex.vindex import topk_abs

    mu = ranking.mean()
    sd = ranking.std().clamp_min(1e-12)
    idx = topk_abs(ranking, k).tolist()
    out = []
    for f in idx:
        z = float((ranking[f] - mu) / sd)
        s = float(raw[f])
        out.append(_Hit(layer, f, s, z, z if unit == "z" else s))
    return out


def _activation_hits(vindex, x: torch.Tensor, acts: torch.Tensor, layer: int, k: int, unit: str) -> list[_Hit]:
    """`_layer_hits` ranked by the activations `acts` [F], each hit's raw gate score `g·x` read for
    the top-k only (`Vindex.gate_scores_at`: a DESCRIBE does not read every layer's gate matrix)."""
    from ..vindex.vindex import topk_abs

    mu = acts.mean()
    sd = acts.std().clamp_min(1e-12)
    idx = topk_abs(acts, k)
    raw = vindex.gate_scores_at(layer, x, idx).tolist()
    zs = ((acts[idx] - mu) / sd).tolist()
    return [_Hit(layer, f, s, z, z if unit == "z" else s) for f, s, z in zip(idx.tolist(), raw, zs)]


def describe(
    vindex,
    entity: str,
    *,
    mode: str | None = "auto",
    band: str | None = None,
    layer: int | None = None,
    layers: Iterable[int] | None = None,
    relations_only: bool = False,
    threshold: float | None = None,
    min_z: float = DEFAULT_MIN_Z,
    k: int = DEFAULT_K,
    token_filter: str = "content",
    probe_only: bool = False,
    model=None,
    contexts: Sequence[str] | None = None,
    combine: str = "max",
    score: str = "activation",
    knn_entries: Iterable | None = None,
    labels: FeatureLabels | None = None,
) -> DescribeResult:
    """DESCRIBE `entity` on `vindex`; returns every edge (uncapped; see `DescribeResult.sections`).

    mode: "auto" (residual with weights, else embedding), "embedding", "residual".
    band / layer / layers: which layers to scan (default all loaded layers).
    threshold: None = adaptive (`z ≥ min_z` in the hit's layer); a number = the reference's
      absolute signed gate score (5.0 = LARQL).
    token_filter: "content" (LQL: content tokens, coherence filter) or "light" (the server
      variant: any token of ≥ 2 chars).
    probe_only: only probe labels count (the server variant; decoded claims are probe-derived);
      else cluster labels are the fallback.
    contexts: residual-mode contexts: plain strings are neutral (per-feature edges), `(template,
      relation)` pairs are relation probes (decoded claims); None ⇒ the neutral defaults plus the
      vindex's probe templates.
    knn_entries: KNN-store facts (objects with entity, relation, target_token / target_id,
      confidence, layer) appended as edges when their entity matches.
    """
    t0 = time.perf_counter()
    key = None
    if contexts is None and knn_entries is None and labels is None:
        session = getattr(vindex, "session", None)
        key = (entity, mode, band, layer, tuple(layers) if layers is not None else None, relations_only, threshold,
               min_z, k, token_filter, probe_only, combine, score, id(model), getattr(session, "epoch", None),
               labels_for(vindex).stamp)
        got = _result_cache(vindex).get(key)
        if got is not None:
            return replace(got, latency_ms=(time.perf_counter() - t0) * 1e3)
    result = _describe(vindex, entity, t0, mode=mode, band=band, layer=layer, layers=layers,
                       relations_only=relations_only, threshold=threshold, min_z=min_z, k=k,
                       token_filter=token_filter, probe_only=probe_only, model=model, contexts=contexts,
                       combine=combine, score=score, knn_entries=knn_entries, labels=labels)
    if key is not None:
        cache = _result_cache(vindex)
        with _results_lock:
            cache[key] = result
            while len(cache) > RESULT_CACHE:
                cache.popitem(last=False)
    return result


#: DESCRIBE results kept per vindex (keyed by the query, the overlay epoch and the label files)
RESULT_CACHE = 256
_results: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()
_results_lock = threading.Lock()


def _result_cache(vindex) -> "OrderedDict":
    with _results_lock:
        got = _results.get(vindex)
        if got is None:
            got = _results[vindex] = OrderedDict()
        return got


def _describe(vindex, entity: str, t0: float, *, mode, band, layer, layers, relations_only, threshold, min_z, k,
              token_filter, probe_only, model, contexts, combine, score, knn_entries, labels) -> DescribeResult:
    if k < 1:
        raise DescribeError("k must be at least 1")
    if combine not in ("mean", "max"):
        raise DescribeError(f"unknown context combination {combine!r} (use mean or max)")
    if score not in ("activation", "gate"):
        raise DescribeError(f"unknown residual score {score!r} (use activation or gate)")
    if token_filter not in ("content", "light"):
        raise DescribeError(f"unknown token filter {token_filter!r}")
    m = resolve_mode(vindex, mode)
    scanned = scan_layers(vindex, band, layer, layers)
    unit = "score" if threshold is not None else "z"
    thr = float(threshold) if threshold is not None else float(min_z)
    bands = {name: tuple(vindex.bands.get(name)) for name in ("syntax", "knowledge", "output")}
    base = dict(entity=entity, model=vindex.model, mode=m, layers=tuple(scanned), bands=bands, unit=unit,
                threshold=thr, relations_only=relations_only)

    hits: list[_Hit] = []
    used_contexts: tuple[str, ...] = ()
    decoded: set[str] = set()  # relations whose claims come from their probe's decode
    claims: list[Claim] = []
    if m == "embedding":
        q = entity_vector(vindex, entity) if entity.strip() else None
        if q is None:
            return DescribeResult(found=False, edges=(), max_gate=0.0, signal="diffuse",
                                  latency_ms=(time.perf_counter() - t0) * 1e3, **base)
        for L in scanned:
            s = vindex.gate_scores(L, q)
            hits += _layer_hits(s, s, L, k, unit, s)
    else:
        ctx_list, ctx_rel = _contexts(vindex, contexts)
        m_ = model_for(vindex, model) if ctx_rel else model
        fam_idx: list[int] = []
        if ctx_rel and calibration_for(vindex) is not None:
            from .calibrate import FAMILIARITY_CONTEXT

            if FAMILIARITY_CONTEXT not in ctx_list:
                ctx_list.append(FAMILIARITY_CONTEXT)
            fam_idx = [ctx_list.index(FAMILIARITY_CONTEXT)]
        rq = residual_query(vindex, entity, model=m_, contexts=ctx_list, layers=scanned, with_logits=bool(ctx_rel),
                            token_logprobs=fam_idx)
        if rq is None:
            return DescribeResult(found=False, edges=(), max_gate=0.0, signal="diffuse",
                                  latency_ms=(time.perf_counter() - t0) * 1e3, **base)
        used_contexts = rq.contexts
        neutral = [i for i, c in enumerate(rq.contexts) if c not in ctx_rel]
        probes: dict[str, list[int]] = {}
        for i, c in enumerate(rq.contexts):
            if c in ctx_rel:
                probes.setdefault(ctx_rel[c], []).append(i)
        decoded = set(probes)
        if probes:
            cal = calibration_for(vindex)
            claims = decode_claims(m_, rq, probes, entity, relation_cardinality(vindex), vindex.tokenizer,
                                   phrase_tokens=cal.answer_tokens if cal is not None else None,
                                   objects=cal.objects if cal is not None else None)
        for L in scanned if neutral else ():
            xs, acts = rq.per_context[L][neutral], rq.per_context_act[L][neutral]
            if combine == "mean":
                xs, acts = xs.mean(dim=0, keepdim=True), acts.mean(dim=0, keepdim=True)
            best: dict[int, _Hit] = {}
            for x, a in zip(xs, acts):
                if score == "activation" and a.numel() == vindex.num_features(L):
                    # ranked by activation: only the top-k features' gate scores are read
                    got = _activation_hits(vindex, x, a, L, k, unit)
                else:
                    s = vindex.gate_scores(L, x)
                    got = _layer_hits(s, s, L, k, unit, s)
                for h in got:
                    old = best.get(h.feature)
                    if old is None or h.gate > old.gate:
                        best[h.feature] = h
            hits += sorted(best.values(), key=lambda h: -h.gate)[:k]
    labs = labels if labels is not None else labels_for(vindex)
    edges = _aggregate(vindex, entity, hits, thr, unit, token_filter, labs, probe_only)
    if decoded:
        edges = _merge_claims(vindex, entity, edges, claims, decoded, unit)
    verdict = (_calibrated(vindex, entity, m_ if ctx_rel else None, edges, rq.token_logprobs)
               if m == "residual" else None)
    if verdict is not None:
        edges = verdict.pop("edges")
    edges = _overlay_edges(vindex, entity, edges)
    if knn_entries is None and hasattr(vindex, "session"):
        knn_entries = vindex.knn_entries()
    edges += _knn_edges(vindex, entity, knn_entries, labs, skip={(e.relation, e.target.lower()) for e in edges})
    if relations_only:
        edges = [e for e in edges if e.relation]
    edges.sort(key=lambda e: (e.source != "patch", not e.decoded, -e.gate, e.layer, e.feature))
    max_gate = max([0.0] + [e.gate for e in edges])
    signal = signal_label(max_gate, unit)
    if verdict is not None and not any(e.relation and e.confident for e in edges):
        signal = "unknown" if verdict.get("known") is False else "diffuse"
    if verdict is None:
        verdict = {"note": capability_note(vindex, m, bool(decoded))}
    return DescribeResult(found=True, edges=tuple(edges), max_gate=max_gate, signal=signal,
                          contexts=used_contexts, latency_ms=(time.perf_counter() - t0) * 1e3,
                          **verdict, **base)


def capability_note(vindex, mode: str, decoded: bool) -> str | None:
    """What this vindex cannot answer and how to get it (None when DESCRIBE ran in full)."""
    name = Path(getattr(vindex, "path", "vindex")).name
    if mode == "embedding" and not getattr(vindex, "has_weights", False):
        level = getattr(vindex, "extract_level", "browse")
        return (f"{name} is a {level}-level vindex: without model weights DESCRIBE only compares the entity's "
                "embedding with the gates (no relation claims, no context); for claims re-extract with "
                "`modelql extract MODEL -o OUT --level inference` and `modelql label OUT`")
    if mode == "residual" and not decoded:
        return (f"{name} is not probe-labelled: DESCRIBE shows feature edges only, no relation claims "
                f"(run `modelql label {name}`)")
    return None


def suggest(entity: str, subjects: Sequence[str]) -> str | None:
    """A known subject `entity` may mean: the same name in another case, else a close spelling."""
    import difflib

    e = entity.strip()
    if not e or e in subjects:
        return None
    low = {s.lower(): s for s in subjects}
    if e.lower() in low:
        return low[e.lower()]
    got = difflib.get_close_matches(e.lower(), list(low), n=1, cutoff=0.75)
    return low[got[0]] if got else None


def _calibrated(vindex, entity: str, model, edges: list[Edge], token_logprobs: dict | None = None) -> dict | None:
    """Mark the claims confident / low-confidence by the vindex's calibration (module
    `knowledge.calibrate`) and say in one line when the model does not seem to know the entity.
    None when the vindex was labelled without a calibration (then nothing is marked)."""
    from .calibrate import FAMILIARITY_CONTEXT, familiarity, familiarity_from

    cal = calibration_for(vindex)
    if cal is None or model is None:
        return None
    tok = model.tokenizer if model.tokenizer is not None else vindex.tokenizer
    lps = (token_logprobs or {}).get(FAMILIARITY_CONTEXT)
    fam = familiarity_from(tok, lps) if lps is not None else familiarity(model, tok, [entity])[0]
    known = cal.familiar(fam)
    out = []
    for e in edges:
        if e.decoded:
            conf = float(e.c_score)
            e = replace(e, confidence=conf, confident=cal.confident(e.relation or "", conf, fam))
        elif e.relation:
            e = replace(e, confident=False)  # a feature's label names what it promotes everywhere, not a claim
        out.append(e)
    sugg = suggest(entity, cal.subjects)
    note = None
    if not known:
        note = (f"the model does not seem to know {entity!r} (familiarity {fam:.1f} < {cal.min_familiarity:.1f}, "
                "measured on made-up names): no confident claims")
    elif not any(e.decoded and e.confident for e in out):
        note = f"no confident claim about {entity!r} (answers below the floors measured on made-up names)"
    if sugg and note:
        note += f"; did you mean {sugg!r}?"
    elif sugg:
        note = f"did you mean {sugg!r}?"
    return {"edges": out, "known": known, "note": note, "suggestion": sugg, "familiarity": round(fam, 3)}


def _overlay_edges(vindex, entity: str, edges: list[Edge]) -> list[Edge]:
    """The facts the overlay's patches inserted for `entity` (any mode: feature, KNN, weight-level
    edits), as edges whose source is the patch; a fact deleted again is not listed, and a claim of
    the same relation decoded from the model gives way to the patch's fact."""
    from ..vindex.patch_facts import overlay_facts

    facts = [f for f in overlay_facts(vindex) if _same_entity(f.entity, entity)]
    if not facts:
        return edges
    rels = {f.relation for f in facts if f.relation}
    targets = {f.target.strip().lower() for f in facts}
    kept = [e for e in edges if not (e.decoded and e.relation in rels) and e.target.strip().lower() not in targets]
    out = []
    for f in facts:
        layer = f.layer if f.layer is not None else -1
        conf = 1.0 if f.confidence is None else float(f.confidence)
        gate = conf * KNN_GATE_PER_CONFIDENCE
        out.append(Edge(target=f.target.strip(), target_id=int(f.target_id or 0), gate=gate, score=gate, z=gate,
                        layer=layer, feature=-1 if f.feature is None else f.feature,
                        layers=(layer,) if layer >= 0 else (), count=1, c_score=conf, relation=f.relation or None,
                        source="patch", band=section_of(vindex, max(layer, 0)), confidence=conf, confident=True,
                        patch=f"{f.patch} ({f.mode})"))
    return out + kept


def _same_entity(a: str, b: str) -> bool:
    return a.strip().lower() == b.strip().lower()


def _aggregate(vindex, entity: str, hits: list[_Hit], thr: float, unit: str, token_filter: str,
               labs: FeatureLabels, probe_only: bool) -> list[Edge]:
    ent = entity.strip().lower()
    floor = COHERENCE_FLOOR if unit == "score" else COHERENCE_FLOOR_Z
    groups: dict[str, dict] = {}
    order: list[str] = []
    for h in hits:  # layer ascending, then KNN order
        if h.gate < thr:
            continue
        meta = vindex.feature_meta(h.layer, h.feature)
        if meta is None:
            continue
        top = meta.top_token.strip()
        if token_filter == "content":
            if not content(top) or top.lower() == ent:
                continue
            also_readable = [t.strip() for t, _i, v in meta.top_k
                             if v > 0 and not same_token(t, top) and t.strip().lower() != ent and readable(t)][:5]
            also = [t for t in also_readable if content(t)][:3]
            if not also and also_readable and h.gate < floor:
                continue
        else:
            if len(top) < 2 or top.lower() == ent:
                continue
            also_readable = []
            also = [t.strip() for t, _i, v in meta.top_k
                    if v > 0 and len(t.strip()) >= 2 and not same_token(t, top) and t.strip().lower() != ent][:3]
        key = top.lower()
        g = groups.get(key)
        if g is None:
            groups[key] = g = dict(target=top, target_id=meta.top_token_id, best=h, c_score=meta.c_score,
                                   also=tuple(also), also_readable=tuple(also_readable), layers=set(), count=0)
            order.append(key)
        g["layers"].add(h.layer)
        g["count"] += 1
        if h.gate > g["best"].gate:
            g["best"] = h
            g["c_score"] = meta.c_score
    out = []
    for key in order:
        g = groups[key]
        b: _Hit = g["best"]
        got = labs.get(b.layer, b.feature)
        if got is not None and probe_only and got[1] != "probe":
            got = None
        out.append(Edge(
            target=g["target"], target_id=g["target_id"], gate=b.gate, score=b.score, z=b.z, layer=b.layer,
            feature=b.feature, layers=tuple(sorted(g["layers"])), count=g["count"], c_score=g["c_score"],
            also=g["also"], also_readable=g["also_readable"], relation=got[0] if got else None,
            source=got[1] if got else None, band=section_of(vindex, b.layer),
        ))
    return out


def _merge_claims(vindex, entity: str, edges: list[Edge], claims: list[Claim], decoded: set[str],
                  unit: str) -> list[Edge]:
    """Decoded claims become the labelled edges of their relations: a per-feature edge keeps no
    label of a decoded relation (its static token is not what the entity's context writes), and
    one naming a claimed token gives way to the claim."""
    out: list[Edge] = []
    claimed = set()
    for c in claims:
        gate = c.z if unit == "z" else c.logit
        claimed.add(c.text.lower())
        meta = vindex.feature_meta(c.layer, c.feature)
        also_readable: tuple[str, ...] = ()
        if meta is not None:
            ent = entity.strip().lower()
            also_readable = tuple(t.strip() for t, _i, v in meta.top_k
                                  if v > 0 and not same_token(t, c.text) and t.strip().lower() != ent
                                  and readable(t))[:5]
        out.append(Edge(
            target=c.text, target_id=c.token_id, gate=gate, score=c.logit, z=c.z, layer=c.layer,
            feature=c.feature, layers=c.layers or (c.layer,), count=max(1, c.count), c_score=c.prob,
            also=tuple(t for t in also_readable if content(t))[:3], also_readable=also_readable,
            relation=c.relation, source="probe", band=section_of(vindex, c.layer), decoded=True,
        ))
    for e in edges:
        if e.target.lower() in claimed:
            continue
        if e.relation in decoded:
            e = replace(e, relation=None, source=None)
        out.append(e)
    return out


def _knn_edges(vindex, entity: str, entries: Iterable | None, labs: FeatureLabels,
               skip: set | frozenset = frozenset()) -> list[Edge]:
    if not entries:
        return []
    out = []
    for e in entries:
        if not same_token(str(getattr(e, "entity", "")), entity):
            continue
        conf = float(getattr(e, "confidence", 1.0))
        target = str(getattr(e, "target_token", None) or getattr(e, "target", ""))
        if ((str(getattr(e, "relation", "") or "") or None), target.strip().lower()) in skip:
            continue  # already listed as its patch's fact
        layer = int(getattr(e, "layer", 0))
        rel = str(getattr(e, "relation", "") or "")
        gate = conf * KNN_GATE_PER_CONFIDENCE
        out.append(Edge(
            target=target.strip(), target_id=int(getattr(e, "target_id", 0)), gate=gate, score=gate, z=gate,
            layer=layer, feature=-1, layers=(layer,), count=1, c_score=conf, also=(f"[knn:{rel}]",),
            relation=rel or None, source="knn", band=section_of(vindex, layer),
        ))
    return out
