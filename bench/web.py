#!/usr/bin/env python
"""Web UI benchmark: page load and DESCRIBE view in real headless Chromium, on the embedded model.

    python bench/web.py                # 10 page loads, 20 DESCRIBE views
    python bench/web.py --loads 20 --entities 40

Starts `modelql serve` in-process (embedded model, its cached vindex, an API key), drives
Debian's chromium through playwright (no browser download), and measures

* page load — navigation to `/` until the page has connected (its `/v1/models` call answered
  with the key kept in the tab): what a person waits for before they can type;
* DESCRIBE view — from pressing DESCRIBE to the grouped edges drawn, per entity (countries of
  the facts table, in a fixed order; one warm-up first).

References measured in the same run, to read the figures on a noisy machine: a GET /health
round trip and the DESCRIBE JSON call itself (`/v1/describe/rows` through httpx, made back to
back with each entity's view, alternating which goes first): the ratio view / JSON and the
overhead view − JSON are what the browser adds on top of the query. Targets: page ≤ 1 s, DESCRIBE ≤ 300 ms.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time

KEY = "bench-key"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def row(name, xs, ref=None, budget=None):
    med = statistics.median(xs)
    line = f"{name:<28} median {med:7.1f} ms   p90 {pct(xs, 0.9):7.1f} ms"
    if ref is not None:
        line += f"   x{med / ref:5.1f} vs reference"
    if budget is not None:
        line += f"   budget {budget:.0f} ms: {'met' if pct(xs, 0.9) <= budget else 'NOT met'} (p90)"
    print(line)
    return med


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--loads", type=int, default=10)
    ap.add_argument("--entities", type=int, default=20)
    ap.add_argument("--mode", choices=["auto", "embedding", "residual"], default="auto",
                    help="DESCRIBE mode of the view (auto: residual with weights, the UI's default)")
    args = ap.parse_args()
    chromium = shutil.which("chromium")
    if chromium is None:
        print("bench/web.py needs Debian's chromium: apt-get install -y chromium", file=sys.stderr)
        return 2
    import httpx
    from playwright.sync_api import sync_playwright

    from modelql import defaults
    from modelql.server.config import ServerConfig
    from modelql.server.serve import background

    entities = sorted({f.entity for f in defaults.facts() if f.relation == "capital"})[: args.entities]
    with background(None, ServerConfig(port=0, api_key=KEY)) as srv:
        if not srv.app.state.knowledge.wait(600):
            print("the vindex did not load", file=sys.stderr)
            return 1
        h = {"Authorization": f"Bearer {KEY}"}
        c = httpx.Client(base_url=srv.url, headers=h, timeout=60)
        c.get("/v1/describe/rows", params={"entity": "France", "mode": args.mode})  # warm-up (labels, layers, weights)
        health = []
        for _ in range(20):
            t0 = time.perf_counter()
            c.get("/health")
            health.append(1e3 * (time.perf_counter() - t0))

        def json_call(e: str) -> float:
            t0 = time.perf_counter()
            c.get("/v1/describe/rows", params={"entity": e, "mode": args.mode}).raise_for_status()
            return 1e3 * (time.perf_counter() - t0)

        profile = tempfile.mkdtemp(prefix="modelql-bench-chromium-")
        api, views = [], []
        try:
            with sync_playwright() as p:
                ctx = p.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True, args=FLAGS)
                page = ctx.new_page()
                page.goto(srv.url + "/")
                page.fill("#key-input", KEY)
                page.click("#key-form button")
                page.wait_for_selector("body[data-ready='1']")
                loads = []
                for _ in range(args.loads):
                    t0 = time.perf_counter()
                    page.goto(srv.url + "/")  # key kept in the tab's sessionStorage
                    page.wait_for_selector("body[data-ready='1']")
                    loads.append(1e3 * (time.perf_counter() - t0))
                page.click("#tabs button[data-tab='browse']")
                page.select_option("#describe-mode", args.mode)

                def view(e: str) -> float:
                    page.fill("#entity-input", e)
                    t0 = time.perf_counter()
                    page.click("#describe-form button")
                    page.locator("#browse-out h2", has_text=e).wait_for()
                    return 1e3 * (time.perf_counter() - t0)

                view("France")
                for i, e in enumerate(entities):  # the JSON call and the view of each entity back to back,
                    if i % 2:                     # alternating which goes first (the machine's load drifts)
                        api.append(json_call(e))
                        views.append(view(e))
                    else:
                        views.append(view(e))
                        api.append(json_call(e))
                ctx.close()
        finally:
            c.close()
            shutil.rmtree(profile, ignore_errors=True)
    print(f"web UI on the embedded model ({srv.url}; {len(loads)} page loads, {len(views)} DESCRIBE views, "
          f"mode {args.mode})")
    ref_h = row("reference: GET /health", health)
    ref_api = row("reference: DESCRIBE JSON", api, ref_h)
    row("page load (to connected)", loads, ref_h, budget=1000)
    row("DESCRIBE view", views, ref_api, budget=300)
    over = [v - a for v, a in zip(views, api)]
    print(f"{'UI overhead (view - JSON)':<28} median {statistics.median(over):7.1f} ms   (the rest is the query)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
