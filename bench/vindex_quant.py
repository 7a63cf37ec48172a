#!/usr/bin/env python
"""A vindex in the source's quantization against the float32 vindex of the same GGUF file, in one run.

    python bench/vindex_quant.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf
    python bench/vindex_quant.py --gguf F.gguf --f32-vindex F32.vindex --quant-vindex Q.vindex   # reuse

Extracts (unless given) both vindexes at level inference — `--quant none --dtype f32` (float32 weights,
gate_vectors.bin, embeddings.bin) and `--quant auto` (the file's blocks) — and prints:

* sizes: the GGUF file, each vindex, the block vindex's ratio to the file (target ≤ 1.5×);
* gate KNN: top-10 features per layer for the embeddings of N entities, same features and order, and
  the largest score difference;
* DESCRIBE: the edges (target, layer, feature) of N entities in embedding and residual mode, identical or
  not, and the CPU time per call of each vindex (process time, so the machine's load cancels out);
* the peak RSS of opening each vindex and running the DESCRIBEs (one child process each).

Both vindexes hold the same values: the float32 one is the blocks dequantized, so the figures should
match exactly up to float summation order.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENTITIES = ["France", "Japan", "Germany", "Italy", "Spain", "Canada", "Brazil", "Egypt", "India", "China",
            "Paris", "London", "Einstein", "Shakespeare", "Mozart", "Python", "Tokyo", "Berlin", "Mars", "Amazon"]


def _size(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).iterdir() if p.is_file())


def _run_child(vindex: Path, n: int) -> dict:
    """DESCRIBE + KNN in a fresh process: results, CPU seconds per DESCRIBE, peak RSS."""
    out = subprocess.run([sys.executable, __file__, "--child", str(vindex), "--n", str(n)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def child(vindex: Path, n: int) -> None:
    import resource

    import torch

    from modelql.knowledge import describe
    from modelql.vindex import Vindex

    torch.set_num_threads(1)
    vx = Vindex.load(vindex)
    tok = vx.tokenizer
    ents = ENTITIES[:n]
    knn = {}
    for e in ents:
        ids = tok.encode(" " + e)
        q = vx.embedding(ids[0])
        knn[e] = [[(h.feature, h.score) for h in vx.gate_knn(layer, q, k=10)] for layer in vx.layers()]
    res = {}
    times = {}
    for mode in ("embedding", "residual"):
        describe(vx, ents[0], mode=mode)  # warm: model load, gate decode
        t = time.process_time()
        res[mode] = {e: [(x.target, x.layer, x.feature) for x in describe(vx, e, mode=mode).edges] for e in ents}
        times[mode] = (time.process_time() - t) / len(ents)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"knn": knn, "describe": res, "cpu": times, "peak_mb": peak,
                      "quant": vx.index.quant}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--f32-vindex", type=Path)
    ap.add_argument("--quant-vindex", type=Path)
    ap.add_argument("--n", type=int, default=10, help="entities (≤ 20)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.n)
        return 0
    if args.gguf is None:
        ap.error("--gguf is required")
    from modelql.vindex import extract

    tmp = tempfile.TemporaryDirectory(prefix="modelql-bench-vq-")
    paths = {}
    for name, given, kw in (("f32", args.f32_vindex, dict(quant="none", dtype="f32")),
                            ("quant", args.quant_vindex, dict(quant="auto"))):
        if given is None:
            given = Path(tmp.name) / f"{name}.vindex"
            t = time.process_time()
            extract(args.gguf, given, level="inference", **kw)
            print(f"extracted {name} vindex in {time.process_time() - t:.0f} s CPU")
        paths[name] = given
    g = args.gguf.stat().st_size
    print(f"\nGGUF {args.gguf.name}: {g / 1e6:.1f} MB")
    for name, p in paths.items():
        print(f"  {name:<6} vindex: {_size(p) / 1e6:7.1f} MB = {_size(p) / g:.2f}× the file")
    r = {name: _run_child(p, args.n) for name, p in paths.items()}
    a, b = r["f32"], r["quant"]
    same_knn = total = 0
    worst = 0.0
    for e in a["knn"]:
        for la, lb in zip(a["knn"][e], b["knn"][e]):
            total += 1
            same_knn += [f for f, _ in la] == [f for f, _ in lb]
            worst = max(worst, max(abs(x - y) for (_, x), (_, y) in zip(la, lb)))
    print(f"\nquant {b['quant']}: gate KNN top-10 identical in {same_knn}/{total} (entity, layer) queries, "
          f"largest score difference {worst:.2e}")
    for mode in ("embedding", "residual"):
        same = sum(a["describe"][mode][e] == b["describe"][mode][e] for e in a["describe"][mode])
        edges = sum(len(v) for v in a["describe"][mode].values())
        print(f"DESCRIBE {mode:<9}: {same}/{len(a['describe'][mode])} entities with identical edges ({edges} edges); "
              f"CPU per call f32 {a['cpu'][mode] * 1e3:.0f} ms, quant {b['cpu'][mode] * 1e3:.0f} ms "
              f"(×{b['cpu'][mode] / max(a['cpu'][mode], 1e-9):.2f})")
    print(f"peak RSS (open + KNN + DESCRIBE): f32 {a['peak_mb']:.0f} MB, quant {b['peak_mb']:.0f} MB")
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
