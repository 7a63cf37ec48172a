"""The official `openai` client against a live server: the reference for the OpenAI group."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from modelql.runtime.generate import eos_token_ids


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def no_eos(tiny_model):
    return {str(i): -100 for i in eos_token_ids(tiny_model)}


def test_models(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.app.state.modelql.model_id]
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat_non_stream_exact_usage(client, tiny_model, no_eos):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=7, temperature=0, logit_bias=no_eos)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    prompt = tiny_model.tokenizer.encode_chat([{"role": "user", "content": "Hello"}])
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 7 and r.usage.total_tokens == len(prompt) + 7


def test_chat_stream(client, no_eos):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=12, temperature=0, logit_bias=no_eos, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    full = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=12, temperature=0, logit_bias=no_eos)
    assert text == full.choices[0].message.content


def test_completions_and_logprobs(client, no_eos):
    r = client.completions.create(model="tiny", prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logit_bias=no_eos, logprobs=2, echo=True)
    c = r.choices[0]
    assert c.text.startswith("The capital of France is") and c.finish_reason == "length"
    assert c.logprobs.token_logprobs[0] is None
    assert len(c.logprobs.tokens) == r.usage.prompt_tokens + 5
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs[1:])


def test_chat_logprobs_are_of_the_model_distribution(client, no_eos):
    r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=4, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert content and all(len(e.top_logprobs) == 3 for e in content)
    for e in content:  # greedy: the chosen token is the most likely one
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob, abs=1e-5)


def test_seed_is_deterministic(client, no_eos):
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Tell me"}], max_tokens=10, temperature=1.0,
              seed=1234, logit_bias=no_eos)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b


def test_embeddings(client, tiny_model):
    r = client.embeddings.create(model="tiny", input=["hello world", "Paris"])
    assert [d.index for d in r.data] == [0, 1]
    assert all(len(d.embedding) == tiny_model.spec.hidden_size for d in r.data)
    assert sum(x * x for x in r.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    b64 = client.embeddings.create(model="tiny", input="Paris", encoding_format="base64")
    values = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
    assert values.tolist() == pytest.approx(r.data[1].embedding, abs=1e-6)


def test_error_types(client, server, make_server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], n=2)
    assert e.value.body["param"] == "n" and e.value.body["code"] == "invalid_value"
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"
    with make_server(api_key="sekrit", rate_limit="2/min") as srv:
        bad = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as e:
            bad.models.list()
        assert e.value.body["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="sekrit", max_retries=0)
        with pytest.raises(openai.RateLimitError) as e:
            good.models.list()  # the bucket of 2 was drained by the two calls above... or this one
            good.models.list()
        assert e.value.body["type"] == "rate_limit_error"
