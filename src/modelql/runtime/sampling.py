"""Sampling: typed parameters, logits processors, and a per-sequence sampler with its own RNG.

Processing order for one next-token distribution (float32 logits of the model):

    logit_bias → repetition penalty (HF) → frequency/presence penalties (OpenAI)
      → temperature → top-k → top-p → min-p → draw (or argmax when greedy)

* repetition penalty, HF semantics: for every token id in prompt + output so far, a positive logit
  is divided by the penalty and a negative one multiplied by it (`RepetitionPenaltyLogitsProcessor`);
* frequency / presence, OpenAI semantics: `logit_j -= frequency·c_j + presence·[c_j > 0]` with
  `c_j` the count of token j in the *generated* tokens;
* temperature, top-k, top-p, min-p are exactly transformers' `TemperatureLogitsWarper`,
  `TopKLogitsWarper`, `TopPLogitsWarper`, `MinPLogitsWarper` (filtered logits become -inf).

Greedy is `temperature == 0` or `top_k == 1`: argmax of the penalised logits, no RNG. Each
sequence draws from its own `torch.Generator` seeded with `seed` (one uniform per token, inverse-CDF
sampling), so the same seed, prompt and weights give the same tokens whatever else runs. A decode
step processes its whole batch together (`choose_batch`). Logprobs, when asked, are of the *unmodified*
model distribution (log-softmax of the raw logits), as the OpenAI API reports them.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch

from ..errors import InvalidParamsError


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Defaults are OpenAI's (temperature 1, no filters)."""

    max_tokens: int | None = None  # None: until EOS, a stop string, or the end of the context
    temperature: float = 1.0  # 0 ⇒ greedy
    top_k: int = 0  # 0 ⇒ off; 1 ⇒ greedy
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        self.logit_bias = {int(k): float(v) for k, v in (self.logit_bias or {}).items()}
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    def validate(self) -> None:
        def bad(param: str, why: str):
            raise InvalidParamsError(f"{param} {why}", param)

        if self.max_tokens is not None and self.max_tokens < 1:
            bad("max_tokens", f"must be ≥ 1 (got {self.max_tokens})")
        if not self.temperature >= 0:
            bad("temperature", f"must be ≥ 0 (got {self.temperature})")
        if self.top_k < 0:
            bad("top_k", f"must be ≥ 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            bad("top_p", f"must be in (0, 1] (got {self.top_p})")
        if not 0 <= self.min_p <= 1:
            bad("min_p", f"must be in [0, 1] (got {self.min_p})")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", f"must be > 0 (got {self.repetition_penalty})")
        if self.top_logprobs < 0 or self.top_logprobs > 20:
            bad("top_logprobs", f"must be in [0, 20] (got {self.top_logprobs})")

    def replace(self, **changes: Any) -> SamplingParams:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any] | None, **overrides: Any) -> SamplingParams:
        """Defaults from a generation_config.json dict (do_sample, temperature, top_k, top_p, min_p,
        repetition_penalty), then `overrides` (None values ignored)."""
        config = config or {}
        values: dict[str, Any] = {}
        if config.get("do_sample") is False:
            values["temperature"] = 0.0
        else:
            for key in ("temperature", "top_p", "min_p", "repetition_penalty"):
                if config.get(key) is not None:
                    values[key] = float(config[key])
            if config.get("top_k") is not None:
                values["top_k"] = int(config["top_k"])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


# -- logits processors (batched: logits [B, V] float32; each returns a new tensor) --------------


def apply_logit_bias(logits: torch.Tensor, bias: Mapping[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    idx = torch.tensor(list(bias.keys()), dtype=torch.long)
    val = torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits.index_add(-1, idx, val.expand(*logits.shape[:-1], -1))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics. `seen` is a bool mask [B, V] of tokens in prompt + output."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence(logits: torch.Tensor, counts: torch.Tensor, frequency: float, presence: float) -> torch.Tensor:
    """OpenAI semantics. `counts` [B, V] holds how often each token was generated so far."""
    if frequency == 0.0 and presence == 0.0:
        return logits
    return logits - (frequency * counts + presence * (counts > 0).to(logits.dtype))


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    if temperature == 1.0 or temperature == 0.0:
        return logits
    return logits / temperature


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k)[0][..., -1, None]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    if p >= 1.0:
        return logits
    if logits.dim() == 2 and logits.shape[0] > 1:  # torch's CPU sort of a [B, V] tensor is ~4× slower than B row sorts
        return torch.cat([apply_top_p(row[None], p) for row in logits])
    sorted_logits, sorted_idx = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    if min_p <= 0.0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    top = probs.amax(dim=-1, keepdim=True)
    remove = probs < min_p * top
    remove.scatter_(-1, torch.topk(probs, 1, dim=-1).indices, False)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None,
                   counts: torch.Tensor | None = None) -> torch.Tensor:
    """All processors in order. Greedy params stop after the penalties (argmax needs no warping)."""
    logits = apply_logit_bias(logits, params.logit_bias)
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if counts is not None:
        logits = apply_frequency_presence(logits, counts, params.frequency_penalty, params.presence_penalty)
    if params.greedy:
        return logits
    logits = apply_temperature(logits, params.temperature)
    logits = apply_top_k(logits, params.top_k)
    logits = apply_top_p(logits, params.top_p)
    return apply_min_p(logits, params.min_p)


@dataclass
class TokenChoice:
    """One sampled token, with logprobs of the unmodified distribution when requested."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """Per-sequence sampling state: params, RNG, the token statistics the penalties need."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int):
        self.params = params
        self.vocab_size = vocab_size
        self.generator = torch.Generator(device="cpu")
        self.seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.generator.manual_seed(self.seed)
        self.seen: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None
        if params.repetition_penalty != 1.0:
            self.seen = torch.zeros((1, vocab_size), dtype=torch.bool)
            ids = [i for i in prompt_ids if 0 <= i < vocab_size]
            if ids:
                self.seen[0, torch.tensor(ids, dtype=torch.long)] = True
        if params.frequency_penalty != 0.0 or params.presence_penalty != 0.0:
            self.counts = torch.zeros((1, vocab_size), dtype=torch.float32)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with nothing to change the logits: a bare argmax."""
        return self.params.greedy and self.seen is None and self.counts is None and not self.params.logit_bias

    @property
    def warp_key(self) -> tuple:
        """Rows with equal keys are warped and drawn together (one sort for top-p over the group)."""
        p = self.params
        return (p.greedy, p.temperature, p.top_k, p.top_p, p.min_p)

    def observe(self, token_id: int) -> None:
        """Record a generated token (call once per accepted token)."""
        if not 0 <= token_id < self.vocab_size:
            return
        if self.seen is not None:
            self.seen[0, token_id] = True
        if self.counts is not None:
            self.counts[0, token_id] += 1

    def penalise(self, logits: torch.Tensor) -> torch.Tensor:
        """logit_bias and the penalties (the per-sequence part of `process_logits`): [1, V]."""
        logits = apply_logit_bias(logits.reshape(1, -1).float(), self.params.logit_bias)
        if self.seen is not None:
            logits = apply_repetition_penalty(logits, self.seen, self.params.repetition_penalty)
        if self.counts is not None:
            logits = apply_frequency_presence(logits, self.counts, self.params.frequency_penalty,
                                              self.params.presence_penalty)
        return logits

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """Processed logits [1, V] for raw logits [1, V] or [V]."""
        return process_logits(logits.reshape(1, -1).float(), self.params, self.seen, self.counts)

    def uniform(self) -> float:
        """This sequence's next uniform draw in [0, 1) from its own generator."""
        return float(torch.rand((), generator=self.generator, dtype=torch.float64))

    def choose(self, logits: torch.Tensor, token_id: int | None = None) -> TokenChoice:
        """Pick the next token from raw logits [V] (or use `token_id` if already chosen)."""
        if token_id is not None:
            return _with_logprobs([self], logits.reshape(1, -1), [token_id])[0]
        return choose_batch([self], logits.reshape(1, -1))[0]


def draw(probs: torch.Tensor, uniforms: Sequence[float]) -> list[int]:
    """Inverse-CDF sampling: row i of probs [B, V] → the first token whose cumulative probability
    exceeds uniforms[i] × the row total. One vectorised pass for the batch (`torch.multinomial`
    costs a random number per vocabulary entry and runs row by row with per-row generators), and
    each row still consumes exactly one draw of its own generator, so a seeded sequence's tokens do
    not depend on what else is in the batch. Zero-probability tokens can never be picked."""
    cdf = probs.double().cumsum(-1)
    u = torch.tensor(uniforms, dtype=torch.float64)[:, None]
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)[:, 0]
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).to(torch.int8).argmax(-1)  # rounding at u ≈ 1
    return torch.minimum(idx, last).tolist()


def _with_logprobs(samplers: Sequence[Sampler], logits: torch.Tensor, tokens: list[int]) -> list[TokenChoice]:
    """TokenChoices, with logprobs of the unmodified distribution for the rows that ask (one batched
    log-softmax)."""
    choices = [TokenChoice(t) for t in tokens]
    want = [i for i, s in enumerate(samplers) if s.params.logprobs or s.params.top_logprobs]
    if not want:
        return choices
    logp = torch.log_softmax(logits[want].float(), dim=-1)
    for row, i in enumerate(want):
        choices[i].logprob = float(logp[row, tokens[i]])
        k = samplers[i].params.top_logprobs
        if k:
            values, ids = torch.topk(logp[row], min(k, logp.shape[-1]))
            choices[i].top_logprobs = list(zip(ids.tolist(), values.tolist()))
    return choices


def choose_batch(samplers: Sequence[Sampler], logits: torch.Tensor, raw: torch.Tensor | None = None
                 ) -> list[TokenChoice]:
    """One token per row of raw logits [B, V], the batch processed together: plain-greedy rows share
    one argmax; the other rows get their own bias/penalties, then rows with the same warping
    parameters are warped (temperature, top-k, top-p, min-p) and drawn as one [G, V] tensor. Every
    row's result equals what the row alone would give. `raw`, when given, is the model's distribution
    before a grammar mask (`logits` then has the disallowed tokens at -inf): logprobs are of `raw`."""
    tokens: list[int] = [0] * len(samplers)
    fast = [i for i, s in enumerate(samplers) if s.plain_greedy]
    if fast:
        rows = logits[fast] if len(fast) < len(samplers) else logits
        for i, t in zip(fast, rows.argmax(-1).tolist()):
            tokens[i] = t
    groups: dict[tuple, list[int]] = {}
    for i, s in enumerate(samplers):
        if not s.plain_greedy:
            groups.setdefault(s.warp_key, []).append(i)
    for rows in groups.values():
        first = samplers[rows[0]]
        x = torch.cat([samplers[i].penalise(logits[i]) for i in rows])
        if first.params.greedy:
            picked = x.argmax(-1).tolist()
        else:
            p = first.params
            x = apply_min_p(apply_top_p(apply_top_k(apply_temperature(x, p.temperature), p.top_k), p.top_p), p.min_p)
            picked = draw(torch.softmax(x, dim=-1), [samplers[i].uniform() for i in rows])
        for i, t in zip(rows, picked):
            tokens[i] = t
    return _with_logprobs(samplers, logits if raw is None else raw, tokens)
