"""The OpenAI-compatible group: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models.

Pydantic request models exist only here, at the HTTP edge: a validated request becomes token ids
plus one `runtime.generate.Sequence` per choice (the decode state the CLI uses), handed to the
engine. Responses are assembled from the engine's events, as one JSON body or as SSE chunks
(spec §3.2.3).
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any, AsyncIterator

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, StreamingResponse

from .body import JsonRoute
from .. import __version__
from ..errors import ModelqlError
from ..runtime.generate import Sequence, encode_prompt, generation_config
from ..runtime.sampling import SamplingParams
from . import tools as tools_mod
from .app import ServerState
from .engine import Failed, Finished, Token
from .errors import HttpError, InvalidValue, ServiceUnavailable, modelql_error_parts, openai_error_body
from .schemas import (OPENAI_ERRORS, ChatCompletion, ChatCompletionRequest, Completion, CompletionRequest,
                      EmbeddingList, EmbeddingRequest, ModelCard, ModelList)

router = APIRouter(route_class=JsonRoute, tags=["openai"])

FINGERPRINT = f"fp_modelql_{__version__}"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_MEDIA = "text/event-stream; charset=utf-8"
MAX_STOPS = 4
MAX_PROMPTS = 2048


# -- shared helpers -------------------------------------------------------------------------------

def _state(request: Request) -> ServerState:
    return request.app.state.modelql


def _require(st: ServerState, route: str, group: str = "generate"):
    reason = st.config.unavailable_reason(route, group)
    if reason:
        raise ServiceUnavailable(reason)
    model = st.require_model()
    if model.tokenizer is None:
        raise ServiceUnavailable("the served model has no tokenizer")
    return model


def _check_model_name(st: ServerState, name: str | None) -> None:
    if st.config.strict_model_name and name is not None and name != st.model_id:
        raise HttpError(404, f"The model '{name}' does not exist", code="model_not_found", param="model")


def _check_text(value: str, param: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidValue(param, f"'{param}' is not valid unicode (lone surrogate)") from None
    return value


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if len(stops) > MAX_STOPS:
        raise InvalidValue("stop", f"at most {MAX_STOPS} stop sequences are supported, got {len(stops)}")
    return [_check_text(s, "stop") for s in stops if s]


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    out: dict[int, float] = {}
    for key, value in (bias or {}).items():
        try:
            token = int(key)
        except ValueError:
            raise InvalidValue("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
        if not 0 <= token < vocab:
            raise InvalidValue("logit_bias", f"logit_bias token id {token} out of range (vocab={vocab})")
        if not -100 <= value <= 100:
            raise InvalidValue("logit_bias", f"logit_bias values must be in [-100, 100], got {value}")
        out[token] = float(value)
    return out


def _n(st: ServerState, n: int | None) -> int:
    n = 1 if n is None else n
    if n > st.config.max_n:
        raise InvalidValue("n", f"n = {n} is not supported: this server generates at most {st.config.max_n} "
                                f"choice{'s' if st.config.max_n > 1 else ''} per request")
    return n


def _params(model, req, *, choice: int, max_tokens: int | None, stops: list[str], logprobs: bool,
            top_logprobs: int) -> SamplingParams:
    """The runtime's SamplingParams for choice `choice`: generation_config.json defaults, then the
    request's fields (choice i of a seeded request uses seed + i)."""
    seed = None if req.seed is None else req.seed + choice
    return SamplingParams.from_generation_config(
        generation_config(model), max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
        top_k=req.top_k, frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
        logit_bias=_logit_bias(req.logit_bias, model.spec.vocab_size), seed=seed, stop=stops,
        logprobs=logprobs, top_logprobs=top_logprobs, ignore_eos=bool(req.ignore_eos))


def _check_context(model, ids: list[int], param: str) -> None:
    ctx = model.spec.max_position
    if len(ids) >= ctx:
        raise HttpError(400, f"This model's maximum context length is {ctx} tokens, but the prompt has {len(ids)} "
                             f"tokens: no room for a completion", code="context_length_exceeded", param=param)


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _raise_failed(ev: Failed) -> None:
    if isinstance(ev.error, asyncio.CancelledError):
        raise HttpError(503, "generation was cancelled", code="service_unavailable")
    raise ev.error


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": keep-alive\n\n"


async def _collect(request: Request, handle) -> AsyncIterator[Any]:
    """Events of a non-streaming request; the generation is cancelled if the client goes away."""
    async for batch in handle.events(timeout=0.5):
        if batch is None:
            if await request.is_disconnected():
                handle.cancel()
                return
            continue
        for event in batch:
            yield event


async def _stream_items(handle, choices: list, keepalive: float) -> AsyncIterator[tuple]:
    """A streaming request's events as chunk-sized items. Tokens that arrived together are merged
    into one text item per choice (a reader that falls behind gets fewer, larger chunks):
    ("keepalive",), ("text", index, text, logprob entries), ("finish", index, reason, tokens),
    ("failed", error)."""
    async for batch in handle.events(keepalive):
        if batch is None:
            yield ("keepalive",)
            continue
        pending: dict[int, list] = {}
        for ev in batch:
            if isinstance(ev, Token):
                text, entries = choices[ev.index].add(ev.delta)
                if text:
                    acc = pending.setdefault(ev.index, ["", []])
                    acc[0] += text
                    acc[1] += entries
            elif isinstance(ev, Finished):
                if ev.index in pending:
                    text, entries = pending.pop(ev.index)
                    yield ("text", ev.index, text, entries)
                yield ("finish", ev.index, ev.finish_reason, ev.completion_tokens)
            elif isinstance(ev, Failed):
                handle.cancel()  # the request's other choices stop too
                yield ("failed", ev.error)
                return
        for index, (text, entries) in pending.items():
            yield ("text", index, text, entries)


def _stream_error_chunk(exc: BaseException) -> bytes:
    status, message, code, param = modelql_error_parts(exc)
    return _sse(openai_error_body(status, message, code, param))


# -- logprobs rendering -------------------------------------------------------------------------------

def _token_str(tok, token_id: int) -> str:
    return tok.decode([token_id])


def _entry(tok, token_id: int, logprob: float | None, top: list[tuple[int, float]] | None) -> dict:
    return {"token": _token_str(tok, token_id), "logprob": logprob, "bytes": list(tok.token_bytes(token_id)),
            "top_logprobs": [{"token": _token_str(tok, i), "logprob": lp, "bytes": list(tok.token_bytes(i))}
                             for i, lp in (top or [])]}


class _Choice:
    """Accumulates one choice's deltas; logprobs of tokens whose text is held back wait for it."""

    def __init__(self) -> None:
        self.text = ""
        self.held: list[tuple[int, float | None, list | None]] = []
        self.logprobs: list[tuple[int, float | None, list | None]] = []
        self.finish_reason = "stop"
        self.token_ids: list[int] = []

    def add(self, delta) -> tuple[str, list]:
        """→ (text released by this delta, the logprob entries that go with it)."""
        if delta.token_id is not None:
            self.token_ids.append(delta.token_id)
        if delta.token_id is not None and delta.logprob is not None:
            self.held.append((delta.token_id, delta.logprob, delta.top_logprobs))
        if not delta.text:
            return "", []
        released, self.held = self.held, []
        self.text += delta.text
        self.logprobs += released
        return delta.text, released


# -- /v1/models ---------------------------------------------------------------------------------------

def _card(st: ServerState) -> dict:
    model = st.model
    features = model.spec.num_layers * model.spec.intermediate_size if model is not None else 0
    return {"id": st.model_id, "object": "model", "created": int(st.started), "owned_by": "modelql",
            "path": "/v1", "features": features, "loaded": model is not None}


@router.get("/v1/models", response_model=ModelList, responses=OPENAI_ERRORS)
async def list_models(request: Request):
    return {"object": "list", "data": [_card(_state(request))]}


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=OPENAI_ERRORS)
async def get_model(model_id: str, request: Request):
    st = _state(request)
    if model_id != st.model_id:
        raise HttpError(404, f"The model '{model_id}' does not exist", code="model_not_found", param="model")
    return _card(st)


# -- /v1/chat/completions -------------------------------------------------------------------------

def _chat_messages(req: ChatCompletionRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        content = m.content
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.type != "text":
                    raise InvalidValue(f"messages[{i}].content", f"unsupported content part type: {part.type}")
                parts.append(part.text or "")
            content = "\n".join(parts)
        if content is None:
            if role != "assistant":
                raise InvalidValue(f"messages[{i}].content", f"messages[{i}] (role {role}) has no content")
            content = ""
        msg: dict[str, Any] = {"role": role, "content": _check_text(content, f"messages[{i}].content")}
        if m.name is not None:
            msg["name"] = _check_text(m.name, f"messages[{i}].name")
        if m.tool_calls is not None:
            msg["tool_calls"] = m.tool_calls
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _tool_plan(req: ChatCompletionRequest) -> tools_mod.ToolPlan:
    if req.functions is not None and req.tools is None:
        fns = tools_mod.parse_tools(req.functions, "functions")
        choice = req.function_call
        if isinstance(choice, dict):
            choice = {"type": "function", "function": choice}
        return tools_mod.plan(fns, choice, False, "function_call")
    return tools_mod.plan(tools_mod.parse_tools(req.tools), req.tool_choice, req.parallel_tool_calls)


def _chat_prompt(model, req: ChatCompletionRequest, plan: tools_mod.ToolPlan) -> list[int]:
    messages = _chat_messages(req)
    native = tools_mod.template_handles_tools(model.tokenizer)
    messages, tools = tools_mod.render_messages(messages, plan, native)
    try:
        return model.tokenizer.encode_chat(messages, add_generation_prompt=True, tools=tools)
    except ModelqlError as exc:
        raise InvalidValue("messages", str(exc)) from None
    except Exception as exc:  # a template that breaks on unusual input is the request's problem
        raise InvalidValue("messages", f"could not render the chat template: {exc}") from None


def _grammar(plan: tools_mod.ToolPlan, response_format) -> str | None:
    fmt = response_format.as_dict() if response_format is not None else None
    if plan.active:
        if fmt and fmt.get("type") != "text":
            raise InvalidValue("response_format", "response_format cannot be combined with tools "
                                                  "(set tool_choice: 'none' or drop one)")
        return tools_mod.tool_grammar(plan)
    return tools_mod.response_format_grammar(fmt)


def _message(c, plan: tools_mod.ToolPlan, legacy: bool) -> tuple[dict, str]:
    """(assistant message, finish_reason) of a finished choice."""
    content, calls = tools_mod.parse_answer(c.text, plan.active)
    msg: dict[str, Any] = {"role": "assistant", "content": content, "tool_calls": None}
    finish = c.finish_reason
    if calls:
        if legacy:
            msg["function_call"] = {"name": calls[0].name, "arguments": calls[0].arguments}
            finish = "function_call"
        else:
            msg["tool_calls"] = [{"id": k.id, "type": "function",
                                  "function": {"name": k.name, "arguments": k.arguments}} for k in calls]
            finish = "tool_calls"
    return msg, finish


def _sse_response(gen: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(gen, media_type=SSE_MEDIA, headers=SSE_HEADERS)


@router.post("/v1/chat/completions", response_model=ChatCompletion, responses={
    **OPENAI_ERRORS, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                           "description": "a chat.completion, or SSE chat.completion.chunk events"}})
async def chat_completions(body: ChatCompletionRequest, request: Request):
    st = _state(request)
    model = _require(st, "/v1/chat/completions")
    _check_model_name(st, body.model)
    n = _n(st, body.n)
    if body.top_logprobs and not body.logprobs:
        raise InvalidValue("top_logprobs", "top_logprobs requires logprobs: true")
    plan = _tool_plan(body)
    legacy = body.functions is not None and body.tools is None
    grammar = _grammar(plan, body.response_format)
    stops = _stops(body.stop)
    prompt = _chat_prompt(model, body, plan)
    _check_context(model, prompt, "messages")
    explain = _explain_request(request, body)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    want_lp = bool(body.logprobs)
    seqs = [Sequence(model, prompt, _params(model, body, choice=i, max_tokens=max_tokens, stops=stops,
                                            logprobs=want_lp, top_logprobs=body.top_logprobs or 0),
                     grammar=grammar)
            for i in range(n)]
    handle = st.engine.submit(seqs)
    rid, created = "chatcmpl-" + secrets.token_hex(12), int(time.time())
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": st.model_id,
            "system_fingerprint": FINGERPRINT}
    tok = model.tokenizer
    choices = [_Choice() for _ in range(n)]

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(index: int, delta: dict, finish: str | None = None, logprobs: Any = None) -> bytes:
            return _sse({**base, "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                              "finish_reason": finish}], **extra})

        parsers = [tools_mod.ToolCallParser(enabled=plan.active) for _ in range(n)]

        def deltas(index: int, events: list, lp: Any) -> list[bytes]:
            out = []
            for ev in events:
                if ev[0] == "content":
                    out.append(chunk(index, {"content": ev[1]}, None, lp))
                elif legacy:
                    fc = {"name": ev[3], "arguments": ""} if ev[0] == "call" else {"arguments": ev[2]}
                    if ev[0] == "call" and ev[1] > 0:
                        continue
                    out.append(chunk(index, {"function_call": fc}, None, lp))
                elif ev[0] == "call":
                    out.append(chunk(index, {"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                                             "function": {"name": ev[3], "arguments": ""}}]},
                                     None, lp))
                else:
                    out.append(chunk(index, {"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]},
                                     None, lp))
                lp = None
            return out

        async def stream() -> AsyncIterator[bytes]:
            completion = 0
            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": None if plan.active else ""})
            try:
                async for item in _stream_items(handle, choices, st.config.keepalive_seconds):
                    kind = item[0]
                    if kind == "keepalive":
                        yield SSE_KEEPALIVE
                    elif kind == "text":
                        _, index, text, entries = item
                        lp = None
                        if want_lp:
                            lp = {"content": [_entry(tok, *e) for e in entries], "refusal": None}
                        for data in deltas(index, parsers[index].feed(text), lp):
                            yield data
                    elif kind == "finish":
                        completion += item[3]
                        index, finish = item[1], item[2]
                        for data in deltas(index, parsers[index].finish(), None):
                            yield data
                        if parsers[index].complete:
                            finish = "function_call" if legacy else "tool_calls"
                        yield chunk(index, {}, finish)
                    else:
                        if isinstance(item[1], asyncio.CancelledError):
                            return
                        yield _stream_error_chunk(item[1])
                        yield SSE_DONE
                        return
            except Exception as exc:  # never leave a stream without its terminator
                yield _stream_error_chunk(exc)
                yield SSE_DONE
                return
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(len(prompt), completion)})
            yield SSE_DONE

        return _sse_response(stream())

    completion = 0
    async for ev in _collect(request, handle):
        if isinstance(ev, Token):
            choices[ev.index].add(ev.delta)
        elif isinstance(ev, Finished):
            choices[ev.index].finish_reason = ev.finish_reason
            completion += ev.completion_tokens
        elif isinstance(ev, Failed):
            _raise_failed(ev)
    out = []
    for i, c in enumerate(choices):
        msg, finish = _message(c, plan, legacy)
        out.append({"index": i, "message": msg, "finish_reason": finish,
                    "logprobs": {"content": [_entry(tok, *e) for e in c.logprobs], "refusal": None} if want_lp
                    else None})
    if explain is not None:
        for row, ex in zip(out, await _explain_choices(st, explain, prompt, choices)):
            row["modelql"] = {"explain": ex}
    return JSONResponse({"id": rid, "object": "chat.completion", "created": created, "model": st.model_id,
                         "system_fingerprint": FINGERPRINT, "choices": out,
                         "usage": _usage(len(prompt), completion)})


def _explain_request(request: Request, body: ChatCompletionRequest):
    """(top, scope) of an opt-in `modelql.explain`, or None; the vindex must be ready (else 503)
    and the request non-streaming (else 400)."""
    opt = body.modelql.explain if body.modelql is not None else None
    if opt is None or opt is False:
        return None
    if body.stream:
        raise InvalidValue("modelql", "modelql.explain is available only for non-streaming requests "
                                      "(set stream: false)")
    from .knowledge_routes import _scope

    scope = _scope(request)
    scope.view()  # 503 while the vindex is extracting or when there is none
    return (opt.top if not isinstance(opt, bool) else 5), scope


async def _explain_choices(st: ServerState, explain, prompt: list[int], choices: list) -> list[dict]:
    """`knowledge.explain.attribute` of every choice's tokens, on the engine's worker thread."""
    from ..knowledge.explain import VindexFeatures, attribute

    top, scope = explain

    def run(m):
        src = VindexFeatures(scope.view())
        m = scope.model(m)
        return [{"tokens": [t.to_json() for t in attribute(m, prompt, c.token_ids, src, top=top)]} for c in choices]

    return await st.engine.run(run)


# -- /v1/completions ----------------------------------------------------------------------------------

def _completion_prompts(model, prompt) -> list[tuple[list[int], str]]:
    """[(token ids, prompt text)] of a completions `prompt` (string, strings, ids, or lists of ids)."""
    tok, vocab = model.tokenizer, model.spec.vocab_size
    if isinstance(prompt, str):
        items: list = [prompt]
    elif not prompt:
        raise InvalidValue("prompt", "prompt must not be empty")
    elif all(isinstance(p, int) for p in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if len(items) > MAX_PROMPTS:
        raise InvalidValue("prompt", f"at most {MAX_PROMPTS} prompts per request")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = encode_prompt(model, _check_text(item, "prompt"))
            out.append((ids, item))
        else:
            if not item:
                raise InvalidValue("prompt", f"prompt[{i}] is an empty token list")
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidValue("prompt", f"token id {bad} out of range (vocab={vocab})")
            out.append((list(item), tok.decode(item)))
    return out


def _prompt_logprobs(model, ids: list[int], k: int) -> list[tuple[int, float | None, list | None]]:
    """(token, logprob, top-k) of every prompt token under the model (the first has no logprob)."""
    import torch

    logits = model.forward(torch.tensor([ids]), logits="all")[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    out: list[tuple[int, float | None, list | None]] = [(ids[0], None, None)]
    for pos in range(1, len(ids)):
        row = logp[pos - 1]
        top = None
        if k:
            values, top_ids = torch.topk(row, min(k, row.shape[-1]))
            top = list(zip(top_ids.tolist(), values.tolist()))
        out.append((ids[pos], float(row[ids[pos]]), top))
    return out


def _completion_logprobs(tok, entries: list, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for token_id, logprob, top in entries:
        s = _token_str(tok, token_id)
        tokens.append(s)
        token_lps.append(logprob)
        tops.append(None if logprob is None else {_token_str(tok, i): lp for i, lp in (top or [])})
        offsets.append(offset)
        offset += len(s)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions", response_model=Completion, responses={
    **OPENAI_ERRORS, 200: {"content": {"application/json": {}, "text/event-stream": {}},
                           "description": "a text_completion, or SSE text_completion chunks"}})
async def completions(body: CompletionRequest, request: Request):
    st = _state(request)
    model = _require(st, "/v1/completions")
    _check_model_name(st, body.model)
    n = _n(st, body.n)
    if body.suffix is not None:
        raise InvalidValue("suffix", "suffix is not supported")
    if body.best_of is not None and body.best_of != n:
        raise InvalidValue("best_of", f"best_of must equal n ({n}) when given")
    stops = _stops(body.stop)
    prompts = _completion_prompts(model, body.prompt)
    for ids, _ in prompts:
        _check_context(model, ids, "prompt")
    echo, k = bool(body.echo), body.logprobs
    max_tokens = 16 if body.max_tokens is None else body.max_tokens  # OpenAI's default, also for null
    count = len(prompts) * n
    seqs = []
    if max_tokens != 0:
        for ids, _ in prompts:
            for j in range(n):
                seqs.append(Sequence(model, ids, _params(model, body, choice=j, max_tokens=max_tokens, stops=stops,
                                                         logprobs=k is not None, top_logprobs=k or 0)))
    echo_lps: list[list] = []
    if echo and k is not None:
        echo_lps = await st.engine.run(lambda m: [_prompt_logprobs(m, ids, k) for ids, _ in prompts])
    handle = st.engine.submit(seqs) if seqs else None
    rid, created = "cmpl-" + secrets.token_hex(12), int(time.time())
    base = {"id": rid, "object": "text_completion", "created": created, "model": st.model_id,
            "system_fingerprint": FINGERPRINT}
    tok = model.tokenizer
    prompt_tokens = sum(len(ids) for ids, _ in prompts)
    choices = [_Choice() for _ in range(count)]
    if handle is None:
        for c in choices:
            c.finish_reason = "length"

    def prompt_text(i: int) -> str:
        return prompts[i // n][1]

    def head_logprobs(i: int) -> dict:
        return _completion_logprobs(tok, echo_lps[i // n], 0)

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}
        offsets = [0 if echo else len(prompt_text(i)) for i in range(count)]

        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
            return _sse({**base, "choices": [{"text": text, "index": index, "logprobs": logprobs,
                                              "finish_reason": finish}], **extra})

        async def stream() -> AsyncIterator[bytes]:
            completion = 0
            if echo:
                for i in range(count):
                    yield chunk(i, prompt_text(i), None, head_logprobs(i) if k is not None else None)
                    offsets[i] = len(prompt_text(i))
            try:
                if handle is None:
                    for i in range(count):
                        yield chunk(i, "", "length")
                else:
                    async for item in _stream_items(handle, choices, st.config.keepalive_seconds):
                        kind = item[0]
                        if kind == "keepalive":
                            yield SSE_KEEPALIVE
                        elif kind == "text":
                            _, index, text, entries = item
                            lp = _completion_logprobs(tok, entries, offsets[index]) if k is not None else None
                            offsets[index] += len(text)
                            yield chunk(index, text, None, lp)
                        elif kind == "finish":
                            completion += item[3]
                            yield chunk(item[1], "", item[2])
                        else:
                            if isinstance(item[1], asyncio.CancelledError):
                                return
                            yield _stream_error_chunk(item[1])
                            yield SSE_DONE
                            return
            except Exception as exc:
                yield _stream_error_chunk(exc)
                yield SSE_DONE
                return
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion)})
            yield SSE_DONE

        return _sse_response(stream())

    completion = 0
    if handle is not None:
        async for ev in _collect(request, handle):
            if isinstance(ev, Token):
                choices[ev.index].add(ev.delta)
            elif isinstance(ev, Finished):
                choices[ev.index].finish_reason = ev.finish_reason
                completion += ev.completion_tokens
            elif isinstance(ev, Failed):
                _raise_failed(ev)
    out = []
    for i, c in enumerate(choices):
        ptext = prompt_text(i)
        logprobs_obj = None
        if k is not None:
            logprobs_obj = _completion_logprobs(tok, c.logprobs, len(ptext))
            if echo:
                head = head_logprobs(i)
                logprobs_obj = {key: head[key] + logprobs_obj[key] for key in logprobs_obj}
        out.append({"text": (ptext if echo else "") + c.text, "index": i, "logprobs": logprobs_obj,
                    "finish_reason": c.finish_reason})
    return JSONResponse({**base, "choices": out, "usage": _usage(prompt_tokens, completion)})

# -- /v1/embeddings ------------------------------------------------------------------------------------

def _embedding_inputs(model, value) -> list[list[int]]:
    tok, vocab = model.tokenizer, model.spec.vocab_size
    if isinstance(value, str):
        items: list = [value]
    elif not value:
        raise InvalidValue("input", "input must not be empty")
    elif all(isinstance(v, int) for v in value):
        items = [list(value)]
    else:
        items = list(value)
    if len(items) > MAX_PROMPTS:
        raise InvalidValue("input", f"at most {MAX_PROMPTS} inputs per request")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            ids = tok.encode(_check_text(item, "input"), add_special_tokens=False)
        else:
            bad = next((t for t in item if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidValue("input", f"token id {bad} out of range (vocab={vocab})")
            ids = list(item)
        if not ids:
            raise InvalidValue("input", f"input[{i}] is empty")
        if len(ids) > model.spec.max_position:
            raise HttpError(400, f"input[{i}] has {len(ids)} tokens; the maximum is {model.spec.max_position}",
                            code="context_length_exceeded", param="input")
        out.append(ids)
    return out


def embed_batch(model, inputs: list[list[int]], pooling: str):
    """L2-normalised embeddings [N, H] (float32): static, mean or last pooling (spec §3.4)."""
    import torch

    rows = []
    with torch.inference_mode():
        for ids in inputs:
            if pooling == "static":
                h = model.embed_tokens(torch.tensor([ids]), [0])[0]
                v = h.float().mean(0)
            else:
                h = model.forward([ids], logits="none")
                x = model.norm(h, "final_norm")[0].float()
                v = x.mean(0) if pooling == "mean" else x[-1]
            rows.append(torch.nn.functional.normalize(v, dim=0))
    return torch.stack(rows)


@router.post("/v1/embeddings", response_model=EmbeddingList, responses=OPENAI_ERRORS)
async def embeddings(body: EmbeddingRequest, request: Request):
    st = _state(request)
    model = _require(st, "/v1/embeddings", "embed")
    _check_model_name(st, body.model)
    fmt = body.encoding_format or "float"
    if fmt not in ("float", "base64"):
        raise InvalidValue("encoding_format", f"the encoding_format '{fmt}' is not supported")
    hidden = model.spec.hidden_size
    if body.dimensions is not None and body.dimensions != hidden:
        raise InvalidValue("dimensions", f"dimensions must equal the model's hidden size {hidden}")
    pooling = body.x_pooling or ("mean" if st.config.inference else "static")
    if pooling != "static" and not st.config.inference:
        raise InvalidValue("x_pooling", f"x_pooling '{pooling}' needs inference, which this server does not "
                                        f"serve ({st.config.mode} mode{', --no-infer' if st.config.no_infer else ''})")
    inputs = _embedding_inputs(model, body.input)
    vectors = await st.engine.run(lambda m: embed_batch(m, inputs, pooling))
    data = []
    for i, v in enumerate(vectors):
        if fmt == "base64":
            emb: Any = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode()
        else:
            emb = v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    total = sum(len(ids) for ids in inputs)
    return JSONResponse({"object": "list", "data": data, "model": st.model_id,
                         "usage": {"prompt_tokens": total, "total_tokens": total}})
