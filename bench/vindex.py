"""Vindex benchmark: gate KNN and walk at Gemma-3-4B dimensions; extraction throughput.

    python bench/vindex.py [--quick] [--model 100m|500m] [--skip-extract]

Part 1 (KNN). A synthetic vindex with Gemma-3-4B gate dimensions — 34 layers × 10,240 features ×
2,560 hidden, random f16 gates written to disk (1.78 GB, cached under $MODELQL_BENCH_CACHE) — is
opened with `Vindex.load`. Per layer:
  * streaming: one read of the layer's decoded f32 matrix (`torch.mv(G, q)`, the memory-bound
    floor of any exact scorer computing in f32; `G.sum()` reported alongside);
  * KNN warm: `gate_knn(layer, q, 10)` with the decoded layer in the cache;
  * batched: `gate_knn_batch` with 32 queries, per query;
  * on a freshly opened vindex: the 1st query of a layer (fused f16 decoder, no allocation) and
    the 2nd (the layer is widened into the cache: first touch of fresh memory);
  * KNN with a cache budget too small for the model: fused f16 decode on every query.
Then `walk(q, 34 layers, k=10)`: 1st and 2nd call on a fresh vindex, warm, and without a cache.
Times are median and min: on a shared machine the min is the uncontended figure.

Part 2 (extraction). A random Llama from bench/models.py (f32 safetensors, given a 32k-word
tokenizer) extracted at browse and inference level in a subprocess that samples its anonymous
RSS: GB/s of weights read, the share spent in the down_meta logits (E·W_down, f32, exact), and
the peak anonymous memory against the model size.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from models import SIZES, cache_dir, random_llama  # noqa: E402

from modelql.vindex import Vindex  # noqa: E402
from modelql.vindex import format as fmt  # noqa: E402

LAYERS, FEATURES, HIDDEN, VOCAB, TOP_K = 34, 10240, 2560, 32000, 10


# -- synthetic vindex --------------------------------------------------------------------------


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    tok.save(str(directory / "tokenizer.json"))


def synthetic_vindex(layers: int) -> Path:
    """A browse vindex with random f16 gates at Gemma-3-4B dimensions (built once, then reused)."""
    path = cache_dir() / f"gemma3-4b-dims-{layers}L.vindex"
    if (path / "index.json").exists():
        return path
    tmp = Path(tempfile.mkdtemp(dir=cache_dir().mkdir(parents=True, exist_ok=True) or cache_dir()))
    gen = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    infos = []
    with (tmp / "gate_vectors.bin").open("wb") as fh, fmt.DownMetaWriter(tmp / "down_meta.bin", layers, TOP_K) as dm:
        for layer in range(layers):
            g = (torch.randn(FEATURES, HIDDEN, generator=gen) * 0.02).half()
            fh.write(g.numpy().tobytes())
            infos.append(fmt.LayerInfo(layer, FEATURES, layer * FEATURES * HIDDEN * 2, FEATURES * HIDDEN * 2))
            ids = rng.integers(3, VOCAB, size=(FEATURES, TOP_K)).astype(np.uint32)
            vals = -np.sort(-rng.random((FEATURES, TOP_K), dtype=np.float32) * 20, axis=1)
            dm.write_layer(layer, fmt.make_records(ids[:, 0], vals[:, 0], ids, vals, TOP_K))
    emb = (torch.randn(VOCAB, HIDDEN, generator=gen) * 0.02).half()
    (tmp / "embeddings.bin").write_bytes(emb.numpy().tobytes())
    write_tokenizer(tmp, VOCAB)
    fmt.IndexJson(model="synthetic/gemma-3-4b-dims", family="gemma3", num_layers=layers, hidden_size=HIDDEN,
                  intermediate_size=FEATURES, vocab_size=VOCAB, embed_scale=HIDDEN ** 0.5, layers=infos,
                  down_top_k=TOP_K, dtype="f16").write(tmp)
    tmp.rename(path)
    return path


def timed_ms(fn, reps: int) -> tuple[float, float]:
    """(median, min) wall time in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3, min(times) * 1e3


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))


def _mean(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.mean(p[0] for p in pairs), statistics.mean(p[1] for p in pairs)


def bench_knn(layers: int, sample_layers: int, reps: int) -> None:
    path = synthetic_vindex(layers)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(HIDDEN, generator=gen)
    Q = torch.randn(32, HIDDEN, generator=gen)
    picks = sorted(set(np.linspace(0, layers - 1, sample_layers).round().astype(int).tolist()))

    # a freshly opened vindex: the 1st query of a layer is scored by the fused f16 decoder,
    # the 2nd widens the layer into the cache (first touch of fresh memory), later ones are warm
    vx = Vindex.load(path, cache_bytes=8 << 30)
    first, second = [], []
    for layer in picks:
        for store in (first, second):
            t = time.perf_counter()
            vx.gate_knn(layer, q, 10)
            store.append((time.perf_counter() - t) * 1e3)
    nocache = Vindex.load(path, cache_bytes=0)  # budget too small: fused f16 decode per query
    fused, stream, sums, warm, batched = [], [], [], [], []
    for layer in picks:
        fused.append(timed_ms(lambda l=layer: nocache.gate_knn(l, q, 10), max(3, reps // 3)))
        G = vx.gate(layer)
        stream.append(timed_ms(lambda: torch.mv(G, q), reps))
        sums.append(timed_ms(lambda: G.sum(), reps))
        warm.append(timed_ms(lambda l=layer: vx.gate_knn(l, q, 10), reps))
        med, mn = timed_ms(lambda l=layer: vx.gate_knn_batch(l, Q, 10), max(3, reps // 4))
        batched.append((med / len(Q), mn / len(Q)))
    s_med, s_min = _mean(stream)

    def row(label, pair, note=""):
        med, mn = pair
        return [label, f"{med:.1f}", f"{mn:.1f}", f"{med / s_med:.2f}", f"{mn / s_min:.2f}", note]

    mb = FEATURES * HIDDEN * 4 / 1e6
    rows = [
        row("streaming the f32 layer once: mv(G, q)", (s_med, s_min), f"{mb / s_min:.1f} GB/s at min"),
        row("streaming the f32 layer once: G.sum()", _mean(sums)),
        row("gate_knn k=10, warm (decoded layer in the cache)", _mean(warm), "target ≤ 1.5×"),
        row("gate_knn_batch 32 queries, per query (warm)", _mean(batched)),
        row("gate_knn k=10, 1st query of a layer (fused f16)", (statistics.mean(first), min(first)),
            "mean / min over layers"),
        row("gate_knn k=10, 2nd query: widen f16 → cache", (statistics.mean(second), min(second)),
            "once per layer"),
        row("gate_knn k=10, cache budget too small: fused f16", _mean(fused), "every query"),
    ]
    table(f"Gate KNN per layer — {FEATURES:,} × {HIDDEN:,} f16 on disk, f32 compute, "
          f"{torch.get_num_threads()} threads, mean over layers {picks}; median and min of {reps} runs",
          ["measure", "ms med", "ms min", "× stream med", "× stream min", "note"], rows)

    # walk over all layers
    fresh = Vindex.load(path, cache_bytes=8 << 30)
    calls = []
    for _ in range(2):
        t = time.perf_counter()
        hits = fresh.walk(q, range(layers), k=10)
        calls.append((time.perf_counter() - t) * 1e3)
    w_med, w_min = timed_ms(lambda: fresh.walk(q, range(layers), k=10), max(3, reps // 5))
    small = Vindex.load(path, cache_bytes=0)
    f_med, f_min = timed_ms(lambda: small.walk(q, range(layers), k=10), 2)
    rows = [
        [f"walk {layers} layers k=10, 1st call on a fresh Vindex (fused f16)", f"{calls[0]:.0f}", "",
         f"{calls[0] / layers:.1f}"],
        [f"walk {layers} layers k=10, 2nd call (widens every layer into the cache)", f"{calls[1]:.0f}", "",
         f"{calls[1] / layers:.1f}"],
        [f"walk {layers} layers k=10, warm", f"{w_med:.0f}", f"{w_min:.0f}", f"{w_med / layers:.1f}"],
        [f"walk {layers} layers k=10, cache budget 0 (fused f16 every call)", f"{f_med:.0f}", f"{f_min:.0f}",
         f"{f_med / layers:.1f}"],
        [f"  {layers} × streaming one f32 layer", f"{s_med * layers:.0f}", f"{s_min * layers:.0f}", f"{s_med:.1f}"],
    ]
    table(f"Walk ({len(hits)} hits with metadata)", ["measure", "ms med", "ms min", "ms/layer med"], rows)


# -- extraction --------------------------------------------------------------------------------

_CHILD = r"""
import json, sys, threading, time
from modelql.vindex.extract import extract
peak = [0]
stop = False
def sample():
    while not stop:
        for line in open('/proc/self/status'):
            if line.startswith('RssAnon:'):
                peak[0] = max(peak[0], int(line.split()[1]) * 1024)
        time.sleep(0.02)
def anon():
    for line in open('/proc/self/status'):
        if line.startswith('RssAnon:'):
            return int(line.split()[1]) * 1024
import torch, numpy, tokenizers, safetensors, modelql.vindex.vindex, modelql.runtime  # baseline imports
base = anon()
th = threading.Thread(target=sample, daemon=True); th.start()
r = extract(sys.argv[1], sys.argv[2], level=sys.argv[3], dtype='f16', clusters=False)
stop = True; th.join()
print(json.dumps({'read': r.bytes_read, 'written': r.bytes_written, 'seconds': r.seconds,
                  'down_meta': r.seconds_down_meta, 'peak_anon': peak[0], 'base_anon': base}))
"""


def bench_extract(size: str) -> None:
    src = random_llama(size)
    model = cache_dir() / f"llama-{size}-with-tokenizer"
    if not (model / "tokenizer.json").exists():
        model.mkdir(parents=True, exist_ok=True)
        for p in src.iterdir():
            if not (model / p.name).exists():
                (model / p.name).symlink_to(p.resolve())
        write_tokenizer(model, 32000)
    weights = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    cfg = SIZES[size]
    embed = 32000 * cfg["hidden_size"] * 4
    layer = 3 * cfg["hidden_size"] * cfg["intermediate_size"] * 4
    rows = []
    for level in ("browse", "inference"):
        out = Path(tempfile.mkdtemp()) / "bench.vindex"
        try:
            proc = subprocess.run([sys.executable, "-c", _CHILD, str(model), str(out), level],
                                  capture_output=True, text=True, check=True)
            r = json.loads(proc.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(out.parent, ignore_errors=True)
        rest = r["seconds"] - r["down_meta"]
        flop = 2 * 32000 * cfg["hidden_size"] * cfg["intermediate_size"] * cfg["num_hidden_layers"]
        rows.append([level, f"{r['read'] / 1e9:.2f}", f"{r['seconds']:.1f}", f"{r['read'] / 1e9 / r['seconds']:.3f}",
                     f"{r['down_meta']:.1f} ({flop / 1e9 / r['down_meta']:.0f} GFLOP/s)",
                     f"{r['read'] / 1e9 / max(rest, 1e-9):.2f}", f"{r['written'] / 1e9:.2f}",
                     f"{(r['peak_anon'] - r['base_anon']) / 1e9:.2f} (+{r['base_anon'] / 1e9:.2f} imports)"])
    table(f"Extraction of a random Llama-{size} (f32 safetensors {weights / 1e9:.2f} GB, "
          f"{cfg['num_hidden_layers']} layers; f32 embeddings {embed / 1e9:.2f} GB, one layer's FFN "
          f"{layer / 1e9:.2f} GB), f16 browse files",
          ["level", "GB read", "s total", "GB/s", "s down_meta (E·W_down f32)", "GB/s excl. down_meta",
           "GB written", "peak anon RSS GB"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer layers and repetitions")
    ap.add_argument("--model", default="100m", choices=sorted(SIZES), help="extraction source size")
    ap.add_argument("--skip-extract", action="store_true")
    ap.add_argument("--skip-knn", action="store_true")
    args = ap.parse_args()
    layers = 8 if args.quick else LAYERS
    if not args.skip_knn:
        bench_knn(layers, sample_layers=3 if args.quick else 6, reps=10 if args.quick else 30)
    if not args.skip_extract:
        bench_extract(args.model)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
