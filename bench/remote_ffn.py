"""Remote FFN: decode speed with each layer's FFN on other processes vs the whole model local.

    python bench/remote_ffn.py                                # embedded model + random 500M, full run
    python bench/remote_ffn.py --models embedded --tokens 16  # quick check
    python bench/remote_ffn.py --models 500m --netns          # also across network namespaces (veth)

For each model: local greedy decode (dense FFN) is timed first; then FFN shards are started as
real `modelql serve MODEL --ffn-only [--layers a-b] --enable-i8-wire` processes on 127.0.0.1 —
one shard owning every layer, and two shards splitting the layers in half — and the client
(embeddings, attention, KV cache, lm_head local; `RemoteFfn` over a persistent HTTP connection per
shard) decodes the same prompt with each wire format (f32, f16, i8 responses; requests are f32).
Every process runs torch with 1 thread. Reported per run:

* decode tokens/s (N greedy tokens after the prompt, EOS ignored) and the ratio to local;
* bytes on the wire per decoded token (request + response bodies, HTTP headers not counted);
* whether the greedy tokens equal local (f32 must), and the teacher-forced top-1 agreement with
  local over prompt + generated positions (f16/i8 trade accuracy for bytes).

`--netns`: the shards also run in a network namespace joined to the client's namespace by a veth
pair (both namespaces created by this script, addresses 10.213.77.1/2, removed at the end), with
`tc netem delay` added per direction when the kernel has netem; otherwise it says so and measures
the veth path without added latency. Needs root and `ip`; skipped with a message if not permitted.

Target: remote decode ≥ 0.5× local on loopback for the 500M model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' weight-loading bars are noise here

import argparse
import contextlib
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

NS_CLIENT, NS_SERVER = "mqlffn-c", "mqlffn-s"
IP_CLIENT, IP_SERVER = "10.213.77.1", "10.213.77.2"
TEXT_PROMPT = "The capital of France is"


def model_ref(name: str) -> str:
    if name == "embedded":
        from modelql.runtime.loading import default_model_dir

        return str(default_model_dir())
    from bench.models import random_llama

    print(f"building/caching random {name} model ...", file=sys.stderr, flush=True)
    return str(random_llama(name))


def prompt_ids(model) -> list[int]:
    if model.tokenizer is not None:
        return model.tokenizer.encode(TEXT_PROMPT)
    return [(7 * i + 3) % model.spec.vocab_size for i in range(24)]


def decode(model, ids: list[int], n: int) -> tuple[list[int], float]:
    """Greedy: prefill, then n decode steps; → (tokens, decode seconds)."""
    cache = model.new_cache()
    logits = model.forward(ids, cache, logits="last")[0]
    out = [int(logits.argmax())]
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model.forward([out[-1]], cache, logits="last")[0]
        out.append(int(logits.argmax()))
    return out, time.perf_counter() - t0


def best_decode(model, ids, n, repeats) -> tuple[list[int], float]:
    decode(model, ids, 2)  # warm-up (connections, allocator)
    runs = [decode(model, ids, n) for _ in range(repeats)]
    return runs[0][0], min(s for _, s in runs)


def agreement(model, ids: list[int], ref_argmax: torch.Tensor) -> float:
    got = model.forward(ids)[0].argmax(-1)
    return float((got == ref_argmax).float().mean())


# -- shard processes --------------------------------------------------------------------------------

@contextlib.contextmanager
def shards(ref: str, ranges: list[tuple[int, int]], host: str = "127.0.0.1", netns: str | None = None):
    """Start one `--ffn-only` process per layer range; yields their URLs; always killed."""
    procs, urls = [], []
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        for a, b in ranges:
            cmd = [sys.executable, "-m", "modelql.cli", "serve", ref, "--ffn-only", "--layers", f"{a}-{b}",
                   "--host", host, "--port", "0", "--threads", "1", "--enable-i8-wire"]
            if netns:
                cmd = ["ip", "netns", "exec", netns, *cmd]
            p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            procs.append(p)
            out, url, deadline = "", None, time.monotonic() + 300
            while time.monotonic() < deadline:
                line = p.stdout.readline()
                if not line:
                    break
                out += line
                m = re.search(r"at (http://[\d.]+:\d+)", line)
                if m:
                    url = m.group(1)
                    break
            if url is None:
                raise RuntimeError(f"shard {a}-{b} did not start:\n{out}")
            urls.append(url)
        yield urls
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            p.stdout.close()


def remote_runs(ref: str, urls: list[str], wires: list[str], ids, n: int, repeats: int, ref_tokens, ref_argmax
                ) -> list[dict]:
    from modelql.remote.client import load_remote_model

    rows = []
    for w in wires:
        model = load_remote_model(ref, ",".join(urls), wire_dtype=w)
        try:
            decode(model, ids, 2)
            st = model.ffn.stats
            s0, r0 = st.bytes_sent, st.bytes_received
            runs = [decode(model, ids, n) for _ in range(repeats)]
            toks = runs[0][0]
            secs = min(s for _, s in runs)
            # bytes of one run, less its prefill's: the decode steps' bytes
            per_step = (st.bytes_sent + st.bytes_received - s0 - r0) / repeats
            prefill = _prefill_bytes(model, ids)
            rows.append({"wire": w, "tok_s": n / secs, "bytes_per_token": (per_step - prefill) / n,
                         "identical": toks == ref_tokens, "top1": agreement(model, ids + ref_tokens[:-1], ref_argmax),
                         "failovers": st.failovers})
        finally:
            model.ffn.close()
            del model
            gc.collect()
    return rows


def _prefill_bytes(model, ids) -> int:
    st = model.ffn.stats
    before = st.bytes_sent + st.bytes_received
    model.forward(ids, model.new_cache(), logits="last")
    return st.bytes_sent + st.bytes_received - before


# -- network namespaces -----------------------------------------------------------------------------

def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), capture_output=True, text=True)


@contextlib.contextmanager
def netns_pair(delay_ms: float):
    """Two namespaces joined by a veth pair; yields a note on the added latency; always removed."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        raise PermissionError("needs root and the `ip` tool")
    _cleanup_netns()
    try:
        steps = [("ip", "netns", "add", NS_CLIENT), ("ip", "netns", "add", NS_SERVER),
                 ("ip", "link", "add", "mqlffn0", "type", "veth", "peer", "name", "mqlffn1"),
                 ("ip", "link", "set", "mqlffn0", "netns", NS_CLIENT),
                 ("ip", "link", "set", "mqlffn1", "netns", NS_SERVER),
                 ("ip", "-n", NS_CLIENT, "addr", "add", f"{IP_CLIENT}/30", "dev", "mqlffn0"),
                 ("ip", "-n", NS_SERVER, "addr", "add", f"{IP_SERVER}/30", "dev", "mqlffn1"),
                 ("ip", "-n", NS_CLIENT, "link", "set", "mqlffn0", "up"),
                 ("ip", "-n", NS_SERVER, "link", "set", "mqlffn1", "up"),
                 ("ip", "-n", NS_CLIENT, "link", "set", "lo", "up"),
                 ("ip", "-n", NS_SERVER, "link", "set", "lo", "up")]
        for s in steps:
            r = _run(*s)
            if r.returncode:
                raise PermissionError(f"`{' '.join(s)}` failed: {r.stderr.strip()}")
        note = "veth, no added latency"
        if delay_ms > 0:
            r1 = _run("ip", "netns", "exec", NS_CLIENT, "tc", "qdisc", "add", "dev", "mqlffn0", "root", "netem",
                      "delay", f"{delay_ms}ms")
            r2 = _run("ip", "netns", "exec", NS_SERVER, "tc", "qdisc", "add", "dev", "mqlffn1", "root", "netem",
                      "delay", f"{delay_ms}ms")
            if r1.returncode or r2.returncode:
                note = (f"veth WITHOUT added latency: tc netem unavailable "
                        f"({(r1.stderr or r2.stderr).strip()})")
            else:
                note = f"veth + netem {delay_ms:g} ms each way"
        yield note
    finally:
        _cleanup_netns()


def _cleanup_netns() -> None:
    for ns in (NS_CLIENT, NS_SERVER):
        _run("ip", "netns", "del", ns)


def netns_runs(ref, ranges, wires, n, repeats) -> list[dict]:
    """Shards in the server namespace; the client measured by this script re-run in the client one."""
    with shards(ref, ranges, host=IP_SERVER, netns=NS_SERVER) as urls:
        cmd = ["ip", "netns", "exec", NS_CLIENT, sys.executable, __file__, "--role", "client", "--ref", ref,
               "--urls", ",".join(urls), "--wires", ",".join(wires), "--tokens", str(n), "--repeats", str(repeats)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"netns client failed: {r.stderr.strip()[-500:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def client_role(args) -> None:
    """`--role client`: local reference + remote runs against given URLs; one JSON line on stdout."""
    from modelql.runtime.loading import load_model

    local = load_model(args.ref)
    ids = prompt_ids(local)
    ref_tokens, _ = decode(local, ids, args.tokens)
    ref_argmax = local.forward(ids + ref_tokens[:-1])[0].argmax(-1)
    del local
    gc.collect()
    rows = remote_runs(args.ref, args.urls.split(","), args.wires.split(","), ids, args.tokens, args.repeats,
                       ref_tokens, ref_argmax)
    print(json.dumps(rows))


# -- report -----------------------------------------------------------------------------------------

def table(rows: list[dict]) -> str:
    head = ["model", "path", "shards", "wire", "decode tok/s", "× local", "KiB/token", "greedy = local",
            "top-1 agree"]
    body = [[r["model"], r["path"], str(r["shards"]), r["wire"], f"{r['tok_s']:.1f}",
             f"{r['ratio']:.2f}" if r["ratio"] is not None else "-",
             f"{r['bytes_per_token'] / 1024:.1f}" if r["bytes_per_token"] is not None else "-",
             {True: "yes", False: "no", None: "-"}[r["identical"]],
             f"{r['top1']:.1%}" if r["top1"] is not None else "-"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    right = {4, 5, 6, 8}
    fmt = lambda cells: "  ".join(c.rjust(w) if i in right else c.ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(b) for b in body])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="embedded,500m", help="comma list: embedded, 100m, 500m")
    ap.add_argument("--tokens", type=int, default=64, help="decode tokens per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (best is kept)")
    ap.add_argument("--wires", default="f32,f16,i8")
    ap.add_argument("--shards", default="1,2", help="shard counts to run: 1, 2 or both")
    ap.add_argument("--netns", action="store_true", help="also run across two network namespaces (veth)")
    ap.add_argument("--delay-ms", type=float, default=1.0, help="netem delay per direction with --netns")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON here")
    ap.add_argument("--role", default="main", help=argparse.SUPPRESS)
    ap.add_argument("--ref", help=argparse.SUPPRESS)
    ap.add_argument("--urls", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "client":
        return client_role(args)

    from modelql.runtime.loading import load_model

    wires = args.wires.split(",")
    rows: list[dict] = []
    notes: list[str] = []
    for name in args.models.split(","):
        ref = model_ref(name)
        local = load_model(ref)
        ids = prompt_ids(local)
        n_layers = local.spec.num_layers
        ref_tokens, local_secs = best_decode(local, ids, args.tokens, args.repeats)
        ref_argmax = local.forward(ids + ref_tokens[:-1])[0].argmax(-1)
        local_tps = args.tokens / local_secs
        rows.append({"model": name, "path": "local", "shards": 0, "wire": "-", "tok_s": local_tps, "ratio": 1.0,
                     "bytes_per_token": None, "identical": None, "top1": None})
        del local
        gc.collect()
        print(f"{name}: local {local_tps:.1f} tok/s", file=sys.stderr, flush=True)
        configs = {"1": [(0, n_layers - 1)], "2": [(0, n_layers // 2 - 1), (n_layers // 2, n_layers - 1)]}
        for k in args.shards.split(","):
            with shards(ref, configs[k]) as urls:
                for r in remote_runs(ref, urls, wires, ids, args.tokens, args.repeats, ref_tokens, ref_argmax):
                    rows.append({"model": name, "path": "loopback", "shards": int(k), **r,
                                 "ratio": r["tok_s"] / local_tps})
                    print(f"{name}: {k} shard(s) {r['wire']}: {r['tok_s']:.1f} tok/s", file=sys.stderr, flush=True)
        if args.netns:
            try:
                with netns_pair(args.delay_ms) as note:
                    notes.append(f"{name} netns: {note}")
                    for k in args.shards.split(","):
                        for r in netns_runs(ref, configs[k], wires, args.tokens, args.repeats):
                            rows.append({"model": name, "path": "netns", "shards": int(k), **r,
                                         "ratio": r["tok_s"] / local_tps})
            except (PermissionError, RuntimeError) as exc:
                notes.append(f"{name}: network-namespace runs skipped: {exc}")
    print()
    print(f"remote FFN decode, {args.tokens} tokens, best of {args.repeats}, torch threads 1 per process")
    print(table(rows))
    for n in notes:
        print("note:", n)
    for name in args.models.split(","):
        if name == "500m":
            got = [r["ratio"] for r in rows if r["model"] == "500m" and r["path"] == "loopback"]
            if got:
                print(f"500m loopback: worst remote/local = {min(got):.2f} (target ≥ 0.5): "
                      f"{'met' if min(got) >= 0.5 else 'NOT met'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
