"""generate()/stream(): equal to HF generate where HF defines the result; stop strings, EOS, length,
context window, streaming of multi-byte characters, batched decode steps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from modelql.errors import ContextLengthError
from modelql.runtime import load_model
from modelql.runtime.generate import (Sequence, StopMatcher, generate, generate_batch, prefill_batch, step,
                                      stream)
from modelql.runtime.sampling import SamplingParams
from modelql.tokenizer import Tokenizer
from tests.runtime.tiny_tokenizer import make_model_with_tokenizer, train_tokenizer

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("tinychat")
    hf = make_model_with_tokenizer(d, "chatml", max_position=64)
    return hf, load_model(d), d


def _hf_generate(hf, ids, n, **kwargs):
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=None,
                          **kwargs)
    return out[0, len(ids):].tolist()


def test_greedy_equals_transformers(pair):
    hf, model, _ = pair
    ids = model.tokenizer.encode(PROMPT)
    c = generate(model, PROMPT, temperature=0, max_tokens=20, ignore_eos=True)
    assert c.token_ids == _hf_generate(hf, ids, 20, do_sample=False)
    assert c.finish_reason == "length" and c.prompt_tokens == len(ids) and c.completion_tokens == 20


def test_repetition_penalty_equals_transformers(pair):
    hf, model, _ = pair
    ids = model.tokenizer.encode(PROMPT)
    c = generate(model, PROMPT, temperature=0, repetition_penalty=1.5, max_tokens=20, ignore_eos=True)
    ref = _hf_generate(hf, ids, 20, do_sample=False, repetition_penalty=1.5)
    assert c.token_ids == ref
    assert ref != _hf_generate(hf, ids, 20, do_sample=False)  # the penalty mattered


def test_temperature_zero_and_top_k_one_equal_greedy(pair):
    _, model, _ = pair
    greedy = generate(model, PROMPT, temperature=0, max_tokens=15, ignore_eos=True).token_ids
    assert generate(model, PROMPT, temperature=1.3, top_k=1, seed=5, max_tokens=15, ignore_eos=True).token_ids == greedy


def test_seeded_sampling_is_reproducible(pair):
    _, model, _ = pair
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=25, ignore_eos=True)
    a, b = generate(model, PROMPT, params), generate(model, PROMPT, params)
    assert a.text == b.text and a.token_ids == b.token_ids
    c = generate(model, PROMPT, params.replace(seed=43))
    assert c.token_ids != a.token_ids
    assert "".join(d.text for d in stream(model, PROMPT, params)) == a.text


def test_stream_text_equals_decoded_tokens_and_ends_with_finish_reason(pair):
    _, model, _ = pair
    deltas = list(stream(model, PROMPT, temperature=0.9, seed=1, max_tokens=30, ignore_eos=True))
    assert [d.finish_reason for d in deltas[:-1]] == [None] * (len(deltas) - 1)
    assert deltas[-1].finish_reason == "length"
    ids = [d.token_id for d in deltas]
    assert "".join(d.text for d in deltas) == model.tokenizer.decode(ids, skip_special_tokens=True)


def test_stop_string_split_across_tokens_is_never_emitted(pair):
    _, model, _ = pair
    tok = model.tokenizer
    base = generate(model, PROMPT, temperature=0, max_tokens=30, ignore_eos=True)
    pieces = [tok.decode([t]) for t in base.token_ids]
    # a stop string that starts inside one token and ends inside a later one
    starts = [sum(len(p) for p in pieces[:i]) for i in range(len(pieces))]
    i = next(i for i in range(3, len(pieces) - 2) if len(pieces[i]) >= 2 and "\ufffd" not in "".join(pieces[i:i + 2]))
    at = starts[i] + 1
    stop = base.text[at:starts[i + 1] + 1]
    assert len(stop) >= 2
    deltas = list(stream(model, PROMPT, temperature=0, max_tokens=30, ignore_eos=True, stop=["zzz-never", stop]))
    text = "".join(d.text for d in deltas)
    assert text == base.text[: base.text.find(stop)]
    assert deltas[-1].finish_reason == "stop"
    assert all(stop not in d.text for d in deltas)


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END", "###"])
    out = [m.feed(t) for t in ["Hel", "lo E", "N", "o; #", "#", "# tail"]]
    assert out == [("Hel", False), ("lo ", False), ("", False), ("ENo; ", False), ("", False), ("", True)]
    m = StopMatcher(["ab"])
    assert m.feed("xa") == ("x", False) and m.flush() == "a"


def test_eos_from_generation_config_list(tmp_path):
    make_model_with_tokenizer(tmp_path, "chatml")
    model = load_model(tmp_path)
    free = generate(model, PROMPT, temperature=0, max_tokens=10, ignore_eos=True).token_ids
    target = free[3]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, target]}))
    from modelql.runtime.generate import _generation_config, eos_token_ids

    _generation_config.cache_clear()
    assert {1, target} <= eos_token_ids(model)
    c = generate(model, PROMPT, temperature=0, max_tokens=10)
    assert c.token_ids == free[: free.index(target)] and c.finish_reason == "stop"
    assert c.completion_tokens == len(c.token_ids) + 1  # the EOS was generated, not emitted


def test_eos_falls_back_to_config_and_tokenizer(pair):
    _, model, _ = pair
    # config.json eos_token_id = 1 (</s>); the tokenizer's eos is <|im_end|>
    for eos in (1, model.tokenizer.token_to_id("<|im_end|>")):
        c = generate(model, PROMPT, temperature=0, max_tokens=10, logit_bias={eos: 1000.0})
        assert c.token_ids == [] and c.text == "" and c.finish_reason == "stop"


def test_max_tokens_and_context_window(pair):
    _, model, _ = pair
    assert len(generate(model, PROMPT, temperature=0, max_tokens=3, ignore_eos=True).token_ids) == 3
    ids = model.tokenizer.encode(PROMPT)
    c = generate(model, PROMPT, temperature=0, ignore_eos=True)  # no max_tokens: runs to the context end
    assert c.finish_reason == "length" and len(ids) + len(c.token_ids) == model.spec.max_position
    with pytest.raises(ContextLengthError) as info:
        generate(model, list(range(5, 5 + model.spec.max_position)), max_tokens=1)
    assert "context window" in str(info.value) and "\n" not in str(info.value)


def test_chat_messages_use_the_template(pair):
    _, model, _ = pair
    messages = [{"role": "user", "content": "Hi"}]
    c = generate(model, messages, temperature=0, max_tokens=4, ignore_eos=True)
    assert c.prompt_tokens == len(model.tokenizer.encode_chat(messages))
    assert c.token_ids == generate(model, model.tokenizer.encode_chat(messages), temperature=0, max_tokens=4,
                                   ignore_eos=True).token_ids


def test_logprobs_match_the_forward_pass(pair):
    _, model, _ = pair
    c = generate(model, PROMPT, temperature=0, max_tokens=6, ignore_eos=True, logprobs=True, top_logprobs=3)
    ids = model.tokenizer.encode(PROMPT)
    full = torch.log_softmax(model.forward(ids + c.token_ids)[0], -1)
    for i, choice in enumerate(c.logprobs):
        ref = full[len(ids) - 1 + i]
        assert choice.logprob == pytest.approx(float(ref[choice.token_id]), abs=1e-4)
        assert choice.top_logprobs[0][0] == choice.token_id  # greedy picks the top one


def test_batched_steps_equal_single_sequences(pair):
    _, model, _ = pair
    prompts = [PROMPT, "Hello world", "日本の首都は"]
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, seed=3, max_tokens=7, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, stop=["zz"])]
    batched = generate_batch(model, prompts, params)
    single = [generate(model, p, sp) for p, sp in zip(prompts, params)]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]
    assert [b.text for b in batched] == [s.text for s in single]


def test_batched_prefill_equals_single_prefills(pair):
    """Prompts of different lengths prefilled together (padded, masked by causality, caches cut back)
    leave the same next-token logits and cache lengths as one prefill each."""
    _, model, _ = pair
    prompts = [PROMPT, "Hi", "日本の首都は東京です。 The capital of Japan"]
    p = SamplingParams(temperature=0)
    together = [Sequence(model, q, p) for q in prompts]
    prefill_batch(model, together)
    for seq, q in zip(together, prompts):
        alone = Sequence(model, q, p)
        alone.prefill(model)
        assert seq.cache.length == alone.cache.length == len(alone.prompt_ids)
        torch.testing.assert_close(seq.logits, alone.logits, rtol=1e-4, atol=1e-4)
        assert int(seq.logits.argmax()) == int(alone.logits.argmax())


def test_default_model_batched_greedy_equals_single():
    """The embedded model (what `modelql serve` batches by default): eight chats decoded in one batch
    give exactly the tokens each gives alone."""
    from modelql.defaults import DEFAULT_MODEL_DIR

    if not (DEFAULT_MODEL_DIR / "config.json").exists():
        pytest.skip("embedded default model not installed")
    model = load_model(None)
    chats = [[{"role": "user", "content": q}] for q in (
        "What is the capital of France?", "Tell me about Japan.", "Hi", "Which language is spoken in Brazil?",
        "What is the currency of Germany?", "Where is Kenya?", "Tell me about country 12.", "Paris is")]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    batched = generate_batch(model, chats, params)
    single = [generate(model, c, params) for c in chats]
    assert [b.token_ids for b in batched] == [s.token_ids for s in single]


def test_sequences_can_join_a_running_batch(pair):
    _, model, _ = pair
    p = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    a, b = Sequence(model, PROMPT, p), Sequence(model, "Hello world", p)
    a.prefill(model)
    for _ in range(3):
        step(model, [a])
    b.prefill(model)
    while not (a.finished and b.finished):
        step(model, [a, b])
    assert a.output_ids == generate(model, PROMPT, p).token_ids
    assert b.output_ids == generate(model, "Hello world", p).token_ids


# -- a scripted model: forces a token sequence, to test the text path exactly --------------------


class ScriptedModel:
    """Emits `script` token by token (then EOS); enough of Model's interface for generate()."""

    def __init__(self, tokenizer: Tokenizer, script: list[int], eos: int = 1, max_position: int = 256):
        self.tokenizer = tokenizer
        self.script = script
        self.path = None
        vocab = tokenizer.vocab_size
        self.spec = SimpleNamespace(vocab_size=vocab, max_position=max_position, eos_token_ids=(eos,), bos_token_id=0)
        self.eos = eos

    def new_cache(self):
        return SimpleNamespace(length=0, prompt=None)

    def forward(self, ids, caches, hooks=None, logits="last"):
        ids = torch.as_tensor(ids)
        caches = caches if isinstance(caches, list) else [caches]
        out = torch.zeros(len(caches), self.spec.vocab_size)
        for row, cache in enumerate(caches):
            if cache.prompt is None:
                cache.prompt = ids.shape[1]
            cache.length += ids.shape[1]
            k = cache.length - cache.prompt
            out[row, self.script[k] if k < len(self.script) else self.eos] = 10.0
        return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer(train_tokenizer(), {"bos_token": "<s>", "eos_token": "</s>"})


@pytest.mark.parametrize("text", ["Café ñoño", "日本の首都は東京です", "emoji 🙂🚀🤖 done", "ü日🙂é"])
def test_streaming_never_splits_multibyte_characters(tok, text):
    script = tok.encode(text, add_special_tokens=False)
    assert any(b"\xef\xbf\xbd" in tok.decode([t]).encode() for t in script)  # some tokens end mid-character
    deltas = list(stream(ScriptedModel(tok, script), "x", temperature=0))
    assert "".join(d.text for d in deltas) == text
    assert not any("\ufffd" in d.text for d in deltas)
    assert deltas[-1].finish_reason == "stop" and deltas[-1].token_id is None
    assert sum(1 for d in deltas if d.text == "") > 0  # some deltas were held back


@pytest.mark.parametrize("stop,expected", [
    ("END", "Hello "), ("o E", "Hell"), ("日本", "Hello END "), ("本の", "Hello END 日"), ("🙂", "Hello END 日本の "),
    ("absent", "Hello END 日本の 🙂 tail"),
])
def test_stop_strings_across_tokens_and_characters(tok, stop, expected):
    text = "Hello END 日本の 🙂 tail"
    script = tok.encode(text, add_special_tokens=False)
    deltas = list(stream(ScriptedModel(tok, script), "x", temperature=0, stop=[stop]))
    assert "".join(d.text for d in deltas) == expected
    assert deltas[-1].finish_reason == "stop"
    if stop != "absent":
        assert deltas[-1].token_id is not None and len(deltas) <= len(script)


def test_length_finish_flushes_held_text(tok):
    script = tok.encode("abc EN", add_special_tokens=False)
    deltas = list(stream(ScriptedModel(tok, script), "x", temperature=0, stop=["END"], max_tokens=len(script)))
    assert "".join(d.text for d in deltas) == "abc EN" and deltas[-1].finish_reason == "length"
