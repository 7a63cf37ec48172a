#!/usr/bin/env python
"""Cost of grammar-constrained decoding: decode tokens/s with and without a grammar, same run.

For batch sizes 1 and 8 (the engine's batched `generate.step`), the embedded default model
(or `--model`) generates `--tokens` tokens per sequence from the same prompts, sampled at
temperature 1 with fixed seeds, in three modes:

* `free`: no grammar (the reference);
* `json_schema`: a schema whose string field is unbounded, so every sequence runs to
  `--tokens` (the steady-state per-token cost: a mask per token per sequence);
* `tools`: the tool-call grammar of two tools with `tool_choice: required`.

Matcher creation (grammar compilation) is inside the timed region. Passes are interleaved
`--repeats` times (the order rotating) and the best of each kept (a shared machine's load drifts).
Two clocks: wall time, and the process's CPU time (what the decode itself consumed: on a machine
other jobs load, wall time also counts the time the scheduler gave them; with `--threads 1` the
CPU time is the decode's cost). The figure that matters is the ratio to `free` (target: ≥ 0.85,
i.e. structured decoding costs ≤ 15%).

    python bench/structured.py [--model PATH] [--tokens 128] [--batch 1,8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time


def run(model, prompts, grammar_of, tokens: int) -> tuple[float, float, int]:
    """→ (wall seconds, CPU seconds, generated tokens) for one batch decoded to the end."""
    import torch

    from modelql.runtime.generate import Sequence, prefill_batch, step
    from modelql.runtime.sampling import SamplingParams

    seqs = [Sequence(model, p, SamplingParams(temperature=1.0, seed=i, max_tokens=tokens, ignore_eos=True),
                     grammar=grammar_of()) for i, p in enumerate(prompts)]
    with torch.inference_mode():
        prefill_batch(model, seqs)
        t0, c0 = time.perf_counter(), time.process_time()
        while any(not s.finished for s in seqs):
            step(model, seqs)
        dt, ct = time.perf_counter() - t0, time.process_time() - c0
    return dt, ct, sum(s.generated for s in seqs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from modelql.runtime.constrain import json_schema_grammar
    from modelql.runtime.loading import load_model
    from modelql.server import tools

    torch.set_num_threads(args.threads)
    model = load_model(args.model)
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"],
              "additionalProperties": False}
    tool_list = tools.parse_tools([
        {"type": "function", "function": {"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]}}}])
    tool_grammar = tools.tool_grammar(tools.plan(tool_list, "required", False))
    json_grammar = json_schema_grammar(schema)
    modes = {"free": lambda: None, "json_schema": lambda: json_grammar, "tools": lambda: tool_grammar}
    questions = ["What is the capital of France?", "Which language is spoken in Brazil?",
                 "What currency does Japan use?", "Where is Nairobi?"]
    print(f"model {getattr(model, 'path', None) or 'default'}, {args.tokens} tokens per sequence, "
          f"best of {args.repeats}, {args.threads} thread(s)")
    print(f"{'batch':>5}  {'mode':<12} {'tok/s':>9}  {'vs free':>8}  {'tok/CPU-s':>10}  {'vs free':>8}")
    names = list(modes)
    for b in [int(x) for x in args.batch.split(",")]:
        prompts = [[{"role": "user", "content": questions[i % len(questions)]}] for i in range(b)]
        best: dict[str, float] = {}
        best_cpu: dict[str, float] = {}
        run(model, prompts, modes["json_schema"], 8)  # warm-up (tokenizer adapter, allocator)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                dt, ct, n = run(model, prompts, modes[name], args.tokens)
                best[name] = max(best.get(name, 0.0), n / dt)
                best_cpu[name] = max(best_cpu.get(name, 0.0), n / max(ct, 1e-9))
        for name in names:
            print(f"{b:>5}  {name:<12} {best[name]:>9.1f}  {best[name] / best['free']:>8.3f}  "
                  f"{best_cpu[name]:>10.1f}  {best_cpu[name] / best_cpu['free']:>8.3f}")
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
