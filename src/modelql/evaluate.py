"""Measure the embedded default model against its ground-truth facts.

Three measurements, each per relation:

* **template accuracy** on the training templates and on the held-out paraphrases
  (``modelql.defaults``): the prompt (with BOS) is run once; ``top1`` counts a prompt correct when
  the greedy next token is the first token of ``" " + target`` (for multi-valued relations: of any
  valid target); ``exact`` counts it correct when greedy decoding reproduces a whole valid target
  and then ends the word.
* **chat accuracy**: the question is rendered with the model's chat template (user turn,
  generation prompt), greedy-generated until ``<|im_end|>``, and counted correct when the answer
  contains a valid target as a whole word.

Functions return typed rows; :func:`main` (``python -m modelql.evaluate``) prints them.
Backends: ``modelql`` (modelql's own runtime, when importable) and ``hf`` (transformers, the
independent reference); ``auto`` prefers modelql.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from modelql import defaults as D


@dataclass(frozen=True)
class AccuracyRow:
    relation: str  # a relation name, or "all"
    template_set: str  # "train" | "heldout"
    n: int  # prompts (entity × template; multi-valued relations: one per entity, any target counts)
    top1: int
    exact: int

    @property
    def top1_acc(self) -> float:
        return self.top1 / self.n if self.n else 0.0

    @property
    def exact_acc(self) -> float:
        return self.exact / self.n if self.n else 0.0


@dataclass(frozen=True)
class ChatRow:
    relation: str
    question_set: str  # "train" | "heldout"
    n: int
    correct: int

    @property
    def acc(self) -> float:
        return self.correct / self.n if self.n else 0.0


@dataclass(frozen=True)
class ChatSample:
    relation: str
    entity: str
    question: str
    answer: str
    correct: bool


class Backend(Protocol):
    name: str

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def argmax(self, batch: list[list[int]]) -> list[list[int]]:
        """Greedy next token at every position of every sequence."""
        ...

    def generate(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy continuation of equal-length prompts, stopping at the model's stop tokens (excluded)."""
        ...

    def render_chat(self, messages: list[dict[str, str]]) -> str: ...


class _TokenizerMixin:
    model_dir: Path

    def _init_tokenizer(self) -> None:
        from tokenizers import Tokenizer

        self.tok = Tokenizer.from_file(str(self.model_dir / "tokenizer.json"))
        cfg = json.loads((self.model_dir / "tokenizer_config.json").read_text())
        self.chat_template = cfg["chat_template"]
        gen = json.loads((self.model_dir / "generation_config.json").read_text())
        eos = gen.get("eos_token_id")
        self.stop_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_id = gen.get("pad_token_id") or self.tok.token_to_id("<|endoftext|>")

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        import jinja2.sandbox

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        return env.from_string(self.chat_template).render(messages=messages, add_generation_prompt=True)


class HFBackend(_TokenizerMixin):
    """transformers' LlamaForCausalLM in float32 (the reference)."""

    name = "hf"

    def __init__(self, model_dir: Path | str, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self._init_tokenizer()
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()

    def _pad(self, batch: list[list[int]]):
        import torch

        T = max(len(s) for s in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
        return ids

    def argmax(self, batch: list[list[int]]) -> list[list[int]]:
        import torch

        with torch.inference_mode():
            # right padding under a causal mask: positions before the padding are unaffected
            am = self.model(input_ids=self._pad(batch)).logits.argmax(-1)
        return [am[i, : len(s)].tolist() for i, s in enumerate(batch)]

    def generate(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch

        assert len({len(s) for s in batch}) == 1, "equal-length prompts only"
        ids = torch.tensor(batch, dtype=torch.long)
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=sorted(self.stop_ids), pad_token_id=self.pad_id)
        res = []
        for row in out[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.stop_ids), len(row))
            res.append(row[:cut])
        return res


class ModelqlBackend(_TokenizerMixin):
    """modelql's own runtime (``modelql.runtime.load_model``) in float32."""

    name = "modelql"

    def __init__(self, model_dir: Path | str, threads: int | None = None):
        import torch

        from modelql.runtime import load_model

        if threads:
            torch.set_num_threads(threads)
        self.model_dir = Path(model_dir)
        self._init_tokenizer()
        self.model = load_model(self.model_dir, "float32")

    def argmax(self, batch: list[list[int]]) -> list[list[int]]:
        import torch

        T = max(len(s) for s in batch)
        ids = torch.full((len(batch), T), self.pad_id, dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s)] = torch.tensor(s)
        am = self.model.forward(ids, logits="all").argmax(-1)
        return [am[i, : len(s)].tolist() for i, s in enumerate(batch)]

    def generate(self, batch: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        import torch

        assert len({len(s) for s in batch}) == 1, "equal-length prompts only"
        caches = [self.model.new_cache() for _ in batch]
        nxt = self.model.forward(torch.tensor(batch, dtype=torch.long), caches, logits="last").argmax(-1)
        out: list[list[int]] = [[] for _ in batch]
        done = [False] * len(batch)
        for step in range(max_new_tokens):
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in self.stop_ids:
                        done[i] = True
                    else:
                        out[i].append(t)
            if all(done) or step == max_new_tokens - 1:
                break
            nxt = self.model.forward(nxt[:, None], caches, logits="last").argmax(-1)
        return out


def make_backend(model_dir: Path | str | None = None, backend: str = "auto", threads: int | None = None) -> Backend:
    """``auto``: modelql's runtime when importable, else transformers."""
    model_dir = Path(model_dir) if model_dir else D.DEFAULT_MODEL_DIR
    if backend == "modelql":
        return ModelqlBackend(model_dir, threads=threads)
    if backend == "auto":
        try:
            import modelql.runtime  # noqa: F401
        except ImportError:
            pass
        else:
            return ModelqlBackend(model_dir, threads=threads)
    return HFBackend(model_dir, threads=threads)


# ---------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------

def sample_pairs(relations: Sequence[str] = D.RELATIONS, per_relation: int | None = None,
                 seed: int = 0) -> list[tuple[str, str]]:
    """``(entity, relation)`` pairs, all or a deterministic sample of ``per_relation`` each."""
    by_rel: dict[str, list[tuple[str, str]]] = {r: [] for r in relations}
    for (e, r) in D.targets_by_subject():
        if r in by_rel:
            by_rel[r].append((e, r))
    out = []
    for r in relations:
        pairs = sorted(by_rel[r])
        if per_relation is not None and per_relation < len(pairs):
            pairs = sorted(random.Random(f"{seed}:{r}").sample(pairs, per_relation))
        out += pairs
    return out


_WORDCHAR = re.compile(r"^[\w\-'’]")


def template_accuracy(be: Backend, template_set: str = "train", pairs: Sequence[tuple[str, str]] | None = None,
                      batch_size: int = 256) -> list[AccuracyRow]:
    """Per-relation rows plus an ``"all"`` row, for ``template_set`` in {"train", "heldout"}."""
    templates = {"train": D.TRAIN_TEMPLATES, "heldout": D.HELDOUT_TEMPLATES}[template_set]
    pairs = list(pairs) if pairs is not None else sample_pairs()
    tbs = D.targets_by_subject()
    # one sequence per (pair, template, target); a prompt is an item
    items: list[tuple[str, list[int], list[list[int]]]] = []  # relation, prompt ids, target ids
    for ent, rel in pairs:
        tids = [be.encode(" " + t, False) for t in tbs[(ent, rel)]]
        for tpl in templates[rel]:
            items.append((rel, be.encode(D.prompt(tpl, ent), True), tids))
    seqs, owner = [], []
    for k, (_, p, tids) in enumerate(items):
        for t in tids:
            seqs.append(p + t)
            owner.append(k)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    am: list[list[int] | None] = [None] * len(seqs)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        for i, a in zip(idx, be.argmax([seqs[i] for i in idx])):
            am[i] = a
    top1 = [False] * len(items)
    exact = [False] * len(items)
    j = 0
    for k, (_, p, tids) in enumerate(items):
        for t in tids:
            a = am[j]
            j += 1
            n = len(p)
            if a[n - 1] == t[0]:
                top1[k] = True
                if a[n - 1:n - 1 + len(t)] == t and not _WORDCHAR.match(be.decode([a[-1]])):
                    exact[k] = True
    rows = []
    rels = [r for r in D.RELATIONS if any(it[0] == r for it in items)]
    for r in rels + ["all"]:
        ks = [k for k, it in enumerate(items) if r == "all" or it[0] == r]
        rows.append(AccuracyRow(r, template_set, len(ks), sum(top1[k] for k in ks), sum(exact[k] for k in ks)))
    return rows


def chat_accuracy(be: Backend, question_set: str = "train", pairs: Sequence[tuple[str, str]] | None = None,
                  max_new_tokens: int = 40, batch_size: int = 64) -> tuple[list[ChatRow], list[ChatSample]]:
    """One question per pair (the training questions alternate deterministically by entity)."""
    questions = {"train": D.CHAT_QUESTIONS, "heldout": D.HELDOUT_CHAT_QUESTIONS}[question_set]
    pairs = list(pairs) if pairs is not None else sample_pairs()
    tbs = D.targets_by_subject()
    prompts = []
    for i, (ent, rel) in enumerate(pairs):
        qs = questions[rel]
        q = D.prompt(qs[i % len(qs)], ent)
        ids = be.encode(be.render_chat([{"role": "user", "content": q}]), False)
        prompts.append((ent, rel, q, ids))
    answers: list[str] = [""] * len(prompts)
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p[3]), []).append(i)
    for _, idx in sorted(by_len.items()):
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            for i, out in zip(chunk, be.generate([prompts[i][3] for i in chunk], max_new_tokens)):
                answers[i] = be.decode(out).strip()
    samples = []
    for (ent, rel, q, _), ans in zip(prompts, answers):
        ok = any(re.search(r"(?<![\w])" + re.escape(t) + r"(?![\w])", ans) for t in tbs[(ent, rel)])
        samples.append(ChatSample(rel, ent, q, ans, ok))
    rows = []
    rels = [r for r in D.RELATIONS if any(s.relation == r for s in samples)]
    for r in rels + ["all"]:
        ss = [s for s in samples if r == "all" or s.relation == r]
        rows.append(ChatRow(r, question_set, len(ss), sum(s.correct for s in ss)))
    return rows, samples


def greedy_continuations(be: Backend, prompts: Sequence[str], max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy token ids after each prompt (BOS added), for backend-agreement checks."""
    return [be.generate([be.encode(p, True)], max_new_tokens)[0] for p in prompts]


# ---------------------------------------------------------------------------------------------
# full report and CLI
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Report:
    backend: str
    model: str
    sample: int | None  # entities per relation, None = all
    train: list[AccuracyRow]
    heldout: list[AccuracyRow]
    chat: list[ChatRow]  # empty when chat was skipped
    chat_heldout: list[ChatRow]
    chat_errors: list[ChatSample]
    seconds: float

    def to_json(self) -> dict:
        d = asdict(self)
        d["chat_errors"] = d["chat_errors"][:50]
        return d


def evaluate_model(model_dir: Path | str | None = None, backend: str = "auto", sample: int | None = None,
                   seed: int = 0, chat: bool = True, threads: int | None = None) -> Report:
    t0 = time.time()
    be = make_backend(model_dir, backend, threads)
    pairs = sample_pairs(per_relation=sample, seed=seed)
    train = template_accuracy(be, "train", pairs)
    held = template_accuracy(be, "heldout", pairs)
    c_rows: list[ChatRow] = []
    ch_rows: list[ChatRow] = []
    errors: list[ChatSample] = []
    if chat:
        c_rows, s1 = chat_accuracy(be, "train", pairs)
        ch_rows, s2 = chat_accuracy(be, "heldout", pairs)
        errors = [s for s in s1 + s2 if not s.correct]
    return Report(be.name, str(Path(model_dir) if model_dir else D.DEFAULT_MODEL_DIR), sample, train, held,
                  c_rows, ch_rows, errors, round(time.time() - t0, 1))


def print_report(rep: Report, console=None, show_errors: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"default-model accuracy ({rep.backend} backend, "
                        f"{'all facts' if rep.sample is None else f'{rep.sample} entities/relation'})")
    for col in ("relation", "entities", "train top-1", "train exact", "held-out top-1", "held-out exact"):
        table.add_column(col, justify="left" if col == "relation" else "right")
    if rep.chat:
        table.add_column("chat", justify="right")
        table.add_column("chat held-out", justify="right")
    pct = lambda x: f"{100 * x:.1f}%"  # noqa: E731
    for i, r in enumerate(rep.train):
        h = rep.heldout[i]
        n_ent = rep.chat[i].n if rep.chat else r.n // len(D.TRAIN_TEMPLATES.get(r.relation, ("",) * 5))
        cells = [r.relation, str(n_ent), pct(r.top1_acc), pct(r.exact_acc), pct(h.top1_acc), pct(h.exact_acc)]
        if rep.chat:
            cells += [pct(rep.chat[i].acc), pct(rep.chat_heldout[i].acc)]
        table.add_row(*cells, end_section=r.relation == D.RELATIONS[-1])
    console.print(table)
    for s in rep.chat_errors[:show_errors]:
        console.print(f"[red]x[/red] {s.question!r} -> {s.answer!r}", highlight=False)
    console.print(f"evaluated in {rep.seconds:.1f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m modelql.evaluate",
                                 description="Top-1 accuracy of the default model on its facts, per relation.")
    ap.add_argument("--model", type=Path, default=None, help="model directory (default: the embedded default model)")
    ap.add_argument("--backend", choices=["auto", "modelql", "hf"], default="auto")
    ap.add_argument("--sample", type=int, default=None, help="entities per relation (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-chat", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--write", type=Path, default=None, help="also write the JSON report to this file")
    ap.add_argument("--show-errors", type=int, default=0, help="print this many wrong chat answers")
    args = ap.parse_args(argv)
    rep = evaluate_model(args.model, args.backend, args.sample, args.seed, not args.no_chat, args.threads)
    if args.write:
        args.write.write_text(json.dumps(rep.to_json(), indent=1, ensure_ascii=False) + "\n")
    if args.json:
        print(json.dumps(rep.to_json(), indent=1, ensure_ascii=False))
    else:
        print_report(rep, show_errors=args.show_errors)
    return 0


if __name__ == "__main__":
    sys.exit(main())
