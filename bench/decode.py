"""Prefill and decode speed of modelql vs HF transformers `generate`, on the same random weights.

    python bench/decode.py                 # ~100M and ~500M Llama, float32 and bfloat16
    python bench/decode.py --sizes 100M --dtypes float32 --repeats 5
    python bench/decode.py --gguf FILE --vs-llama-cpp   # a GGUF file vs llama.cpp (bench/decode_gguf.py)

Builds random-weight LlamaForCausalLM models with transformers in a temp dir (save_pretrained),
loads them with modelql, and times, interleaved in the same run with the same thread count:

* prefill: a 128-token prompt to the first token (`generate(max_tokens=1)` vs HF
  `generate(max_new_tokens=1)`), reported as prompt tokens/s;
* decode: (time for 1 + N tokens − time for 1 token) / N, greedy, EOS ignored, as tokens/s.

Each figure is the best of `--repeats` runs (the machine may be shared: the in-run ratios are
what to read). The bandwidth-limit fraction is (bytes of weights one decode step must read ÷ a
measured memory bandwidth) ÷ the measured time per token: 1.0 would be a decode step that does
nothing but stream its weights once. The bandwidth is measured as a large tensor copy,
(bytes read + bytes written) / time, with the same threads.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # name: (hidden, layers, intermediate, heads, kv_heads)
    "100M": (768, 12, 2048, 12, 12),
    "500M": (1280, 24, 3584, 20, 20),
}
VOCAB = 32000


def build(size: str, directory: Path) -> int:
    """Save a random-weight Llama of the given size; returns its parameter count."""
    import transformers as T

    hidden, layers, inter, heads, kv = SIZES[size]
    config = T.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter,
                           num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                           max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = T.LlamaForCausalLM(config).eval()
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory, safe_serialization=True)
    del model
    gc.collect()
    return n


def copy_bandwidth(mbytes: int = 512, repeats: int = 5) -> float:
    """Bytes per second of a large tensor copy, counting bytes read plus bytes written."""
    n = mbytes * 2**20 // 4
    src = torch.rand(n)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(size: str, dtype: str, directory: Path, n_params: int, args, bandwidth: float) -> dict:
    import transformers as T

    from modelql.runtime import load_model
    from modelql.runtime.generate import generate
    from modelql.runtime.sampling import SamplingParams

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    ours = load_model(directory, dtype)
    hf = T.LlamaForCausalLM.from_pretrained(directory, dtype=torch_dtype).eval()
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, VOCAB, (1, args.prompt), generator=g)
    ids = prompt[0].tolist()
    n = args.tokens

    def ours_gen(k):
        return lambda: generate(ours, ids, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))

    def hf_gen(k):
        def run():
            with torch.inference_mode():
                hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k, min_new_tokens=k,
                            do_sample=False, pad_token_id=0, eos_token_id=None)
        return run

    # correctness guard: both produce the same greedy tokens (float32 only: bf16 rounding differs)
    if dtype == "float32":
        a = generate(ours, ids, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)).token_ids
        with torch.inference_mode():
            b = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False,
                            pad_token_id=0, eos_token_id=None)[0, args.prompt:].tolist()
        if a != b:
            print(f"warning: {size} {dtype}: greedy tokens differ from transformers", file=sys.stderr)
    for fn in (ours_gen(2), hf_gen(2)):  # warm up
        fn()
    t1 = {"ours": [], "hf": []}
    tn = {"ours": [], "hf": []}
    for _ in range(args.repeats):  # interleave so both see the same machine load
        t1["ours"].append(timed(ours_gen(1), 1))
        t1["hf"].append(timed(hf_gen(1), 1))
        tn["ours"].append(timed(ours_gen(n + 1), 1))
        tn["hf"].append(timed(hf_gen(n + 1), 1))
    row = {"size": size, "dtype": dtype, "params": n_params}
    element = torch.tensor([], dtype=torch_dtype).element_size()
    hidden = SIZES[size][0]
    row["weight_bytes"] = (n_params - VOCAB * hidden) * element  # everything but the embedding table
    for who in ("ours", "hf"):
        pre, total = min(t1[who]), min(tn[who])
        per_token = max(total - pre, 1e-9) / n
        row[f"{who}_prefill"] = args.prompt / pre
        row[f"{who}_decode"] = 1 / per_token
        row[f"{who}_ms"] = per_token * 1e3
        row[f"{who}_bw"] = (row["weight_bytes"] / bandwidth) / per_token
        row[f"{who}_spread"] = (statistics.pstdev(tn[who]) / statistics.mean(tn[who])) if len(tn[who]) > 1 else 0.0
    del ours, hf
    gc.collect()
    return row


def print_table(rows: list[dict], bandwidth: float, args) -> None:
    head = ["model", "dtype", "params", "weights", "prefill modelql", "prefill HF", "ratio",
            "decode modelql", "decode HF", "ratio", "ms/tok modelql", "ms/tok HF", "BW-limit modelql", "BW-limit HF"]
    units = ["", "", "M", "MB", "tok/s", "tok/s", "×", "tok/s", "tok/s", "×", "ms", "ms", "fraction", "fraction"]
    lines = []
    for r in rows:
        lines.append([
            f"llama-{r['size']}", r["dtype"], f"{r['params'] / 1e6:.0f}", f"{r['weight_bytes'] / 1e6:.0f}",
            f"{r['ours_prefill']:.0f}", f"{r['hf_prefill']:.0f}", f"{r['ours_prefill'] / r['hf_prefill']:.2f}",
            f"{r['ours_decode']:.1f}", f"{r['hf_decode']:.1f}", f"{r['ours_decode'] / r['hf_decode']:.2f}",
            f"{r['ours_ms']:.1f}", f"{r['hf_ms']:.1f}", f"{r['ours_bw']:.2f}", f"{r['hf_bw']:.2f}",
        ])
    widths = [max(len(h), len(u), *(len(line[i]) for line in lines)) for i, (h, u) in enumerate(zip(head, units))]
    fmt = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    print(f"\nthreads={torch.get_num_threads()}  prompt={args.prompt} tokens  decode={args.tokens} tokens (greedy)  "
          f"copy bandwidth={bandwidth / 1e9:.1f} GB/s (read+write)  best of {args.repeats}")
    print(fmt(head))
    print(fmt(units))
    print(fmt(["-" * w for w in widths]))
    for line in lines:
        print(fmt(line))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens for prefill")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--gguf", help="benchmark this GGUF file (and Q8_0 / Q4_K_M versions of it) instead")
    ap.add_argument("--vs-llama-cpp", action="store_true",
                    help="with --gguf: compare with llama.cpp (llama-cpp-python) when importable")
    ap.add_argument("--variants", nargs="*", default=["q8_0", "q4_k_m"], choices=["q8_0", "q4_k_m"],
                    help="with --gguf: derived files to make from its F16 export (none: the file only)")
    ap.add_argument("--agreement", action="store_true",
                    help="with --gguf: greedy agreement and logits vs transformers' dequantized reference")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--agree-tokens", type=int, default=32)
    ap.add_argument("--float-too", action="store_true", help="with --gguf: also time modelql's float32 path")
    ap.add_argument("--memory-1b", action="store_true",
                    help="peak RSS loading a random ~1B Llama written as a Q4_K_M-like GGUF, vs its file size")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_1b:
        sys.path.insert(0, str(Path(__file__).parent))
        import decode_gguf

        decode_gguf.memory_1b(args)
        return
    if args.gguf:
        sys.path.insert(0, str(Path(__file__).parent))
        import decode_gguf

        decode_gguf.main(args)
        return
    import transformers

    transformers.logging.set_verbosity_error()
    bandwidth = copy_bandwidth()
    rows = []
    with tempfile.TemporaryDirectory(prefix="modelql-bench-") as tmp:
        for size in args.sizes:
            d = Path(tmp) / size
            t = time.perf_counter()
            n = build(size, d)
            print(f"built llama-{size}: {n / 1e6:.0f}M parameters in {time.perf_counter() - t:.0f}s", file=sys.stderr)
            for dtype in args.dtypes:
                rows.append(measure(size, dtype, d, n, args, bandwidth))
                r = rows[-1]
                print(f"  {dtype}: decode {r['ours_decode']:.1f} vs {r['hf_decode']:.1f} tok/s, "
                      f"prefill {r['ours_prefill']:.0f} vs {r['hf_prefill']:.0f} tok/s", file=sys.stderr)
    print_table(rows, bandwidth, args)


if __name__ == "__main__":
    main()
