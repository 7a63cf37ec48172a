#!/usr/bin/env python
"""Web UI benchmark: page load and DESCRIBE view in real headless Chromium, on the embedded model.

    python bench/web.py                # 10 page loads, 20 DESCRIBE views
    python bench/web.py --loads 20 --entities 40
    python bench/web.py --threads 1     # as `modelql serve --threads 1`

Starts `modelql serve` in-process (embedded model, its cached vindex, an API key), drives
Debian's chromium through playwright (no browser download), and measures

* page load — navigation to `/` until the page has connected (its `/v1/models` call answered
  with the key kept in the tab): what a person waits for before they can type;
* DESCRIBE view — from pressing DESCRIBE to the grouped edges painted, measured by the page
  itself (submit → the frame after the DOM change: what the person waits; the driver's own
  wall clock, which adds playwright's round trips to chromium, is printed beside it), per entity (countries of
  the facts table, in a fixed order, each described once: DESCRIBE results are cached per
  entity, so a repeated entity would measure the cache; one warm-up first); split into the
  page's own fetch time and the rest (rendering, event dispatch, the driver's round trips);
* DESCRIBE view again — the same entities a second time (the server's result cache): what a
  person waits for when coming back to an entity.

References measured in the same run, to read the figures on a noisy machine: a GET /health
round trip and the DESCRIBE JSON call itself (`/v1/describe/rows` through httpx) on *other*
entities of the same list, interleaved with the views (the machine's load drifts): the ratio
view / JSON and the overhead view − JSON are what the browser adds on top of the query.
Targets: page ≤ 1 s, DESCRIBE ≤ 300 ms (p90 of first views).
"""

from __future__ import annotations

import argparse
import os
import re
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
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (serve --threads)")
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

    entities = sorted({f.entity for f in defaults.facts() if f.relation == "capital"})[: 2 * args.entities]
    viewed, queried = entities[0::2], entities[1::2]  # never the same entity: no result cache shared
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
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
        api, views, fetches, driven, again = [], [], [], [], []
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

                def view(e: str) -> tuple[float, float, float]:
                    page.fill("#entity-input", e)
                    t0 = time.perf_counter()
                    page.click("#describe-form button")
                    page.locator("#browse-out h2", has_text=e).wait_for()
                    total = 1e3 * (time.perf_counter() - t0)
                    page.wait_for_selector("#browse-out[data-view-ms]")
                    in_page = float(page.get_attribute("#browse-out", "data-view-ms"))
                    fetched = re.search(r"describe/rows · (\d+) ms", page.inner_text("#status"))
                    return in_page, float(fetched.group(1)) if fetched else float("nan"), total

                view("France")
                for i, (e, q) in enumerate(zip(viewed, queried)):  # a view and a JSON call of another entity,
                    if i % 2:                                      # alternating which goes first
                        api.append(json_call(q))
                        shown, fetched, total = view(e)
                    else:
                        shown, fetched, total = view(e)
                        api.append(json_call(q))
                    views.append(shown)
                    fetches.append(fetched)
                    driven.append(total)
                for e in viewed:
                    again.append(view(e)[0])
                ctx.close()
        finally:
            c.close()
            shutil.rmtree(profile, ignore_errors=True)
    import torch

    print(f"web UI on the embedded model ({srv.url}; {len(loads)} page loads, {len(views)} DESCRIBE views, "
          f"mode {args.mode}, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs)")
    ref_h = row("reference: GET /health", health)
    ref_api = row("reference: DESCRIBE JSON", api, ref_h)
    row("page load (to connected)", loads, ref_h, budget=1000)
    row("DESCRIBE view", views, ref_api, budget=300)
    row("  of which the page's fetch", fetches, ref_api)
    rest = [v - f for v, f in zip(views, fetches)]
    print(f"{'  the rest (render, paint)':<28} median {statistics.median(rest):7.1f} ms")
    row("  as the driver sees it", driven, ref_api)
    row("DESCRIBE view again (cached)", again, ref_api, budget=300)
    over = [v - a for v, a in zip(views, api)]
    print(f"{'UI overhead (view - JSON)':<28} median {statistics.median(over):7.1f} ms   (the rest is the query)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
