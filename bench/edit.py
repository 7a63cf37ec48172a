#!/usr/bin/env python
"""Editing benchmark (CounterFact style) on the embedded model: every INSERT mode, edits applied together.

    python bench/edit.py                         # 50 edits, modes memit, knn, compose
    python bench/edit.py --edits 20 --modes memit,knn
    python bench/edit.py --model DIR_OR_GGUF --edits 20   # any model: bench/edit_real.py (facts it knows, measured first)

Setup (deterministic): among the countries whose capital the *unedited* model states correctly
(canonical template ``"The capital of {X} is"``, top-1 = the capital's first token), take
``--edits`` of them spread over the alphabet; each gets as new target another country's real
capital (the capital of the country `--shift` places later in that list, skipping any whose first
token equals the true one). The locality set is a fixed ≥ 100 other facts the unedited model
gets right: capitals of countries that are not edited, and other relations (continent, language,
currency, ...) of edited and non-edited countries.

For each mode, all edits are inserted into one fresh patch overlay (``insert_many``: MEMIT edits
them as one batch; KNN and COMPOSE one after the other), then:

* **efficacy** — new target top-1 on the edit prompt (the canonical template); ``full``: greedy
  generation after it spells every token of the new target (most capitals are several tokens);
* **generalisation** — new target top-1 on each held-out paraphrase (``HELDOUT_TEMPLATES``),
  two columns: ``gen all`` over every held-out paraphrase (CounterFact's paraphrase score: the
  edited facts are ones the model knows, the paraphrases are not filtered), and ``gen known``
  over only the held-out paraphrases that the *unedited* model answers with the true capital.
  ``gen known`` separates what the edit carries over from what the model knows at all: an edit
  rewrites what the model recalls, so it cannot be expected to carry over to a phrasing in
  which the model does not recall the fact; the share of such phrasings caps ``gen all``;
* **locality** — the locality facts' top-1 unchanged;
* **survival** — ``COMPILE CURRENT INTO MODEL`` → load the directory with ``transformers``
  (``AutoModelForCausalLM`` + ``AutoTokenizer``) → the share of all the above prompts whose top-1
  equals the patched session's (KNN facts are materialised as weight edits by COMPILE);
  ``hf eff`` is the efficacy measured on the reloaded model.

Then ``--single`` of the edits (spread over the set) are inserted one at a time, each alone in a
fresh overlay (CounterFact's usual setting, where a single edit has no batch to share its update
with): mean efficacy, ``gen all`` and locality over them, in a second table.

Top-1 in a session is what INFER reports (KNN override included). Prints one aligned row per mode.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Row:
    mode: str
    edits: int
    efficacy: float
    full: float  # greedy generation spells the whole new target
    generalisation: float
    gen_known: float
    known_paraphrases: int
    locality: float
    survival: float
    hf_efficacy: float
    insert_s: float
    compile_s: float
    default: bool = False


def _first_id(tok, text: str) -> int:
    ids = tok.encode(" " + text, add_special_tokens=False)
    return ids[0] if ids else -1


def _top1_plain(model, prompt: str) -> int:
    return int(model.forward(model.tokenizer.encode(prompt), logits="last")[0].argmax())


def choose(model, n_edits: int, shift: int, n_local: int):
    """(edits [(entity, true, new)], locality [(prompt, expected top-1 id)])."""
    from modelql import defaults as D

    tok = model.tokenizer
    tpl = D.TRAIN_TEMPLATES["capital"][0]
    caps = sorted({(f.entity, f.target) for f in D.facts() if f.relation == "capital"})
    by_entity: dict[str, str] = {}
    for e, t in caps:
        by_entity.setdefault(e, t)  # first capital of multi-capital countries
    known = [(e, t) for e, t in sorted(by_entity.items())
             if _top1_plain(model, D.prompt(tpl, e)) == _first_id(tok, t)]
    if len(known) < n_edits + 10:
        raise SystemExit(f"the model states only {len(known)} capitals correctly; need {n_edits + 10}")
    step = len(known) / n_edits
    picked = [known[int(i * step)] for i in range(n_edits)]
    edits = []
    for i, (e, t) in enumerate(picked):
        j = known.index((e, t))
        for k in range(shift, len(known)):
            cand = known[(j + k) % len(known)][1]
            if _first_id(tok, cand) != _first_id(tok, t) and cand != t:
                edits.append((e, t, cand))
                break
    edited = {e for e, _, _ in edits}
    # locality: capitals of other countries, then other relations (canonical template), all correct now
    local: list[tuple[str, int]] = []
    others = [(e, t) for e, t in known if e not in edited]
    for e, t in others[: n_local // 2]:
        local.append((D.prompt(tpl, e), _first_id(tok, t)))
    rel_facts = sorted({(f.entity, f.relation) for f in D.facts() if f.relation != "capital"})
    targets = D.targets_by_subject()
    ed_first = [x for x in rel_facts if x[0] in edited]
    non_ed = [x for x in rel_facts if x[0] not in edited]
    pool = ed_first[::3] + non_ed[::7]
    for e, r in pool:
        if len(local) >= n_local:
            break
        p = D.prompt(D.TRAIN_TEMPLATES[r][0], e)
        got = _top1_plain(model, p)
        if got in {_first_id(tok, t) for t in targets[(e, r)]}:
            local.append((p, got))
    return edits, local


def full_target(model, prompt: str, target: str) -> bool:
    """Does greedy generation after `prompt` spell all of `target` (every token, not just the
    first)? Generation does not see KNN overrides."""
    tok = model.tokenizer
    want = tok.encode(" " + target, add_special_tokens=False)
    ids = tok.encode(prompt)
    for t in want:
        got = int(model.forward(ids, logits="last")[0].argmax())
        if got != t:
            return False
        ids.append(got)
    return True


def session_top1(model, knn, prompts: list[str]) -> list[int]:
    from modelql.knowledge.infer import infer

    out = []
    for p in prompts:
        r = infer(model, p, top=1, knn=knn or None)
        out.append(r.predictions[0].token_id)
    return out


def hf_top1(directory: Path, prompts: list[str], threads: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(directory))
    out = []
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            out.append(int(m(input_ids=ids).logits[0, -1].argmax()))
    return out


def known_mask(model, edits) -> list[bool]:
    """Per held-out paraphrase (edit-major, ``HELDOUT_TEMPLATES`` order): does the *unedited*
    model answer it with the true capital's first token?"""
    from modelql import defaults as D

    tok = model.tokenizer
    return [_top1_plain(model, D.prompt(h, e)) == _first_id(tok, true)
            for e, true, _ in edits for h in D.HELDOUT_TEMPLATES["capital"]]


def hit_rate(got: list[int], want: list[int], mask: list[bool] | None = None) -> tuple[float, int]:
    """(share of positions with got == want, positions counted), over the positions where `mask`
    is true (all when None); 0.0 when none count."""
    keep = [i for i in range(len(want)) if mask is None or mask[i]]
    return (sum(got[i] == want[i] for i in keep) / len(keep) if keep else 0.0), len(keep)


def run_mode(vindex, base_model, mode: str, edits, local, threads: int, workdir: Path, log,
             compile_dtype: str | None = None, known: list[bool] | None = None) -> Row:
    from modelql import defaults as D
    from modelql.knowledge import edit
    from modelql.vindex.compile import compile_model
    from modelql.vindex.overlay import PatchSession

    ps = PatchSession(vindex, model=base_model)  # one base model: MEMIT's covariance cache is shared
    model = ps.model()
    tok = model.tokenizer
    t0 = time.perf_counter()
    edit.insert_many(ps, [(e, "capital", new) for e, _, new in edits], mode=mode)
    ins_s = time.perf_counter() - t0
    knn = ps.knn_entries()
    tpl = D.TRAIN_TEMPLATES["capital"][0]
    edit_prompts = [D.prompt(tpl, e) for e, _, _ in edits]
    para_prompts = [D.prompt(h, e) for e, _, _ in edits for h in D.HELDOUT_TEMPLATES["capital"]]
    want_edit = [_first_id(tok, new) for _, _, new in edits]
    want_para = [_first_id(tok, new) for _, _, new in edits for _ in D.HELDOUT_TEMPLATES["capital"]]
    local_prompts = [p for p, _ in local]
    s_edit = session_top1(model, knn, edit_prompts)
    s_para = session_top1(model, knn, para_prompts)
    s_local = session_top1(model, knn, local_prompts)
    eff = sum(a == b for a, b in zip(s_edit, want_edit)) / len(edits)
    full = sum(full_target(model, p, new) for p, (_, _, new) in zip(edit_prompts, edits)) / len(edits)
    gen, _ = hit_rate(s_para, want_para)
    gen_k, n_known = hit_rate(s_para, want_para, known)
    loc = sum(a == w for a, (_, w) in zip(s_local, local)) / len(local)
    log(f"  {mode}: inserted {len(edits)} in {ins_s:.1f}s; eff {eff:.1%} (full {full:.1%}) gen {gen:.1%} "
        f"(known {gen_k:.1%}) loc {loc:.1%}; compiling")
    out = workdir / f"compiled-{mode}"
    t1 = time.perf_counter()
    compile_model(ps, out, dtype=compile_dtype)
    comp_s = time.perf_counter() - t1
    all_prompts = edit_prompts + para_prompts + local_prompts
    h = hf_top1(out, all_prompts, threads)
    mine = s_edit + s_para + s_local
    surv = sum(a == b for a, b in zip(h, mine)) / len(all_prompts)
    hf_eff = sum(a == b for a, b in zip(h[: len(edits)], want_edit)) / len(edits)
    return Row(mode, len(edits), eff, full, gen, gen_k, n_known, loc, surv, hf_eff, ins_s, comp_s)


@dataclass
class SingleRow:
    mode: str
    edits: int
    efficacy: float
    full: float
    generalisation: float
    locality: float
    insert_s: float  # mean per edit


def run_single(vindex, base_model, mode: str, edits, local, log) -> SingleRow:
    """Each edit alone in a fresh overlay (CounterFact's usual setting): mean efficacy,
    paraphrase generalisation and locality over the edits."""
    from modelql import defaults as D
    from modelql.knowledge import edit
    from modelql.vindex.overlay import PatchSession

    tpl = D.TRAIN_TEMPLATES["capital"][0]
    heldout = D.HELDOUT_TEMPLATES["capital"]
    tok = base_model.tokenizer
    eff = full = gen = loc = secs = 0.0
    for i, (e, _, new) in enumerate(edits):
        ps = PatchSession(vindex, model=base_model)
        t0 = time.perf_counter()
        edit.insert(ps, e, "capital", new, mode=mode)
        secs += time.perf_counter() - t0
        model, knn = ps.model(), ps.knn_entries()
        want = _first_id(tok, new)
        eff += session_top1(model, knn, [D.prompt(tpl, e)])[0] == want
        full += full_target(model, D.prompt(tpl, e), new)
        gen += sum(t == want for t in session_top1(model, knn, [D.prompt(h, e) for h in heldout])) / len(heldout)
        got = session_top1(model, knn, [p for p, _ in local])
        loc += sum(a == w for a, (_, w) in zip(got, local)) / len(local)
        if (i + 1) % 10 == 0:
            log(f"  {mode}, one at a time: {i + 1}/{len(edits)} edits")
    n = len(edits)
    return SingleRow(mode, n, eff / n, full / n, gen / n, loc / n, secs / n)


def single_table(rows: list[SingleRow]) -> str:
    head = f"{'mode':<10}{'edits':>6}{'efficacy':>10}{'full':>8}{'gen all':>9}{'locality':>10}{'insert':>9}"
    lines = ["one edit at a time (each in a fresh overlay; means over the edits):", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.mode:<10}{r.edits:>6}{r.efficacy:>10.1%}{r.full:>8.1%}{r.generalisation:>9.1%}"
                     f"{r.locality:>10.1%}{r.insert_s:>8.2f}s")
    return "\n".join(lines)


def _heldout() -> tuple[str, ...]:
    from modelql import defaults as D

    return D.HELDOUT_TEMPLATES["capital"]


def table(rows: list[Row], n_local: int) -> str:
    n_para = rows[0].edits * len(_heldout()) if rows else 0
    head = (f"{'mode':<10}{'edits':>6}{'efficacy':>10}{'full':>8}{'gen all':>9}{'gen known':>11}{'locality':>10}"
            f"{'survival':>10}{'hf eff':>9}{'insert':>9}{'compile':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        name = r.mode + (" *" if r.default else "")
        lines.append(f"{name:<10}{r.edits:>6}{r.efficacy:>10.1%}{r.full:>8.1%}{r.generalisation:>9.1%}"
                     f"{r.gen_known:>11.1%}{r.locality:>10.1%}{r.survival:>10.1%}{r.hf_efficacy:>9.1%}"
                     f"{r.insert_s:>8.1f}s{r.compile_s:>8.1f}s")
    if rows:
        lines.append(f"(gen known over the {rows[0].known_paraphrases} of {n_para} held-out paraphrases the unedited "
                     "model answers correctly; gen all over all of them)")
    lines.append(f"(* = default mode; locality over {n_local} facts; survival = top-1 agreement of the "
                 "transformers-loaded COMPILE INTO MODEL output with the patched session)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF model directory (default: the embedded model)")
    ap.add_argument("--vindex", type=Path, default=None, help="use this inference-level vindex instead")
    ap.add_argument("--edits", type=int, default=50)
    ap.add_argument("--shift", type=int, default=7, help="new target = capital of the country this far on")
    ap.add_argument("--locality", type=int, default=120, help="number of locality facts (>= 100)")
    ap.add_argument("--modes", default="memit,knn,compose")
    ap.add_argument("--single", type=int, default=20,
                    help="also insert this many of the edits one at a time, each alone (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile-dtype", default=None,
                    help="dtype of the COMPILE INTO MODEL output (default: what LQL's COMPILE writes)")
    ap.add_argument("--json", type=Path, default=None)
    args, rest = ap.parse_known_args(argv)
    if args.model is not None and args.vindex is None:
        # any model (a real pretrained one): edit and locality sets from the facts it states
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import edit_real

        fwd = ["--model", str(args.model), "--edits", str(args.edits), "--threads", str(args.threads)] + rest
        if args.json is not None:
            fwd += ["--json", str(args.json)]
        return edit_real.main(fwd)
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")

    import torch

    torch.set_num_threads(args.threads)
    from modelql.knowledge.edit import DEFAULT_MODE, resolve_mode
    from modelql.lql import default_vindex as dv
    from modelql.vindex import Vindex

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.vindex is not None:
        vpath = args.vindex
    elif args.model is not None:
        vpath = dv.ensure_vindex(args.model, progress=False)
    else:
        vpath = dv.default_vindex_path(progress=False)
    vx = Vindex.load(vpath)
    base = vx.load_model()
    log(f"vindex {vpath}: {vx.model}, {vx.num_layers} layers, H={vx.hidden_size}")
    edits, local = choose(base, args.edits, args.shift, args.locality)
    known = known_mask(base, edits)
    log(f"{len(edits)} edits (e.g. {edits[0][0]}: {edits[0][1]} → {edits[0][2]}), {len(local)} locality facts, "
        f"{sum(known)}/{len(known)} held-out paraphrases known to the unedited model")
    modes = [resolve_mode(m) for m in args.modes.split(",") if m.strip()]
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelql-bench-edit-") as tmp:
        for mode in modes:
            row = run_mode(vx, base, mode, edits, local, args.threads, Path(tmp), log, args.compile_dtype,
                           known)
            row.default = mode == DEFAULT_MODE
            rows.append(row)
    singles = []
    if args.single > 0:
        step = len(edits) / min(args.single, len(edits))
        some = [edits[int(i * step)] for i in range(min(args.single, len(edits)))]
        singles = [run_single(vx, base, mode, some, local, log) for mode in modes]
    print(table(rows, len(local)))
    if singles:
        print()
        print(single_table(singles))
    if args.json is not None:
        args.json.write_text(json.dumps({"edits": edits, "locality": len(local), "rows": [asdict(r) for r in rows],
                                         "single": [asdict(r) for r in singles]}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
