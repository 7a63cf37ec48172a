"""A Q4_K_M-like GGUF loads without float copies: the RSS it adds stays within a bound relative to its file
size (measured in a fresh subprocess, so the process's own high-water mark is the model's; no timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[2]


def _load_rss(path: Path, stage_bytes: int) -> dict:
    code = ("import json, sys; import modelql.runtime.ort_decode as d; d.STAGE_BYTES = int(sys.argv[2]); "
            "from tests.random_gguf import load_rss; print('RESULT ' + json.dumps(load_rss(sys.argv[1])))")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(stage_bytes)], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert line is not None, proc.stderr[-2000:]
    return json.loads(line[7:])


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc (Linux)")
def test_q4_k_m_like_gguf_loads_within_bounded_rss(tmp_path):
    from tests.random_gguf import write_random_q4_k_m

    path = tmp_path / "random-Q4_K_M.gguf"
    params = write_random_q4_k_m(path, hidden=1024, layers=6, inter=2816, heads=16, kv=4, vocab=16000)
    size = path.stat().st_size / 2**20
    # stages of ~8 MiB: the staged build is exercised as on a large model (~6 sessions here)
    r = _load_rss(path, 8 << 20)
    assert r["quantized"] and r["finite"]
    grown = r["peak"] - r["base"]
    # float32 weights would add 4 bytes per parameter (≈ 7× this file). The kernels' own prepacked layout
    # (codes plus a float scale and block sum per 32 weights; Q6_K held as 8-bit) and Q4_K's float block
    # offsets make the loaded model ≈ 1.8× the file (measured 1.83×, peak 2.24× with 8 MiB stages)
    assert grown < 3.0 * size, (grown, size)
    assert grown < 0.4 * params * 4 / 2**20
