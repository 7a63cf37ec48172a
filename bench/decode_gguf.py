"""GGUF decode speed and memory: modelql's low-bit path vs llama.cpp (or transformers) on the same file.

    python bench/decode.py --gguf FILE                  # FILE, plus Q8_0 / Q4_K_M versions of it
    python bench/decode.py --gguf FILE --agreement      # greedy agreement + logits vs transformers
    python bench/decode.py --memory-1b                  # RSS of a random ~1B Q4_K_M-like GGUF vs its size

llama.cpp is the reference whenever llama-cpp-python is importable (a 10-30 minute source build,
`CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-binary llama-cpp-python llama-cpp-python`; not a
dependency of modelql); otherwise one line says so and the reference is transformers' GGUF loader
(`from_pretrained(gguf_file=...)`, which dequantizes to float32). modelql runs three times: float32
activations (the default), int16 (`--quantize auto:int16`: the int8 kernel on the activations' rounding and
on its rest) and int8 activations (`--quantize auto:int8`).

Every engine runs in its own subprocess (so each peak RSS is its own), one after the other in the same
run, with the same thread count: load, warm up, then a greedy decode of `--tokens` tokens after a short
prompt, best of `--repeats`. Decode tok/s = N / (time(prompt + N + 1 tokens) − time(prompt + 1 token)).
The machine may be shared: read the in-run ratios.

Derived files (never downloaded): the F16 export is the file's own weights dequantized and written
by `modelql.models.gguf_convert` (gguf-py) from a HF directory made from the GGUF; Q8_0 is gguf-py's
quantizer on it; Q4_K_M is llama.cpp's quantizer (`llama_model_quantize`) on it, when importable.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPTS = [
    "The capital of France is", "Water boils at a temperature of", "The largest planet in the solar system is",
    "Photosynthesis is the process by which", "The author of Romeo and Juliet is", "A triangle has three",
    "The chemical symbol for gold is", "In computer science, a linked list is", "The Great Wall of China was built",
    "The speed of light is approximately", "Shakespeare was born in the town of", "The human heart has four",
    "Python is a programming language that", "The Amazon river flows through", "Mount Everest is located in",
    "The theory of relativity was developed by", "A haiku is a form of poetry with", "The moon orbits the Earth every",
    "Bread is made from flour, water and", "The first person to walk on the moon was",
]


def peak_rss_mb() -> float:
    """This process's peak RSS: /proc's VmHWM (ru_maxrss keeps, across exec, the RSS the parent had
    at fork: every worker then reported the parent's peak)."""
    try:
        with open("/proc/self/status") as fh:
            return int(fh.read().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Current RSS (Linux /proc; the peak elsewhere)."""
    try:
        with open("/proc/self/status") as fh:
            return int(fh.read().split("VmRSS:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return peak_rss_mb()


# ---------------------------------------------------------------------------------------------
# workers (one engine per process)
# ---------------------------------------------------------------------------------------------


def _best(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def worker_modelql(path: str, tokens: int, repeats: int, quantize: str) -> dict:
    import onnxruntime  # noqa: F401  (libraries loaded before `base`: their cost is not the model's)

    from modelql.runtime import load_model
    from modelql.runtime.generate import generate
    from modelql.runtime.sampling import SamplingParams

    base = rss_mb()
    t = time.perf_counter()
    model = load_model(path, "float32", quantize)
    load_s = time.perf_counter() - t
    ids = model.tokenizer.encode(PROMPTS[0])

    def run(k):
        return lambda: generate(model, ids, SamplingParams(temperature=0, max_tokens=k, ignore_eos=True))

    run(4)()
    t1 = _best(run(1), repeats)
    tn = _best(run(tokens + 1), repeats)
    out = generate(model, ids, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)).token_ids
    return {"decode": tokens / max(tn - t1, 1e-9), "prefill_s": t1, "load_s": load_s, "tokens": out,
            "quantized": model.quantized, "base_rss_mb": base}


def worker_llama_cpp(path: str, tokens: int, repeats: int, threads: int) -> dict:
    import numpy as np
    from llama_cpp import Llama

    base = rss_mb()
    t = time.perf_counter()
    llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, verbose=False)
    load_s = time.perf_counter() - t
    ids = llm.tokenize(PROMPTS[0].encode(), add_bos=False)

    def run(k):
        def go():
            llm.reset()
            llm.eval(ids)
            out = []
            for _ in range(k):
                tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
                out.append(tok)
                if len(out) < k:
                    llm.eval([tok])
            return out
        return go

    run(4)()
    t1 = _best(run(1), repeats)
    tn = _best(run(tokens + 1), repeats)
    return {"decode": tokens / max(tn - t1, 1e-9), "prefill_s": t1, "load_s": load_s, "tokens": run(16)(),
            "base_rss_mb": base}


def worker_transformers(path: str, tokens: int, repeats: int) -> dict:
    import torch
    import transformers as T

    T.logging.set_verbosity_error()
    p = Path(path)
    base = rss_mb()
    t = time.perf_counter()
    model = T.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    tok = T.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    load_s = time.perf_counter() - t
    prompt = torch.tensor([tok.encode(PROMPTS[0], add_special_tokens=False)])

    def run(k):
        def go():
            with torch.inference_mode():
                return model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=k,
                                      min_new_tokens=k, do_sample=False, pad_token_id=0)[0, prompt.shape[1]:].tolist()
        return go

    run(4)()
    t1 = _best(run(1), repeats)
    tn = _best(run(tokens + 1), repeats)
    return {"decode": tokens / max(tn - t1, 1e-9), "prefill_s": t1, "load_s": load_s, "tokens": run(16)(),
            "base_rss_mb": base}


def worker_main(argv: list[str]) -> None:
    engine, path, tokens, repeats, threads = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
    if engine != "llama.cpp":  # llama.cpp's process imports no torch (≈ 210 MB of RSS), as a user's would not
        import torch

        torch.set_num_threads(threads)
    if engine == "modelql":
        row = worker_modelql(path, tokens, repeats, "auto")
    elif engine in ("modelql-int8", "modelql-int16"):
        row = worker_modelql(path, tokens, repeats, "auto:" + engine.rpartition("-")[2])
    elif engine == "modelql-float":
        row = worker_modelql(path, tokens, repeats, "none")
    elif engine == "llama.cpp":
        row = worker_llama_cpp(path, tokens, repeats, threads)
    else:
        row = worker_transformers(path, tokens, repeats)
    row["peak_rss_mb"] = peak_rss_mb()
    print("RESULT " + json.dumps(row))


def run_worker(engine: str, path: Path, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, __file__, "--worker", engine, str(path), str(args.tokens), str(args.repeats),
           str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise RuntimeError(f"{engine} on {path.name} failed:\n{proc.stderr[-2000:]}")


# ---------------------------------------------------------------------------------------------
# derived files
# ---------------------------------------------------------------------------------------------


def export_hf(gguf_path: Path, out_dir: Path) -> Path:
    """The GGUF's weights (dequantized, stored float16) as a HF directory: the "F16 export"."""
    import torch
    from safetensors.torch import save_file

    from modelql.models.gguf import GgufSource

    src = GgufSource(gguf_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in src.hf_files().items():
        (out_dir / name).write_text(text, encoding="utf-8")
    cfg = json.loads((out_dir / "config.json").read_text())
    cfg["torch_dtype"] = "float16"
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file({n: src.get(n).to(torch.float16).contiguous() for n in src.names()}, str(out_dir / "model.safetensors"))
    return out_dir


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def derived_files(gguf_path: Path, tmp: Path, variants: list[str]) -> list[tuple[str, Path]]:
    from modelql.models.gguf_convert import convert

    files = [(gguf_path.stem.rsplit(".", 1)[-1], gguf_path)]
    if not variants:
        return files
    hf = export_hf(gguf_path, tmp / "hf-f16")
    f16 = tmp / "model-F16.gguf"
    convert(hf, f16, "f16")
    if "q8_0" in variants:
        q8 = tmp / "model-Q8_0.gguf"
        convert(hf, q8, "q8_0")
        files.append(("Q8_0 (gguf-py)", q8))
    if "q4_k_m" in variants:
        if llama_cpp_available():
            import llama_cpp

            q4k = tmp / "model-Q4_K_M.gguf"
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), str(q4k).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize failed ({rc})")
            files.append(("Q4_K_M (llama.cpp)", q4k))
        else:
            print("note: Q4_K_M needs llama.cpp's quantizer (pip install llama-cpp-python); skipped", file=sys.stderr)
    return files


# ---------------------------------------------------------------------------------------------
# agreement with transformers' dequantized reference
# ---------------------------------------------------------------------------------------------


def agreement(path: Path, n_prompts: int, n_tokens: int, threads: int = 2) -> dict[str, dict]:
    """Greedy tokens vs transformers on the GGUF (dequantized float32), for modelql's low-bit path with
    float32 activations (the default), int16 (`:int16`) and int8 activations (`:int8`), its float path (dequantized
    weights: what is left is summation order) and, when importable, llama.cpp (whose kernels quantize the
    activations to 8 bits per block too): per-position agreement over the prompts, how many prompts
    match exactly, and prefill logits max |Δ| relative to max |logit| (worst prompt)."""
    import torch
    import transformers as T

    from modelql.runtime import load_model

    T.logging.set_verbosity_error()
    ref = T.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    models = {"low-bit": load_model(path), "low-bit :int16": load_model(path, quantize="auto:int16"),
              "low-bit :int8": load_model(path, quantize="auto:int8"),
              "float": load_model(path, quantize="none")}
    engines = {name: (lambda ids, m=m: _greedy(m, ids, n_tokens), lambda ids, m=m: m.forward(ids, logits="all")[0])
               for name, m in models.items()}
    if llama_cpp_available():
        engines["llama.cpp"] = _llama_cpp_engine(path, n_tokens, threads)
    rows = {k: {"same": 0, "total": 0, "worst": 0.0, "exact": 0, "first_divergence": []} for k in engines}
    tok = models["float"].tokenizer
    for prompt in PROMPTS[:n_prompts]:
        ids = tok.encode(prompt)
        x = torch.tensor([ids])
        with torch.inference_mode():
            want = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_tokens, min_new_tokens=n_tokens,
                                do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
            ref_logits = ref(x).logits[0].float()
        for name, (greedy, logits) in engines.items():
            r = rows[name]
            got = greedy(ids)
            lg = logits(ids)
            r["worst"] = max(r["worst"], float((lg - ref_logits).abs().max() / ref_logits.abs().max()))
            r["same"] += sum(a == b for a, b in zip(got, want))
            r["total"] += n_tokens
            r["exact"] += got == want
            r["first_divergence"].append(next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), n_tokens))
    quant = models["low-bit"]
    layout = max((w.error_rms for w in quant.quant.info), default=0.0) if quant.quantized else 0.0
    return {name: {"agreement": r["same"] / r["total"], "logit_rel_max": r["worst"], "exact_prompts": r["exact"],
                   "first_divergence": r["first_divergence"],
                   "layout_error_rms": layout if name.startswith("low-bit") else 0.0 if name == "float" else None,
                   "quantized": models[name].quantized if name in models else True}
            for name, r in rows.items()}


def _llama_cpp_engine(path: Path, n_tokens: int, threads: int):
    """(greedy, prefill logits) on llama.cpp, fed the same token ids."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_threads=threads, n_threads_batch=threads, n_ctx=512, logits_all=True,
                verbose=False)

    def greedy(ids: list[int]) -> list[int]:
        llm.reset()
        llm.eval(ids)
        out = []
        while True:
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            if len(out) == n_tokens:
                return out
            llm.eval([out[-1]])

    def logits(ids: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(ids)
        return torch.from_numpy(np.array(llm.scores[:len(ids)], np.float32))

    return greedy, logits


def _greedy(model, ids: list[int], n: int) -> list[int]:
    from modelql.runtime.model import KVCache

    cache = KVCache()
    logits = model.forward(ids, cache, logits="last")
    out = [int(logits[0].argmax())]
    while len(out) < n:
        out.append(int(model.forward([out[-1]], cache, logits="last")[0].argmax()))
    return out


# ---------------------------------------------------------------------------------------------


def main(args) -> None:
    gguf_path = Path(args.gguf).resolve()
    if not gguf_path.is_file():
        sys.exit(f"error: {gguf_path} is not a file")
    reference = "llama.cpp" if llama_cpp_available() else "transformers"
    if reference != "llama.cpp":
        print("note: llama-cpp-python is not importable (CMAKE_BUILD_PARALLEL_LEVEL=2 pip install --no-binary "
              "llama-cpp-python llama-cpp-python, a 10-30 min build): comparing with transformers' GGUF loader",
              file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="modelql-gguf-bench-") as tmp:
        files = derived_files(gguf_path, Path(tmp), args.variants)
        if args.agreement:
            print(f"\ngreedy agreement with transformers (dequantized float32), {args.prompts} prompts × "
                  f"{args.agree_tokens} tokens; logits: prefill max|Δ| / max|logit|, worst prompt; layout error: "
                  "rms of the kernel's weights vs the file's (0 = the file's own codes and scales)")
            for label, path in files:
                for name, r in agreement(path, args.prompts, args.agree_tokens, args.threads).items():
                    layout = "-" if r["layout_error_rms"] is None else f"{r['layout_error_rms']:.2%}"
                    print(f"  {label:<20} {name:<14} agreement {r['agreement']:6.1%}  identical prompts "
                          f"{r['exact_prompts']:2d}/{args.prompts}  logits {r['logit_rel_max']:.2e}  layout error "
                          f"{layout}  first divergence {r['first_divergence']}")
            return
        engines = ["modelql", "modelql-int16", "modelql-int8", reference]
        engines += ["modelql-float"] if args.float_too else []
        rows = []
        for label, path in files:
            results = {e: run_worker(e, path, args) for e in engines}
            rows.append((label, path.stat().st_size, results))
            r = results
            print(f"  {label}: " + ", ".join(f"{e} {r[e]['decode']:.1f} tok/s {r[e]['peak_rss_mb']:.0f} MB"
                                             for e in engines), file=sys.stderr)
    print(f"\nthreads={args.threads}  decode={args.tokens} tokens (greedy)  best of {args.repeats}  reference={reference}"
          f"  load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}  (ratios: modelql ÷ reference, same run)")
    head = ["file", "MB", "modelql tok/s", "ratio", ":int16 tok/s", "ratio", ":int8 tok/s", "ratio",
            f"{reference} tok/s", "modelql RSS MB", ":int16 RSS MB", ":int8 RSS MB", f"{reference} RSS MB", "RSS ratio",
            "growth MB (modelql / ref)", "same 16 tokens (modelql / :int16)"]
    if args.float_too:
        head += ["modelql f32 tok/s", "f32 RSS MB"]
    lines = []
    for label, size, r in rows:
        a, a16, a8, b = r["modelql"], r["modelql-int16"], r["modelql-int8"], r[reference]
        line = [label, f"{size / 1e6:.0f}", f"{a['decode']:.1f}", f"{a['decode'] / b['decode']:.2f}",
                f"{a16['decode']:.1f}", f"{a16['decode'] / b['decode']:.2f}",
                f"{a8['decode']:.1f}", f"{a8['decode'] / b['decode']:.2f}", f"{b['decode']:.1f}",
                f"{a['peak_rss_mb']:.0f}", f"{a16['peak_rss_mb']:.0f}", f"{a8['peak_rss_mb']:.0f}",
                f"{b['peak_rss_mb']:.0f}", f"{a['peak_rss_mb'] / b['peak_rss_mb']:.2f}",
                f"{a['peak_rss_mb'] - a['base_rss_mb']:.0f} / {b['peak_rss_mb'] - b['base_rss_mb']:.0f}",
                " / ".join("yes" if x["tokens"] == b["tokens"] else "no" for x in (a, a16))]
        if args.float_too:
            f = r["modelql-float"]
            line += [f"{f['decode']:.1f}", f"{f['peak_rss_mb']:.0f}"]
        lines.append(line)
    print("RSS: the process's peak; growth: the peak minus the RSS once the engine's libraries are imported "
          "(modelql: torch, onnxruntime; llama.cpp: llama_cpp, numpy)")
    widths = [max(len(h), *(len(x[i]) for x in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)))


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    worker_main(sys.argv[2:])


# ---------------------------------------------------------------------------------------------
# load memory of a ~1B random-weight Llama stored Q4_K_M-like (Q4_K matrices, Q6_K output and half the
# ffn_down, as llama.cpp's Q4_K_M mix does); blocks are random codes with sane float16 scales
# ---------------------------------------------------------------------------------------------

def _random_gguf():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import tests.random_gguf

    return tests.random_gguf


def memory_1b_worker(path: str) -> None:
    print("RESULT " + json.dumps(_random_gguf().load_rss(path)))


def memory_1b(args) -> None:
    with tempfile.TemporaryDirectory(prefix="modelql-1b-") as tmp:
        path = Path(tmp) / "random-1b-Q4_K_M.gguf"
        n = _random_gguf().write_random_q4_k_m(path)
        size = path.stat().st_size / 2**20
        proc = subprocess.run([sys.executable, __file__, "--memory-worker", str(path)], capture_output=True, text=True)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(proc.stderr[-2000:])
        r = json.loads(line[7:])
        print(f"random Llama {n / 1e9:.2f}B params, Q4_K_M-like GGUF {size:.0f} MiB; RSS in MiB, "
              f"growth = over the process with its libraries loaded ({r['base']:.0f} MiB):")
        print(f"  peak  {r['peak']:.0f} total ({r['peak'] / size:.2f}× the file), growth {r['peak'] - r['base']:.0f} "
              f"({(r['peak'] - r['base']) / size:.2f}×)")
        print(f"  after {r['after']:.0f} total ({r['after'] / size:.2f}× the file), growth {r['after'] - r['base']:.0f} "
              f"({(r['after'] - r['base']) / size:.2f}×)   low-bit {r['quantized']}, finite logits {r['finite']}")


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--memory-worker":
    memory_1b_worker(sys.argv[2])
