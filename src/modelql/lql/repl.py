"""The LQL REPL (``modelql repl``): prompt_toolkit input, rich output, one session.

* Input accumulates (multi-line) until the buffer holds a complete statement
  (``batch.statement_complete``: ends with ``;`` outside strings; STATS and SHOW MODELS may omit
  it); Enter inside an incomplete statement inserts a newline.
* History in a file (``FileHistory``: ``$MODELQL_HISTORY``, else ``<cache>/lql_history``).
* Tab completes keywords (what the grammar accepts next: ``parser.next_tokens``) and, inside a
  string, entity names: the default facts table's entities and targets (for the embedded
  model) and the whole-word tokens of the open vindex's vocabulary.
* ``exit`` / ``quit`` / ``\\q`` (or Ctrl-D) leave; ``help`` / ``\\h`` / ``\\?`` print help;
  ``clear`` clears the screen; Ctrl-C discards a partial statement (or interrupts a running one).
* Results print as rich tables; errors as ``Error: <message>`` and the REPL continues.

When stdin is not a terminal the same loop runs over plain lines (no prompt_toolkit), so
``modelql repl < script.lql`` works too.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Iterable, Iterator, TextIO

from prompt_toolkit.completion import Completer, Completion

from modelql.lql import render
from modelql.lql.batch import statement_complete
from modelql.lql.executor import Executor
from modelql.lql.session import Session

__all__ = ["run", "LqlCompleter", "meta_command", "history_path", "HELP", "scan"]

PROMPT = "lql> "
CONTINUATION = "...> "

EXIT_WORDS = frozenset({"exit", "quit", "\\q"})
HELP_WORDS = frozenset({"help", "\\h", "\\?"})
CLEAR_WORDS = frozenset({"clear"})

HELP = """\
LQL statements end with ';' (STATS and SHOW MODELS may omit it); Enter continues an
unfinished statement on a new line, Tab completes keywords and entity names. A |> B runs A, then B.
With no USE, statements run against the embedded default model's vindex.

HELP <statement>;  its syntax and an example (HELP EXTENSIONS: what modelql adds to LARQL's LQL)
help, \\h, \\?   this text      clear   clear the screen      exit, quit, \\q, Ctrl-D   leave
Ctrl-C discards the statement being typed."""


def history_path() -> Path:
    env = os.environ.get("MODELQL_HISTORY")
    if env:
        return Path(env).expanduser()
    from modelql.lql.default_vindex import cache_dir

    return cache_dir() / "lql_history"


def meta_command(text: str) -> str | None:
    """``"exit"``, ``"help"`` or ``"clear"`` when ``text`` is one of the REPL's own commands."""
    word = text.strip().rstrip(";").strip().lower()
    if word in EXIT_WORDS:
        return "exit"
    if word in HELP_WORDS:
        return "help"
    if word in CLEAR_WORDS:
        return "clear"
    return None


def ready(text: str) -> bool:
    """Whether Enter should submit ``text`` (a complete statement, a REPL command, or nothing)."""
    return not text.strip() or meta_command(text) is not None or statement_complete(text)


# ---------------------------------------------------------------------------------------------
# completion
# ---------------------------------------------------------------------------------------------


def scan(text: str) -> tuple[int, int | None]:
    """(offset just after the last ``;`` outside strings and comments, offset of the opening
    quote of an unterminated string at the end — or None)."""
    i, n = 0, len(text)
    stmt_start = 0
    while i < n:
        c = text[i]
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            if j >= n:
                return stmt_start, i
            i = j + 1
        elif c == "-" and text.startswith("--", i):
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == ";":
            stmt_start = i + 1
            i += 1
        else:
            i += 1
    return stmt_start, None


_WORD = re.compile(r"[A-Za-z_\\?]*\Z")
_NAME = re.compile(r"[A-Z_]+\Z")


class LqlCompleter(Completer):
    """prompt_toolkit completer: keywords from the grammar, entity names inside strings."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._names: tuple[object, list[str]] | None = None

    # -- entity names ----------------------------------------------------------------------------

    def entity_names(self) -> list[str]:
        """Names to complete inside a string, best first (cached per open vindex)."""
        vx = self.session.vindex
        key = (id(vx), self.session.vindex_is_default)
        if self._names is not None and self._names[0] == key:
            return self._names[1]
        names: list[str] = []
        seen: set[str] = set()

        def add(items: Iterable[str]) -> None:
            for t in items:
                if t and t not in seen:
                    seen.add(t)
                    names.append(t)

        if vx is None or self.session.vindex_is_default:
            add(_fact_names())
        if vx is not None:
            add(_whole_words(vx))
        self._names = (key, names)
        return names

    # -- the Completer protocol ------------------------------------------------------------------

    def get_completions(self, document, complete_event) -> Iterator[Completion]:
        text = document.text_before_cursor
        start, quote = scan(text)
        if quote is not None:
            typed = text[quote + 1:]
            if "\n" in typed or "\\" in typed:
                return
            closing = text[quote]
            if _PATH_CONTEXT.search(text[start:quote]):
                yield from _path_completions(typed, closing, self.session)
                return
            low = typed.lower()
            count = 0
            for name in self.entity_names():
                if name.lower().startswith(low) and name != typed:
                    yield Completion(name + closing, start_position=-len(typed), display=name)
                    count += 1
                    if count >= 200:
                        return
            return
        stmt = text[start:]
        word = _WORD.search(stmt).group()
        before = stmt[: len(stmt) - len(word)]
        upper = word.upper()
        if not before.strip():
            for meta in ("exit", "quit", "help", "clear"):
                if word and meta.startswith(word.lower()) and meta != word.lower():
                    yield Completion(meta, start_position=-len(word))
        if "\\" in word:
            return
        from modelql.lql.parser import CONTEXTUAL_WORDS, KEYWORDS, next_tokens

        accepted = sorted(t for t in next_tokens(before) if _NAME.match(t) and (t in KEYWORDS or t in CONTEXTUAL_WORDS))
        lower = bool(word) and word == word.lower()
        for kw in accepted:
            if kw.startswith(upper) and kw != upper:
                yield Completion(kw.lower() if lower else kw, start_position=-len(word))


#: string positions that name files or directories (USE "…", STATS "…", … INTO "…", SAVE "…").
_PATH_CONTEXT = re.compile(
    r"\b(USE|MODEL|STATS|INTO|SAVE|PATCH|MERGE|DIFF|CURRENT)\s*(\"[^\"]*\"\s*|'[^']*'\s*)?$",
    re.IGNORECASE)


def _path_completions(typed: str, closing: str, session: Session) -> Iterator[Completion]:
    """Entries of the directory ``typed`` points into; directories end with "/", files close the string."""
    head, sep, tail = typed.rpartition("/")
    base = Path(head + sep or ".").expanduser()
    if not base.is_absolute() and session.cwd is not None:
        base = session.cwd / base
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except OSError:
        return
    prefix = typed[: len(typed) - len(tail)]
    for e in entries:
        if not e.name.startswith(tail) or (e.name.startswith(".") and not tail.startswith(".")):
            continue
        is_dir = e.is_dir() and not (Path(e.path) / "index.json").is_file()  # a vindex is a leaf
        text = prefix + e.name + ("/" if is_dir else closing)
        yield Completion(text, start_position=-len(typed), display=e.name + ("/" if is_dir else ""))


def _fact_names() -> list[str]:
    try:
        from modelql import defaults
    except ImportError:  # pragma: no cover
        return []
    facts = defaults.facts()
    return sorted({f.entity for f in facts}) + sorted({f.target for f in facts})


def _whole_words(vx) -> list[str]:
    """Vocabulary tokens that are whole words: a word-initial token (decodes with a leading
    space) of letters only, 3+ characters; for vocabularies without word-initial markers, every
    alphabetic token of 3+ characters."""
    try:
        tok = vx.tokenizer
        seqs = [[i] for i in range(vx.vocab_size)]
        batch = getattr(tok, "decode_batch", None)
        if batch is None and hasattr(tok, "backend"):
            batch = tok.backend.decode_batch
        raw = (batch(seqs, skip_special_tokens=True) if batch is not None
               else [tok.decode(s, skip_special_tokens=True) for s in seqs])
    except Exception:  # a completion must never fail
        return []
    spaced = [t[1:] for t in raw if t.startswith(" ") and len(t) > 3 and t[1:].isalpha()]
    if not spaced:
        spaced = [t.strip() for t in raw if len(t.strip()) >= 3 and t.strip().isalpha()]
    return sorted(set(spaced), key=lambda w: (not w[0].isupper(), w.lower()))


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------


class _Repl:
    def __init__(self, session: Session, console, out: TextIO) -> None:
        self.session = session
        self.executor = Executor(session)
        self.console = console
        self.out = out

    def execute(self, text: str) -> None:
        """Parse and run one buffer (which may hold several statements), printing as it goes."""
        from modelql.lql.parser import parse_pieces

        from modelql.lql.reference import run_help

        for piece, parsed in parse_pieces(text):
            try:
                helped = run_help(piece.text)
            except Exception as exc:  # an unknown HELP topic
                self.error(exc)
                continue
            if helped is not None:
                self.show(helped)
                continue
            if isinstance(parsed, Exception):
                self.error(parsed)
                continue
            try:
                self.executor.execute(parsed, emit=self.show)
            except KeyboardInterrupt:
                self.error(KeyboardInterrupt())
            except Exception as exc:
                if os.environ.get("MODELQL_DEBUG") and not _is_user_error(exc):
                    raise
                self.error(exc)

    def show(self, executed) -> None:
        for r in render.renderables(executed):
            self.console.print(r)

    def error(self, exc: BaseException) -> None:
        from rich.text import Text

        for line in render.error_lines(exc):
            self.console.print(Text(line, style="red" if line.startswith("Error:") else ""))

    def meta(self, word: str) -> bool:
        """Run a REPL command; False means leave."""
        if word == "exit":
            return False
        if word == "help":
            from modelql.lql.reference import help_text

            self.console.print(HELP + "\n\n" + str(help_text()), markup=False, highlight=False)
        elif word == "clear":
            self.console.clear()
        return True


def _is_user_error(exc: BaseException) -> bool:
    from modelql.errors import ModelqlError

    return isinstance(exc, ModelqlError)


def run(
    session: Session | None = None,
    *,
    history: str | Path | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Run the REPL until exit; returns the exit status (0)."""
    from rich.console import Console

    session = session if session is not None else Session()
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty() and stdout.isatty()
    console = Console(file=stdout, highlight=False, soft_wrap=False,
                      force_terminal=None if interactive else False)
    repl = _Repl(session, console, stdout)
    if interactive:
        return _interactive(repl, history)
    return _plain(repl, stdin)


def _banner(session: Session) -> str:
    return ("modelql LQL — end statements with ';'  (help, exit; Tab completes)\n"
            f"backend: {session.summary()}")


def _interactive(repl: _Repl, history: str | Path | None) -> int:
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    hist = InMemoryHistory()
    path = Path(history) if history is not None else history_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        hist = FileHistory(str(path))
    except OSError:
        pass  # an unwritable history location only loses history

    kb = KeyBindings()

    @kb.add("enter")
    def _enter(event) -> None:
        buf = event.current_buffer
        if buf.complete_state is not None and buf.complete_state.current_completion is not None:
            buf.apply_completion(buf.complete_state.current_completion)
            return
        if ready(buf.text):
            buf.validate_and_handle()
        else:
            buf.insert_text("\n")

    prompt = PromptSession(
        message=PROMPT, multiline=True, history=hist, completer=LqlCompleter(repl.session),
        complete_while_typing=False, key_bindings=kb, enable_history_search=False,
        prompt_continuation=lambda width, line_number, wrap_count: CONTINUATION.rjust(width),
    )
    repl.console.print(_banner(repl.session), markup=False)
    while True:
        try:
            text = prompt.prompt()
        except KeyboardInterrupt:  # discard the partial statement
            continue
        except EOFError:
            return 0
        if not text.strip():
            continue
        word = meta_command(text)
        if word is not None:
            if not repl.meta(word):
                return 0
            continue
        repl.execute(text)


def _plain(repl: _Repl, stdin: TextIO) -> int:
    buffer = ""
    for line in stdin:
        buffer += line
        if not buffer.strip():
            buffer = ""
            continue
        word = meta_command(buffer)
        if word is not None:
            buffer = ""
            if not repl.meta(word):
                return 0
            continue
        if statement_complete(buffer):
            repl.execute(buffer)
            buffer = ""
    if buffer.strip():
        repl.execute(buffer)
    return 0
