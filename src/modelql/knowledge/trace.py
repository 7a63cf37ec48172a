"""TRACE: how the residual stream arrives at a prediction, layer by layer (algorithms §9).

For every layer the trace records what attention and the FFN added to the residual and what
the logit lens reads from it, so "which layers raised ' Paris'" is a table, not a guess.
Differences from the reference: the answer id is the *first* token of " tok" (the one the model
must predict next), and traces are saved as JSON that reloads to an identical `Trace`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..errors import ModelqlError
from ..fsutil import atomic_write_json
from ..runtime import interp
from ..runtime.model import Model

TRACE_FORMAT = "modelql-trace/1"


@dataclass(frozen=True)
class TraceRow:
    """One layer at one position. layer −1 is the (scaled) embedding."""

    layer: int
    position: int
    top_token: str
    top_prob: float
    attn_norm: float
    ffn_norm: float
    resid_norm: float
    attn_share: float
    answer_rank: int | None = None
    answer_prob: float | None = None
    attn_logit: float | None = None
    ffn_logit: float | None = None
    who: str | None = None


@dataclass(frozen=True)
class Trace:
    prompt: str
    tokens: list[str]
    answer: str | None
    answer_id: int | None
    rows: list[TraceRow]
    elapsed_ms: float = 0.0
    num_layers: int = 0
    format: str = field(default=TRACE_FORMAT)

    def first_rank1_layer(self, position: int | None = None) -> int | None:
        """The first layer whose residual already ranks the answer first (None if never)."""
        pos = position if position is not None else len(self.tokens) - 1
        for r in self.rows:
            if r.position == pos and r.answer_rank == 1:
                return r.layer
        return None

    def save(self, path: str | Path) -> Path:
        """Write atomically (temp file + rename): a failure never leaves half a trace."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | Path) -> Trace:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            if data.get("format") != TRACE_FORMAT:
                raise ValueError(f"format is {data.get('format')!r}")
            rows = [TraceRow(**r) for r in data.pop("rows")]
            return cls(rows=rows, **data)
        except FileNotFoundError:
            raise ModelqlError(f"trace file {path} does not exist") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ModelqlError(f"{path} is not a modelql trace file ({exc})") from None


def _who(attn: float, ffn: float) -> str:
    if attn > 0.5 and ffn > 0.5:
        return "BOTH ↑"
    if attn > 0.5:
        return "ATTN ↑"
    if ffn > 0.5:
        return "FFN ↑"
    if attn < -0.5 and ffn < -0.5:
        return "both ↓"
    if attn < -0.5:
        return "attn ↓"
    if ffn < -0.5:
        return "ffn ↓"
    return "~"


def answer_token_id(model: Model, answer: str) -> int:
    """The id the model must predict next for `answer`: the first token of " answer"."""
    text = answer if answer.startswith(" ") else " " + answer
    ids = model.tokenizer.encode(text, add_special_tokens=False)
    if not ids:
        raise ModelqlError(f"answer {answer!r} encodes to no tokens")
    return ids[0]


def trace(model: Model, prompt: str | list[int], for_token: str | None = None, layers: range | None = None,
          positions: str = "last", answer_id: int | None = None) -> Trace:
    """Per-layer residual trace of `prompt` (text or token ids) at the last position (or all
    positions). The answer is `for_token` (its first token, see `answer_token_id`) or, for a
    token already generated (the web explanation of one token), its id `answer_id`."""
    if model.tokenizer is None:
        raise ModelqlError("TRACE needs a tokenizer")
    if positions not in ("last", "all"):
        raise ModelqlError(f"positions must be 'last' or 'all', not {positions!r}")
    start = time.perf_counter()
    ids = interp.to_ids(model, prompt)
    n = model.spec.num_layers
    names = ["blocks.0.hook_resid_pre"]
    for i in range(n):
        names += [f"blocks.{i}.hook_attn_out", f"blocks.{i}.hook_mlp_out", f"blocks.{i}.hook_resid_post"]
    _, cache = interp.run_with_cache(model, ids, names)
    if for_token is not None:
        answer_id = answer_token_id(model, for_token)
    elif answer_id is not None:
        if not 0 <= answer_id < model.spec.vocab_size:
            raise ModelqlError(f"answer token id {answer_id} is outside the vocabulary")
        for_token = model.tokenizer.decode([answer_id])
    t = ids.shape[1]
    pos_list = list(range(t)) if positions == "all" else [t - 1]
    wanted = set(layers) if layers is not None else None
    rows: list[TraceRow] = []
    with torch.inference_mode():
        for layer in range(-1, n):
            if wanted is not None and layer not in wanted and layer != -1:
                continue
            if layer == -1:
                resid = cache["blocks.0.hook_resid_pre"]
                attn = ffn = torch.zeros_like(resid)
            else:
                resid = cache[f"blocks.{layer}.hook_resid_post"]
                attn = cache[f"blocks.{layer}.hook_attn_out"]
                ffn = cache[f"blocks.{layer}.hook_mlp_out"]
            probs = torch.softmax(model.unembed(resid[pos_list]).double(), dim=-1)
            lens_a = model.unembed(attn[pos_list]) if answer_id is not None else None
            lens_f = model.unembed(ffn[pos_list]) if answer_id is not None else None
            for j, pos in enumerate(pos_list):
                p = probs[j]
                top = int(p.argmax())
                an, fn = float(attn[pos].float().norm()), float(ffn[pos].float().norm())
                extra = {}
                if answer_id is not None:
                    pa = float(p[answer_id])
                    al = float(lens_a[j, answer_id]) if an > 0 else 0.0
                    fl = float(lens_f[j, answer_id]) if fn > 0 else 0.0
                    extra = dict(
                        answer_rank=1 + int((p > p[answer_id]).sum()),
                        answer_prob=pa,
                        attn_logit=al,
                        ffn_logit=fl,
                        who="embed" if layer == -1 else _who(al, fl),
                    )
                rows.append(TraceRow(
                    layer=layer, position=pos, top_token=model.tokenizer.decode([top]), top_prob=float(p[top]),
                    attn_norm=an, ffn_norm=fn, resid_norm=float(resid[pos].float().norm()),
                    attn_share=100 * an / (an + fn) if an + fn > 0 else 0.0, **extra,
                ))
    return Trace(
        prompt=prompt if isinstance(prompt, str) else model.tokenizer.decode([int(i) for i in ids[0]]),
        tokens=[model.tokenizer.decode([int(i)]) for i in ids[0]],
        answer=for_token,
        answer_id=answer_id,
        rows=rows,
        elapsed_ms=round((time.perf_counter() - start) * 1000, 1),
        num_layers=n,
    )
