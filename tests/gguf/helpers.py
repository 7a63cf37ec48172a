"""Test fixtures for GGUF: small tokenizers of each kind llama.cpp stores, trained at test time, and
tiny models that use them (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

SPACE = "\u2581"

CORPUS = [
    "The capital of France is Paris. The capital of Japan is Tokyo.",
    "日本の首都は東京です。中国的首都是北京。한국의 수도는 서울입니다.",
    "Café au lait, crème brûlée, naïve résumé, Übergrößenträger und Straße.",
    "Москва — столица России. Київ — столиця України. Αθήνα είναι η πρωτεύουσα.",
    "Numbers like 3.14159, 2025 and 1,000,000 appear; emoji too 🙂🚀✅.",
    "I've been told he's there; we'll see what you'd like. DON'T SHOUT!",
    "def f(x):\n    return x * 2  # code\n\n\tindented\ttabs and   spaces",
    "user assistant system: answer the question briefly, then stop.",
] * 30

TEST_TEXT = (
    "<s>Hello world! The capital of Japan is Tokyo — 東京です。Ça va? Привет, мир! 🚀🙂\n"
    "<|im_start|>user\nWhat's 3.14159 × 2025?<|im_end|>\n<|im_start|>assistant\n"
    "  multiple   spaces,\ttabs\n\nand unseen ½ ∑ ğ characters</s> trailing"
)

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _byte_level(kind: str, vocab_size: int = 600):
    """A byte-level BPE: kind "gpt2" (ByteLevel regex), "llama3" or "qwen2" (Split + ByteLevel)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=kind == "llama3"))
    if kind == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        split = LLAMA3_SPLIT if kind == "llama3" else QWEN2_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    if kind == "llama3":
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _sentencepiece(prefix: str, vocab_size: int = 600):
    """A SentencePiece-style BPE as transformers converts one: <unk> <s> </s>, 256 <0xXX> byte tokens,
    pieces with "▁", byte fallback, and merges generated from the piece scores (every split of every
    piece, best piece first: transformers' `generate_merges`). `prefix` is "first" (Metaspace,
    Llama's current converter), "always" (Prepend normalizer, the legacy Llama-2 tokenizer.json) or
    "never" (Gemma: no prefix space)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers.tokenization_utils_base import generate_merges

    # 1. learn pieces (words split on "▁" as SentencePiece does) and rank them by merge order
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Replace(" ", SPACE)
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False)
    base.train_from_iterator(CORPUS, trainer)
    learned = json.loads(base.to_str())["model"]
    pieces = sorted(learned["vocab"], key=learned["vocab"].get)
    # 2. the SentencePiece vocabulary: specials, bytes, then pieces (single characters last-ranked)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    multi = [p for p in pieces if len(p) > 1]
    singles = [p for p in pieces if len(p) == 1]
    tokens += multi + singles
    vocab = {t: i for i, t in enumerate(tokens)}
    scores = {t: -float(i) for i, t in enumerate(tokens) if i >= 259}
    merges = generate_merges(vocab, scores)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if prefix == "first":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    elif prefix == "always":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
    else:
        tok.normalizer = normalizers.Replace(" ", SPACE)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix != "never":
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    from tokenizers import AddedToken

    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


TOKENIZER_KINDS = ("gpt2", "llama3", "qwen2", "spm-first", "spm-always", "spm-gemma")


def write_tokenizer(kind: str, directory: Path) -> int:
    """tokenizer.json + tokenizer_config.json of the given kind in `directory`; returns its size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if kind in ("gpt2", "llama3", "qwen2"):
        tok = _byte_level(kind)
    else:
        tok = _sentencepiece({"spm-first": "first", "spm-always": "always", "spm-gemma": "never"}[kind])
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "<|im_end|>",
              "unk_token": "<unk>", "chat_template": CHATML}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return tok.get_vocab_size()


def make_tiny_with_tokenizer(kind: str, directory: Path, family: str = "llama", seed: int = 0):
    """A tiny random model of `family` whose vocabulary is a `kind` tokenizer; returns the HF model."""
    import torch
    import transformers as T

    from tests.tiny_models import _configs

    n = write_tokenizer(kind, directory)
    torch.manual_seed(seed)
    config = _configs()[family]()
    config.vocab_size = n
    config.bos_token_id, config.eos_token_id, config.pad_token_id = 1, 4, None
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.08 if p.dim() > 1 else 0.3)
    model.save_pretrained(directory, safe_serialization=True)
    return model
