"""Walk FFN benchmark: decode speed and fidelity of full and sparse top-K walks against dense.

    python bench/walk.py [--quick]

Part 1 (speed, 500M random Llama): greedy decode tokens/s with the dense FFN, walk-full and
sparse walks at several K, all in one run so the ratios are meaningful on a noisy machine.
Part 2 (fidelity): top-1 agreement and mean KL(dense ‖ sparse) over teacher-forced positions
for K = 100%, 50%, 25%, 10%, 5% of the features, on the embedded model and on the 500M model,
and the largest K fraction where agreement first falls below 99%.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import random_llama  # noqa: E402

from modelql.ffn import WalkFfn  # noqa: E402
from modelql.runtime import load_model  # noqa: E402

FRACTIONS = [1.0, 0.5, 0.25, 0.10, 0.05]


def decode_rate(model, prompt_len: int, new_tokens: int) -> float:
    ids = torch.randint(0, model.spec.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache()
    logits = model.forward(ids, cache, logits="last")
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model.forward(logits.argmax(-1, keepdim=True), cache, logits="last")
    return new_tokens / (time.perf_counter() - start)


def fidelity(model, batches: list[torch.Tensor], frac: float) -> tuple[float, float]:
    """(top-1 agreement, mean KL(dense‖walk) in nats) over every position of the batches."""
    f = model.spec.intermediate_size
    walk = WalkFfn.from_model(model, k=max(1, round(frac * f)) if frac < 1 else None)
    agree = total = 0
    kl = 0.0
    for ids in batches:
        model.ffn = model.dense_ffn
        ref = torch.log_softmax(model.forward(ids)[0].double(), -1)
        model.ffn = walk
        got = torch.log_softmax(model.forward(ids)[0].double(), -1)
        model.ffn = model.dense_ffn
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        total += ref.shape[0]
        kl += float((ref.exp() * (ref - got)).sum(-1).sum())
    return agree / total, kl / total


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100M model instead of 500M, fewer tokens")
    args = ap.parse_args()
    torch.set_num_threads(2)
    size = "100m" if args.quick else "500m"
    print(f"building/loading random {size} Llama ...", flush=True)
    big = load_model(random_llama(size))
    f = big.spec.intermediate_size
    new_tokens = 16 if args.quick else 32

    rows = []
    dense_rate = decode_rate(big, 16, new_tokens)
    rows.append(["dense", "-", f"{dense_rate:.2f}", "1.00"])
    for label, k in [("walk-full", None)] + [(f"sparse {int(fr * 100)}%", round(fr * f)) for fr in (0.5, 0.25, 0.10, 0.05)]:
        big.ffn = WalkFfn.from_model(big, k=k)
        rate = decode_rate(big, 16, new_tokens)
        big.ffn = big.dense_ffn
        rows.append([label, str(k or f), f"{rate:.2f}", f"{rate / dense_rate:.2f}"])
    table(f"Decode speed, random {size} Llama, float32, {new_tokens} tokens after a 16-token prompt",
          ["FFN", "K", "tok/s", "× dense"], rows)

    subjects = []
    try:
        from modelql.defaults import DEFAULT_MODEL_DIR, facts

        small = load_model(DEFAULT_MODEL_DIR)
        prompts = [f"The capital of {fact.entity} is" for fact in facts() if fact.relation == "capital"][:64]
        subjects.append(("embedded model", small, [torch.tensor([small.tokenizer.encode(p)]) for p in prompts]))
    except Exception as exc:  # the embedded model is optional for this benchmark
        print(f"\n(embedded model unavailable: {exc})")
    g = torch.Generator().manual_seed(1)
    subjects.append((f"random {size}", big, [torch.randint(0, big.spec.vocab_size, (1, 32), generator=g) for _ in range(4)]))
    for name, model, batches in subjects:
        rows, below = [], None
        for frac in FRACTIONS:
            agree, kl = fidelity(model, batches, frac)
            if agree < 0.99 and below is None:
                below = frac
            rows.append([f"{int(frac * 100)}%", str(max(1, round(frac * model.spec.intermediate_size))),
                         f"{agree * 100:.1f}%", f"{kl:.2e}"])
        positions = sum(b.shape[1] for b in batches)
        table(f"Sparse walk fidelity vs dense, {name} ({positions} positions)",
              ["K", "features", "top-1 agree", "KL nats"], rows)
        print("agreement falls below 99% at K = " + (f"{int(below * 100)}%" if below else "none of the tested K"))


if __name__ == "__main__":
    main()
