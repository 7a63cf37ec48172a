"""The CLI's pictures: TRACE ... SAVE "x.png" | "x.html" and `modelql explain --html`."""

from __future__ import annotations

import json
import re

import pytest

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def session(kvindex):
    from modelql.lql.session import Session

    s = Session(default_vindex=False, progress=False)
    s.use_vindex(kvindex.path, default=True)
    return s


def run(session, script):
    from modelql.lql.executor import run_batch

    return run_batch(script, session)


def test_trace_save_png(session, tmp_path, kmodel):
    from PIL import Image

    from modelql.knowledge.trace import trace

    out = tmp_path / "t.png"
    [o] = run(session, f'TRACE "{PROMPT}" FOR "Paris" POSITIONS ALL SAVE "{out}";')
    assert o.ok, o.error
    img = Image.open(out)
    img.verify()
    ref = trace(kmodel, PROMPT, for_token="Paris", positions="all")
    im = Image.open(out).convert("RGB")
    assert im.width >= 64 * len(ref.tokens) and im.height > 22 * (kmodel.spec.num_layers + 1)
    # the heat map's darkest cell is where the answer is most probable (last layer, last position)
    from modelql.viz.png import CELL_H, CELL_W

    left, top = 60, 90
    cx = left + (len(ref.tokens) - 1) * CELL_W + CELL_W - 6
    cy = top + CELL_H // 2
    first = left + CELL_W - 6
    dark, light = sum(im.getpixel((cx, cy))), sum(im.getpixel((first, cy)))
    assert ref.rows[-1].answer_prob > 0.5 and dark < light


def test_trace_save_html_is_standalone(session, tmp_path, kmodel):
    from modelql.knowledge.trace import trace

    out = tmp_path / "t.html"
    [o] = run(session, f'TRACE "{PROMPT}" FOR "Paris" POSITIONS ALL SAVE "{out}";')
    assert o.ok, o.error
    text = out.read_text(encoding="utf-8")
    assert set(re.findall(r"[a-z]+://[^\s\"'`)<>]*", text)) <= {"http://www.w3.org/2000/svg"}
    assert "<script src" not in text and "<link" not in text
    data = json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S)
                      .group(1).replace("<\\/", "</"))
    ref = trace(kmodel, PROMPT, for_token="Paris", positions="all")
    assert data["tokens"] == ref.tokens and [r["answer_rank"] for r in data["rows"]] == \
        [r.answer_rank for r in ref.rows]
    assert "ModelqlCharts" in text


def test_trace_picture_needs_an_answer_and_leaves_no_file(session, tmp_path):
    out = tmp_path / "t.png"
    [o] = run(session, f'TRACE "{PROMPT}" POSITIONS ALL SAVE "{out}";')
    assert not o.ok and "FOR" in str(o.error)
    assert list(tmp_path.iterdir()) == []


def test_trace_save_json_unchanged(session, tmp_path):
    from modelql.knowledge.trace import Trace

    out = tmp_path / "t.json"
    [o] = run(session, f'TRACE "{PROMPT}" FOR "Paris" POSITIONS ALL SAVE "{out}";')
    assert o.ok and Trace.load(out).answer == "Paris"


def test_explain_html(tmp_path, kvindex):
    from typer.testing import CliRunner

    from modelql.cli import app

    out = tmp_path / "e.html"
    r = CliRunner().invoke(app, ["explain", str(kvindex.path), PROMPT, "-n", "3", "--json", "--html", str(out)])
    assert r.exit_code == 0, r.output
    ref = json.loads(r.output)
    text = out.read_text(encoding="utf-8")
    assert "http" not in text and "<script" not in text
    toks = re.findall(r'<a class=tok href="#tok\d+">(.*?)</a>', text)
    assert toks == [t["token"] for t in ref["tokens"]] and toks
    assert text.count("<table>") == len(toks)
    for t in ref["tokens"]:
        for f in t["features"]:
            assert f"L{f['layer']} F{f['feature']}" in text
