"""The chat API's opt-in `modelql.explain` field, through the official openai client (extra_body)."""

from __future__ import annotations

import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture()
def oai(ksrv):
    with openai.OpenAI(base_url=ksrv.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def test_explain_field_adds_per_token_attributions(oai, kmodel, kvindex):
    from modelql.knowledge.explain import VindexFeatures, attribute

    r = oai.chat.completions.create(model="modelql-default", messages=MESSAGES, max_tokens=6, temperature=0,
                                    extra_body={"modelql": {"explain": {"top": 3}}})
    choice = r.choices[0]
    assert isinstance(choice.message.content, str) and choice.finish_reason in ("stop", "length")
    ex = choice.model_extra["modelql"]["explain"]
    tokens = ex["tokens"]
    assert len(tokens) == r.usage.completion_tokens - (choice.finish_reason == "stop")
    assert "".join(t["token"] for t in tokens) == choice.message.content
    # the same attribution, recomputed with the Python API on the same prompt and token ids
    prompt = kmodel.tokenizer.encode_chat(MESSAGES)
    want = attribute(kmodel, prompt, [t["token_id"] for t in tokens], VindexFeatures(kvindex), top=3)
    assert [[(f["layer"], f["feature"], f["top_token"], f["relation"]) for f in t["features"]] for t in tokens] == \
        [[(f.layer, f.feature, f.top_token, f.relation) for f in t.features] for t in want]
    assert all(len(t["features"]) == 3 for t in tokens)


def test_explain_true_and_absent(oai):
    r = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, temperature=0,
                                    extra_body={"modelql": {"explain": True}})
    assert all(len(t["features"]) == 5 for t in r.choices[0].model_extra["modelql"]["explain"]["tokens"])
    plain = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, temperature=0)
    assert "modelql" not in (plain.choices[0].model_extra or {})
    off = oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, temperature=0,
                                      extra_body={"modelql": {"explain": False}})
    assert "modelql" not in (off.choices[0].model_extra or {})


def test_explain_is_non_stream_only_and_validated(oai):
    with pytest.raises(openai.BadRequestError) as e:
        oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2, stream=True,
                                    extra_body={"modelql": {"explain": True}})
    assert e.value.status_code == 400 and "non-streaming" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(model="m", messages=MESSAGES, max_tokens=2,
                                    extra_body={"modelql": {"explain": {"top": 0}}})
