"""Issue 23, defect 8: the user docs cite only files users have, and the README's KnowledgeClient
example prints what the client returns (run here against the embedded model's server)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_user_docs_cite_no_design_files():
    for doc in USER_DOCS:
        text = doc.read_text(encoding="utf-8")
        for banned in ("server-api.md", "vindex-format.md", "algorithms.md", "ARCHITECTURE.md", "../shared"):
            assert banned not in text, (doc.name, banned)
        for link in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text):
            if not link.startswith(("http://", "https://", "mailto:")):
                assert (doc.parent / link).exists(), (doc.name, link)


def test_readme_knowledge_client_example_prints_what_it_returns(ksrv):
    """Each `expr    # shown` line of the README's KnowledgeClient block: the value's repr matches the
    comment (`...` stands for the fields the README leaves out; numbers as the README rounds them)."""
    from modelql.client import KnowledgeClient

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "KnowledgeClient(" in b)
    lines = [ln for ln in block.splitlines() if "#" in ln and ln.startswith("kc.")]
    assert lines
    kc = KnowledgeClient(ksrv.url)
    try:
        for line in lines:
            expr, shown = (part.strip() for part in line.split("#", 1))
            value = eval(expr, {"kc": kc})  # noqa: S307 - the README's own example
            if "..." not in shown:
                assert repr(value) == shown, (expr, repr(value))
                continue
            text = repr(value)
            for field in re.findall(r"(\w+=(?:'[^']*'|[-\d.]+))", shown):
                name, want = field.split("=", 1)
                got = re.search(rf"\b{name}=('[^']*'|[-\d.e]+)", text)
                assert got, (expr, name, text[:300])
                if want.startswith("'"):
                    assert got.group(1) == want, (expr, name, got.group(1))
                else:
                    decimals = len(want.split(".")[1]) if "." in want else 0
                    assert round(float(got.group(1)), decimals) == float(want), (expr, name, got.group(1))
            assert text.startswith(shown.split("(")[0] + "("), (expr, text[:80])
    finally:
        kc.close()
