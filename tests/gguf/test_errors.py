"""Bad GGUF input gives one typed, one-line error: truncated files, foreign files, unknown
architectures and unsupported tensor types; the CLI prints `error: ...` without a traceback."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from modelql.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from modelql.models.gguf import GgufSource
from modelql.models.gguf_convert import convert
from modelql.runtime import load_model
from tests.gguf.test_dequant import random_blocks, write_gguf
from tests.tiny_models import make_tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    make_tiny("qwen2", d / "hf")
    return convert(d / "hf", d / "m.gguf", "q8_0").path


def _one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text and text
    return text


@pytest.mark.parametrize("keep", [0, 10, 23, 200, 2000, "half", "minus1"])
def test_truncated_file(keep, good, tmp_path):
    data = good.read_bytes()
    n = {"half": len(data) // 2, "minus1": len(data) - 1}.get(keep, keep)
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:n])
    with pytest.raises(ModelFormatError) as exc:
        GgufSource(bad)
    text = _one_line(exc)
    assert "truncated" in text and "cut.gguf" in text


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ModelFormatError, match="not a GGUF file"):
        GgufSource(bad)
    with pytest.raises(ModelNotFoundError):
        GgufSource(tmp_path / "missing.gguf")


def test_corrupt_header(good, tmp_path):
    data = bytearray(good.read_bytes())
    data[16:24] = struct.pack("<Q", 10**12)  # absurd metadata count
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFormatError) as exc:
        GgufSource(bad)
    assert "corrupt" in _one_line(exc) or "truncated" in str(exc.value)


def test_unknown_architecture(tmp_path):
    write_gguf(tmp_path / "mamba.gguf", {"token_embd.weight": np.zeros((4, 32), np.float32)}, arch="mamba")
    with pytest.raises(UnsupportedModelError) as exc:
        GgufSource(tmp_path / "mamba.gguf")
    assert "architecture 'mamba' is not supported" in _one_line(exc)


@pytest.mark.parametrize("qtype", ["TQ2_0", "IQ2_XXS", "IQ4_NL"])
def test_unsupported_quantisation_type(qtype, tmp_path):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    raw = np.frombuffer(random_blocks("Q8_0", 0, np.random.default_rng(0)) + bytes(size * 2 * (256 // block)),
                        dtype=np.uint8).reshape(2, -1)
    write_gguf(tmp_path / "q.gguf", {"token_embd.weight": (raw, qtype, (2, 256))})
    with pytest.raises(UnsupportedModelError) as exc:
        GgufSource(tmp_path / "q.gguf")
    assert f"quantisation type {qtype} (tensor token_embd.weight) is not supported" in _one_line(exc)


def test_unknown_type_id(good, tmp_path):
    """A tensor type id no gguf version knows (a newer llama.cpp) is unsupported, not corrupt."""
    data = bytearray(good.read_bytes())
    name = b"token_embd.weight"
    at = data.index(name) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, 250)
    bad = tmp_path / "newtype.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnsupportedModelError, match="type id 250"):
        GgufSource(bad)


def test_convert_rejects_unknown_type(tmp_path):
    make_tiny("llama", tmp_path / "hf")
    with pytest.raises(UnsupportedModelError, match="q4_k"):
        convert(tmp_path / "hf", tmp_path / "m.gguf", "q4_k")
    assert not (tmp_path / "m.gguf").exists()


def test_cli_prints_one_error_line(good, tmp_path):
    from modelql.cli import app

    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    runner = CliRunner()
    for args in (["generate", str(bad), "hello"], ["info", str(bad)], ["extract", str(bad), "-o", str(tmp_path / "v")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 1, (args, result.output)
        err = result.stderr if hasattr(result, "stderr") else result.output
        lines = [ln for ln in err.strip().splitlines() if ln]
        assert len(lines) == 1 and lines[0].startswith("error: ") and "truncated" in lines[0], (args, err)
        assert "Traceback" not in result.output


def test_load_model_error_is_typed(good, tmp_path):
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:3000])
    with pytest.raises(ModelFormatError):
        load_model(bad)
