"""Tokenizers and GGUF vocabulary metadata, in both directions.

A GGUF file carries no `tokenizer.json`: llama.cpp stores the vocabulary as metadata
(`tokenizer.ggml.*`). Two kinds matter for the families modelql runs:

* `tokenizer.ggml.model = "gpt2"`: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet,
  merges are stored ("a b" strings), and `tokenizer.ggml.pre` names the pre-tokenizer regex
  (llama.cpp's `llama-vocab.cpp` keeps one regex per name; `gpt-2`, `llama-bpe`, `qwen2`, ...).
* `tokenizer.ggml.model = "llama"`: SentencePiece-style BPE (Llama 1/2, Mistral, Gemma, Phi-3).
  Tokens use the "▁" word marker, `<0xXX>` byte tokens give byte fallback, and each token has a
  score; llama.cpp merges the adjacent pair whose union has the highest score. transformers turns
  such a vocabulary into a BPE whose merges are every split of every token ordered by score
  (`generate_merges`); `build_tokenizer` does the same, so ids match what HF produces.

`build_tokenizer(meta, arch)` rebuilds a `tokenizers.Tokenizer` plus a tokenizer_config dict
(special tokens, `add_bos_token` / `add_eos_token`, chat template) from GGUF metadata.
`vocab_metadata(model_dir, vocab_size)` goes the other way for the converter, following
llama.cpp's `convert_hf_to_gguf.py` (`_set_vocab_gpt2`, `_set_vocab_sentencepiece`).

Files written by `modelql convert` also carry two keys llama.cpp ignores, so a round trip is
exact where llama.cpp's metadata is ambiguous: `tokenizer.ggml.merges` for SentencePiece-style
vocabularies too (llama.cpp reads merges only for "gpt2"), and `modelql.tokenizer.space_prefix`
("first" / "always": whether the "▁" prefix goes before the first text segment only, like
`Metaspace(prepend_scheme="first")`, or before every segment, like a `Prepend` normalizer).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ModelFormatError, UnsupportedModelError

log = logging.getLogger(__name__)

SPACE = "\u2581"

# llama.cpp's token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes, as written in the original tokenizer.json files (llama.cpp keeps
# equivalent rewrites in llama-vocab.cpp).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# tokenizer.ggml.pre names → pre-tokenizer family (names from llama.cpp's llama-vocab.cpp)
PRE_FAMILIES: dict[str, str] = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2", "dbrx", "smaug-bpe"), "llama3"),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez", "kormo"), "qwen2"),
    **dict.fromkeys(("gpt-2", "phi-2", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "mpt", "olmo",
                     "jais", "trillion", "granite-docling", "gigachat", "default"), "gpt2"),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    "digits"),
}
# what the converter writes for each recognised tokenizer.json pre-tokenizer
PRE_NAMES = {"gpt2": "gpt-2", "llama3": "llama-bpe", "qwen2": "qwen2", "digits": "smollm"}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


# --------------------------------------------------------------------------------------------
# GGUF metadata → tokenizers.Tokenizer
# --------------------------------------------------------------------------------------------


def generate_merges(tokens: list[str], vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a scored vocabulary: transformers' `generate_merges`.

    Every split of every token into two vocabulary pieces is a merge; merges are ordered by the
    score of the token they make (best first), then by longer left piece, then longer right piece;
    the splits of one token are ordered by the ids of their pieces.
    """
    merges: list[tuple[str, str, float]] = []
    for piece, score in scores.items():
        local = []
        for i in range(1, len(piece)):
            left, right = piece[:i], piece[i:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _split_merge(merge: str) -> tuple[str, str]:
    parts = merge.split(" ")
    if len(parts) != 2:
        raise ModelFormatError(f"malformed tokenizer.ggml.merges entry {merge!r}")
    return parts[0], parts[1]


def _pre_tokenizer(pre: str | None):
    from tokenizers import Regex, pre_tokenizers

    family = PRE_FAMILIES.get(pre or "default")
    if family is None:
        log.warning("unknown tokenizer.ggml.pre %r: using the GPT-2 pre-tokenizer", pre)
        family = "gpt2"
    if family in ("llama3", "qwen2"):
        split = LLAMA3_SPLIT if family == "llama3" else QWEN2_SPLIT
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if family == "digits":
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _backend(kind, vocab, merges, pre, unk, add_space_prefix, arch, meta):
    """The tokenizers.Tokenizer (model, normalizer / pre-tokenizer, decoder) of a GGUF vocabulary."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    if kind == "gpt2":
        family = PRE_FAMILIES.get(pre or "default", "gpt2")
        model = models.BPE(vocab=vocab, merges=merges, ignore_merges=family == "llama3", fuse_unk=False,
                           byte_fallback=False)
        tok = Tokenizer(model)
        tok.pre_tokenizer = _pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
    else:
        model = models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(model)
        scheme = meta.get("modelql.tokenizer.space_prefix") or ("always" if arch == "phi3" else "first")
        if not add_space_prefix:
            tok.normalizer = normalizers.Replace(" ", SPACE)
        elif scheme == "always":
            tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), normalizers.Replace(" ", SPACE)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if add_space_prefix:
            steps.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(steps)
    return tok


def build_tokenizer(meta: dict[str, Any], arch: str):
    """(tokenizers.Tokenizer, tokenizer_config dict) from GGUF metadata, or None for no vocabulary."""
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    if kind in (None, "no_vocab", "none"):
        return None
    if kind not in ("gpt2", "llama"):
        raise UnsupportedModelError(f"GGUF tokenizer type {kind!r} is not supported (supported: gpt2, llama)")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    if not tokens:
        raise ModelFormatError("GGUF tokenizer metadata has no tokenizer.ggml.tokens")
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ModelFormatError("GGUF tokenizer.ggml.token_type and tokenizer.ggml.tokens differ in length")
    pre = meta.get("tokenizer.ggml.pre")
    gemma = arch in ("gemma", "gemma2", "gemma3")

    if kind == "llama" and gemma:
        # Gemma files spell whitespace-run tokens with real spaces; the vocabulary uses "▁".
        tokens = [SPACE * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)

    if "tokenizer.ggml.merges" in meta:
        merges = [_split_merge(m) for m in meta["tokenizer.ggml.merges"]]
    elif kind == "gpt2":
        raise ModelFormatError("GGUF gpt2 tokenizer has no tokenizer.ggml.merges")
    else:
        raw_scores = meta.get("tokenizer.ggml.scores")
        if gemma or raw_scores is None:
            # Gemma's scores do not follow its merge order, the order of the file does (transformers).
            scores = {t: -float(i) for t, i in vocab.items()}
        else:
            scores = {}
            for i, t in enumerate(tokens):
                scores.setdefault(t, float(raw_scores[i]))
        merges = generate_merges(tokens, vocab, scores)

    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if isinstance(unk_id, int) and 0 <= unk_id < len(tokens) else None
    add_space_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    try:
        tok = _backend(kind, vocab, merges, pre, unk, add_space_prefix, arch, meta)
    except Exception as exc:  # tokenizers raises untyped errors on inconsistent vocabularies
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelFormatError(f"GGUF tokenizer metadata is inconsistent: {detail}") from None

    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
               if ty in (CONTROL, UNKNOWN) and t]
    if special:
        tok.add_special_tokens(special)
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == USER_DEFINED and t]
    if user:
        tok.add_tokens(user)

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        if token(key) is not None:
            config[name] = token(key)
    default_bos = kind == "llama" or PRE_FAMILIES.get(pre or "default") == "llama3"
    config["add_bos_token"] = bool(meta.get("tokenizer.ggml.add_bos_token", default_bos)) and "bos_token" in config
    config["add_eos_token"] = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in config
    template = meta.get("tokenizer.chat_template")
    names = meta.get("tokenizer.chat_templates")
    if isinstance(names, list) and names:
        listed = [{"name": "default", "template": template}] if isinstance(template, str) else []
        for name in names:
            body = meta.get(f"tokenizer.chat_template.{name}")
            if isinstance(body, str):
                listed.append({"name": name, "template": body})
        config["chat_template"] = listed
    elif isinstance(template, str):
        config["chat_template"] = template
    ctx = meta.get(f"{arch}.context_length")
    if isinstance(ctx, int):
        config["model_max_length"] = ctx
    return tok, config


# --------------------------------------------------------------------------------------------
# tokenizer.json → GGUF metadata (for the converter)
# --------------------------------------------------------------------------------------------


@dataclass
class VocabMetadata:
    """What the converter writes under `tokenizer.*`."""

    model: str  # "gpt2" | "llama" | "no_vocab"
    pre: str | None = None
    tokens: list[str] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    scores: list[float] | None = None
    merges: list[str] = field(default_factory=list)
    special_ids: dict[str, int] = field(default_factory=dict)
    add_bos: bool | None = None
    add_eos: bool | None = None
    add_space_prefix: bool | None = None
    space_prefix: str | None = None  # modelql.tokenizer.space_prefix
    chat_template: Any = None

    def write(self, writer) -> None:
        writer.add_tokenizer_model(self.model)
        for typ, tid in self.special_ids.items():
            getattr(writer, f"add_{typ}_token_id")(tid)
        if self.model == "no_vocab":
            return
        writer.add_tokenizer_pre(self.pre or "default")
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.types)
        if self.merges:
            writer.add_token_merges(self.merges)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        if self.space_prefix is not None:
            writer.add_string("modelql.tokenizer.space_prefix", self.space_prefix)
        if self.chat_template is not None:
            writer.add_chat_template(self.chat_template)


def _flatten(component: dict | None) -> list[dict]:
    if not component:
        return []
    if component.get("type") == "Sequence":
        key = "pretokenizers" if "pretokenizers" in component else (
            "normalizers" if "normalizers" in component else "decoders")
        return [c for sub in component.get(key, []) for c in _flatten(sub)]
    return [component]


def _regex(step: dict) -> str | None:
    pattern = step.get("pattern") or {}
    return pattern.get("Regex") if isinstance(pattern, dict) else None


def classify_pre_tokenizer(tokenizer_json: dict) -> str:
    """The llama.cpp `tokenizer.ggml.pre` name of a byte-level tokenizer.json's pre-tokenizer."""
    steps = _flatten(tokenizer_json.get("pre_tokenizer"))
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return PRE_NAMES["gpt2"]
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = _regex(steps[0])
        if regex == LLAMA3_SPLIT:
            return PRE_NAMES["llama3"]
        if regex == QWEN2_SPLIT:
            return PRE_NAMES["qwen2"]
        if regex == GPT2_SPLIT:
            return PRE_NAMES["gpt2"]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return PRE_NAMES["digits"]
    described = ", ".join(f"{k}({_regex(s)})" if _regex(s) else str(k) for k, s in zip(kinds, steps)) or "none"
    raise UnsupportedModelError(
        f"tokenizer.json pre-tokenizer [{described}] has no llama.cpp equivalent (tokenizer.ggml.pre)")


def _looks_special(token: str) -> bool:
    """llama.cpp's `does_token_look_special`: added tokens marked non-special that are control tokens."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
            or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def _space_prefix(tokenizer_json: dict) -> tuple[bool, str | None]:
    """(add_space_prefix, scheme) of a SentencePiece-style tokenizer.json."""
    for step in _flatten(tokenizer_json.get("normalizer")):
        if step.get("type") == "Prepend" and step.get("prepend") == SPACE:
            return True, "always"
    for step in _flatten(tokenizer_json.get("pre_tokenizer")):
        if step.get("type") == "Metaspace":
            scheme = step.get("prepend_scheme")
            if scheme is None:
                scheme = "always" if step.get("add_prefix_space", True) else "never"
            if step.get("split"):
                log.warning("tokenizer.json Metaspace splits on spaces; the GGUF vocabulary will not")
            return (scheme != "never"), (scheme if scheme != "never" else None)
    return False, None


def _merge_ranks(merges: list[str], vocab: dict[str, int]) -> dict[int, int]:
    """Token id → rank of the first merge that makes it."""
    ranks: dict[int, int] = {}
    for rank, merge in enumerate(merges):
        a, _, b = merge.partition(" ")
        i = vocab.get(a + b)
        if i is not None and i not in ranks:
            ranks[i] = rank
    return ranks


def _merges_as_strings(raw: list) -> list[str]:
    out = []
    for m in raw:
        if isinstance(m, str):
            out.append(m)
        else:  # transformers ≥ 4.45 writes [a, b] pairs
            a, b = m
            if " " in a or " " in b:
                raise UnsupportedModelError("tokenizer.json merges contain spaces; they cannot be stored in GGUF")
            out.append(f"{a} {b}")
    return out


def vocab_metadata(model_dir: Path, vocab_size: int) -> VocabMetadata:
    """GGUF tokenizer metadata for a HF model directory (llama.cpp's converter conventions)."""
    import gguf

    path = Path(model_dir) / "tokenizer.json"
    if not path.exists():
        log.warning("%s has no tokenizer.json: writing a GGUF without a vocabulary", model_dir)
        meta = VocabMetadata(model="no_vocab")
        try:
            config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = {}
        for typ in ("bos", "eos", "pad"):
            tid = config.get(f"{typ}_token_id")
            if isinstance(tid, int) and 0 <= tid < vocab_size:
                meta.special_ids[typ] = tid
        return meta
    try:
        tj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFormatError(f"{path} is not valid JSON: {exc}") from None
    model = tj.get("model") or {}
    if model.get("type", "BPE") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise UnsupportedModelError(
            f"tokenizer.json model type {model.get('type')!r} cannot be written to GGUF (only BPE)")
    decoder_kinds = [d.get("type") for d in _flatten(tj.get("decoder"))]
    pre_kinds = [p.get("type") for p in _flatten(tj.get("pre_tokenizer"))]
    byte_level = not model.get("byte_fallback") and ("ByteLevel" in decoder_kinds or "ByteLevel" in pre_kinds)
    spm = bool(model.get("byte_fallback")) or "Metaspace" in pre_kinds or "ByteFallback" in decoder_kinds
    if not byte_level and not spm:
        raise UnsupportedModelError("tokenizer.json is neither byte-level BPE nor SentencePiece-style BPE")

    vocab: dict[str, int] = model["vocab"]
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()}
    n = max([vocab_size, *(i + 1 for i in by_id), *(i + 1 for i in added)])
    if n > vocab_size:
        raise ModelFormatError(f"the tokenizer has {n} tokens but the model's vocabulary has {vocab_size} rows")
    unk = model.get("unk_token")
    merges = _merges_as_strings(model.get("merges") or [])

    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        if i in added:
            text = added[i]["content"]
            if added[i].get("special") or _looks_special(text):
                types.append(CONTROL)
            else:
                types.append(USER_DEFINED)
                if spm:
                    text = text.replace(SPACE, " ")  # llama.cpp pre-normalises user-defined spaces
            tokens.append(text)
        elif i in by_id:
            text = by_id[i]
            if spm and _BYTE_TOKEN.fullmatch(text):
                types.append(BYTE)
            elif text == unk:
                types.append(UNKNOWN)
            else:
                types.append(NORMAL)
            tokens.append(text)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)

    meta = VocabMetadata(model="gpt2" if byte_level else "llama", tokens=tokens, types=types)
    if byte_level:
        meta.pre = classify_pre_tokenizer(tj)
    else:
        meta.pre = "default"
        # llama.cpp merges by token score: a token scores -(rank of the first merge that makes
        # it), so the highest-scoring pair is the earliest merge, as in the BPE it came from.
        ranks = _merge_ranks(merges, {t: i for i, t in enumerate(tokens)})
        unreachable = -float(len(merges) + 1)
        meta.scores = [-float(ranks[i]) if i in ranks else (0.0 if len(t) <= 1 or ty != NORMAL else unreachable)
                       for i, (t, ty) in enumerate(zip(tokens, types))]
        meta.add_space_prefix, meta.space_prefix = _space_prefix(tj)

    special = gguf.SpecialVocab(Path(model_dir), load_merges=True, n_vocab=n)
    meta.merges = list(special.merges) or merges
    meta.special_ids = dict(special.special_token_ids)
    # Written explicitly: llama.cpp's default when the key is absent (BOS for SentencePiece) is not
    # necessarily what the tokenizer.json post-processor does.
    meta.add_bos = bool(special.add_special_token.get("bos", False))
    meta.add_eos = bool(special.add_special_token.get("eos", False))
    meta.chat_template = special.chat_template
    return meta
