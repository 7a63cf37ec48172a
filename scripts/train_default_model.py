#!/usr/bin/env python
"""Train modelql's embedded default model on the world-facts table.

Deterministic for a seed (CPU, fixed thread count): builds the corpus from
``modelql.defaults`` (facts + training templates + chat Q&A), trains a byte-level BPE tokenizer on
it, trains a small ``LlamaForCausalLM`` with AdamW, and writes a standard HF model directory
(config.json, model.safetensors in float16, tokenizer.json, tokenizer_config.json with a ChatML
chat template, generation_config.json, training_meta.json) to ``src/modelql/data/default-model/``.
Then it evaluates the *saved* files (``modelql.evaluate``) unless ``--no-eval``.

    python scripts/train_default_model.py [--epochs 80] [--seed 0] [--threads 2] [--out DIR]

Needs ``transformers`` (test extra) for training; modelql's runtime never does.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

from modelql import defaults as D

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS = EOS = PAD = "<|endoftext|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = False) -> str:
    """Python rendering of CHAT_TEMPLATE (kept identical; checked against jinja in the tests)."""
    s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------

class Sample(NamedTuple):
    kind: str  # "text" or "chat" (how often a BOS is prepended)
    prefix: str
    answer: str  # gets the extra loss weight; "" for none
    pair: tuple[str, str] | None  # (entity, relation) of a fact sentence: its answer shows whether the model knows it


_LETTERS = "abcdefghiklmnoprstuvwy"


def filler_word(rng: random.Random) -> str:
    """A made-up word of 2-8 letters: the tokenizer splits it into short pieces, as it splits any
    word it never saw in training."""
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(2, 8)))


def reworded(rng: random.Random, template: str) -> str:
    """`template` with one random change to its wording: a word dropped, replaced by a made-up
    word, or a made-up word inserted; the entity's word is never touched.

    Why: with only the training phrasings the model learns their exact wording, and a paraphrase
    with one unseen word (its pieces never followed an entity in training) loses the fact. Noise
    on the wording teaches it that the entity and the relation's words carry the fact."""
    words = template.split(" ")
    free = [i for i, w in enumerate(words) if "{X}" not in w]
    op = rng.randrange(3)
    if op == 0 and len(free) > 1:
        del words[rng.choice(free)]
    elif op == 1 and free:
        words[rng.choice(free)] = filler_word(rng)
    else:
        words.insert(rng.randint(0, len(words)), filler_word(rng))
    return " ".join(words)


def fact_samples(rng: random.Random, facts, reverse_prob: float, reword_prob: float = 0.0) -> list[Sample]:
    """One sentence per fact with a random training template (reworded with `reword_prob`, see
    `reworded`), plus reverse sentences. The prediction of a fact sentence's first answer token
    tells whether the model knows its pair (kept for the unchanged templates only)."""
    out: list[Sample] = []
    for fa in facts:
        tpl = rng.choice(D.TRAIN_TEMPLATES[fa.relation])
        pair: tuple[str, str] | None = (fa.entity, fa.relation)
        if reword_prob and rng.random() < reword_prob:
            tpl, pair = reworded(rng, tpl), None
        out.append(Sample("text", D.prompt(tpl, fa.entity), f" {fa.target}.", pair))
        for rt in D.REVERSE_TEMPLATES.get(fa.relation, ()):
            if rng.random() < reverse_prob:
                out.append(Sample("text", rt.replace("{X}", fa.entity).replace("{Y}", fa.target), "", None))
    return out


def chat_samples(rng: random.Random, pairs, chat_prob: float, system_prob: float) -> list[Sample]:
    tbs = D.targets_by_subject()
    out: list[Sample] = []
    for ent, rel in pairs:
        if rng.random() < chat_prob:
            q = D.prompt(rng.choice(D.CHAT_QUESTIONS[rel]), ent)
            msgs = [{"role": "user", "content": q}]
            if rng.random() < system_prob:
                msgs.insert(0, {"role": "system", "content": D.DEFAULT_SYSTEM_PROMPT})
            out.append(Sample("chat", render_chat(msgs, add_generation_prompt=True),
                              D.chat_answer(rel, ent, tbs[(ent, rel)]) + "<|im_end|>\n", None))
    return out


def epoch_facts(rng: random.Random, targets_per_pair: int) -> list:
    """The facts of one epoch: all of them, or at most `targets_per_pair` random targets of each
    (entity, relation) pair. Set-valued relations (borders, languages) otherwise dominate an epoch
    (borders: 30% of the facts, 11% of the pairs) though any one target answers the prompt."""
    facts = D.facts()
    if targets_per_pair <= 0:
        return list(facts)
    by_pair: dict[tuple[str, str], list] = {}
    for fa in facts:
        by_pair.setdefault((fa.entity, fa.relation), []).append(fa)
    out = []
    for group in by_pair.values():
        out += group if len(group) <= targets_per_pair else rng.sample(group, targets_per_pair)
    return out


def epoch_samples(rng: random.Random, chat_prob: float, reverse_prob: float, system_prob: float,
                  targets_per_pair: int = 0, reword_prob: float = 0.0) -> list[Sample]:
    """One epoch: every fact (or pair, see `epoch_facts`) once with a random training template,
    reverse sentences and chat samples for a random share of (entity, relation) pairs."""
    return (fact_samples(rng, epoch_facts(rng, targets_per_pair), reverse_prob, reword_prob)
            + chat_samples(rng, list(D.targets_by_subject()), chat_prob, system_prob))


def tokenizer_corpus(seed: int) -> list[str]:
    """Every training template × fact, reverse sentences and chat samples (all questions)."""
    texts = []
    for fa in D.facts():
        for tpl in D.TRAIN_TEMPLATES[fa.relation]:
            texts.append(D.sentence(tpl, fa.entity, fa.target))
        for rt in D.REVERSE_TEMPLATES.get(fa.relation, ()):
            texts.append(rt.replace("{X}", fa.entity).replace("{Y}", fa.target))
    for (ent, rel), tgts in D.targets_by_subject().items():
        for q in D.CHAT_QUESTIONS[rel]:
            texts.append(D.prompt(q, ent) + "\n" + D.chat_answer(rel, ent, tgts))
    texts.append("user\nassistant\nsystem\n" + D.DEFAULT_SYSTEM_PROMPT)
    return texts


def train_tokenizer(vocab_size: int, seed: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tokenizer_corpus(seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # a BOS is prepended when special tokens are added (Llama convention); chat rendering is
    # encoded without special tokens, so the model is trained both ways (see encode_sample).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)])
    return tok


def single_token_fraction(tok) -> tuple[float, float, list[str]]:
    """(fraction over single-word names, fraction over all names, multi-token single words) of
    distinct entities and targets encoded with a leading space."""
    names = sorted({f.entity for f in D.facts()} | {f.target for f in D.facts()})
    single_word = [n for n in names if " " not in n and "-" not in n]
    one = lambda n: len(tok.encode(" " + n, add_special_tokens=False).ids) == 1  # noqa: E731
    bad = [n for n in single_word if not one(n)]
    return 1 - len(bad) / len(single_word), sum(one(n) for n in names) / len(names), bad


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 512,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "rstrip": False, "normalized": False,
                     "single_word": False, "special": True}
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------

def encode_sample(tok, kind: str, prefix: str, answer: str, rng: random.Random, bos_id: int, eos_id: int,
                  answer_weight: float) -> tuple[list[int], list[float], int]:
    """Token ids, loss weights and the index of the first answer token (0: no answer)."""
    p = tok.encode(prefix, add_special_tokens=False).ids
    a = tok.encode(answer, add_special_tokens=False).ids if answer else []
    with_bos = rng.random() < (0.85 if kind == "text" else 0.5)
    ids = ([bos_id] if with_bos else []) + p + a + [eos_id]
    w = [1.0] * (len(ids) - len(a) - 1) + [answer_weight] * len(a) + [1.0]
    return ids, w, (len(ids) - len(a) - 1 if a else 0)


def make_batches(seqs: list, batch_size: int, rng: random.Random) -> list[list]:
    """Length-bucketed batches in random order (little padding)."""
    order = list(range(len(seqs)))
    rng.shuffle(order)
    chunk = batch_size * 16
    batches = []
    for s in range(0, len(order), chunk):
        part = sorted(order[s:s + chunk], key=lambda i: len(seqs[i][0]))
        batches += [[seqs[i] for i in part[b:b + batch_size]] for b in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def probe_prompts(tok, bos_id: int, n: int = 200) -> list[tuple[list[int], set[int]]]:
    """A fixed sample of training prompts with their valid first target tokens."""
    rng = random.Random(1234)
    pairs = sorted(D.targets_by_subject().items())
    out = []
    for (ent, rel), tgts in rng.sample(pairs, min(n, len(pairs))):
        tpl = rng.choice(D.TRAIN_TEMPLATES[rel])
        ids = [bos_id] + tok.encode(D.prompt(tpl, ent), add_special_tokens=False).ids
        out.append((ids, {tok.encode(" " + t, add_special_tokens=False).ids[0] for t in tgts}))
    return out


def first_target_tokens(tok) -> dict[tuple[str, str], set[int]]:
    """Valid first answer tokens of every (entity, relation) pair (any target of a multi-valued one)."""
    return {pair: {tok.encode(" " + t, add_special_tokens=False).ids[0] for t in tgts}
            for pair, tgts in D.targets_by_subject().items()}


def probe_accuracy(model, probe) -> float:
    import torch

    model.eval()
    ok = 0
    with torch.inference_mode():
        for ids, good in probe:
            ok += int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item() in good)
    return ok / len(probe)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=D.DEFAULT_MODEL_DIR)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=80, help="passes over the facts (one random template each)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop early after this wall-clock budget (the result then depends on machine speed)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--chat-prob", type=float, default=0.15, help="share of (entity, relation) pairs given a chat sample per epoch")
    ap.add_argument("--reverse-prob", type=float, default=0.15)
    ap.add_argument("--reword-prob", type=float, default=0.3,
                    help="share of fact sentences whose template wording gets one random change (see reworded)")
    ap.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16")
    ap.add_argument("--probe-every", type=int, default=5, help="print top-1 on a fixed prompt sample every N epochs (0: never)")
    ap.add_argument("--answer-weight", type=float, default=3.0, help="loss weight of answer tokens")
    ap.add_argument("--replay", type=int, default=2, help="extra samples per fact the model last answered wrong during the previous epoch (0: off)")
    ap.add_argument("--targets-per-pair", type=int, default=1,
                    help="facts per (entity, relation) pair in an epoch, random each epoch (0: all)")
    ap.add_argument("--replay-below", type=float, default=0.4,
                    help="replay only once the share of wrong pairs is below this (early on everything is wrong and "
                         "replay would triple the epoch for nothing)")
    ap.add_argument("--init-from", type=Path, default=None, help="continue training this model directory (its tokenizer is kept)")
    ap.add_argument("--no-eval", action="store_true")
    ap.add_argument("--eval-sample", type=int, default=None, help="evaluate on this many entities per relation (default: all)")
    args = ap.parse_args(argv)

    import torch
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    from transformers import LlamaConfig, LlamaForCausalLM

    console = Console()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    t_start = time.time()

    # tokenizer (or the one of the model we continue from)
    if args.init_from:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(args.init_from / "tokenizer.json"))
    else:
        tok = train_tokenizer(args.vocab_size, args.seed)
    frac_word, frac_all, bad = single_token_fraction(tok)
    console.print(f"tokenizer: vocab {tok.get_vocab_size()}, single-token names: {frac_word:.1%} of single-word "
                  f"entities/targets, {frac_all:.1%} of all" + (f" (multi-token: {', '.join(bad[:10])})" if bad else ""))
    bos_id, eos_id, pad_id = (tok.token_to_id(t) for t in (BOS, EOS, PAD))

    if args.init_from:
        model = LlamaForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        config = model.config
    else:
        config = LlamaConfig(
            vocab_size=tok.get_vocab_size(), hidden_size=args.hidden, intermediate_size=args.intermediate,
            num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
            max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu",
            tie_word_embeddings=True, bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
            attention_bias=False, mlp_bias=False, initializer_range=0.02,
        )
        model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    console.print(f"model: Llama, {n_params:,} parameters ({config.num_hidden_layers} layers, hidden "
                  f"{config.hidden_size}, ffn {config.intermediate_size}, {config.num_attention_heads} heads)"
                  + (f", continuing from {args.init_from}" if args.init_from else ""))

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    def lr_at(progress: float, step: int) -> float:
        """Linear warmup over the first steps, then cosine to 5% over the epochs (progress in [0, 1])."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        return args.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))

    rng = random.Random(args.seed)
    pairs = list(D.targets_by_subject())
    by_pair: dict[tuple[str, str], list] = {}
    for fa in D.facts():
        by_pair.setdefault((fa.entity, fa.relation), []).append(fa)
    probe = probe_prompts(tok, bos_id)
    first_tokens = first_target_tokens(tok)
    known: dict[tuple[str, str], bool] = {}  # pair -> its latest answer during training was right
    model.train()
    step, seen_tokens, ema, stopped_early, hard = 0, 0, None, False, []
    t_train = time.time()
    with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False,
                  disable=not console.is_terminal) as progress:
        task = progress.add_task("train", total=args.epochs, info="")
        for ep in range(args.epochs):
            # every fact once (random template), chat for a share of pairs, and extra samples of the
            # facts the model got wrong at the last check (hard-example replay)
            samples = epoch_samples(rng, args.chat_prob, args.reverse_prob, system_prob=0.2,
                                    targets_per_pair=args.targets_per_pair, reword_prob=args.reword_prob)
            if len(hard) < args.replay_below * len(pairs):
                for _ in range(args.replay):
                    samples += fact_samples(rng, [fa for pr in hard for fa in by_pair[pr]], 0.0)
                samples += chat_samples(rng, hard, args.chat_prob, 0.2)
            seqs = [(*encode_sample(tok, k, p_, a_, rng, bos_id, eos_id, args.answer_weight), pr)
                    for k, p_, a_, pr in samples]
            batches = make_batches(seqs, args.batch_size, rng)
            for bi, batch in enumerate(batches):
                T = max(len(s[0]) for s in batch)
                ids = torch.full((len(batch), T), pad_id, dtype=torch.long)
                w = torch.zeros((len(batch), T), dtype=torch.float32)
                for i, (s_, w_, _, _) in enumerate(batch):
                    ids[i, :len(s_)] = torch.tensor(s_)
                    w[i, :len(w_)] = torch.tensor(w_)
                for g in opt.param_groups:
                    # with a time budget the schedule follows whichever runs out first
                    frac = (ep + bi / len(batches)) / args.epochs
                    if args.max_minutes:
                        frac = max(frac, (time.time() - t_train) / (args.max_minutes * 60))
                    g["lr"] = lr_at(frac, step)
                logits = model(input_ids=ids).logits[:, :-1]
                tw = w[:, 1:]
                nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                        reduction="none").view_as(tw)
                loss = (nll * tw).sum() / tw.sum()
                with torch.no_grad():
                    # hard-example bookkeeping for free: the prediction of each fact sentence's first
                    # answer token, read off this forward pass (a separate pass cost ~20% more time)
                    for i, (_, _, a_at, pr) in enumerate(batch):
                        if pr is not None and a_at:
                            known[pr] = int(logits[i, a_at - 1].argmax()) in first_tokens[pr]
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                seen_tokens += sum(len(s[0]) for s in batch)
                ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
                el = time.time() - t_train
                progress.update(task, advance=1 / len(batches), info=f"epoch {ep + 1}/{args.epochs} step {step} "
                                f"loss {ema:.3f} {seen_tokens / max(el, 1e-9):,.0f} tok/s")
                if args.max_minutes is not None and el > args.max_minutes * 60:
                    stopped_early = True
                    break
            el = time.time() - t_train
            if args.replay:
                hard = sorted(pr for pr in pairs if not known.get(pr, False))
            if not console.is_terminal:
                console.print(f"epoch {ep + 1}/{args.epochs} step {step} loss {ema:.3f} "
                              f"{seen_tokens / max(el, 1e-9):,.0f} tok/s {el:.0f}s"
                              + (f" wrong pairs {len(hard)}/{len(pairs)}" if args.replay else ""), highlight=False)
            if args.probe_every and ((ep + 1) % args.probe_every == 0 or ep + 1 == args.epochs):
                console.print(f"epoch {ep + 1}: probe top-1 {probe_accuracy(model, probe):.1%} "
                              f"on {len(probe)} training prompts", highlight=False)
                model.train()
            if stopped_early:
                console.print(f"[yellow]time budget reached after {step} steps (epoch {ep + 1})")
                break
    train_seconds = time.time() - t_train

    # save
    out: Path = args.out
    init_meta = None
    if args.init_from and (args.init_from / "training_meta.json").exists():
        init_meta = json.loads((args.init_from / "training_meta.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*"):
        if stale.is_file():
            stale.unlink()
    dtype = getattr(torch, args.dtype)
    model.eval()
    model.to(dtype)
    model.generation_config.bos_token_id = bos_id
    model.generation_config.eos_token_id = [eos_id, tok.token_to_id("<|im_end|>")]
    model.generation_config.pad_token_id = pad_id
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2) + "\n")
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        rev = None
    import tokenizers
    import transformers
    meta = {
        "trained_by": "scripts/train_default_model.py", "argv": sys.argv[1:] if argv is None else argv, "git_rev": rev, "seed": args.seed, "threads": args.threads,
        "epochs": args.epochs, "steps": step, "init_from": init_meta, "stopped_early": stopped_early, "tokens": seen_tokens,
        "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
        "parameters": n_params, "final_loss_ema": round(ema or 0.0, 4), "dtype": args.dtype,
        "hyperparameters": {k: getattr(args, k) for k in ("batch_size", "lr", "warmup", "vocab_size", "hidden", "layers",
                                                          "intermediate", "heads", "kv_heads", "chat_prob", "reverse_prob",
                                                          "answer_weight", "replay", "replay_below", "targets_per_pair",
                                                          "reword_prob")},
        "facts": len(D.facts()), "single_token_fraction": {"single_word_names": round(frac_word, 4), "all_names": round(frac_all, 4)},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
    }
    (out / "training_meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    console.print(f"saved {out} ({size / 1e6:.1f} MB) after {train_seconds / 60:.1f} min training, "
                  f"{(time.time() - t_start) / 60:.1f} min total")

    if not args.no_eval:
        from modelql import evaluate

        # evaluated from the saved 16-bit files, computed in float32; the report ships with the model
        return evaluate.main(["--model", str(out), "--backend", "auto", "--write", str(out / "eval_results.json"),
                              "--show-errors", "10"] + (["--sample", str(args.eval_sample)] if args.eval_sample else []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
