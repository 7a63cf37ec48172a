"""Function tools and structured output at the HTTP edge: request fields → a grammar, the prompt
rendering of tools and tool messages, and the parser that turns the constrained answer back into
OpenAI `tool_calls` (whole, or as streaming deltas).

The wire format the model writes is the Hermes / Qwen2.5 one, one block per call:

    <tool_call>
    {"name": "get_weather", "arguments": {"city":"Paris"}}
    </tool_call>

Decoding is constrained (`runtime.constrain`) by a Lark grammar built from the declared tools:

* `tool_choice: "required"` → one call (or several, newline-separated, with `parallel_tool_calls`)
  of any declared tool, its arguments valid for that tool's `parameters` schema;
* a named function → one call of that function;
* `"auto"` (the default when tools are given) → either free text that does not begin with
  `<tool_call>`, or calls as with "required": the model chooses with its first tokens, and once it
  opens a call the call is forced to be well-formed (as vLLM / llama.cpp do);
* `"none"` → plain text; the tools are not shown to the model.

Objects that list properties are closed (`additionalProperties: false` unless the schema says
otherwise), as llama.cpp does: a sampled model would otherwise invent keys.

Prompt rendering: a chat template that handles tools itself (it reads `tools` and `tool_calls`)
gets them as transformers passes them (arguments as objects). Otherwise the tools are described in a
system message in the same format, assistant `tool_calls` are rendered as `<tool_call>` blocks and
`role: tool` messages as `<tool_response>` blocks in a user turn, which every template can show.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from ..runtime.constrain import check_grammar, json_schema_grammar, lark_grammar
from .errors import InvalidValue

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_NO_PARAMS = {"type": "object", "properties": {}}


@dataclass
class Tool:
    name: str
    description: str | None
    parameters: dict
    strict: bool = False

    def openai(self) -> dict:
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass
class ToolPlan:
    """What a request asks of tools: the tools shown to the model, the forced choice, parallelism."""

    tools: list[Tool]
    choice: str  # "auto" | "required" | "none" | "named"
    named: str | None = None
    parallel: bool = True

    @property
    def active(self) -> bool:
        return bool(self.tools) and self.choice != "none"


def parse_tools(tools: list[dict] | None, param: str = "tools", flat: bool = False) -> list[Tool]:
    """Tools of a chat request (`{"type": "function", "function": {...}}`), of a Responses request
    (`flat`: `{"type": "function", "name", ...}`), or legacy `functions` (`[{name, ...}]`)."""
    out: list[Tool] = []
    for i, item in enumerate(tools or []):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise InvalidValue(where, f"'{where}' must be an object")
        if param == "functions":
            fn = item
        else:
            if item.get("type", "function") != "function":
                raise InvalidValue(f"{where}.type", f"tool type '{item.get('type')}' is not supported: only "
                                                     "'function' tools")
            fn = item if flat else item.get("function")
            if not isinstance(fn, dict):
                raise InvalidValue(f"{where}.function", f"'{where}.function' must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidValue(f"{where}.name", f"tool names must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
        params = fn.get("parameters")
        if params is None:
            params = dict(_NO_PARAMS)
        if not isinstance(params, dict):
            raise InvalidValue(f"{where}.parameters", "tool parameters must be a JSON schema object")
        out.append(Tool(name, fn.get("description"), params, bool(fn.get("strict"))))
    names = [t.name for t in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise InvalidValue(param, f"tool '{dup}' is declared twice")
    return out


def plan(tools: list[Tool], tool_choice: Any, parallel: bool | None, param: str = "tool_choice") -> ToolPlan:
    """Resolve `tool_choice` (string, `{"type":"function","function":{"name"}}`, the Responses
    `{"type":"function","name"}`, or legacy `function_call` `{"name"}`)."""
    par = True if parallel is None else bool(parallel)
    if tool_choice is None:
        return ToolPlan(tools, "auto" if tools else "none", parallel=par)
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "required", "none"):
            raise InvalidValue(param, f"tool_choice must be 'auto', 'required', 'none' or a function, "
                                      f"got {tool_choice!r}")
        if tool_choice == "required" and not tools:
            raise InvalidValue(param, "tool_choice 'required' needs at least one tool")
        return ToolPlan(tools, tool_choice, parallel=par)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function") if isinstance(tool_choice.get("function"), dict) else tool_choice
        name = fn.get("name")
        if not any(t.name == name for t in tools):
            raise InvalidValue(param, f"tool_choice names the function {name!r}, which is not among the tools")
        return ToolPlan(tools, "named", named=name, parallel=par)
    raise InvalidValue(param, "tool_choice must be a string or an object")


# -- grammars -------------------------------------------------------------------------------------

def _closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists properties and does
    not say otherwise (as llama.cpp's grammar converter does): JSON Schema would allow any extra key,
    and a sampled model takes that freedom to write keys nobody declared."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (_closed(v) if k in ("items", "anyOf", "oneOf", "allOf", "prefixItems", "not") else v)
           for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {k: _closed(v) for k, v in schema[key].items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def _guided(schema: dict, strict: bool) -> dict:
    out = _closed(schema)
    opts = dict(out.get("x-guidance") or {})
    opts.setdefault("whitespace_flexible", False)
    if not strict:
        opts.setdefault("lenient", True)  # keywords llguidance does not implement are ignored, not refused
    out["x-guidance"] = opts
    return out


def tool_grammar(p: ToolPlan) -> str:
    """The Lark grammar of the answer a tool plan allows (see the module docstring)."""
    tools = [t for t in p.tools if p.choice != "named" or t.name == p.named]
    alts = []
    rules = []
    for i, t in enumerate(tools):
        head = json.dumps('{"name": ' + json.dumps(t.name) + ', "arguments": ')
        rules.append(f"fn{i}: {head} %json {json.dumps(_guided(t.parameters, t.strict))} \"}}\"")
        alts.append(f"fn{i}")
    call = f'call: "{OPEN}\\n" ({" | ".join(alts)}) "\\n{CLOSE}"'
    calls = 'calls: call ("\\n" call)*' if p.parallel and p.choice != "named" else "calls: call"
    start = "start: calls" if p.choice in ("required", "named") else "start: (TEXT | calls)?"
    text = "TEXT: /(?s:.+)/ & ~/<tool_call>(?s:.*)/"
    grammar = lark_grammar("\n".join([start, text, calls, call, *rules]) + "\n")
    check_grammar(grammar, "tools")
    return grammar


def response_format_grammar(fmt: dict | None, param: str = "response_format") -> str | None:
    """The grammar of a `response_format` (chat) / `text.format` (Responses); None for text."""
    if not fmt:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        grammar = json_schema_grammar({"type": "object"})
    elif kind == "json_schema":
        spec = fmt.get("json_schema", fmt)  # Responses puts name/schema/strict at the top level
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if schema is None:
            schema = {}
        if not isinstance(schema, dict):
            raise InvalidValue(f"{param}.json_schema.schema", "the schema must be a JSON object")
        grammar = json_schema_grammar(_guided(schema, bool(spec.get("strict"))))
    else:
        raise InvalidValue(f"{param}.type", f"unknown response format type {kind!r}")
    check_grammar(grammar, param)
    return grammar


# -- prompt rendering -----------------------------------------------------------------------------

def template_handles_tools(tokenizer) -> bool:
    src = tokenizer.chat_template(tools=[{}])
    return "tools" in src and "tool_calls" in src


def _call_block(name: str, arguments: str) -> str:
    return f'{OPEN}\n{{"name": {json.dumps(name)}, "arguments": {arguments}}}\n{CLOSE}'


def _args_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _type_text(schema: Any) -> str:
    """A short TypeScript-like rendering of a JSON schema (prompt text only: the grammar enforces
    the exact schema)."""
    if not isinstance(schema, dict):
        return "any"
    if "enum" in schema:
        return "|".join(json.dumps(v) for v in schema["enum"])
    if "const" in schema:
        return json.dumps(schema["const"])
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return "|".join(_type_text(s) for s in schema[key])
    t = schema.get("type")
    if isinstance(t, list):
        return "|".join(_type_text({**schema, "type": x}) for x in t)
    if t == "array":
        return _type_text(schema.get("items")) + "[]"
    if t == "object" and isinstance(schema.get("properties"), dict):
        required = set(schema.get("required") or [])
        return "{" + ", ".join(f"{k}{'' if k in required else '?'}: {_type_text(v)}"
                               for k, v in schema["properties"].items()) + "}"
    return {"integer": "int", "number": "number", "boolean": "bool", "null": "null"}.get(t, t or "any")


def tools_system_text(tools: list[Tool]) -> str:
    """The generic tool prompt: one signature line per tool (compact: small models have short
    contexts), then the call format."""
    lines = []
    for t in tools:
        args = _type_text(t.parameters)
        args = "(" + args[1:-1] + ")" if args.startswith("{") else "()"
        lines.append(t.name + args + (f" - {t.description}" if t.description else ""))
    return "Tools:\n" + "\n".join(lines) + "\nTo call a tool, answer " + _call_block("<name>", "<arguments>")


def render_messages(messages: list[dict], p: ToolPlan, native: bool) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) to hand the chat template. `native`: the template renders tools itself."""
    shown = p.tools if p.active else []
    if native:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c.get("function", {}),
                                                       "arguments": _args_object(c.get("function", {}).get("arguments"))}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, ([t.openai() for t in shown] or None)
    out = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            blocks = []
            for c in m["tool_calls"]:
                fn = c.get("function", {})
                args = fn.get("arguments")
                args = args if isinstance(args, str) else json.dumps(args)
                blocks.append(_call_block(fn.get("name", ""), args or "{}"))
            text = "\n".join(([m["content"]] if m.get("content") else []) + blocks)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            body = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1]["role"] == "user" and out[-1].get("_tool"):
                out[-1]["content"] += "\n" + body
            else:
                out.append({"role": "user", "content": body, "_tool": True})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    for m in out:
        m.pop("_tool", None)
    if shown:
        text = tools_system_text(shown)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + text}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out, None


# -- parsing the answer ---------------------------------------------------------------------------

@dataclass
class _Call:
    id: str
    name: str = ""
    arguments: str = ""


@dataclass
class ToolCallParser:
    """Incremental parser of a constrained answer: feed text deltas, get events

    ("content", text) | ("call", index, id, name) | ("arguments", index, text)

    Text is held back only while it could still be the start of `<tool_call>` (at the start of the
    answer); arguments are released as soon as they are known to be inside the arguments object."""

    enabled: bool = True
    buf: str = ""
    pos: int = 0
    mode: str = "start"  # start | text | head | name | args | tail | between
    calls: list[_Call] = field(default_factory=list)
    depth: int = 0
    in_str: bool = False
    escape: bool = False

    def feed(self, text: str) -> list[tuple]:
        if not self.enabled:
            return [("content", text)] if text else []
        self.buf += text
        events: list[tuple] = []
        while True:
            before = (self.mode, self.pos)
            self._advance(events)
            if (self.mode, self.pos) == before:
                return events

    def finish(self) -> list[tuple]:
        """Flush at the end of the answer: text still held back is content."""
        if self.enabled and self.mode in ("start", "text") and self.pos < len(self.buf):
            rest, self.pos = self.buf[self.pos:], len(self.buf)
            self.mode = "text"
            return [("content", rest)]
        return []

    @property
    def complete(self) -> bool:
        """Every call opened was closed (the answer is a well-formed list of calls)."""
        return bool(self.calls) and self.mode == "between"

    def _advance(self, events: list) -> None:
        b, i = self.buf, self.pos
        if self.mode == "start":
            if b.startswith(OPEN):
                self.mode = "head"
            elif not OPEN.startswith(b):
                self.mode = "text"
        elif self.mode == "text":
            if i < len(b):
                events.append(("content", b[i:]))
                self.pos = len(b)
        elif self.mode in ("head", "between"):
            prefix = ("\n" if self.mode == "between" else "") + OPEN + '\n{"name": "'
            if len(b) - i >= len(prefix) and b.startswith(prefix, i):
                self.pos = i + len(prefix)
                self.mode = "name"
        elif self.mode == "name":
            end = b.find('", "arguments": ', i)
            if end >= 0:
                name = json.loads('"' + b[i:end] + '"')
                call = _Call("call_" + secrets.token_hex(12), name)
                self.calls.append(call)
                events.append(("call", len(self.calls) - 1, call.id, name))
                self.pos = end + len('", "arguments": ')
                self.mode, self.depth, self.in_str, self.escape = "args", 0, False, False
        elif self.mode == "args":
            j = i
            while j < len(b):
                ch = b[j]
                j += 1
                if self.in_str:
                    if self.escape:
                        self.escape = False
                    elif ch == "\\":
                        self.escape = True
                    elif ch == '"':
                        self.in_str = False
                elif ch == '"':
                    self.in_str = True
                elif ch in "{[":
                    self.depth += 1
                elif ch in "}]":
                    self.depth -= 1
                    if self.depth == 0:
                        self.mode = "tail"
                        break
            if j > i:
                piece = b[i:j]
                self.calls[-1].arguments += piece
                events.append(("arguments", len(self.calls) - 1, piece))
                self.pos = j
        elif self.mode == "tail":
            tail = "}\n" + CLOSE
            if len(b) - i >= len(tail) and b.startswith(tail, i):
                self.pos = i + len(tail)
                self.mode = "between"


def parse_answer(text: str, enabled: bool) -> tuple[str | None, list[_Call]]:
    """(content, calls) of a whole answer."""
    parser = ToolCallParser(enabled=enabled)
    content = ""
    for ev in parser.feed(text) + parser.finish():
        if ev[0] == "content":
            content += ev[1]
    if parser.calls and not parser.complete:  # cut off mid-call (max_tokens): report the raw text
        return text, []
    return (content or (None if parser.calls else "")), parser.calls
