"""Grammar-constrained decoding: one llguidance matcher per sequence, applied as a logits mask.

Why llguidance: it installs as one CPU wheel with no dependencies (xgrammar needs torch/triton
pins, outlines-core compiles an index per schema up front), reads HF `tokenizer.json` directly,
takes JSON schema and Lark grammars (with `%json` embedding and lexeme negation, which the tool
call grammar needs), and computes a mask in tens of microseconds on the machine's vocabularies
(bench/structured.py measures the end-to-end cost).

A `Constraint` follows its sequence: `allowed()` is the token mask for the next step (bool [V]),
`consume(token)` advances the matcher with the sampled token, `stopped` says the grammar admits
no more tokens (the sequence then finishes with "stop"). EOS is allowed exactly when the grammar
accepts, so a finished JSON document ends the answer.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Iterable

import numpy as np
import torch

from ..errors import InvalidParamsError, ModelqlError

_LOCK = threading.Lock()
_TOKENIZERS: dict[tuple[int, tuple[int, ...]], Any] = {}


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a runtime dependency
        raise ModelqlError("structured output needs the llguidance package (pip install llguidance)") from None
    return llguidance


def ll_tokenizer(tokenizer, eos_ids: Iterable[int], vocab_size: int):
    """The llguidance tokenizer of a modelql `Tokenizer` (cached: building it walks the vocabulary)."""
    lg = _llguidance()
    eos = tuple(sorted(set(int(i) for i in eos_ids)))
    key = (id(tokenizer), eos)
    with _LOCK:
        found = _TOKENIZERS.get(key)
        if found is None or found[0] is not tokenizer:
            n_vocab = max(vocab_size, tokenizer.vocab_size)
            ll = lg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=list(eos) or None)
            found = (tokenizer, ll)
            _TOKENIZERS[key] = found
        return found[1]


def json_schema_grammar(schema: dict | bool) -> str:
    """An llguidance grammar of one JSON document valid for `schema` (compact: no free whitespace,
    so a small model cannot wander into endless blanks)."""
    lg = _llguidance()
    if not isinstance(schema, (dict, bool)):
        raise InvalidParamsError("a JSON schema must be an object", "response_format")
    return lg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults={"whitespace_flexible": False})


def lark_grammar(source: str) -> str:
    return _llguidance().LLMatcher.grammar_from_lark(source)


def check_grammar(grammar: str, param: str) -> None:
    """Raise InvalidParamsError (→ HTTP 400 naming `param`) for a grammar llguidance rejects."""
    lg = _llguidance()
    is_error, messages = lg.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidParamsError(f"unsupported schema: {messages[0] if messages else 'invalid grammar'}", param)


class Constraint:
    """One sequence's grammar state."""

    def __init__(self, tokenizer, grammar: str, eos_ids: Iterable[int], vocab_size: int):
        lg = _llguidance()
        self.vocab_size = vocab_size
        self.matcher = lg.LLMatcher(ll_tokenizer(tokenizer, eos_ids, vocab_size), grammar, log_level=0)
        if self.matcher.is_error():
            raise InvalidParamsError(f"invalid grammar: {self.matcher.get_error()}", "response_format")

    @property
    def stopped(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def accepting(self) -> bool:
        return self.matcher.is_accepting()

    def allowed(self) -> torch.Tensor:
        """Bool mask [vocab_size] of the tokens the grammar admits next."""
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little")[: self.vocab_size]
        if self.matcher.is_error():
            raise ModelqlError(f"constrained decoding failed: {self.matcher.get_error()}")
        out = torch.from_numpy(mask.view(np.bool_))
        if out.shape[0] < self.vocab_size:  # model rows past the tokenizer's vocabulary: never allowed
            out = torch.cat([out, torch.zeros(self.vocab_size - out.shape[0], dtype=torch.bool)])
        return out

    def consume(self, token_id: int) -> None:
        if not self.matcher.consume_token(int(token_id)):
            raise ModelqlError(f"constrained decoding failed: {self.matcher.get_error()}")


def mask_logits(logits: torch.Tensor, rows: list[int], masks: list[torch.Tensor]) -> torch.Tensor:
    """A copy of logits [B, V] with the disallowed tokens of `rows` at -inf."""
    out = logits.clone()
    for row, mask in zip(rows, masks):
        out[row].masked_fill_(~mask, float("-inf"))
    return out
