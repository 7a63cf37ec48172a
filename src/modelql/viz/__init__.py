"""Pictures of knowledge results for people who stay in the terminal: the same charts the web UI
draws, written to files. `save_trace(trace, path)` picks the format from the suffix (`.png`
through Pillow, `.html` a standalone page with the UI's own chart script inlined, anything else
the reloadable JSON); `explanation_html(explanation)` is `modelql explain --html`."""

from __future__ import annotations

from pathlib import Path

from .html import explanation_html, trace_html, write_html
from .png import trace_png


def save_trace(trace, path: str | Path) -> Path:
    """Write `trace` to `path` as PNG, HTML or JSON (by suffix), atomically."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".png":
        return trace_png(trace, p)
    if suffix in (".html", ".htm"):
        return write_html(p, trace_html(trace))
    return trace.save(p)


__all__ = ["save_trace", "trace_png", "trace_html", "explanation_html", "write_html"]
