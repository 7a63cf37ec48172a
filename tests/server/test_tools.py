"""Tool calling and structured output through the official `openai` client, against the embedded
default model served by the batched engine. The model was trained on facts, not on tools: every
assertion here is about what constrained decoding guarantees (well-formed calls whose arguments
validate against the declared schema, documents valid for the requested schema), checked with the
independent `jsonschema` validator."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import openai
import pytest

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"hours": {"type": "integer", "minimum": 0, "maximum": 23}},
        "required": ["hours"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "current weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]}, "maxItems": 3},
    "capital": {"type": ["string", "null"], "maxLength": 12}},
    "required": ["name", "age", "tags", "capital"], "additionalProperties": False}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(default_server):
    with openai.OpenAI(base_url=default_server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def check_calls(calls, allowed=SCHEMAS):
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in allowed
        jsonschema.validate(json.loads(call.function.arguments), allowed[call.function.name])


def test_required_tool_call_carries_valid_arguments(client):
    for seed in range(3):
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1, seed=seed, max_tokens=150)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        check_calls(choice.message.tool_calls)


def test_named_function_is_the_one_called(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=1, seed=5, max_tokens=150,
                                       tool_choice={"type": "function", "function": {"name": "get_time"}})
    calls = r.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"] * len(calls)
    check_calls(calls)


def test_none_and_auto(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="none", temperature=0,
                                       max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    plain = client.chat.completions.create(model="m", messages=ASK, temperature=0, max_tokens=30)
    assert r.choices[0].message.content == plain.choices[0].message.content  # tools are not shown
    for seed in range(4):  # auto: text or calls, and a call is always well-formed
        r = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, temperature=1, seed=seed,
                                           max_tokens=150)
        m = r.choices[0].message
        if m.tool_calls:
            check_calls(m.tool_calls)
            assert r.choices[0].finish_reason == "tool_calls"
        else:
            assert not m.content.startswith("<tool_call>")


def test_streamed_tool_call_deltas_reassemble_to_the_same_call(client):
    kw = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, seed=11, max_tokens=200,
              parallel_tool_calls=False)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
    calls, finish = reassemble(client.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls"
    assert [(c["name"], c["arguments"]) for c in calls] == [(c.function.name, c.function.arguments) for c in whole]
    check_calls(whole)


def reassemble(stream) -> tuple[list[dict], str | None]:
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        assert not chunk.choices[0].delta.content
        for d in chunk.choices[0].delta.tool_calls or []:
            c = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
            if d.id:
                assert c["id"] is None  # the id and name come once, in the call's first delta
                c["id"], c["name"] = d.id, d.function.name
            c["arguments"] += d.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return [c for _, c in sorted(calls.items())], finish


def test_streamed_tool_call_raw_sse_reassembles_to_the_same_call(default_server):
    """The bytes on the wire (httpx, no OpenAI client): every event a `chat.completion.chunk`, each
    call's id, type and name in its first delta only, arguments split over deltas, the finish reason
    `tool_calls`, then `[DONE]` — reassembled, equal to the non-streamed answer of the same seed."""
    import httpx

    body = dict(model="m", messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, seed=13,
                max_tokens=200, parallel_tool_calls=False)
    whole = httpx.post(default_server.url + "/v1/chat/completions", json=body, timeout=120).json()
    want = [(c["function"]["name"], c["function"]["arguments"]) for c in whole["choices"][0]["message"]["tool_calls"]]
    with httpx.stream("POST", default_server.url + "/v1/chat/completions", json={**body, "stream": True},
                      timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    calls: dict[int, dict] = {}
    finish, pieces = None, 0
    for raw in events[:-1]:
        chunk = json.loads(raw)
        assert chunk["object"] == "chat.completion.chunk" and chunk["id"] == json.loads(events[0])["id"]
        choice = chunk["choices"][0]
        assert not choice["delta"].get("content")
        for d in choice["delta"].get("tool_calls") or []:
            if d["index"] not in calls:
                assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["name"]
                calls[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
            else:
                assert "id" not in d and "name" not in d.get("function", {})
            calls[d["index"]]["arguments"] += d["function"].get("arguments") or ""
            pieces += 1
        finish = choice.get("finish_reason") or finish
    assert finish == "tool_calls" and pieces > 2  # streamed in pieces, not one event
    got = [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]
    assert got == want
    jsonschema.validate(json.loads(got[0][1]), SCHEMAS[got[0][0]])


def test_parallel_tool_calls_stream_as_separate_indices(client):
    """With parallel calls the small model rarely stops calling: every call it closed is valid."""
    calls, finish = reassemble(client.chat.completions.create(
        model="m", messages=ASK, tools=TOOLS, tool_choice="required", temperature=1, seed=3, max_tokens=160,
        stream=True))
    assert len(calls) >= 2 and len({c["id"] for c in calls}) == len(calls)
    closed = calls if finish == "tool_calls" else calls[:-1]
    for c in closed:
        jsonschema.validate(json.loads(c["arguments"]), SCHEMAS[c["name"]])


def test_tool_results_are_rendered_and_answered(client, default_server):
    first = client.chat.completions.create(model="m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=150)
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'}]
    r = client.chat.completions.create(model="m", messages=history, tools=TOOLS, tool_choice="none",
                                       temperature=0, max_tokens=20)
    assert r.choices[0].message.tool_calls is None
    from modelql.server import tools as t

    tok = default_server.app.state.modelql.model.tokenizer
    msgs, _ = t.render_messages([dict(m) for m in history], t.plan(t.parse_tools(TOOLS), "auto", None),
                                t.template_handles_tools(tok))
    text = tok.apply_chat_template(msgs)
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in text
    assert f'"name": "{call.function.name}", "arguments": {call.function.arguments}' in text
    assert "Tools:\nget_weather(city: string" in text
    shown_none, _ = t.render_messages([dict(m) for m in history], t.plan(t.parse_tools(TOOLS), "none", None), False)
    assert "Tools:" not in tok.apply_chat_template(shown_none)
    assert r.usage.prompt_tokens == len(tok.encode_chat(shown_none))


def test_legacy_functions(client):
    r = client.chat.completions.create(model="m", messages=ASK, functions=[TOOLS[1]["function"]],
                                       function_call={"name": "get_time"}, temperature=1, seed=2, max_tokens=100)
    fc = r.choices[0].message.function_call
    assert r.choices[0].finish_reason == "function_call" and fc.name == "get_time"
    jsonschema.validate(json.loads(fc.arguments), TIME)


def test_json_object(client):
    for seed in range(3):
        r = client.chat.completions.create(model="m", messages=ASK, response_format={"type": "json_object"},
                                           temperature=0.7, seed=seed, max_tokens=120)
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_json_schema_100_samples_at_temperature_1_are_all_valid(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "strict": True, "schema": PERSON}}

    def one(seed):
        r = client.chat.completions.create(model="m", messages=[{"role": "user", "content": f"Person {seed}?"}],
                                           response_format=fmt, temperature=1, seed=seed, max_tokens=200)
        return r.choices[0]

    with ThreadPoolExecutor(8) as pool:
        choices = list(pool.map(one, range(100)))
    valid = 0
    for c in choices:
        assert c.finish_reason == "stop", c.message.content
        jsonschema.validate(json.loads(c.message.content), PERSON)
        valid += 1
    assert valid == 100


def test_structured_errors_are_400s(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, tools=[{"type": "function",
                                                                         "function": {"name": "bad name"}}])
    assert e.value.body["param"] == "tools[0].name"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=ASK, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {
                "a": {"type": "string", "pattern": "(?<=x)y"}}}}})
    assert e.value.body["param"] == "response_format"


@pytest.mark.parametrize("method, path, status", [
    ("get", "/v1/nope", 404), ("post", "/v1/models", 405), ("get", "/v1/describe?entity=France", 503),
    ("post", "/v1/walk-ffn", 400), ("get", "/v1/models/unknown", 404), ("get", "/nothing/here", 404),
])
def test_every_route_error_is_an_openai_error(default_server, method, path, status):
    """The client parses the envelope: a typed exception whose message is the server's message."""
    import httpx

    client = openai.OpenAI(base_url=default_server.url, api_key="unused", max_retries=0, timeout=30)
    call = client.get if method == "get" else client.post
    kw = {} if method == "get" else {"body": {}}
    with pytest.raises(openai.APIStatusError) as e:
        call(path, cast_to=httpx.Response, **kw)
    err = e.value
    assert err.status_code == status
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    assert err.message == f"Error code: {status} - {err.body['message']}"  # the client found the envelope
    assert err.body["message"] and err.code == err.body["code"] and err.type == err.body["type"]


# -- the Responses API -----------------------------------------------------------------------------

FLAT_TOOLS = [{"type": "function", "name": t["function"]["name"], "parameters": t["function"]["parameters"],
               "strict": True} for t in TOOLS]


def test_responses_text_and_previous_response_id(client):
    first = client.responses.create(model="m", input="What is the capital of France?", temperature=0,
                                    max_output_tokens=20)
    assert first.object == "response" and first.status in ("completed", "incomplete")
    chat = client.chat.completions.create(model="m", messages=[{"role": "user",
                                                                "content": "What is the capital of France?"}],
                                          temperature=0, max_tokens=20)
    assert first.output_text == chat.choices[0].message.content  # the same engine path
    assert first.usage.input_tokens == chat.usage.prompt_tokens
    second = client.responses.create(model="m", input="And of Spain?", previous_response_id=first.id,
                                     temperature=0, max_output_tokens=20)
    history = [{"role": "user", "content": "What is the capital of France?"},
               {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And of Spain?"}]
    chat2 = client.chat.completions.create(model="m", messages=history, temperature=0, max_tokens=20)
    assert second.output_text == chat2.choices[0].message.content
    assert second.usage.input_tokens == chat2.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model="m", input="x", previous_response_id="resp_nope")
    assert e.value.body["param"] == "previous_response_id"


def test_responses_stream_events(client):
    kw = dict(model="m", input="Where is Nairobi?", temperature=0, max_output_tokens=20)
    whole = client.responses.create(**kw)
    kinds, text, done = [], "", None
    for ev in client.responses.create(stream=True, **kw):
        kinds.append(ev.type)
        if ev.type == "response.output_text.delta":
            text += ev.delta
        if ev.type == "response.completed":
            done = ev.response
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "response.output_item.added" in kinds and "response.output_text.done" in kinds
    assert text == whole.output_text == done.output_text


def test_responses_function_tools_and_outputs(client):
    r = client.responses.create(model="m", input="What is the weather in Paris?", tools=FLAT_TOOLS,
                                tool_choice="required", parallel_tool_calls=False, temperature=1, extra_body={"seed": 4},
                                max_output_tokens=150)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1
    jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
    streamed = {}
    for ev in client.responses.create(model="m", input="What is the weather in Paris?", tools=FLAT_TOOLS,
                                      tool_choice={"type": "function", "name": "get_time"}, temperature=1, extra_body={"seed": 4},
                                      max_output_tokens=150, stream=True):
        if ev.type == "response.function_call_arguments.delta":
            streamed[ev.item_id] = streamed.get(ev.item_id, "") + ev.delta
        if ev.type == "response.output_item.done" and ev.item.type == "function_call":
            assert streamed[ev.item.id] == ev.item.arguments and ev.item.name == "get_time"
            jsonschema.validate(json.loads(ev.item.arguments), TIME)
    follow = client.responses.create(model="m", previous_response_id=r.id, tools=FLAT_TOOLS, temperature=0,
                                     max_output_tokens=10, tool_choice="none",
                                     input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                             "output": '{"temperature": 21}'}])
    assert follow.output[0].type == "message"


def test_responses_structured_output(client):
    r = client.responses.create(model="m", input="A person?", temperature=1, extra_body={"seed": 9}, max_output_tokens=200,
                                text={"format": {"type": "json_schema", "name": "person", "schema": PERSON,
                                                 "strict": True}})
    jsonschema.validate(json.loads(r.output_text), PERSON)


def test_docs_pages_load_nothing_from_the_network(default_server):
    """/docs and /redoc reference only assets the server itself serves (it works offline)."""
    import re

    import httpx

    for page in ("/docs", "/redoc"):
        html = httpx.get(default_server.url + page, timeout=30).text
        urls = re.findall(r'(?:src|href)="([^"]+)"|url: *[\'"]([^\'"]+)', html)
        urls = [a or b for a, b in urls]
        assert urls and not [u for u in urls if u.startswith(("http:", "https:", "//"))], (page, urls)
        for u in urls:
            r = httpx.get(default_server.url + u, timeout=30)
            assert r.status_code == 200 and len(r.content) > 0, u
        assert "cdn" not in html.lower()


@pytest.mark.parametrize("text, content, calls", [
    ("plain answer", "plain answer", []),
    ("<tool", "<tool", []),  # a prefix of the opening tag that never became one is text
    ('<tool_call>\n{"name": "f", "arguments": {"a":"}{\\"x","b":[1,{"c":2}]}}\n</tool_call>', None,
     [("f", '{"a":"}{\\"x","b":[1,{"c":2}]}')]),
    ('<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n<tool_call>\n{"name": "g_2", "arguments": '
     '{"z":null}}\n</tool_call>', None, [("f", "{}"), ("g_2", '{"z":null}')]),
])
def test_tool_call_parser_is_incremental(text, content, calls):
    """Fed one character at a time or all at once, the parser finds the same content and calls."""
    from modelql.server.tools import ToolCallParser, parse_answer

    got_content, got_calls = parse_answer(text, True)
    assert got_content == content and [(c.name, c.arguments) for c in got_calls] == calls
    p = ToolCallParser()
    events = [ev for ch in text for ev in p.feed(ch)] + p.finish()
    args: dict[int, str] = {}
    for ev in events:
        if ev[0] == "arguments":
            args[ev[1]] = args.get(ev[1], "") + ev[2]
    assert [(c.name, args.get(i, "")) for i, c in enumerate(p.calls)] == calls
    assert "".join(ev[1] for ev in events if ev[0] == "content") == (content or "")
