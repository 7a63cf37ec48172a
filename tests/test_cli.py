"""The `modelql` command: generate/chat/info work; bad input is one `error:` line and a non-zero exit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from modelql.cli import app
from tests.runtime.tiny_tokenizer import make_model_with_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("climodel")
    make_model_with_tokenizer(d, "chatml", max_position=64)
    return d


def run(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def assert_one_line_error(result, pattern: str):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]
    assert "Traceback" not in result.output + result.stderr


def _broken_dirs(tmp_path, model_dir):
    import shutil

    no_config = tmp_path / "no_config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"")
    truncated = tmp_path / "truncated"
    shutil.copytree(model_dir, truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    unsupported = tmp_path / "unsupported"
    shutil.copytree(model_dir, unsupported)
    cfg = json.loads((unsupported / "config.json").read_text())
    cfg["model_type"] = "mamba"
    (unsupported / "config.json").write_text(json.dumps(cfg))
    return {"missing": (tmp_path / "nope", "does not exist"), "no_config": (no_config, "config.json"),
            "truncated": (truncated, "truncated"), "unsupported": (unsupported, "unsupported model_type")}


@pytest.mark.parametrize("case", ["missing", "no_config", "truncated", "unsupported"])
@pytest.mark.parametrize("command", ["generate", "info"])
def test_bad_model_is_a_one_line_error(tmp_path, model_dir, case, command):
    path, pattern = _broken_dirs(tmp_path, model_dir)[case]
    args = [command, path, "hello"] if command == "generate" else [command, path]
    assert_one_line_error(run(*args), pattern)


def test_prompt_longer_than_context_is_a_one_line_error(model_dir):
    assert_one_line_error(run("generate", model_dir, "Hello world " * 60), "context window")


def test_bad_sampling_flag_and_dtype(model_dir):
    r = run("generate", model_dir, "hi", "--top-p", "0")
    assert r.exit_code != 0 and "Traceback" not in r.output + r.stderr
    assert_one_line_error(run("generate", model_dir, "hi", "--dtype", "int3"), "unsupported dtype")


def test_console_script_reports_errors_without_traceback(tmp_path):
    """The installed entry point, in a real process."""
    exe = [sys.executable, "-c", "from modelql.cli import main; main()"]
    p = subprocess.run(exe + ["generate", str(tmp_path / "missing"), "hi"], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [f"error: model path {tmp_path / 'missing'} does not exist"]
    assert p.stdout == ""


def test_help_imports_no_heavy_module():
    """`modelql --help` loads only typer: every command imports its heavy modules in its body."""
    heavy = ("torch", "lark", "numpy", "transformers", "tokenizers", "safetensors", "gguf", "jinja2", "fastapi")
    code = ("import sys\nfrom modelql.cli import main\nsys.argv = ['modelql', '--help']\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print(sorted(m for m in {heavy!r} if m in sys.modules), file=sys.stderr)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "Usage" in p.stdout and "lql" in p.stdout
    assert p.stderr.strip() == "[]", p.stderr


def test_generate_streams_the_completion(model_dir):
    from modelql.runtime import load_model
    from modelql.runtime.generate import generate

    r = run("generate", model_dir, "The capital of France is", "-n", "12", "--seed", "3", "-t", "0.8")
    assert r.exit_code == 0, r.output + r.stderr
    expected = generate(load_model(model_dir), "The capital of France is", max_tokens=12, seed=3, temperature=0.8)
    assert r.stdout == expected.text + ("" if expected.text.endswith("\n") else "\n")


def test_generate_verbose_and_stop(model_dir):
    r = run("generate", model_dir, "Hello", "-n", "5", "-v", "--stop", "zzz")
    assert r.exit_code == 0 and "[finish: " in r.stderr


def test_generate_reads_stdin(model_dir):
    a = run("generate", model_dir, "-", "-n", "5", input="Hello there")
    b = run("generate", model_dir, "Hello there", "-n", "5")
    assert a.exit_code == 0 and a.stdout == b.stdout


def test_chat_keeps_the_conversation(model_dir, monkeypatch):
    import modelql.runtime.generate as gen

    seen = []
    real = gen.Sequence

    def spy(model, prompt, params=None, **kw):
        seen.append([dict(m) for m in prompt])
        return real(model, prompt, params, **kw)

    monkeypatch.setattr(gen, "Sequence", spy)
    r = run("chat", model_dir, "-n", "4", "--system", "Be brief.", input="Hi\nAnd then?\n/help\n/reset\nAgain\n")
    assert r.exit_code == 0, r.output + r.stderr
    assert [len(s) for s in seen] == [2, 4, 2]
    assert seen[1][2]["role"] == "assistant" and seen[1][3] == {"role": "user", "content": "And then?"}
    assert seen[2][1]["content"] == "Again"
    assert "/save FILE" in r.stderr  # /help is answered, not sent to the model


def test_info_reports_the_model(model_dir):
    r = run("info", model_dir)
    assert r.exit_code == 0, r.stderr
    for key in ("family", "layers", "parameters", "dtype", "memory"):
        assert any(line.startswith(key) for line in r.stdout.splitlines()), key
    info = json.loads(run("info", model_dir, "--json", "--dtype", "bfloat16").stdout)
    assert info["family"] == "llama" and info["layers"] == 2 and info["dtype"] == "bfloat16"
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir)
    assert info["parameters"] == sum(p.numel() for p in hf.parameters())
    assert info["memory_bytes"] == 2 * info["parameters"]


def test_no_model_and_no_default_is_a_one_line_error(monkeypatch, tmp_path):
    import modelql.runtime.loading as loading

    monkeypatch.setattr(loading, "default_model_dir", lambda: tmp_path / "default-model")
    assert_one_line_error(run("info"), "does not exist")


def test_unexpected_error_is_still_one_line(monkeypatch, model_dir):
    import modelql.runtime.generate as gen

    def boom(*a, **k):
        raise RuntimeError("kaboom\nsecond line")

    monkeypatch.setattr(gen, "stream", boom)
    r = run("generate", model_dir, "hi")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: internal error: RuntimeError: kaboom"
