"""`modelql lql` batch mode: statements from the argument, -f FILE or stdin; continues after an
error, prints `Error: ...` for it, exits 1 if any statement failed; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from modelql.cli import app


@pytest.fixture
def runner():
    return CliRunner()


def invoke(runner, args, input=None, env=None):
    env = {"MODELQL_DEBUG": "", **(env or {})}
    return runner.invoke(app, args, input=input, env=env)


def test_batch_success(runner, tiny_vindex):
    r = invoke(runner, ["lql", "--vindex", str(tiny_vindex), "SHOW LAYERS; SHOW LAYERS 1-1"])
    assert r.exit_code == 0, r.output
    blocks = r.output.split("\n\n")
    assert len(blocks) == 2
    assert blocks[0].splitlines()[0].split() == ["Layer", "Features", "WithMeta", "TopToken"]
    assert blocks[1].splitlines()[-1].split()[0] == "L1"


def test_batch_continues_after_errors(runner, tiny_vindex):
    script = 'SHOW LAYERS 0-0; WALK "x" BOGUS; SHOW FEATURES 99; SHOW LAYERS 1-1'
    r = invoke(runner, ["lql", "--vindex", str(tiny_vindex), script])
    assert r.exit_code == 1
    out = r.output
    assert "Traceback" not in out
    lines = out.splitlines()
    assert any(line.startswith("Error: Parse error at line 1, column ") for line in lines)
    assert "Error: no features at layer 99" in lines
    # the statements after the failures ran, in order
    assert out.index("L0") < out.index("Error: Parse error") < out.index("Error: no features") < out.rindex("L1")


def test_batch_stops_after_a_failed_use(runner, tiny_vindex, tmp_path):
    """A failed USE stops the script: the INSERT and COMPILE after it would otherwise run on the
    backend in use before (here the --vindex one) and write output."""
    out_dir = tmp_path / "compiled.vindex"
    script = (f'SHOW LAYERS 0-0;\nUSE "nope.vindex";\nSHOW LAYERS 1-1;\n'
              f'INSERT INTO EDGES (entity, relation, target) VALUES ("a", "b", "c");\n'
              f'COMPILE CURRENT INTO VINDEX "{out_dir}";')
    r = invoke(runner, ["lql", "--vindex", str(tiny_vindex), script])
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.output.splitlines()
    assert "Error: vindex not found: nope.vindex" in lines
    assert "Error: script stopped: the USE at line 2 failed, so the 3 statement(s) after it were not run" in lines
    assert "L1" not in r.output and not out_dir.exists()


def test_file_and_stdin(runner, tiny_vindex, tmp_path):
    f = tmp_path / "q.lql"
    f.write_text(f'-- a script\nUSE "{tiny_vindex}";\n\nSHOW LAYERS;\nWALK "x" TOP;\n')
    r = invoke(runner, ["lql", "-f", str(f)])
    assert r.exit_code == 1
    assert r.output.splitlines()[0].startswith(f"Using: {tiny_vindex}")
    assert "Error: Parse error at line 5, column 13: expected positive integer, got ';'" in r.output
    r = invoke(runner, ["lql", "-f", "-"], input=f'USE "{tiny_vindex}"; SHOW LAYERS 0-0')
    assert r.exit_code == 0 and "WithMeta" in r.output
    r = invoke(runner, ["lql"], input=f'USE "{tiny_vindex}"; SHOW LAYERS 0-0')
    assert r.exit_code == 0 and "WithMeta" in r.output


def test_usage_errors_are_one_line(runner, tiny_vindex, tmp_path):
    f = tmp_path / "q.lql"
    f.write_text("STATS")
    r = invoke(runner, ["lql", "-f", str(f), "STATS"])
    assert r.exit_code == 1 and r.output.strip() == "error: give statements or -f FILE, not both"
    r = invoke(runner, ["lql", "--vindex", str(tmp_path / "missing"), "STATS"])
    assert r.exit_code == 1 and r.output.strip() == f"error: vindex not found: {tmp_path / 'missing'}"
    r = invoke(runner, ["lql", "-f", str(tmp_path / "absent.lql")])
    assert r.exit_code == 1 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1


def test_entry_point_exit_codes(tiny_vindex):
    """The installed command, end to end (one subprocess)."""
    env = dict(os.environ, MODELQL_DEBUG="")
    cmd = [sys.executable, "-m", "modelql.cli", "lql", "--vindex", str(tiny_vindex)]
    ok = subprocess.run(cmd + ["SHOW LAYERS"], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "WithMeta" in ok.stdout, ok.stderr
    bad = subprocess.run(cmd + ['SHOW LAYERS; WALK ""; SHOW LAYERS 0-0'], capture_output=True, text=True,
                         env=env, timeout=120)
    assert bad.returncode == 1
    assert "Error: empty prompt" in bad.stdout.splitlines()
    assert bad.stdout.rstrip().splitlines()[-1].split()[0] == "L0"
    assert "Traceback" not in bad.stdout + bad.stderr
