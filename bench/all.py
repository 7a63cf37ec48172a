#!/usr/bin/env python
"""Run every benchmark in turn, one command: `python bench/all.py [--only decode,server] [--skip edit]`.

Each benchmark is its own script (run alone for its options); this runs them with their defaults in
separate processes, so one's threads and caches do not disturb the next, and prints a summary of
exit codes and wall times at the end. Each prints ratios against a reference measured in its own run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

BENCHES = ["decode", "walk", "server", "vindex", "describe", "edit", "lql", "remote_ffn", "moe", "structured", "web"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default="", help="comma list of benchmarks to run (default: all)")
    ap.add_argument("--skip", default="", help="comma list of benchmarks to leave out")
    args = ap.parse_args(argv)
    want = [b.strip() for b in args.only.split(",") if b.strip()] or BENCHES
    skip = {b.strip() for b in args.skip.split(",") if b.strip()}
    unknown = sorted((set(want) | skip) - set(BENCHES))
    if unknown:
        print(f"error: unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(BENCHES)})", file=sys.stderr)
        return 2
    here = Path(__file__).resolve().parent
    done: list[tuple[str, int, float]] = []
    for name in [b for b in want if b not in skip]:
        print(f"\n=== bench/{name}.py " + "=" * (60 - len(name)), flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, str(here / f"{name}.py")])
        done.append((name, rc, time.perf_counter() - t0))
    print(f"\n{'benchmark':<12} {'exit':>4} {'wall':>9}")
    for name, rc, secs in done:
        print(f"{name:<12} {rc:>4} {secs / 60:>7.1f} m")
    return 0 if all(rc == 0 for _, rc, _ in done) else 1


if __name__ == "__main__":
    sys.exit(main())
