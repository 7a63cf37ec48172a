"""The clients agents are built with — langchain-openai and litellm — against the served embedded
model: tool calls parse into each client's own types with arguments valid for the declared schema,
an agent loop runs two tool calls and then answers, structured output returns validated objects."""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
from pydantic import BaseModel, Field

from tests.server.test_tools import SCHEMAS, TIME, TOOLS

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm must not fetch its price list


class Person(BaseModel):
    """A person."""

    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)


@pytest.fixture(scope="module")
def llm(default_server):
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(base_url=default_server.url + "/v1", api_key="unused", model="m", temperature=1,
                      max_tokens=150, max_retries=0, timeout=120, seed=7)


def test_langchain_bind_tools(llm):
    from langchain_core.messages import HumanMessage

    msg = llm.bind_tools(TOOLS, tool_choice="required", parallel_tool_calls=False).invoke(
        [HumanMessage("What is the weather in Paris?")])
    assert len(msg.tool_calls) == 1 and msg.tool_calls[0]["id"].startswith("call_")
    call = msg.tool_calls[0]
    jsonschema.validate(call["args"], SCHEMAS[call["name"]])


def test_langchain_streamed_tool_call_equals_the_invoked_one(llm):
    """`.stream()` of a tool-bound model: the chunks add up (langchain's own merge of the deltas) to
    the call `.invoke()` returns for the same seed."""
    from langchain_core.messages import HumanMessage

    bound = llm.bind_tools(TOOLS, tool_choice="required", parallel_tool_calls=False)
    ask = [HumanMessage("What is the weather in Paris?")]
    whole = bound.invoke(ask)
    chunks = list(bound.stream(ask))
    assert len(chunks) > 2
    merged = chunks[0]
    for c in chunks[1:]:
        merged = merged + c
    assert [(c["name"], c["args"]) for c in merged.tool_calls] == [(c["name"], c["args"]) for c in whole.tool_calls]
    assert len(merged.tool_calls) == 1 and merged.tool_calls[0]["id"] == merged.tool_call_chunks[0]["id"]
    jsonschema.validate(merged.tool_calls[0]["args"], SCHEMAS[merged.tool_calls[0]["name"]])


def test_langchain_agent_loop_of_two_tool_calls(llm):
    """The loop an agent runs: call → execute → feed the result back → call again → answer."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    ran = []

    @tool
    def get_weather(city: str, unit: str) -> str:
        """Current weather of a city."""
        ran.append(("get_weather", {"city": city, "unit": unit}))
        return json.dumps({"temperature": 21, "unit": unit})

    @tool
    def get_time(hours: int) -> str:
        """The time."""
        ran.append(("get_time", {"hours": hours}))
        return "noon"

    tools = {"get_weather": get_weather, "get_time": get_time}
    schemas = [TOOLS[0], TOOLS[1]]  # the same tools with the bounded schemas the small model needs
    messages = [HumanMessage("What is the weather in Paris, and what time is it?")]
    for name in ("get_weather", "get_time"):
        ai = llm.bind_tools(schemas, tool_choice=name).invoke(messages)
        messages.append(ai)
        for call in ai.tool_calls:
            jsonschema.validate(call["args"], SCHEMAS[call["name"]])
            messages.append(ToolMessage(tools[call["name"]].invoke(call["args"]), tool_call_id=call["id"]))
    final = llm.bind_tools(schemas, tool_choice="none").invoke(messages)
    assert [name for name, _ in ran] == ["get_weather", "get_time"]
    assert not final.tool_calls and isinstance(final.content, str)


@pytest.mark.parametrize("method", ["function_calling", "json_schema"])
def test_langchain_with_structured_output(llm, method):
    out = llm.with_structured_output(Person, method=method).invoke("Describe a person.")
    assert isinstance(out, Person)
    jsonschema.validate(out.model_dump(), Person.model_json_schema())


def test_litellm_tool_call_and_json_schema(default_server):
    import litellm

    kw = dict(model="openai/m", api_base=default_server.url + "/v1", api_key="unused", temperature=1, seed=3,
              max_tokens=150)
    r = litellm.completion(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                           tool_choice="required", parallel_tool_calls=False, **kw)
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and len(calls) == 1
    jsonschema.validate(json.loads(calls[0].function.arguments), SCHEMAS[calls[0].function.name])
    r = litellm.completion(messages=[{"role": "user", "content": "What time?"}], **kw, response_format={
        "type": "json_schema", "json_schema": {"name": "t", "schema": TIME, "strict": True}})
    jsonschema.validate(json.loads(r.choices[0].message.content), TIME)
