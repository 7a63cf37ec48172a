#!/usr/bin/env python
"""DESCRIBE benchmark: precision / recall of labelled edges against the facts table, and latency.

    python bench/describe.py                 # embedded default model, every country, all modes
    python bench/describe.py --sample 40     # a deterministic sample of countries
    python bench/describe.py --vindex X.vindex --triples facts.tsv
    python bench/describe.py --sweep         # precision/recall per adaptive threshold (z)
    python bench/describe.py --shares        # who writes the answer: FFN vs attention logit shares
    python bench/describe.py --model SmolLM2-135M-Instruct.Q4_1.gguf --explain 50   # any model: calibrated report
    python bench/describe.py --vindex X.vindex --calibrated                          # same, on a labelled vindex

The calibrated report measures the ground truth first (the facts whose target the greedy
continuation of the relation's plain template names), then scores DESCRIBE's *confident* claims
against it, counts confident claims on 20 made-up names (other names than the calibration's),
shows the one-line notes of typos / lower-case names, the latency against one forward pass of a
probe prompt in the same run, and with ``--explain N`` the ablation check of `explain`.

Steps: extract the model into a temp vindex (level inference), probe-label it with the facts
(`modelql label`), then DESCRIBE every entity in three configurations and score the edges:

* ``embedding/ref``   — LARQL's pipeline: entity embedding, absolute threshold 5.0;
* ``embedding/z``     — the entity embedding with modelql's adaptive (z-score) threshold;
* ``residual/z``      — modelql's default with weights: relation claims decoded from the entity's
  probe templates and attributed to features (`knowledge.decode`), plus per-feature edges of
  the neutral contexts.

``--shares`` measures, per relation on its canonical probe template, how much of the answer's
logit (minus the mean logit, exact decomposition at the final norm) the FFNs and the attention
layers write, and how often the FFNs' write alone, or the whole residual, decodes to a true
answer (why DESCRIBE decodes the residual and attributes it to features, not the FFN alone).

A claim is an edge whose label is a relation of the table; precision = correct claims / claims,
recall = facts matched by a claim of their relation / facts (see `modelql.knowledge.accuracy`).
Latency is per DESCRIBE call, warm (model loaded, labels cached), on this machine's CPU.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path


def _fmt(x: float | None) -> str:
    return "   —  " if x is None else f"{100 * x:5.1f}%"


def table(scores, relations) -> str:
    """An aligned text table: one row per relation, precision/recall column pairs per config."""
    head1 = f"{'relation':<11}{'facts':>6} " + "".join(f"| {s.label:^23} " for s in scores)
    head2 = f"{'':<11}{'':>6} " + "".join(f"| {'prec':>7} {'recall':>7} {'claims':>6} " for _ in scores)
    lines = [head1, head2, "-" * len(head2)]
    for r in list(relations) + ["all"]:
        facts = scores[0].total.facts if r == "all" else scores[0].relations[r].facts
        row = f"{r:<11}{facts:>6} "
        for s in scores:
            rs = s.total if r == "all" else s.relations[r]
            row += f"| {_fmt(rs.precision):>7} {_fmt(rs.recall):>7} {rs.claims:>6} "
        lines.append(row)
    lines.append("-" * len(head2))
    lines.append(f"{'edges/entity':<18}" + "".join(f"| {s.edges / max(1, s.entities):>23.1f} " for s in scores))
    lines.append(f"{'unlabelled/entity':<18}" + "".join(f"| {s.unlabelled / max(1, s.entities):>23.1f} "
                                                       for s in scores))
    lines.append(f"{'latency p50/p90 ms':<18}" + "".join(f"| {f'{s.median_ms:.1f} / {s.p90_ms:.1f}':>23} "
                                                        for s in scores))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="HF model directory (default: the embedded model)")
    ap.add_argument("--vindex", type=Path, default=None, help="use this labelled vindex instead of extracting")
    ap.add_argument("--triples", type=Path, default=None, help="facts TSV/JSON (default: the embedded facts)")
    ap.add_argument("--sample", type=int, default=None, help="score a deterministic sample of N entities")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="f16", help="vindex storage dtype (f16 | f32)")
    ap.add_argument("--sweep", action="store_true", help="also sweep the adaptive threshold")
    ap.add_argument("--shares", action="store_true", help="also print FFN / attention shares of the answers")
    ap.add_argument("--modes", default="embedding/ref,embedding/z,residual/z")
    ap.add_argument("--calibrated", action="store_true",
                    help="only the calibrated report (ground truth measured first, made-up names, latency); "
                         "the default with --model")
    ap.add_argument("--quick", action="store_true",
                    help="calibrated report: batched first-token claims instead of per-entity DESCRIBE")
    ap.add_argument("--relations", default=None, help="calibrated report: score only these relations (comma-separated)")
    ap.add_argument("--explain", type=int, default=0, metavar="N",
                    help="also check `explain` on N prompts (ablate its top-5 features vs random ones)")
    ap.add_argument("--latency", type=int, default=0, metavar="N",
                    help="calibrated report: only the DESCRIBE latency over N known entities (p50 vs one "
                         "forward of a probe prompt, same run)")
    ap.add_argument("--explain-only", action="store_true",
                    help="with --explain: only the explain check (no DESCRIBE scoring)")
    ap.add_argument("--rankings", default="effect,direct",
                    help="explain check: the rankings compared in the same run (effect, direct)")
    args = ap.parse_args(argv)

    import torch

    from modelql import defaults as D
    from modelql.knowledge import describe
    from modelql.knowledge.accuracy import facts_by_entity, score_describe
    from modelql.knowledge.labels import label_vindex, load_triples
    from modelql.vindex import Vindex, extract

    torch.set_num_threads(args.threads)
    tmp = None
    if args.vindex is None:
        tmp = tempfile.TemporaryDirectory(prefix="modelql-bench-describe-")
        path = Path(tmp.name) / "default.vindex"
        t0 = time.perf_counter()
        extract(args.model or D.DEFAULT_MODEL_DIR, path, level="inference", dtype=args.dtype)
        t1 = time.perf_counter()
        rep = label_vindex(path, args.triples)
        t2 = time.perf_counter()
        print(f"extracted in {t1 - t0:.1f}s; probe-labelled {rep.new_labels} features from {rep.probes} probes "
              f"in {t2 - t1:.1f}s ({', '.join(f'{r} {n}' for r, n in sorted(rep.per_relation.items()))})")
    else:
        path = args.vindex
    vx = Vindex.load(path)

    if args.triples is not None:
        tri = load_triples(args.triples)
        triples = [(s, r, o) for r, body in tri.items() for s, o in body["pairs"]]
        relations = list(tri)
    else:
        triples = D.facts()
        relations = list(D.RELATIONS)
    truth = facts_by_entity(triples)
    ents = sorted(truth)
    if args.sample:
        ents = sorted(random.Random(0).sample(ents, min(args.sample, len(ents))))

    configs = {
        "embedding/ref": dict(mode="embedding", threshold=5.0),
        "embedding/z": dict(mode="embedding"),
        "residual/z": dict(mode="residual"),
    }
    if args.calibrated or args.model:
        tri = load_triples(args.triples) if args.triples is not None else D.triples_json()
        calibrated_report(vx, tri, args)
        if tmp is not None:
            tmp.cleanup()
        return 0
    wanted = [m.strip() for m in args.modes.split(",") if m.strip()]
    scores = []
    for name in wanted:
        kw = configs[name]
        if kw["mode"] == "residual" and not vx.has_weights:
            print(f"skipping {name}: the vindex has no weights")
            continue
        describe(vx, ents[0], **kw)  # warm: model load, label cache, gate decode
        scores.append(score_describe(lambda e, kw=kw: describe(vx, e, **kw), ents, truth, relations, label=name))
    print(f"\nDESCRIBE precision / recall of labelled edges, {len(ents)} entities, model {vx.model}\n")
    print(table(scores, relations))

    if args.sweep:
        from modelql.knowledge.describe import DEFAULT_MIN_Z

        print(f"\nadaptive threshold sweep (residual mode; default z ≥ {DEFAULT_MIN_Z}; it filters the per-feature "
              "edges only: decoded claims are not thresholded):")
        sweep = []
        for z in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
            s = score_describe(lambda e, z=z: describe(vx, e, mode="residual", min_z=z), ents, truth, relations,
                               label=f"z>={z:g}")
            sweep.append(s)
        print(table(sweep, relations))
    if args.shares:
        from modelql.knowledge.labels import probe_templates

        print(f"\nwho writes the answer (canonical probe template, {len(ents)} entities):\n")
        print(shares_table(vx, probe_templates(vx), ents, truth))
    if tmp is not None:
        tmp.cleanup()
    return 0


def shares_table(vx, templates, ents, truth) -> str:
    """Per relation: FFN / attention share of the decoded answer's logit, and how often the FFN
    write alone vs. the whole residual decodes (top content token) to a true target."""
    import torch

    from modelql.knowledge.decode import token_direction
    from modelql.knowledge.queries import model_for
    from modelql.knowledge.tokens import content
    from modelql.vindex.clusters import forms

    m = model_for(vx)
    tok = m.tokenizer
    n = m.spec.num_layers
    V = m.lm_head.shape[0]
    mask = torch.tensor([content(tok.decode([i], skip_special_tokens=True)) for i in range(V)])
    final = f"blocks.{n - 1}.hook_resid_post"
    attn = [f"blocks.{i}.hook_attn_out" for i in range(n)]
    ffn = [f"blocks.{i}.hook_mlp_out" for i in range(n)]
    lines = [f"{'relation':<11}{'n':>4} {'FFN share':>10} {'attn share':>11} {'FFN-only decode':>16} "
             f"{'residual decode':>16}", "-" * 72]
    for rel, ts in templates.items():
        sa = sf = 0.0
        ok_f = ok_r = cnt = 0
        for e in ents:
            targets = truth.get(e, {}).get(rel)
            if not targets:
                continue
            cache = {}

            def grab(t, name, _c=cache):
                _c[name] = t[0, -1].float().clone()

            ids = tok.encode(ts[0].replace("{X}", e), add_special_tokens=True)
            lg = m.forward(torch.tensor([ids]), hooks={k: grab for k in attn + ffn + [final]}, logits="last")[0]
            top = int(lg.masked_fill(~mask, -1e30).argmax())
            v = token_direction(m, cache[final], top)
            a, f = sum(float(v @ cache[k]) for k in attn), sum(float(v @ cache[k]) for k in ffn)
            sa, sf = sa + a / (a + f), sf + f / (a + f)
            w = sum(cache[k] for k in ffn)
            g = m.weights["final_norm.weight"].float()
            f_top = int((m.lm_head.float() @ (g * w)).masked_fill(~mask, -1e30).argmax())
            fs = [forms(t) for t in targets]
            ok_f += any(tok.decode([f_top]).strip().lower() in x for x in fs)
            ok_r += any(tok.decode([top]).strip().lower() in x for x in fs)
            cnt += 1
        if cnt:
            lines.append(f"{rel:<11}{cnt:>4} {100 * sf / cnt:>9.1f}% {100 * sa / cnt:>10.1f}% {100 * ok_f / cnt:>15.1f}% "
                         f"{100 * ok_r / cnt:>15.1f}%")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# calibrated DESCRIBE on any model (the real-model report)
# ---------------------------------------------------------------------------------------------

#: Ground truth is the greedy continuation of each relation's plain template, this many tokens.
TRUTH_TOKENS = 8


def ground_truth(model, tok, triples, templates, relations, entities=None):
    """{entity: {relation: [targets]}} of the facts the model *answers* right: the greedy
    continuation (TRUTH_TOKENS tokens) of the relation's plain template names a form of the target."""
    from modelql.knowledge.accuracy import matches
    from modelql.runtime.generate import SamplingParams, generate_batch
    from modelql.vindex.clusters import forms

    out: dict[str, dict[str, list[str]]] = {}
    asked = 0
    for rel in relations:
        pairs: dict[str, list[str]] = {}
        for s, o in triples[rel]["pairs"]:
            if entities is None or s in entities:
                pairs.setdefault(s, []).append(o)
        subs = sorted(pairs)
        t = templates[rel][0]
        sp = SamplingParams(max_tokens=TRUTH_TOKENS, temperature=0.0)
        for b in range(0, len(subs), 32):
            chunk = subs[b:b + 32]
            comps = generate_batch(model, [t.replace("{X}", s) for s in chunk], sp)
            for s, c in zip(chunk, comps):
                text = c.text.strip().lower()
                words = text.replace(".", " ").replace(",", " ").split()
                for o in pairs[s]:
                    fs = forms(o)
                    if any(f in text for f in fs if len(f) >= 3) or any(matches(w, fs) for w in words):
                        out.setdefault(s, {}).setdefault(rel, []).append(o)
            asked += len(chunk)
    return out, asked


def calibrated_report(vx, triples, args) -> None:
    import statistics

    import torch

    from modelql.knowledge import describe
    from modelql.knowledge.accuracy import score_result, RelationScore
    from modelql.knowledge.calibrate import MIN_PRECISION, made_up_names
    from modelql.knowledge.labels import _probe_meta, calibration_for, default_templates
    from modelql.knowledge.queries import model_for

    cal = calibration_for(vx)
    if cal is None:
        print("\nthe vindex has no calibration (label it with this version of `modelql label`)")
        return
    m = model_for(vx)
    tok = m.tokenizer
    meta = _probe_meta(vx)
    print(f"\ncalibration ({vx.model}): templates {cal.templates}")
    print(f"  accuracy per candidate template: {cal.accuracy}")
    print(f"  floors: familiarity ≥ {cal.min_familiarity:.2f}, answer probability {cal.min_prob}; "
          f"negatives passing {cal.negatives_passing}/{cal.negatives}")
    if cal.precision:
        skipped = [r for r in cal.templates if r not in cal.probed()]
        print(f"  confident-claim precision at calibration: "
              f"{ {r: None if p is None else round(p, 3) for r, p in cal.precision.items()} }; "
              f"not probed by DESCRIBE (< {MIN_PRECISION:.0%}): {', '.join(skipped) or 'none'}")
    chk = meta.get("causal_check")
    if chk:
        print(f"  label causal check (at labelling): {chk['passed']}/{chk['checked']} pass "
              f"({100 * (chk['pass_rate'] or 0):.1f}%), {chk['dropped']} dropped, {chk['unchecked']} unchecked")
    rels = [r for r in cal.probed() if r in triples]
    if args.relations:
        rels = [r for r in rels if r in args.relations.split(",")]
    plain = default_templates(rels)
    subjects = sorted({s for r in rels for s, _o in triples[r]["pairs"]})
    if args.sample:
        subjects = sorted(random.Random(0).sample(subjects, min(args.sample, len(subjects))))
    if args.latency:
        latency_report(vx, m, tok, plain[rels[0]][0], subjects, args.latency)
        return
    if args.explain_only:
        for rank in args.rankings.split(","):
            explain_check(vx, m, triples, plain, rels, None, args.explain, rank=rank.strip())
        return
    t0 = time.perf_counter()
    truth, asked = ground_truth(m, tok, triples, plain, rels, set(subjects))
    if args.quick:
        quick_claims(m, tok, cal, truth, rels, t0)
        return
    print(f"\nground truth: {sum(len(v) for e in truth.values() for v in e.values())} facts answered right "
          f"(greedy {TRUTH_TOKENS} tokens of the plain template) of {asked} asked, "
          f"{time.perf_counter() - t0:.0f}s")
    ents = sorted(truth)
    # reference latency: one forward of a plain probe prompt, same run
    ids = torch.tensor([tok.encode(plain[rels[0]][0].replace("{X}", ents[0] if ents else "France"))])
    ref = []
    for _ in range(5):
        t1 = time.perf_counter()
        m.forward(ids, logits="last")
        ref.append((time.perf_counter() - t1) * 1e3)
    ref_ms = statistics.median(ref)
    describe(vx, "Atlantis")  # warm (model, labels); results are cached per entity, so not one of `ents`
    acc = {r: RelationScore(r) for r in rels}
    known = {r: RelationScore(r) for r in rels}  # per relation, only the entities it answers right
    lat = []
    for e in ents:
        t1 = time.perf_counter()
        res = describe(vx, e)
        lat.append((time.perf_counter() - t1) * 1e3)
        res = _confident_only(res)
        score_result(res, truth.get(e, {}), rels, acc)
        for r in truth.get(e, {}):
            if r in known:
                score_result(res, truth[e], [r], known)
    print(f"\nDESCRIBE confident claims vs the facts the model answers right ({len(ents)} entities with a right "
          "answer; 'known only': per relation, the entities whose fact of that relation it answers right):")
    print(f"{'relation':<11}{'facts':>6}{'claims':>8}{'precision':>11}{'recall':>9} | {'known only: claims':>18}"
          f"{'precision':>11}{'recall':>9}")
    for r, s in acc.items():
        k = known[r]
        print(f"{r:<11}{s.facts:>6}{s.claims:>8}{_fmt(s.precision):>11}{_fmt(s.recall):>9} | {k.claims:>18}"
              f"{_fmt(k.precision):>11}{_fmt(k.recall):>9}")
    p50 = statistics.median(lat) if lat else 0.0
    print(f"latency p50 {p50:.0f} ms (one forward of a probe prompt: {ref_ms:.0f} ms; ratio {p50 / ref_ms:.1f}x; "
          f"machine load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    names = made_up_names(40, seed=2026)
    names = [n for n in names if n.lower() not in {x.lower() for x in made_up_names()}][:20]
    conf = 0
    lines = []
    for n in names + ["asdfgh", "Atlantis", "Frnace", "france", "Germny"]:
        res = describe(vx, n)
        c = [e for e in res.edges if e.relation and e.confident is not False]
        if n in names:
            conf += len(c)
        lines.append(f"  {n:<16} confident {len(c):>2}  known={res.known}  {res.note or ''}"
                     + (f"  [{', '.join(f'{e.relation}→{e.target}' for e in c)}]" if c else ""))
    print(f"\nmade-up names: {conf} confident claims over {len(names)} names (calibration used other names)")
    print("\n".join(lines))
    if args.explain:
        for rank in args.rankings.split(","):
            explain_check(vx, m, triples, plain, rels, truth, args.explain, rank=rank.strip())


def _ref_forward_ms(m, tok, prompt: str, n: int = 5) -> float:
    """Median wall time of one forward pass of `prompt` (the same-run reference)."""
    import statistics

    import torch

    ids = torch.tensor([tok.encode(prompt)])
    got = []
    for _ in range(n):
        t1 = time.perf_counter()
        m.forward(ids, logits="last")
        got.append((time.perf_counter() - t1) * 1e3)
    return statistics.median(got)


def _count_forwards(m):
    """Wrap `m.forward` (and `m.forward_packed`) to count the passes (and the token rows) DESCRIBE
    runs; returns the log."""
    log: list[tuple[int, int]] = []
    inner = m.forward

    def forward(ids, *a, **k):
        import torch

        shape = tuple(torch.as_tensor(ids).shape)
        log.append(shape if len(shape) == 2 else (1, shape[0]))
        return inner(ids, *a, **k)

    m.forward = forward
    packed = getattr(m, "forward_packed", None)
    if packed is not None:
        def forward_packed(seqs, *a, **k):
            log.append((1, sum(len(q) for q in seqs)))
            return packed(seqs, *a, **k)

        m.forward_packed = forward_packed
    return log


def latency_report(vx, m, tok, template: str, subjects, n: int) -> None:
    """DESCRIBE p50 over `n` entities (cold per entity: results are cached per entity), wall and
    process CPU time, with the reference forward measured before and after (the machine's load
    drifts), the forward passes per DESCRIBE and the machine's load average."""
    import statistics

    from modelql.knowledge import describe

    ents = sorted(random.Random(1).sample(list(subjects), min(n, len(subjects))))
    describe(vx, "Atlantis")  # warm: model, labels, the probes' shared heads
    ref0 = _ref_forward_ms(m, tok, template.replace("{X}", ents[0]))
    load0 = os.getloadavg()[0]
    log = _count_forwards(m)
    lat, cpu, passes, rows = [], [], [], []
    for e in ents:
        n0 = len(log)
        t1, c1 = time.perf_counter(), time.process_time()
        describe(vx, e)
        lat.append((time.perf_counter() - t1) * 1e3)
        cpu.append((time.process_time() - c1) * 1e3)
        passes.append(len(log) - n0)
        rows.append(sum(b * t for b, t in log[n0:]))
    del m.forward
    m.__dict__.pop("forward_packed", None)
    ref1 = _ref_forward_ms(m, tok, template.replace("{X}", ents[-1]))
    load1 = os.getloadavg()[0]
    p50, ref = statistics.median(lat), (ref0 + ref1) / 2
    print(f"\nDESCRIBE latency over {len(ents)} entities: p50 {p50:.0f} ms wall, {statistics.median(cpu):.0f} ms "
          f"process CPU (threads {__import__('torch').get_num_threads()}), p90 {sorted(lat)[int(0.9 * (len(lat) - 1))]:.0f} ms; "
          f"one forward of a probe prompt {ref0:.0f} / {ref1:.0f} ms (before / after); ratio p50 / forward "
          f"{p50 / ref:.1f}x; forward passes per DESCRIBE p50 {statistics.median(passes):.0f} "
          f"(token rows {statistics.median(rows):.0f}); machine load average {load0:.1f} / {load1:.1f} on "
          f"{os.cpu_count()} CPUs")


def quick_claims(m, tok, cal, truth, rels, t0) -> None:  # noqa: C901
    """The first-token decision DESCRIBE makes, batched (one padded forward per relation over all
    entities, one for familiarity): for a loaded machine where per-entity DESCRIBE is too slow to
    run over every entity. A claim is the decode's top first token, confident by the calibration."""
    import torch

    from modelql.knowledge.calibrate import _forward_last, familiarity, first_token_right, made_up_names

    ents = sorted(truth)
    seen = {x.lower() for x in made_up_names()}
    names = [n for n in made_up_names(40, seed=2026) if n.lower() not in seen][:20]
    fam = dict(zip(ents + names, familiarity(m, tok, ents + names)))
    print(f"\nbatched first-token claims (DESCRIBE's decision), {len(ents)} entities, {len(names)} made-up names:")
    for r in rels:
        people = [e for e in ents if r in truth[e]]
        lg = _forward_last(m, [tok.encode(cal.templates[r].replace("{X}", e)) for e in people + names])
        claims = correct = 0
        for e, l in zip(people, lg):
            p = torch.softmax(l.double(), -1)
            t = int(p.argmax())
            if cal.confident(r, float(p[t]), fam[e]):
                claims += 1
                correct += first_token_right(tok, t, truth[e][r])
        bad = [n for n, l in zip(names, lg[len(people):])
               if cal.confident(r, float(torch.softmax(l.double(), -1).max()), fam[n])]
        print(f"  {r:<10} facts {len(people):>4}  confident claims {claims:>4}  precision "
              f"{_fmt(correct / claims if claims else None)}  recall {_fmt(correct / max(1, len(people)))}  "
              f"made-up names with a confident claim: {len(bad)} {bad}")
    print(f"({time.perf_counter() - t0:.0f}s)")


def _confident_only(res):
    from dataclasses import replace

    return replace(res, edges=tuple(e for e in res.edges if e.confident is not False))


def explain_check(vx, m, triples, plain, rels, truth, n_prompts: int, rank: str = "effect") -> None:
    """Ablating the top-5 features `explain` names for a token vs 5 random features of the same
    layers: how often the named ones lower the token's probability more (`rank`: how explain
    orders features, `knowledge.explain.RANKINGS`)."""
    import torch

    from modelql.knowledge.explain import VindexFeatures, attribute
    from modelql.runtime import interp

    rng = random.Random(0)
    tok = m.tokenizer
    prompts = []
    for r in rels:
        for s, _o in triples[r]["pairs"]:
            prompts.append(plain[r][0].replace("{X}", s))
    rng.shuffle(prompts)
    prompts = prompts[:n_prompts]
    src = VindexFeatures(vx)
    wins = 0
    drops = []
    for p in prompts:
        ids = tok.encode(p)
        lg = m.forward(torch.tensor([ids]), logits="last")[0]
        t = int(lg.argmax())
        ex = attribute(m, ids, [t], src, top=5, rank=rank)[0]
        feats = [(f.layer, f.feature) for f in ex.features]

        def prob(ablate):
            hooks = {}
            by = {}
            for L, f in ablate:
                by.setdefault(L, []).append(f)
            hooks = interp.compose(*[interp.ablate_features(L, fs) for L, fs in by.items()]) if by else {}
            out = m.forward(torch.tensor([ids]), hooks=hooks, logits="last")[0]
            return float(torch.softmax(out.double(), -1)[t])

        base = prob([])
        named = base - prob(feats)
        rand = []
        for _ in range(3):
            rf = [(L, rng.randrange(vx.num_features(L))) for L, _f in feats]
            rand.append(base - prob(rf))
        r_mean = sum(rand) / len(rand)
        wins += named > r_mean
        drops.append((named, r_mean))
    n = len(prompts)
    print(f"\nexplain ({rank}): ablating the top-5 features lowers the token's probability more than 5 random features "
          f"of the same layers (mean of 3 draws) in {wins}/{n} prompts ({100 * wins / max(1, n):.0f}%); "
          f"mean drop {sum(d for d, _ in drops) / max(1, n):.4f} vs {sum(r for _, r in drops) / max(1, n):.4f}")


if __name__ == "__main__":
    sys.exit(main())
