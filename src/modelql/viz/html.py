"""Standalone HTML pages (one file, no external URL): the web UI's `charts.js` and a small
renderer inlined, the data embedded as JSON."""

from __future__ import annotations

import html
import json
from dataclasses import asdict
from importlib import resources
from pathlib import Path

from ..fsutil import atomic_write_bytes

STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:16px;color:#1b1f24}
table{border-collapse:collapse;margin:6px 0}
th,td{border:1px solid #e1e4e8;padding:2px 8px;text-align:left;vertical-align:top}
th{background:#f1f3f5}.muted{color:#6a737d;font-size:12px}.chart text{font:11px system-ui,sans-serif;fill:#333}
.chart .caption{fill:#6a737d}.chart .axis{stroke:#999}.tok{border-bottom:2px solid #3b6fb6;margin-right:1px}"""

TRACE_JS = """(function(){var tr=JSON.parse(document.getElementById('data').textContent);var C=window.ModelqlCharts;
document.getElementById('heat').appendChild(C.traceHeatmap(tr,'prob'));
document.getElementById('rank').appendChild(C.traceHeatmap(tr,'rank'));
document.getElementById('bars').appendChild(C.traceBars(tr));})();"""


def charts_js() -> str:
    return resources.files("modelql.viz").joinpath("static", "charts.js").read_text(encoding="utf-8")


def _script(text: str) -> str:
    return "<script>" + text.replace("</", "<\\/") + "</script>"


def _data(obj) -> str:
    return ('<script type="application/json" id="data">' + json.dumps(obj, ensure_ascii=False).replace("</", "<\\/")
            + "</script>")


def _page(title: str, body: str, data=None, js: str | None = None) -> str:
    parts = ["<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>", body]
    if data is not None:
        parts.append(_data(data))
    if js is not None:
        parts += [_script(charts_js()), _script(js)]
    parts.append("</body></html>")
    return "".join(parts)


def trace_html(trace) -> str:
    """A TRACE as a page: answer probability and rank heat maps (layer × position), and the
    attention-vs-FFN contributions per layer at the last position."""
    if trace.answer is None:
        from ..errors import ModelqlError

        raise ModelqlError('a TRACE picture needs the traced token: TRACE "prompt" FOR "token" POSITIONS ALL '
                           'SAVE "x.html"')
    data = asdict(trace)
    data["vocab_size"] = None
    body = (f"<h1>TRACE {html.escape(json.dumps(trace.prompt))} for {html.escape(json.dumps(trace.answer))}</h1>"
            f"<p class=muted>{len(trace.tokens)} tokens, {trace.num_layers} layers, {trace.elapsed_ms:.0f} ms</p>"
            "<h2>Probability</h2><div id=heat></div><h2>Rank</h2><div id=rank></div>"
            "<h2>Attention vs FFN contributions per layer (last position)</h2><div id=bars></div>")
    return _page(f"TRACE {trace.prompt}", body, data, TRACE_JS)


def explanation_html(ex) -> str:
    """`modelql explain --html`: the completion with every token's top features (static tables)."""
    rows = []
    for t in ex.tokens:
        feats = "".join(
            f"<tr><td>L{f.layer} F{f.feature}</td><td>{f.gate:.2f}</td><td>{html.escape(', '.join(f.top_tokens[:4]))}"
            f"</td><td>{html.escape(f.relation or '')}</td></tr>" for f in t.features)
        rows.append(f"<h3 id=tok{t.index}>{t.index + 1}. {html.escape(json.dumps(t.token))} "
                    f"<span class=muted>(position {t.position})</span></h3>"
                    "<table><tr><th>feature</th><th>gate</th><th>promotes</th><th>relation</th></tr>"
                    f"{feats}</table>")
    toks = "".join(f'<a class=tok href="#tok{t.index}">{html.escape(t.token)}</a>' for t in ex.tokens)
    body = (f"<h1>EXPLAIN</h1><p><b>prompt</b> {html.escape(ex.prompt)}</p><p><b>completion</b> {toks}</p>"
            f"<p class=muted>features from {html.escape(ex.features_from)}; {ex.latency_ms:.0f} ms</p>" + "".join(rows))
    return _page("modelql explain", body)


def write_html(path: str | Path, text: str) -> Path:
    p = Path(path)
    atomic_write_bytes(p, text.encode("utf-8"))
    return p
