"""Text generation: per-sequence state, a batched decode step, and the one-sequence drivers.

The pieces are split so the server can drive many sequences at once (continuous batching):

* `Sequence` holds everything one request owns: prompt ids, KV cache, `SamplingParams`, its
  `Sampler` (RNG, penalty statistics), the incremental detokenizer, the stop-string matcher,
  the generated ids, and the finish reason. `Sequence.prefill(model)` runs its prompt.
* `step(model, sequences)` advances a batch by one token: it samples each sequence's next token
  from its pending logits, turns it into a `Delta` (text, token id, logprobs, finish reason), and
  runs one `Model.forward(ids[B, 1], caches=[...])` for the sequences still running. Sequences can
  join (after their prefill) or leave (when finished) between steps.
* `stream(model, prompt, params)` and `generate(...)` drive one sequence with those.

Stop conditions: an EOS id (`generation_config.json`'s `eos_token_id`, int or list, else the
config's, plus the tokenizer's EOS) or a `stop_token_ids` id — never part of the text; a stop
string — matched on the decoded text, held back while it could still match so it is never emitted,
also when split across tokens; `max_tokens`; the end of the context window (`length`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence as Seq

import torch

from ..errors import ContextLengthError, ModelFormatError
from .model import KVBlock, KVCache
from .threads import glue_threads
from .sampling import InvalidParamsError, Sampler, SamplingParams, TokenChoice, choose_batch

Prompt = str | Seq[int] | Seq[Mapping[str, Any]]


@dataclass
class Delta:
    """One decode step of one sequence: the text it releases (may be empty: held back), the token
    it sampled (None for an EOS/stop token), logprobs if asked, and the finish reason on the last."""

    text: str
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    finish_reason: str | None = None  # "stop" | "length" on the final delta


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int  # tokens the model produced, including a final EOS
    logprobs: list[TokenChoice] | None = None


@lru_cache(maxsize=16)
def _generation_config(path: str) -> dict:
    file = Path(path) / "generation_config.json"
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}


def generation_config(model) -> dict:
    """The model directory's generation_config.json ({} if none)."""
    path = getattr(model, "path", None)
    if path is None or not Path(path).is_dir():
        return {}
    return _generation_config(str(path))


def _ids(value) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]


def eos_token_ids(model) -> set[int]:
    """generation_config's eos_token_id (falling back to config.json's) plus the tokenizer's EOS."""
    gen = generation_config(model)
    ids = set(_ids(gen.get("eos_token_id"))) or set(model.spec.eos_token_ids)
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        ids |= set(tok.eos_token_ids)
    return ids


def encode_prompt(model, prompt: Prompt) -> list[int]:
    """Token ids of a text prompt (BOS per the tokenizer), a chat (messages → template), or ids."""
    tok = model.tokenizer
    if isinstance(prompt, str):
        if tok is None:
            raise ModelFormatError("this model has no tokenizer: pass token ids")
        ids = tok.encode(prompt)
    elif len(prompt) and isinstance(prompt[0], Mapping):
        if tok is None:
            raise ModelFormatError("this model has no tokenizer: chat needs one")
        ids = tok.encode_chat(list(prompt))  # type: ignore[arg-type]
    else:
        ids = [int(i) for i in prompt]  # type: ignore[union-attr]
    if not ids:
        bos = tok.bos_token_id if tok is not None else model.spec.bos_token_id
        if bos is None:
            raise InvalidParamsError("the prompt is empty", "prompt")
        ids = [bos]
    vocab = model.spec.vocab_size
    bad = next((i for i in ids if not 0 <= i < vocab), None)
    if bad is not None:
        raise InvalidParamsError(f"token id {bad} is outside the vocabulary (size {vocab})", "prompt")
    return ids


class StopMatcher:
    """Holds back decoded text that could still turn into a stop string; cuts at the first match."""

    def __init__(self, stops: Seq[str]):
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string matched — the text before it is returned)."""
        if not self.stops:
            return text, False
        self.buffer += text
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer = self.buffer[:cut], ""
            return out, True
        hold = 0
        for k in range(min(len(self.buffer), self.longest - 1), 0, -1):
            tail = self.buffer[-k:]
            if any(s.startswith(tail) for s in self.stops):
                hold = k
                break
        out = self.buffer[: len(self.buffer) - hold]
        self.buffer = self.buffer[len(self.buffer) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


class Sequence:
    """One request's decode state. Create it, `prefill(model)`, then pass it to `step` until finished."""

    def __init__(self, model, prompt: Prompt, params: SamplingParams | None = None, *, request_id: Any = None,
                 grammar: str | None = None):
        """`grammar` (an llguidance grammar, see `runtime.constrain`) restricts every sampled token to
        the ones the grammar admits; the sequence stops when the grammar is complete."""
        self.request_id = request_id
        self.params = params or SamplingParams()
        self.prompt_ids = encode_prompt(model, prompt)
        self.max_position = model.spec.max_position
        if len(self.prompt_ids) >= self.max_position:
            raise ContextLengthError(
                f"the prompt is {len(self.prompt_ids)} tokens; the context window is {self.max_position} tokens"
            )
        self.tokenizer = model.tokenizer
        if self.params.stop and self.tokenizer is None:
            raise InvalidParamsError("stop strings need a tokenizer", "stop")
        self.stop_ids = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            self.stop_ids |= eos_token_ids(model)
        self.sampler = Sampler(self.params, self.prompt_ids, model.spec.vocab_size)
        self.decoder = (self.tokenizer.stream_decoder(self.prompt_ids, self.params.skip_special_tokens)
                        if self.tokenizer is not None else None)
        self.stopper = StopMatcher(self.params.stop)
        self.cache = model.new_cache()
        self.output_ids: list[int] = []
        self.choices: list[TokenChoice] = []
        self.text = ""
        self.generated = 0
        self.finish_reason: str | None = None
        self.logits: torch.Tensor | None = None  # next-token logits [V], pending a choice
        self.constraint = None
        # retrieval-override facts (a patch session's KNN facts, `vindex.knn_match.KnnRecall`):
        # token ids a fired fact still has to emit, and the facts already fired
        self.recall = getattr(model, "recall", None) if grammar is None else None
        self.forced: list[int] = []
        self.fired: set = set()
        self._prompt_text: str | None = None
        if grammar is not None:
            if self.tokenizer is None:
                raise InvalidParamsError("structured output needs a tokenizer", "response_format")
            from .constrain import Constraint

            self.constraint = Constraint(self.tokenizer, grammar, self.stop_ids, model.spec.vocab_size)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    def prefill(self, model) -> None:
        """Run the prompt into the cache; leaves the first token's logits pending."""
        self.logits = forward_last(model, torch.tensor([self.prompt_ids]), [self.cache], [self])[0]

    def recall_layers(self) -> tuple[int, ...]:
        if self.recall is None or self.forced or self.tokenizer is None:
            return ()
        return self.recall.layers(self._recall_text(), self.fired)

    def _recall_text(self) -> str:
        if self._prompt_text is None:
            self._prompt_text = self.tokenizer.decode(self.prompt_ids)
        return self._prompt_text + self.text

    def recall_check(self, residuals: dict[int, torch.Tensor]) -> None:
        """Ask the KNN facts whether one fires at this position (its FFN inputs `residuals`)."""
        if self.recall is None or self.forced or self.tokenizer is None:
            return
        got = self.recall.forced(residuals, self._recall_text(), self.fired)
        if got:
            self.forced = got

    def _release(self, text: str) -> tuple[str, bool]:
        out, hit = self.stopper.feed(text)
        self.text += out
        return out, hit

    def _finish(self, reason: str, text: str) -> str:
        """Flush what the detokenizer and the stop matcher still hold; a late stop match wins."""
        if self.decoder is not None:
            more, hit = self._release(self.decoder.flush())
            text += more
            if hit:
                reason = "stop"
            else:
                rest = self.stopper.flush()
                self.text += rest
                text += rest
        self.finish_reason = reason
        self.logits = None
        return text

    def accept(self, choice: TokenChoice) -> Delta:
        """Take the sampled token: update text, stop state and statistics; returns this step's delta."""
        token = choice.token_id
        self.generated += 1
        if self.forced:
            self.forced = self.forced[1:] if token == self.forced[0] else []
        if token in self.stop_ids:
            return Delta(self._finish("stop", ""), finish_reason="stop")
        self.output_ids.append(token)
        self.choices.append(choice)
        self.sampler.observe(token)
        if self.constraint is not None:
            self.constraint.consume(token)
        text, hit = ("", False)
        if self.decoder is not None:
            text, hit = self._release(self.decoder.push(token))
        delta = Delta(text, token, choice.logprob, choice.top_logprobs)
        if hit:
            self.finish_reason = "stop"
            self.logits = None
        elif self.constraint is not None and self.constraint.stopped:
            delta.text = self._finish("stop", text)
        elif (self.params.max_tokens is not None and self.generated >= self.params.max_tokens) or (
            len(self.prompt_ids) + len(self.output_ids) >= self.max_position
        ):
            delta.text = self._finish("length", text)
        delta.finish_reason = self.finish_reason
        return delta

    def completion(self) -> Completion:
        return Completion(self.text, list(self.output_ids), self.finish_reason or "length", len(self.prompt_ids),
                          self.generated, list(self.choices) if (self.params.logprobs or self.params.top_logprobs) else None)


def forward_last(model, ids: torch.Tensor, caches: list, sequences: Seq[Sequence],
                 positions: Seq[int] | None = None, logits: str = "last") -> torch.Tensor:
    """`model.forward(ids, caches, logits=...)`, also showing each sequence's KNN facts the FFN
    inputs at its last real position (`positions`, default the last column), so a fact can fire
    on the prompt's last token and on every generated one. Without facts: the plain forward."""
    layers = sorted({l for s in sequences for l in s.recall_layers()})
    if not layers:
        return model.forward(ids, caches, logits=logits)
    got: dict[int, torch.Tensor] = {}

    def grab(layer: int):
        def fn(t: torch.Tensor, _name: str) -> None:
            got[layer] = t

        return fn

    out = model.forward(ids, caches, hooks={f"blocks.{l}.ln2.hook_normalized": grab(l) for l in layers},
                        logits=logits)
    last = ids.shape[1] - 1
    for b, s in enumerate(sequences):
        q = last if positions is None else positions[b]
        s.recall_check({l: got[l][b, q] for l in layers if l in got})
    return out


@torch.inference_mode()
def step(model, sequences: Seq[Sequence]) -> list[Delta]:
    """Advance every unfinished, prefilled sequence by one token (one batched forward pass).

    Returns one `Delta` per sequence that had pending logits, in order.
    """
    active = [s for s in sequences if not s.finished and s.logits is not None]
    if not active:
        return []
    with glue_threads(model):
        deltas, running = _sample(active)
    if running:
        block = getattr(running[0].cache, "block", None)
        if block is not None:  # sequences that just finished leave the batch: the rest stay packed
            block.pack([s.cache for s in running])
        ids = torch.tensor([[s.last_token] for s in running], dtype=torch.long)
        out = forward_last(model, ids, [s.cache for s in running], running)
        for s, row in zip(running, out):
            s.logits = row
    return deltas


def _sample(active: list[Sequence]) -> tuple[list[Delta], list[Sequence]]:
    logits = torch.stack([s.logits for s in active])  # type: ignore[misc]
    for i, s in enumerate(active):
        if s.forced:
            logits[i] = torch.full_like(logits[i], float("-inf")).index_fill_(0, torch.tensor([s.forced[0]]), 0.0)
    constrained = [i for i, s in enumerate(active) if s.constraint is not None]
    if constrained:
        from .constrain import mask_logits

        masked = mask_logits(logits, constrained, [active[i].constraint.allowed() for i in constrained])
        choices = choose_batch([s.sampler for s in active], masked, raw=logits)
    else:
        choices = choose_batch([s.sampler for s in active], logits)
    deltas = [s.accept(c) for s, c in zip(active, choices)]
    return deltas, [s for s in active if not s.finished]


@torch.inference_mode()
def prefill_batch(model, sequences: Seq[Sequence]) -> None:
    """`Sequence.prefill` for several sequences in one forward pass (requests arriving together
    share the per-layer work). Shorter prompts are padded at the end by repeating their last token:
    causal attention keeps the padding out of every real position, each sequence's logits are taken
    at its own last prompt token, and its cache is cut back to its prompt, so the padding's keys are
    overwritten by the next token."""
    if len(sequences) == 1:
        sequences[0].prefill(model)
        return
    lens = [len(s.prompt_ids) for s in sequences]
    width = max(lens)
    ids = torch.tensor([s.prompt_ids + [s.prompt_ids[-1]] * (width - n) for s, n in zip(sequences, lens)])
    h = forward_last(model, ids, [s.cache for s in sequences], sequences, [n - 1 for n in lens], logits="none")
    logits = model.unembed(h[torch.arange(len(sequences)), torch.tensor(lens) - 1])
    for s, n, row in zip(sequences, lens, logits):
        s.cache.truncate(n)
        s.logits = row


def stream(model, prompt: Prompt, params: SamplingParams | None = None, **overrides: Any) -> Iterator[Delta]:
    """Generate one completion, yielding a `Delta` per token; the last one has `finish_reason`."""
    seq = Sequence(model, prompt, _params(params, overrides))
    seq.prefill(model)
    while not seq.finished:
        yield from step(model, [seq])


def generate(model, prompt: Prompt, params: SamplingParams | None = None, **overrides: Any) -> Completion:
    """Generate one completion of a text prompt, a chat (list of messages) or token ids."""
    seq = Sequence(model, prompt, _params(params, overrides))
    seq.prefill(model)
    while not seq.finished:
        step(model, [seq])
    return seq.completion()


def generate_batch(model, prompts: Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None
                   ) -> list[Completion]:
    """Several completions decoded together, one batched forward per step (their caches packed in one
    `KVBlock`: one attention call per layer, and on the low-bit path one graph run per step, not one per
    sequence)."""
    if params is None or isinstance(params, SamplingParams):
        params = [params or SamplingParams()] * len(prompts)
    seqs = [Sequence(model, p, sp) for p, sp in zip(prompts, params)]
    prefill_batch(model, seqs)
    if len(seqs) > 1 and isinstance(seqs[0].cache, KVCache):
        KVBlock(model.spec, model.dtype, len(seqs)).pack([s.cache for s in seqs])
    while any(not s.finished for s in seqs):
        step(model, seqs)
    return [s.completion() for s in seqs]


def _params(params: SamplingParams | None, overrides: Mapping[str, Any]) -> SamplingParams:
    if params is None:
        return SamplingParams(**overrides)
    return params.replace(**overrides) if overrides else params


__all__ = ["Completion", "Delta", "Sequence", "SamplingParams", "StopMatcher", "eos_token_ids", "encode_prompt",
           "generate", "generate_batch", "generation_config", "prefill_batch", "step", "stream"]
