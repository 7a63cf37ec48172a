"""The tokenizer wrapper matches transformers' AutoTokenizer: encode/BOS policy, decode, chat templates;
the stream decoder never splits a character."""

from __future__ import annotations

import json

import pytest

from modelql.tokenizer import ChatTemplateError, StreamDecoder, Tokenizer
from tests.runtime.tiny_tokenizer import CHATML, LLAMA2, train_tokenizer, write_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "Café crème brûlée, 日本の首都は東京です。 🙂🚀!",
    "  leading spaces and\nnew lines\t tabs",
    "<s> special <|im_start|> tokens </s> in text",
    "",
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of 日本?"}],
]

# (template, post-processor: True adds BOS / False ByteLevel, tokenizer_config add_bos_token)
VARIANTS = {
    "chatml-nobos": ("chatml", False, None),
    "llama2-bos-postprocessor": ("llama2", True, None),
    "config-true-postprocessor-wins": ("llama2", False, True),
    "config-false-postprocessor-wins": ("llama2", True, False),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer

    template, post, add_bos = VARIANTS[request.param]
    d = write_tokenizer(tmp_path_factory.mktemp(request.param), template, bos_post_processor=post, add_bos_token=add_bos)
    return request.param, Tokenizer.load(d), AutoTokenizer.from_pretrained(str(d))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(pair, text):
    _, ours, hf = pair
    assert ours.encode(text) == hf.encode(text)
    assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)


def test_bos_policy(pair):
    name, ours, _ = pair
    ids = ours.encode("Hello")
    expects_bos = name in ("llama2-bos-postprocessor", "config-false-postprocessor-wins")
    assert (ids[0] == ours.bos_token_id) == expects_bos
    assert ours.bos_token_id == 0 and ours.bos_token == "<s>"


def test_decode_matches_transformers(pair):
    _, ours, hf = pair
    for text in TEXTS:
        ids = hf.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(pair, conv, gen):
    _, ours, hf = pair
    messages = CONVERSATIONS[conv]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected


def test_encode_chat_has_exactly_one_bos(pair):
    name, ours, hf = pair
    if name == "chatml-nobos":
        pytest.skip("the ChatML template renders no BOS")
    for messages in CONVERSATIONS:
        ids = ours.encode_chat(messages)
        assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id
        # transformers tokenizes the rendered chat without special tokens: the template's own BOS
        assert ids == hf.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)


@pytest.mark.parametrize("add_bos", [True, False])
def test_config_flags_apply_without_a_post_processor(tmp_path, add_bos):
    """No post-processor in tokenizer.json (older exports, GGUF): add_bos_token/add_eos_token decide."""
    tok = Tokenizer.load(write_tokenizer(tmp_path, "llama2", bos_post_processor=None, add_bos_token=add_bos))
    assert (tok.encode("Hi")[0] == 0) == add_bos
    tok = Tokenizer(train_tokenizer(None), {"bos_token": "<s>", "eos_token": "</s>", "add_eos_token": True})
    assert tok.encode("Hi")[-1] == 1 and tok.encode("Hi")[0] != 0


def test_raise_exception_is_a_one_line_error(tmp_path):
    tok = Tokenizer.load(write_tokenizer(tmp_path, "llama2"))
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_template_helpers_match_transformers(tmp_path):
    """tojson (no HTML escaping, indent), strftime_now, namespace, loop controls, extra variables, tools."""
    from transformers import AutoTokenizer

    template = (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{{ m | tojson }}|{{ m | tojson(indent=2) }}{% if loop.index > 5 %}{% break %}{% endif %}"
        "{% endfor %}n={{ ns.n }} year={{ strftime_now('%Y')[:2] }} eos={{ eos_token }} unk={{ unk_token }}"
        "{% if tools %} tools={{ tools | tojson }}{% endif %}{% if flag is defined %} flag={{ flag }}{% endif %}"
    )
    write_tokenizer(tmp_path, None)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, hf = Tokenizer.load(tmp_path), AutoTokenizer.from_pretrained(str(tmp_path))
    messages = [{"role": "user", "content": "<b>é & 日本</b>"}, {"role": "skip", "content": "x"},
                {"role": "assistant", "content": "ok", "extra": None}]
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    for kwargs in ({}, {"tools": tools, "flag": 3}):
        assert ours.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, **kwargs)


def test_sandbox_blocks_attribute_escapes():
    tok = Tokenizer(train_tokenizer(), {"chat_template": "{{ messages.__class__.__mro__ }}"})
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])
    tok = Tokenizer(train_tokenizer(), {"chat_template": "{% set ns = namespace(_x=1) %}"})
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_constructible_from_tokenizers_object_and_config():
    """The GGUF loader path: a tokenizers.Tokenizer plus a config dict."""
    tok = Tokenizer(train_tokenizer(None), {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                                            "chat_template": CHATML})
    assert tok.encode("Hi")[0] == tok.bos_token_id == 0
    assert tok.eos_token_ids == (1,)
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>user\nHi")
    assert {0, 1} <= tok.all_special_ids


def test_chatml_eos_and_special_tokens(tmp_path):
    tok = Tokenizer.load(write_tokenizer(tmp_path, "chatml"))
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == (tok.token_to_id("<|im_end|>"),)
    assert tok.special_tokens == {"bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>"}
    assert tok.has_chat_template


def test_fallback_templates_when_none_shipped():
    chatml = Tokenizer(train_tokenizer(), {"eos_token": "<|im_end|>"})
    assert not chatml.has_chat_template
    text = chatml.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    from tokenizers import Tokenizer as HfTok, models

    plain = Tokenizer(HfTok(models.BPE()), {})
    assert plain.apply_chat_template([{"role": "user", "content": "Hi"}]) == "User: Hi\nAssistant:"


def test_chat_template_jinja_file_wins(tmp_path):
    write_tokenizer(tmp_path, "chatml")
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.content }}]{% endfor %}")
    assert Tokenizer.load(tmp_path).apply_chat_template([{"role": "user", "content": "x"}]) == "[x]"


def _multibyte_split(tok: Tokenizer, ids: list[int]) -> bool:
    return any(len(tok.token_bytes(i)) and not _valid_utf8(tok.token_bytes(i)) for i in ids)


def _valid_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("text", ["ñ", "Café crème", "日本の首都は東京です", "🙂🚀 emoji", "mixé 日本 🙂 ok"])
def test_stream_decoder_never_splits_a_character(text):
    tok = Tokenizer(train_tokenizer(), {"bos_token": "<s>", "eos_token": "</s>"})
    ids = tok.encode(text, add_special_tokens=False)
    assert _multibyte_split(tok, ids), "the test needs tokens that end mid-character"
    dec = StreamDecoder(tok)
    deltas = [dec.push(i) for i in ids]
    deltas.append(dec.flush())
    assert "".join(deltas) == text == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_stream_decoder_context_keeps_leading_space():
    """Prompt tokens given as context are not emitted, but a completion's leading space is kept."""
    tok = Tokenizer(train_tokenizer(), {})
    prompt, completion = tok.encode("Hello"), tok.encode(" world 日本")
    dec = StreamDecoder(tok, context=prompt)
    text = "".join(dec.push(i) for i in completion) + dec.flush()
    assert text == " world 日本"


def test_stream_decoder_flushes_an_incomplete_character():
    tok = Tokenizer(train_tokenizer(), {})
    ids = tok.encode("日", add_special_tokens=False)[:-1]  # cut mid-character
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) == ""
    assert dec.flush() == tok.decode(ids)  # the replacement character, only at the end


def test_missing_tokenizer_json_is_a_format_error(tmp_path):
    from modelql.errors import ModelFormatError

    with pytest.raises(ModelFormatError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelFormatError):
        Tokenizer.load(tmp_path)
