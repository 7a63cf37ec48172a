"""`modelql chat`: an interactive conversation with a model, on prompt_toolkit.

In a terminal: line editing and history (kept in the cache directory across sessions, Up recalls),
multi-line input (end a line with a backslash, or Esc-Enter / Alt-Enter, to continue on the next),
Ctrl-C while the model answers stops the answer and keeps the conversation (the partial answer
stays in it), Ctrl-C at the prompt clears the line, Ctrl-D quits. Slash commands are handled here,
never sent to the model (`/help` lists them). Without a terminal (a pipe), lines are read from
stdin, one message each, and the same commands apply.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .errors import ContextLengthError, ModelqlError
from .fsutil import atomic_write_text

HELP = """commands:
  /help           this list
  /reset          forget the conversation (the system prompt stays)
  /save FILE      write the conversation as JSON (OpenAI messages)
  /patch FILE     apply a .vlp patch to the model for the rest of the chat
  /explain [N]    the FFN features behind each token of the last answer (N per token, default 3)
  /exit, /quit    leave (Ctrl-D too)
input: end a line with \\ (or press Esc-Enter) to continue the message on the next line;
Ctrl-C stops an answer and keeps the conversation."""


@dataclass
class ChatSession:
    """The conversation and the model it talks to; `patcher(model, path)` returns a patched model."""

    model: Any
    params: Any
    system: str | None = None
    patcher: Callable[[Any, str], Any] | None = None
    out: Any = field(default_factory=lambda: sys.stdout)
    err: Any = field(default_factory=lambda: sys.stderr)
    messages: list[dict] = field(default_factory=list)
    last: tuple[list[int], list[int]] | None = None  # (prompt ids, answer ids) of the last answer

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self.last = None

    def say(self, text: str) -> None:
        print(text, file=self.err, flush=True)

    # -- one input ------------------------------------------------------------------------------

    def handle(self, line: str) -> bool:
        """Process one input (message or command); False when the user asked to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self.command(text)
        self.ask(line)
        return True

    def command(self, text: str) -> bool:
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/quit"):
            return False
        if name == "/help":
            self.say(HELP)
        elif name == "/reset":
            self.reset()
            self.say("(conversation cleared)")
        elif name == "/save":
            if not arg:
                self.say("usage: /save FILE")
            else:
                try:
                    atomic_write_text(Path(arg).expanduser(), json.dumps(self.messages, indent=2,
                                                                          ensure_ascii=False) + "\n")
                    self.say(f"(saved {len(self.messages)} messages to {arg})")
                except OSError as exc:
                    self.say(f"error: cannot write {arg}: {exc.strerror or exc}")
        elif name == "/patch":
            self.patch(arg)
        elif name == "/explain":
            self.explain(arg)
        else:
            self.say(f"unknown command {name} (/help lists them)")
        return True

    def patch(self, path: str) -> None:
        if not path:
            self.say("usage: /patch FILE")
            return
        if self.patcher is None:
            self.say("error: this chat cannot apply patches")
            return
        try:
            self.model = self.patcher(self.model, path)
        except ModelqlError as exc:
            self.say(f"error: {exc}")
            return
        self.say(f"(patch {path} applied)")

    def explain(self, arg: str) -> None:
        if self.last is None:
            self.say("nothing to explain yet: ask something first")
            return
        try:
            top = int(arg) if arg else 3
        except ValueError:
            self.say("usage: /explain [N]")
            return
        try:
            rows = explain_tokens(self.model, *self.last, top=top)
        except ModelqlError as exc:
            self.say(f"error: {exc}")
            return
        width = max((len(repr(t)) for t, _ in rows), default=5)
        for token, feats in rows:
            self.say(f"  {token!r:<{width}}  " + ", ".join(feats))

    def ask(self, line: str) -> None:
        from .runtime.generate import Sequence, step

        self.messages.append({"role": "user", "content": line})
        try:
            seq = Sequence(self.model, self.messages, self.params)
        except ContextLengthError as exc:
            self.messages.pop()
            self.say(f"error: {exc} (use /reset)")
            return
        except KeyboardInterrupt:
            self.messages.pop()
            self.say("[interrupted]")
            return
        interrupted = False
        try:
            seq.prefill(self.model)
            while not seq.finished:
                for d in step(self.model, [seq]):
                    if d.text:
                        self.out.write(d.text)
                        self.out.flush()
        except KeyboardInterrupt:
            interrupted = True
        text = seq.text
        if interrupted and seq.decoder is not None:
            text += seq.decoder.flush()
        self.out.write("\n")
        self.out.flush()
        if interrupted:
            self.say("[interrupted: the partial answer stays in the conversation]")
        self.messages.append({"role": "assistant", "content": text})
        self.last = (list(seq.prompt_ids), list(seq.output_ids))


def explain_tokens(model, prompt_ids: list[int], answer_ids: list[int], top: int) -> list[tuple[str, list[str]]]:
    """(token, ["L<layer>:F<feature>→top_token", ...]) per answer token, from the model's vindex
    (the cached one, extracted on first use)."""
    from .knowledge.explain import VindexFeatures, attribute

    view = model_vindex(model)
    rows = attribute(model, prompt_ids, answer_ids, VindexFeatures(view), top=top)
    return [(r.token, [f"L{f.layer}:F{f.feature}→{f.top_token!r}" for f in r.features]) for r in rows]


def model_vindex(model):
    """The vindex browsing `model`: its patch session's view when patched, else the cached vindex
    of its model directory (extracted on first use)."""
    session = getattr(model, "patch_session", None)
    if session is not None:
        return session.view
    from .lql import default_vindex as dv
    from .vindex import Vindex

    path = getattr(model, "path", None)
    if path is None or not (Path(path) / "config.json").is_file():
        raise ModelqlError("/explain needs a model directory (its vindex is extracted on first use)")
    default = Path(path).resolve() == dv.default_model_dir().resolve()
    vx = dv.default_vindex_path() if default else dv.ensure_vindex(path)
    return Vindex.load(vx)


def apply_patch(model, path: str):
    """`model` with the .vlp patch `path` applied to its FFN (stacked on earlier ones)."""
    from .vindex.overlay import PatchSession

    session = getattr(model, "patch_session", None)
    if session is None:
        base = getattr(model, "base_model", model)
        session = PatchSession(model_vindex(base), model=base)
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelqlError(f"patch file not found: {path}")
    session.apply(p)
    patched = session.model()
    patched.patch_session = session
    patched.base_model = getattr(model, "base_model", model)
    return patched


# -- the terminal loop ----------------------------------------------------------------------------

def history_file() -> Path | None:
    try:
        from .lql.default_vindex import cache_dir

        d = Path(cache_dir())
        d.mkdir(parents=True, exist_ok=True)
        return d / "chat_history"
    except (ImportError, OSError):
        return None


def prompt_session():
    from prompt_toolkit import PromptSession
    from prompt_toolkit.history import FileHistory, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    keys = KeyBindings()

    @keys.add("enter")
    def _(event):
        buf = event.current_buffer
        if buf.text.endswith("\\"):
            buf.delete_before_cursor(1)
            buf.insert_text("\n")
        else:
            buf.validate_and_handle()

    @keys.add("escape", "enter")
    def _(event):
        event.current_buffer.insert_text("\n")

    path = history_file()
    history = FileHistory(str(path)) if path is not None else InMemoryHistory()
    return PromptSession(history=history, key_bindings=keys, multiline=True,
                         prompt_continuation=lambda width, line, soft: "... ".rjust(width))


def run(session: ChatSession, interactive: bool) -> None:
    if not interactive:
        for line in sys.stdin:
            if not session.handle(line.rstrip("\n")):
                return
        return
    session.say("modelql chat — /help lists commands; Ctrl-C stops an answer, Ctrl-D quits")
    ps = prompt_session()
    while True:
        try:
            line = ps.prompt(">>> ")
        except KeyboardInterrupt:
            continue
        except EOFError:
            return
        if not session.handle(line):
            return
