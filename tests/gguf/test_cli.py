"""GGUF files through the commands a user runs: convert, generate, extract, serve; and a vindex
extracted from a GGUF equals the one extracted from the safetensors checkpoint."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from modelql.cli import app
from modelql.models.gguf_convert import convert
from modelql.vindex import Vindex, extract
from tests.gguf.helpers import make_tiny_with_tokenizer

PROMPT = "The capital of Japan is"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """(HF dir, {type: gguf}) for a tiny Llama with a byte-level tokenizer."""
    d = tmp_path_factory.mktemp("cli")
    make_tiny_with_tokenizer("gpt2", d / "hf", "llama")
    runner = CliRunner()
    files = {}
    for t in ("f32", "f16", "q8_0"):
        out = d / f"m.{t}.gguf"
        result = runner.invoke(app, ["convert", str(d / "hf"), "-o", str(out), "--type", t])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"wrote {out} (llama, {t}:")
        files[t] = out
    return d / "hf", files


def _generate(ref) -> str:
    result = CliRunner().invoke(app, ["generate", str(ref), PROMPT, "-n", "12"])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_generate_from_gguf_matches_the_checkpoint(model):
    hf_dir, files = model
    assert _generate(files["f32"]) == _generate(hf_dir)


def test_info_on_gguf(model):
    _, files = model
    result = CliRunner().invoke(app, ["info", str(files["q8_0"]), "--json"])
    assert result.exit_code == 0, result.output
    assert '"family": "llama"' in result.stdout and '"tokenizer": true' in result.stdout


def test_convert_cli_rejects_bad_type(model, tmp_path):
    hf_dir, _ = model
    result = CliRunner().invoke(app, ["convert", str(hf_dir), "-o", str(tmp_path / "x.gguf"), "--type", "q4_k"])
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("error: unsupported GGUF type 'q4_k'")


def _assert_same_vindex(a: Vindex, b: Vindex, atol: float = 0.0) -> None:
    assert a.layers() == b.layers() and a.vocab_size == b.vocab_size and a.hidden_size == b.hidden_size
    np.testing.assert_allclose(a.embeddings().numpy(), b.embeddings().numpy(), rtol=0, atol=atol)
    for layer in a.layers():
        np.testing.assert_allclose(a.gate(layer).float().numpy(), b.gate(layer).float().numpy(), rtol=0, atol=atol)
        same = total = 0
        for f in range(a.num_features(layer)):
            ma, mb = a.feature_meta(layer, f), b.feature_meta(layer, f)
            total += 1
            if atol == 0.0:
                assert ma == mb, (layer, f)
                same += 1
            else:
                same += ma is not None and mb is not None and ma.top_token_id == mb.top_token_id
        assert same >= 0.95 * total, (layer, same, total)


def test_vindex_from_gguf_equals_vindex_from_safetensors(model, tmp_path):
    hf_dir, files = model
    ref = Vindex.load(extract(hf_dir, tmp_path / "st.vindex", dtype="f32").path)
    exact = Vindex.load(extract(files["f32"], tmp_path / "f32.vindex", dtype="f32").path)
    _assert_same_vindex(ref, exact)  # F32 GGUF: bit-for-bit the same vindex
    assert exact.tokenizer.encode(PROMPT) == ref.tokenizer.encode(PROMPT)
    # F16 GGUF of a float32 checkpoint: within half-precision rounding
    half = Vindex.load(extract(files["f16"], tmp_path / "f16.vindex", dtype="f32").path)
    scale = max(float(ref.embeddings().abs().max()), 1.0)
    _assert_same_vindex(ref, half, atol=scale * 2**-10)


def test_extract_cli_on_gguf(model, tmp_path):
    _, files = model
    out = tmp_path / "q.vindex"
    result = CliRunner().invoke(app, ["extract", str(files["q8_0"]), "-o", str(out), "-q"])
    assert result.exit_code == 0, result.output
    vx = Vindex.load(out)
    assert vx.family == "llama" and (out / "tokenizer.json").exists()


def test_serve_gguf(model):
    hf_dir, files = model
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "modelql.cli", "serve", str(files["f32"]), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, out, deadline = None, "", time.monotonic() + 120
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            out += line
            m = re.search(r"at (http://127\.0\.0\.1:\d+)", line)
            url = m.group(1) if m else None
        assert url, out
        r = httpx.post(url + "/v1/completions", timeout=60,
                       json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0})
        assert r.status_code == 200, r.text
        text = r.json()["choices"][0]["text"]
        assert text and (text if text.endswith("\n") else text + "\n") == _generate(hf_dir)
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        assert r.status_code == 200, r.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
