"""/health latency while an 8 MB binary walk-ffn frame is processed by an --ffn-only server on the
embedded model: the worst /health round trip during the frame, as a ratio of the idle /health round
trip measured in the same run (issue 23: large frames are parsed and computed off the event loop).

    python bench/health_during_ffn.py
"""
import sys, threading, time, statistics
import numpy as np, httpx
from modelql.server.config import ServerConfig
from modelql.server.serve import background
from modelql.server.knowledge_routes import VindexSource
from modelql.runtime.loading import load_model
from modelql.lql import default_vindex as dv
from modelql.remote import wire
m = load_model(dv.default_model_dir())
H = m.spec.hidden_size
rows = (8 * 1024 * 1024) // (4 * H)
frame = wire.encode_request(0, np.random.default_rng(0).standard_normal((rows, H)).astype(np.float32), seq_len=rows)
with background(None, ServerConfig(port=0, ffn_only=True), model=m, vindex_source=VindexSource.unavailable("x")) as srv:
    c = httpx.Client(base_url=srv.url, timeout=120)
    idle = []
    for _ in range(20):
        t = time.perf_counter(); c.get("/health"); idle.append(time.perf_counter() - t)
    worst = []
    for _ in range(3):
        done = threading.Event()
        def big():
            httpx.post(srv.url + "/v1/walk-ffn", content=frame, headers={"Content-Type": wire.MEDIA_F32}, timeout=120)
            done.set()
        th = threading.Thread(target=big); t0 = time.perf_counter(); th.start()
        lat = []
        time.sleep(0.05)
        while not done.is_set():
            t = time.perf_counter(); c.get("/health"); lat.append(time.perf_counter() - t)
        th.join(); big_s = time.perf_counter() - t0
        worst.append((max(lat) if lat else 0.0, big_s))
    med_idle = statistics.median(idle)
    for w, b in worst:
        print(f"frame {b:.2f}s  worst /health {w*1e3:.0f} ms  ({w/med_idle:.0f}x idle {med_idle*1e3:.1f} ms; {w/b:.2f} of the frame time)")
