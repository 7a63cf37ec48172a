"""One tokenizer wrapper: HF `tokenizer.json` through `tokenizers`, chat templates through jinja2.

`Tokenizer.load(dir)` reads `tokenizer.json`, `tokenizer_config.json` (special tokens,
`add_bos_token` / `add_eos_token`, `chat_template`) and `chat_template.jinja` when present. A GGUF
loader builds a `tokenizers.Tokenizer` itself and passes it with a config dict to the constructor.

BOS handling: a `tokenizer.json` post-processor decides which special tokens `encode` adds (as in
transformers ≥ 5, which ignores the config's flags when tokenizer.json exists). A tokenizer without
a post-processor (older exports, GGUF-built ones) gets `[BOS] $A [EOS]` from the config's
`add_bos_token` / `add_eos_token`. `encode_chat` never doubles a BOS the chat template rendered.

Chat templates are rendered like transformers' `apply_chat_template`: an
`ImmutableSandboxedEnvironment(trim_blocks, lstrip_blocks)` with loop controls, `raise_exception`,
`strftime_now`, HF's `tojson` (no HTML escaping, `indent`/`separators`/`sort_keys`), and the named
special tokens (`bos_token`, `eos_token`, ...) as variables. A model without a template gets a
family fallback chosen from its special tokens (ChatML, Llama-3, Gemma, Mistral, or plain text).

`StreamDecoder` turns a token stream into text deltas that never split a character: byte-level
BPE tokens can end in the middle of a multi-byte UTF-8 sequence.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from .errors import ChatTemplateError, ModelFormatError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
REPLACEMENT = "\ufffd"


# -- chat template fallbacks (used only when the model ships none) -----------------------------

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{% if message['role'] == 'system' %}{{ '<start_of_turn>user\n' + message['content'] | trim + '\n\n' }}"
    "{% else %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(system='') %}{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set ns.system = message['content'] + '\n\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + ns.system + message['content'] + ' [/INST]' }}"
    "{% set ns.system = '' %}{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
PLAIN_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _token_content(value: Any) -> str | None:
    """A special token from tokenizer_config: a string or a serialised AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _raise_exception(message):
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def compile_chat_template(source: str):
    """Compile a chat template in the sandbox transformers uses (cached per template text)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask marker): renders its body."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 (jinja's signature trick)
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["namespace"] = Namespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template syntax error (line {exc.lineno}): {exc.message}") from None


class Tokenizer:
    """A HF fast tokenizer plus its config: special tokens, BOS/EOS policy, chat template."""

    def __init__(self, tokenizer, config: Mapping[str, Any] | None = None, chat_template: str | None = None,
                 path: Path | None = None):
        """`tokenizer` is a `tokenizers.Tokenizer`; `config` a tokenizer_config.json dict."""
        from tokenizers import AddedToken, processors

        self._tok = tokenizer
        self.config = dict(config or {})
        self.path = path
        self.special_tokens: dict[str, str] = {}
        for name in SPECIAL_TOKEN_NAMES:
            content = _token_content(self.config.get(name))
            if content is not None:
                self.special_tokens[name] = content
        missing = [c for c in self.special_tokens.values() if tokenizer.token_to_id(c) is None]
        if missing:  # transformers adds configured special tokens the vocabulary lacks
            tokenizer.add_special_tokens([AddedToken(c, special=True, normalized=False) for c in dict.fromkeys(missing)])
        if tokenizer.post_processor is None and ("add_bos_token" in self.config or "add_eos_token" in self.config):
            self._set_post_processor(processors, bool(self.config.get("add_bos_token")),
                                     bool(self.config.get("add_eos_token")))
        template = chat_template if chat_template is not None else self.config.get("chat_template")
        self._templates: dict[str, str] = {}
        if isinstance(template, str):
            self._templates["default"] = template
        elif isinstance(template, list):
            for item in template:
                if isinstance(item, Mapping) and isinstance(item.get("template"), str):
                    self._templates[str(item.get("name", "default"))] = item["template"]
        self._byte_decoder: dict[str, int] | None = None
        self._added: dict[int, str] | None = None
        self._is_byte_level: bool | None = None

    def _set_post_processor(self, processors, add_bos: bool, add_eos: bool) -> None:
        bos, eos = self.bos_token, self.eos_token
        add_bos = add_bos and bos is not None
        add_eos = add_eos and eos is not None
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = []
        if add_bos:
            special.append((bos, self._tok.token_to_id(bos)))
        if add_eos:
            special.append((eos, self._tok.token_to_id(eos)))
        self._tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, chat_template.jinja) from a model directory."""
        from tokenizers import Tokenizer as HfTokenizer

        d = Path(directory)
        file = d / "tokenizer.json"
        if not file.exists():
            raise ModelFormatError(f"{d} has no tokenizer.json")
        try:
            tok = HfTokenizer.from_file(str(file))
        except Exception as exc:  # tokenizers raises untyped errors
            raise ModelFormatError(f"{file} is not a valid tokenizer: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        config: dict = {}
        cfg_file = d / "tokenizer_config.json"
        if cfg_file.exists():
            try:
                config = json.loads(cfg_file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ModelFormatError(f"{cfg_file} is not valid JSON: {exc}") from None
        template = None
        jinja_file = d / "chat_template.jinja"
        if jinja_file.exists():
            template = jinja_file.read_text(encoding="utf-8")
        elif (d / "chat_template.json").exists():
            try:
                template = json.loads((d / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                template = None
        return cls(tok, config, chat_template=template, path=d)

    # -- special tokens -------------------------------------------------------------------

    @property
    def backend(self):
        """The underlying `tokenizers.Tokenizer`."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self.special_tokens.get("pad_token")

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The tokenizer's own end-of-sequence ids (generation adds generation_config's)."""
        i = None if self.eos_token is None else self._tok.token_to_id(self.eos_token)
        return () if i is None else (i,)

    @property
    def all_special_ids(self) -> set[int]:
        ids = {self._tok.token_to_id(c) for c in self.special_tokens.values()}
        for i, added in self._tok.get_added_tokens_decoder().items():
            if added.special:
                ids.add(i)
        ids.discard(None)
        return ids  # type: ignore[return-value]

    # -- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; with special tokens as the post-processor (BOS policy) adds them."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token contributes to the text (for logprobs `bytes`)."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._added is None:
            self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        if token_id in self._added:  # added tokens are stored as plain text
            return self._added[token_id].encode("utf-8")
        if self._byte_level():
            table = self._byte_decoder
            if table is not None and all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")

    def _byte_level(self) -> bool:
        if self._is_byte_level is None:
            decoder = self._tok.decoder
            self._is_byte_level = decoder is not None and "ByteLevel" in repr(decoder)
            if self._is_byte_level:
                self._byte_decoder = {ch: b for b, ch in _bytes_to_unicode().items()}
        return self._is_byte_level

    def stream_decoder(self, context: Sequence[int] = (), skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, context=context, skip_special_tokens=skip_special_tokens)

    # -- chat -------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self._templates)

    def chat_template(self, tools: list | None = None) -> str:
        """The template to render: the model's (its `tool_use` variant when tools are given), else a fallback."""
        if tools and "tool_use" in self._templates:
            return self._templates["tool_use"]
        if "default" in self._templates:
            return self._templates["default"]
        if self._templates:
            return next(iter(self._templates.values()))
        return self.fallback_template()

    def fallback_template(self) -> str:
        """A template for models that ship none, chosen from the control tokens they have."""
        has = lambda t: self._tok.token_to_id(t) is not None  # noqa: E731
        if has("<|im_start|>") and has("<|im_end|>"):
            return CHATML_TEMPLATE
        if has("<|start_header_id|>") and has("<|eot_id|>"):
            return LLAMA3_TEMPLATE
        if has("<start_of_turn>") and has("<end_of_turn>"):
            return GEMMA_TEMPLATE
        if has("[INST]") and has("[/INST]"):
            return MISTRAL_TEMPLATE
        return PLAIN_TEMPLATE

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tools: list | None = None, documents: list | None = None, **kwargs: Any) -> str:
        """Render `messages` with the model's chat template, as transformers does (tokenize=False)."""
        import jinja2

        if not messages:
            raise ChatTemplateError("cannot apply a chat template to an empty conversation")
        chat = []
        for m in messages:
            if not isinstance(m, Mapping):
                raise ChatTemplateError(f"chat messages must be objects, got {type(m).__name__}")
            chat.append({k: v for k, v in m.items() if v is not None})
        template = compile_chat_template(self.chat_template(tools))
        variables = {**self.special_tokens, **kwargs}
        try:
            return template.render(messages=chat, tools=tools, documents=documents,
                                   add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as exc:
            raise ChatTemplateError(f"chat template: {exc}") from None

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                    **kwargs: Any) -> list[int]:
        """Token ids of the rendered conversation: special tokens added by the BOS policy, but a BOS the
        template already rendered is not doubled."""
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs))
        bos = self.bos_token_id
        if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
            ids = ids[1:]
        return ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns the new text, only ever whole characters.

    It re-decodes a short window of recent tokens (so decoders that strip a leading space or merge
    byte-fallback pieces see their context) and withholds text while it ends in an incomplete
    UTF-8 sequence (decoded as U+FFFD). `flush()` returns whatever is still withheld. `context`
    tokens (e.g. the prompt's tail) are decoded as left context but never emitted.
    """

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(context)[-6:]
        self.prefix = 0  # start of the decoding window
        self.read = len(self.ids)  # tokens before this have been emitted
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            delta = after[len(before) :] if after.startswith(before) else after[_common_prefix(before, after):]
            self.prefix, self.read = self.read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """Text still withheld (an incomplete character at the end decodes as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        delta = after[len(before) :] if len(after) > len(before) else ""
        self.text += delta
        return delta


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
