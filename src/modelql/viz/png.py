"""TRACE as a PNG (Pillow: one small dependency with a built-in font; the picture matches the
web UI's heat map and bars): the answer's probability per layer × position, its rank in each
cell, and the attention-vs-FFN contributions per layer at the last position."""

from __future__ import annotations

import math
from pathlib import Path

from ..errors import ModelqlError
from ..fsutil import atomic_path

CELL_W, CELL_H = 64, 22
BLUE, ORANGE, GREY = (59, 111, 182), (224, 123, 57), (106, 115, 125)


def _colour(t: float) -> tuple[int, int, int]:
    t = max(0.0, min(1.0, t))
    return (round(247 - t * (247 - 8)), round(251 - t * (251 - 48)), round(255 - t * (255 - 107)))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _clip(s: str, n: int) -> str:
    s = repr(s)[1:-1]
    return s if len(s) <= n else s[: n - 1] + "…"


def trace_png(trace, path: str | Path) -> Path:
    """Draw `trace` (POSITIONS ALL, with FOR "token") into `path`, atomically."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:  # pragma: no cover - a runtime dependency
        raise ModelqlError("writing PNG needs Pillow: pip install pillow") from None
    if trace.answer is None:
        raise ModelqlError('a TRACE picture needs the traced token: TRACE "prompt" FOR "token" POSITIONS ALL '
                           'SAVE "x.png"')
    layers = sorted({r.layer for r in trace.rows}, reverse=True)
    positions = sorted({r.position for r in trace.rows})
    cell = {(r.layer, r.position): r for r in trace.rows}
    last = len(trace.tokens) - 1
    contrib = sorted((r for r in trace.rows if r.position == last and r.layer >= 0), key=lambda r: r.layer)
    font, small = _font(13), _font(11)
    left, top = 60, 90
    heat_w = left + CELL_W * len(positions) + 20
    bar_h, bar_w = 180, max(320, left + len(contrib) * 22 + 40)
    width = max(heat_w, bar_w, 640)
    height = top + CELL_H * len(layers) + 60 + bar_h + 70
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    d.text((10, 8), f"TRACE {trace.prompt!r} for {trace.answer!r}", fill="black", font=font)
    d.text((10, 28), "probability of the answer by layer (rows) and position (columns); number = rank", fill=GREY,
           font=small)
    for j, pos in enumerate(positions):
        d.text((left + j * CELL_W + 2, top - 20), _clip(trace.tokens[pos], 9), fill="black", font=small)
    for i, layer in enumerate(layers):
        y = top + i * CELL_H
        d.text((10, y + 4), "emb" if layer < 0 else f"L{layer}", fill="black", font=small)
        for j, pos in enumerate(positions):
            r = cell.get((layer, pos))
            x = left + j * CELL_W
            if r is None or r.answer_prob is None:
                d.rectangle([x, y, x + CELL_W - 2, y + CELL_H - 2], fill=(238, 238, 238))
                continue
            v = math.sqrt(r.answer_prob)
            d.rectangle([x, y, x + CELL_W - 2, y + CELL_H - 2], fill=_colour(v))
            d.text((x + 4, y + 4), f"{100 * r.answer_prob:.1f}% #{r.answer_rank}", font=small,
                   fill="white" if v > 0.55 else "black")
    # attention vs FFN bars (last position)
    y0 = top + CELL_H * len(layers) + 50
    d.text((10, y0 - 22), f"attention vs FFN logit-lens contributions to {trace.answer!r} (last position)",
           fill="black", font=font)
    vals = [v for r in contrib for v in (r.attn_logit or 0.0, r.ffn_logit or 0.0)] + [0.0]
    lo, hi = min(vals), max(vals)
    hi = hi if hi > lo else lo + 1.0

    def yy(v: float) -> float:
        return y0 + (hi - v) / (hi - lo) * bar_h

    d.line([left, yy(0), width - 10, yy(0)], fill=GREY)
    for v in (hi, 0.0, lo):
        d.text((10, yy(v) - 6), f"{v:.2f}", fill=GREY, font=small)
    for i, r in enumerate(contrib):
        x = left + 6 + i * 22
        for k, (v, c) in enumerate(((r.attn_logit or 0.0, ORANGE), (r.ffn_logit or 0.0, BLUE))):
            a, b = sorted((yy(v), yy(0)))
            d.rectangle([x + k * 9, a, x + k * 9 + 7, max(b, a + 1)], fill=c)
        if len(contrib) <= 40 or i % 2 == 0:
            d.text((x, y0 + bar_h + 6), f"L{r.layer}", fill="black", font=small)
    ly = y0 + bar_h + 28
    d.rectangle([left, ly, left + 10, ly + 10], fill=ORANGE)
    d.text((left + 14, ly - 2), "attention", fill="black", font=small)
    d.rectangle([left + 90, ly, left + 100, ly + 10], fill=BLUE)
    d.text((left + 104, ly - 2), "FFN", fill="black", font=small)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(p) as tmp:
        img.save(tmp, format="PNG")
    return p
