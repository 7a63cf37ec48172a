"""The tokenizer rebuilt from GGUF metadata gives the ids of the tokenizer.json it came from.

Tokenizers of every kind llama.cpp stores are trained at test time (tests/gguf/helpers.py):
byte-level BPE with the GPT-2, Llama-3 and Qwen2 pre-tokenizers, and SentencePiece-style BPE
(byte fallback, "▁") with the prefix space on the first segment (Metaspace), on every segment
(Llama-2's legacy Prepend normalizer), or not at all (Gemma). The test string is multilingual and
contains special tokens, byte-fallback characters, digits, whitespace runs and newlines.
"""

from __future__ import annotations

import pytest

from modelql.models.gguf import GgufSource
from modelql.models.gguf_convert import convert
from modelql.models.gguf_tokenizer import build_tokenizer
from modelql.tokenizer import Tokenizer
from tests.gguf.helpers import CHATML, TEST_TEXT, TOKENIZER_KINDS, make_tiny_with_tokenizer

FAMILY = {"spm-gemma": "gemma", "qwen2": "qwen2", "spm-always": "mistral"}


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    cache = {}

    def get(kind):
        if kind not in cache:
            d = tmp_path_factory.mktemp(kind)
            make_tiny_with_tokenizer(kind, d / "hf", FAMILY.get(kind, "llama"))
            path = convert(d / "hf", d / "model.gguf", "f32").path
            cache[kind] = (d / "hf", path)
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", TOKENIZER_KINDS)
def test_same_ids_as_tokenizer_json(kind, pair):
    hf_dir, path = pair(kind)
    ref = Tokenizer.load(hf_dir)
    ours = GgufSource(path).tokenizer()
    for special in (True, False):
        a = ref.encode(TEST_TEXT, add_special_tokens=special)
        assert ours.encode(TEST_TEXT, add_special_tokens=special) == a
    assert ours.decode(a) == ref.decode(a)
    assert ours.decode(a, skip_special_tokens=True) == ref.decode(a, skip_special_tokens=True)
    assert ours.vocab_size == ref.vocab_size
    assert (ours.bos_token, ours.eos_token, ours.bos_token_id, ours.eos_token_ids) == \
           (ref.bos_token, ref.eos_token, ref.bos_token_id, ref.eos_token_ids)
    # byte-fallback / unknown characters, empty text, whitespace only
    for text in ("", " ", "\n\n", "½∑ğ\u0000\u200d", "  leading", "trailing  "):
        assert ours.encode(text) == ref.encode(text), repr(text)


@pytest.mark.parametrize("kind", ["spm-first", "spm-always", "spm-gemma"])
def test_sentencepiece_merges_recovered_from_scores(kind, pair):
    """Files from llama.cpp carry scores, not merges: the merges derived from scores give the same ids."""
    _, path = pair(kind)
    src = GgufSource(path)
    meta = {k: v for k, v in src.meta.items() if k != "tokenizer.ggml.merges"}
    tok, config = build_tokenizer(meta, src.arch)
    assert Tokenizer(tok, config).encode(TEST_TEXT) == src.tokenizer().encode(TEST_TEXT)


@pytest.mark.parametrize("kind", ["gpt2", "llama3", "qwen2", "spm-first"])
def test_transformers_reads_the_same_vocabulary(kind, pair):
    """transformers' own GGUF tokenizer builder, on our file, gives the original ids too."""
    import transformers as T

    hf_dir, path = pair(kind)
    theirs = T.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    ref = T.AutoTokenizer.from_pretrained(str(hf_dir))
    assert theirs(TEST_TEXT)["input_ids"] == ref(TEST_TEXT)["input_ids"]


def test_metadata_follows_llama_cpp(pair):
    _, path = pair("llama3")
    meta = GgufSource(path).meta
    assert meta["tokenizer.ggml.model"] == "gpt2"
    assert meta["tokenizer.ggml.pre"] == "llama-bpe"
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == CHATML
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    assert types[tokens.index("<|im_start|>")] == 3  # CONTROL
    assert types[tokens.index("Ġthe")] == 1  # NORMAL, byte-level spelling
    assert all(len(m.split(" ")) == 2 for m in meta["tokenizer.ggml.merges"])
    _, path = pair("spm-first")
    meta = GgufSource(path).meta
    assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.pre"] == "default"
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    scores = meta["tokenizer.ggml.scores"]
    assert types[tokens.index("<0x41>")] == 6 and types[tokens.index("<unk>")] == 3
    assert meta["tokenizer.ggml.add_space_prefix"] is True
    # earlier merges make higher-scoring pieces
    assert scores[tokens.index("\u2581the")] > scores[tokens.index("\u2581capital")]
    _, path = pair("qwen2")
    assert GgufSource(path).meta["tokenizer.ggml.pre"] == "qwen2"
    _, path = pair("gpt2")
    assert GgufSource(path).meta["tokenizer.ggml.pre"] == "gpt-2"


def test_chat_template_and_special_tokens(pair):
    hf_dir, path = pair("gpt2")
    ref, ours = Tokenizer.load(hf_dir), GgufSource(path).tokenizer()
    messages = [{"role": "user", "content": "What is the capital of Japan?"}]
    assert ours.has_chat_template
    assert ours.apply_chat_template(messages) == ref.apply_chat_template(messages)
    assert ours.encode_chat(messages) == ref.encode_chat(messages)


def test_model_loaded_from_gguf_carries_the_tokenizer(pair):
    from modelql.runtime import load_model

    hf_dir, path = pair("llama3")
    model = load_model(path)
    assert model.tokenizer is not None
    assert model.tokenizer.encode(TEST_TEXT) == Tokenizer.load(hf_dir).encode(TEST_TEXT)
    assert model.spec.bos_token_id == 1 and 4 in model.spec.eos_token_ids


def test_file_without_vocabulary_has_no_tokenizer(tmp_path):
    from tests.tiny_models import make_tiny

    make_tiny("llama", tmp_path / "hf")
    path = convert(tmp_path / "hf", tmp_path / "m.gguf", "f32").path
    src = GgufSource(path)
    assert src.meta["tokenizer.ggml.model"] == "no_vocab"
    assert src.tokenizer() is None
    assert src.config["bos_token_id"] == 1 and src.config["eos_token_id"] == 2
