#!/usr/bin/env python
"""Editing benchmark on any model (a real pretrained one: `bench/edit.py --model PATH` runs this).

    python bench/edit.py --model /path/SmolLM2-135M-Instruct.Q4_1.gguf --edits 20
    python bench/edit_real.py --model DIR_OR_GGUF --relations capital,language --json out.json

Everything is measured on the model first (deterministic):

* **facts it knows** — for each relation, the embedded facts table's (country, answer) pairs whose
  canonical prompt ``"The <relation> of <X> is"`` the *unedited* model continues greedily with
  the answer's first token; the edit set is ``--edits`` of them spread over the alphabet, each
  given another known fact's answer (``--shift`` places on, different first token); the locality
  set is every other known fact of that relation (up to ``--locality``);
* **efficacy** — greedy continuation of the canonical prompt starts with the new answer's first token;
* **paraphrases** (never used in the solve, which sees only the canonical prompt after generic
  prefixes): ``PARAPHRASES`` plus the model's chat template (``"What is the <relation> of X?"``,
  assistant turn: the new answer among the first 16 generated tokens and the old one not);
  ``para all`` over every paraphrase, ``para known`` over those the unedited model answers right;
* **locality** — the other known facts' greedy first token unchanged;
* **fluency** — the first 10 greedy tokens of 20 generic prompts (``GENERIC_PROMPTS``: stories,
  code, recipes, ...) unchanged, and the perplexity of a held-out generic text (``HELDOUT_TEXT``)
  relative to the unedited model;
* the same after ``COMPILE CURRENT INTO MODEL``, loaded with ``transformers``;
* timings: the one-time statistics (edit site + sampled corpus + covariance; cold only when the
  cache is empty — run with a fresh ``MODELQL_CACHE`` to time them), one edit alone, and whether
  DELETE of that edit restores bit-identical logits.

Prints one aligned row per (relation, stage), ratios against the unedited model of the same run.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PARAPHRASES = {
    "capital": ("{X}'s capital city is", "The capital city of {X} is", "Q: What is the capital of {X}?\nA: The capital is"),
    "language": ("In {X}, most people speak", "The main language spoken in {X} is",
                 "Q: What language do people in {X} speak?\nA: They speak"),
    "currency": ("In {X}, you pay with the", "The money of {X} is the", "Q: What is the currency of {X}?\nA: It is the"),
}
# the relation as INSERT names it (its canonical prompt "The <name> of X is"), where the facts
# table's short name reads badly ("The language of France is": the model answers it for no country)
RELATION_NAMES = {"language": "official language"}
CHAT_QUESTIONS = {"capital": "What is the capital of {X}?", "language": "What language is spoken in {X}?",
                  "currency": "What is the currency of {X}?"}
GENERIC_PROMPTS = (
    "Once upon a time, a young fox", "The old man sat by the fire and", "It was a dark and stormy night;",
    "def fibonacci(n):", "import json\n\ndef load(path):", "for (int i = 0; i < n; i++) {",
    "<div class=\"header\">", "SELECT name FROM users WHERE", "To make pancakes, mix the flour with",
    "Preheat the oven to", "Add the onions to the pan and", "My favourite food is",
    "The best thing about summer is", "Dear Sir or Madam,", "In conclusion, the results show that",
    "The train left the station at", "She picked up the phone and said", "Here are three tips for better sleep:",
    "The mitochondria is", "Yesterday the team decided to",
)
HELDOUT_TEXT = (
    "The small village sat at the edge of a wide valley. Every morning the baker opened his shop before "
    "sunrise, and the smell of fresh bread drifted down the narrow streets. Children walked to school in "
    "groups, talking about the games they would play in the afternoon. In the evening, families gathered "
    "around their tables to share a simple meal and talk about the day. When winter came, the river froze "
    "and the farmers repaired their tools, waiting patiently for the warmth of spring."
)


@dataclass
class Row:
    relation: str
    stage: str  # session | transformers
    edits: int
    efficacy: float
    para_all: float
    para_known: float
    known_paraphrases: int
    paraphrases: int
    locality: float
    locality_n: int
    fluency: float
    ppl_ratio: float
    insert_s: float = 0.0


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Runner:
    """Greedy generation and perplexity on either a modelql Model or an HF transformers model."""

    def __init__(self, model=None, hf=None, hf_tok=None):
        self.model, self.hf, self.hf_tok = model, hf, hf_tok
        self.tok = model.tokenizer if model is not None else None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text) if self.model is not None else self.hf_tok(text).input_ids

    def decode(self, ids) -> str:
        return self.tok.decode(ids) if self.model is not None else self.hf_tok.decode(ids)

    def first_id(self, text: str) -> int:
        ids = (self.tok.encode(" " + text, add_special_tokens=False) if self.model is not None
               else self.hf_tok(" " + text, add_special_tokens=False).input_ids)
        return ids[0] if ids else -1

    def greedy(self, prompts: list[str], n: int) -> list[list[int]]:
        if self.model is not None:
            from modelql.knowledge.generic_text import greedy

            return greedy(self.model, prompts, n)
        out = []
        with torch.no_grad():
            for p in prompts:
                ids = torch.tensor([self.encode(p)])
                g = self.hf.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=self.hf_tok.eos_token_id)
                out.append(g[0, ids.shape[1]:].tolist())
        return out

    def first(self, prompts: list[str]) -> list[int]:
        return [g[0] for g in self.greedy(prompts, 1)]

    def nll(self, text: str) -> float:
        ids = torch.tensor([self.encode(text)])
        with torch.no_grad():
            logits = (self.model.forward(ids, logits="all") if self.model is not None
                      else self.hf(input_ids=ids).logits).float()
        return float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]))


def canonical(relation: str, entity: str) -> str:
    from modelql.knowledge.memit import canonical_text

    return canonical_text(RELATION_NAMES.get(relation, relation), entity)


def known_facts(runner: Runner, relation: str) -> list[tuple[str, str]]:
    from modelql import defaults as D

    by: dict[str, str] = {}
    for f in D.facts():
        if f.relation == relation:
            by.setdefault(f.entity, f.target)
    pairs = sorted(by.items())
    got = []
    firsts = runner.first([canonical(relation, e) for e, _ in pairs])
    for (e, t), g in zip(pairs, firsts):
        if g == runner.first_id(t):
            got.append((e, t))
    return got


class NotEnoughFacts(Exception):
    pass


def choose(runner: Runner, relation: str, n_edits: int, shift: int, n_local: int):
    known = known_facts(runner, relation)
    if len(known) < n_edits + 5:
        raise NotEnoughFacts(f"the model states only {len(known)} {relation} facts correctly; need {n_edits + 5}")
    step = len(known) / n_edits
    picked = [known[int(i * step)] for i in range(n_edits)]
    edits = []
    for e, t in picked:
        j = known.index((e, t))
        for k in range(shift, shift + len(known)):
            cand = known[(j + k) % len(known)][1]
            if runner.first_id(cand) != runner.first_id(t):
                edits.append((e, t, cand))
                break
    edited = {e for e, _, _ in edits}
    local = [(e, t) for e, t in known if e not in edited][:n_local]
    return known, edits, local


def measure(runner: Runner, chat: list[str], relation: str, edits, local, base: dict | None):
    """Every measure of one stage; `base` (the unedited model's outputs) makes locality,
    fluency and `para known` relative."""
    paras = PARAPHRASES.get(relation, ())
    edit_first = runner.first([canonical(relation, e) for e, _, _ in edits])
    para_first = runner.first([p.replace("{X}", e) for e, _, _ in edits for p in paras])
    chat_out = runner.greedy(chat, 16)
    loc_first = runner.first([canonical(relation, e) for e, _ in local])
    gen = runner.greedy(list(GENERIC_PROMPTS), 10)
    nll = runner.nll(HELDOUT_TEXT)
    out = {"edit": edit_first, "para": para_first, "chat": chat_out, "loc": loc_first, "gen": gen, "nll": nll}
    return out


def para_hits(runner: Runner, relation: str, edits, got: dict, use_new: bool) -> list[bool]:
    paras = PARAPHRASES.get(relation, ())
    hits = []
    k = 0
    for e, old, new in edits:
        want = runner.first_id(new if use_new else old)
        for _ in paras:
            hits.append(got["para"][k] == want)
            k += 1
    for (e, old, new), ids in zip(edits, got["chat"]):
        text = runner.decode(ids)
        a, b = (new, old) if use_new else (old, new)
        hits.append(a in text and b not in text)
    return hits


def summarise(runner: Runner, relation: str, stage: str, edits, local, got: dict, base: dict, known: list[bool],
              insert_s: float = 0.0) -> Row:
    eff = sum(g == runner.first_id(n) for g, (_, _, n) in zip(got["edit"], edits)) / len(edits)
    hits = para_hits(runner, relation, edits, got, True)
    pk = [h for h, k in zip(hits, known) if k]
    loc = sum(a == b for a, b in zip(got["loc"], base["loc"])) / max(1, len(local))
    flu = sum(a == b for a, b in zip(got["gen"], base["gen"])) / len(GENERIC_PROMPTS)
    import math

    return Row(relation, stage, len(edits), eff, sum(hits) / len(hits), sum(pk) / max(1, len(pk)), len(pk), len(hits),
               loc, len(local), flu, math.exp(got["nll"]) / math.exp(base["nll"]), insert_s)


def table(rows: list[Row]) -> str:
    head = (f"{'relation':<10}{'stage':<14}{'edits':>6}{'efficacy':>10}{'para all':>10}{'para known':>12}"
            f"{'locality':>10}{'fluency':>9}{'ppl ratio':>11}{'insert':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.relation:<10}{r.stage:<14}{r.edits:>6}{r.efficacy:>10.1%}{r.para_all:>10.1%}"
                     f"{r.para_known:>12.1%}{r.locality:>10.1%}{r.fluency:>9.1%}{r.ppl_ratio:>11.4f}"
                     f"{r.insert_s:>8.1f}s")
    lines.append("(para known over the paraphrases + chat questions the unedited model answers right; locality over "
                 "the other known facts; fluency = generic prompts whose first 10 greedy tokens are unchanged; "
                 "ppl ratio = held-out generic text perplexity / the unedited model's)")
    return "\n".join(lines)


def vindex_for(model_path: Path) -> Path:
    """An inference-level vindex of `model_path` (HF directory or GGUF file), extracted once into
    $MODELQL_CACHE/bench-vindex/."""
    from modelql.lql.default_vindex import cache_dir
    from modelql.vindex.extract import extract

    out = cache_dir() / "bench-vindex" / (model_path.stem + ".vindex")
    if not out.exists():
        _log(f"extracting {model_path} into {out} (first use) ...")
        out.parent.mkdir(parents=True, exist_ok=True)
        extract(model_path, out, level="inference", dtype="f32", clusters=False)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="HF model directory or GGUF file")
    ap.add_argument("--edits", type=int, default=20)
    ap.add_argument("--shift", type=int, default=7)
    ap.add_argument("--locality", type=int, default=60)
    ap.add_argument("--relations", default="capital,language")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--hparams", default="", help="MEMIT hyper-parameters, k=v,k=v")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from modelql.knowledge import edit, memit
    from modelql.vindex import Vindex
    from modelql.vindex.compile import compile_model
    from modelql.vindex.overlay import PatchSession

    hp = {}
    for kv in filter(None, args.hparams.split(",")):
        k, v = kv.split("=")
        hp[k] = float(v) if any(c in v for c in ".e") else int(v)
    vx = Vindex.load(vindex_for(args.model))
    base_model = vx.load_model()
    base = Runner(base_model)
    rows: list[Row] = []
    timings: dict = {}
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(str(vx.path))
    chat_runner = Runner(None, None, hf_tok)
    for ri, relation in enumerate(r.strip() for r in args.relations.split(",") if r.strip()):
        try:
            known, edits, local = choose(base, relation, args.edits, args.shift, args.locality)
        except NotEnoughFacts as exc:
            _log(f"{relation}: skipped, {exc}")
            continue
        chat = [chat_runner.hf_tok.apply_chat_template([{"role": "user", "content": CHAT_QUESTIONS.get(
            relation, f"What is the {relation} of {{X}}?").replace("{X}", e)}], tokenize=False,
            add_generation_prompt=True) for e, _, _ in edits]
        _log(f"{relation}: the model knows {len(known)} facts; {len(edits)} edits (e.g. {edits[0]}), "
             f"{len(local)} locality facts")
        b = measure(base, chat, relation, edits, local, None)
        known_mask = para_hits(base, relation, edits, b, False)
        if ri == 0:
            ps = PatchSession(vx, model=base_model)
            t0 = time.perf_counter()
            reqs = [memit.EditRequest(e, RELATION_NAMES.get(relation, relation), n) for e, _, n in edits]
            ready = edit.memit_statistics_ready(ps, **hp)
            memit.prepare_statistics(ps.model(), None, memit.MemitParams(**hp) if hp else None, reqs)
            timings["statistics_s"] = time.perf_counter() - t0
            timings["statistics_cold"] = not ready
            e0, _, n0 = edits[0]
            probe = base_model.tokenizer.encode(canonical(relation, e0))
            before = ps.model().forward(probe, logits="all")
            t0 = time.perf_counter()
            edit.insert(ps, e0, RELATION_NAMES.get(relation, relation), n0, **hp)
            timings["one_edit_s"] = time.perf_counter() - t0
            edit.delete(ps, [("entity", "=", e0)])
            after = ps.model().forward(probe, logits="all")
            timings["delete_bit_identical"] = bool(torch.equal(before, after))
            _log(f"statistics {timings['statistics_s']:.1f}s ({'cold' if not ready else 'cached'}), one edit "
                 f"{timings['one_edit_s']:.1f}s, DELETE bit-identical: {timings['delete_bit_identical']}")
        ps = PatchSession(vx, model=base_model)
        t0 = time.perf_counter()
        try:
            edit.insert_many(ps, [(e, RELATION_NAMES.get(relation, relation), n) for e, _, n in edits], **hp)
        except memit.FluencyGuardError as exc:
            _log(f"  {relation}: the fluency guard refused the batch: {exc}")
            rows.append(Row(relation, "refused", len(edits), 0, 0, 0, 0, 0, 0, len(local), 0, 0))
            continue
        ins = time.perf_counter() - t0
        s = measure(Runner(ps.model()), chat, relation, edits, local, b)
        rows.append(summarise(base, relation, "session", edits, local, s, b, known_mask, ins))
        _log(table(rows[-1:]))
        if not args.no_compile:
            from transformers import AutoModelForCausalLM

            with tempfile.TemporaryDirectory(prefix="modelql-bench-edit-") as tmp:
                out = Path(tmp) / "compiled"
                compile_model(ps, out)
                hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
                hr = Runner(None, hf, AutoTokenizer.from_pretrained(str(out)))
                h = measure(hr, chat, relation, edits, local, b)
                rows.append(summarise(base, relation, "transformers", edits, local, h, b, known_mask))
                _log(table(rows[-1:]))
    print(table(rows))
    print(f"statistics: {timings.get('statistics_s', 0):.1f}s ({'cold' if timings.get('statistics_cold') else 'cached'}), "
          f"one edit: {timings.get('one_edit_s', 0):.1f}s, DELETE restores bit-identical logits: "
          f"{timings.get('delete_bit_identical')}")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": [asdict(r) for r in rows], "timings": timings}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
