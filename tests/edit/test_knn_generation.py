"""KNN facts reach generation (runtime, server chat), keyed on the entity: a fact fires where the
prompt names its entity and asks its relation, emits the whole target once, and never fires on
another entity's prompt. The embedded model through a patch session, the real model through the
same matcher on its own residuals."""

from __future__ import annotations

import copy

import pytest

from modelql.knowledge import edit
from modelql.runtime.generate import generate, generate_batch
from modelql.runtime.sampling import SamplingParams
from modelql.vindex.format import KnnEntry
from modelql.vindex.knn_match import KnnRecall
from modelql.vindex.overlay import PatchSession

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture
def knn_session(kvindex, kmodel):
    ps = PatchSession(kvindex, model=kmodel)
    edit.insert(ps, "Atlantis", "capital", "Zorbu", mode="knn")
    return ps


def test_knn_fact_is_generated_for_its_entity_only(knn_session, kmodel):
    m = knn_session.model()
    base_france = generate(kmodel, "The capital of France is", GREEDY).text
    got = generate_batch(m, ["The capital of Atlantis is", "The capital of France is", "Once upon a time"],
                         GREEDY)
    assert got[0].text.strip().startswith("Zorbu")
    assert got[1].text == base_france  # another entity's prompt: the fact does not fire
    assert got[2].text == generate(kmodel, "Once upon a time", GREEDY).text
    assert generate(m, "The capital of Atlantis is", GREEDY).text == got[0].text


def test_knn_fact_fires_once_and_deletion_removes_it(knn_session, kmodel):
    m = knn_session.model()
    out = generate(m, "The capital of Atlantis is", SamplingParams(temperature=0.0, max_tokens=24)).text
    assert out.count("Zorbu") == 1
    edit.delete(knn_session, [("entity", "=", "Atlantis")])
    assert "Zorbu" not in generate(m, "The capital of Atlantis is", GREEDY).text


def test_knn_fact_reaches_the_served_chat(kvindex, kmodel):
    from openai import OpenAI

    from modelql.server.config import ServerConfig
    from modelql.server.knowledge_routes import VindexSource
    from modelql.server.serve import background

    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0)
    with background(None, cfg, model=kmodel, vindex_source=VindexSource.ready(kvindex)) as srv:
        import httpx

        r = httpx.post(f"{srv.url}/v1/insert", json={"entity": "Atlantis", "relation": "capital",
                                                       "target": "Zorbu", "mode": "knn"}, timeout=60)
        assert r.status_code == 200, r.text
        client = OpenAI(base_url=f"{srv.url}/v1", api_key="x")
        model = client.models.list().data[0].id
        got = client.completions.create(model=model, prompt="The capital of Atlantis is", max_tokens=4,
                                        temperature=0)
        assert got.choices[0].text.strip().startswith("Zorbu")
        other = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4,
                                          temperature=0)
        assert "Zorbu" not in other.choices[0].text


def test_knn_fact_on_the_real_model_is_keyed_on_the_entity(real_model):
    m = copy.copy(real_model)
    layer = m.spec.num_layers // 2
    key = edit.capture(m, "The capital of Atlantis is", [layer])[layer]
    entry = KnnEntry(layer=layer, key=key.numpy(), target_id=0, target_token="Zorbu", entity="Atlantis",
                     relation="capital")
    m.recall = KnnRecall(lambda: [entry], m.tokenizer)
    assert generate(m, "The capital of Atlantis is", GREEDY).text.strip().startswith("Zorbu")
    for other in ("The capital of Germany is", "My favourite food is"):  # one at a time: batching moves the last bits
        assert generate(m, other, GREEDY).text == generate(real_model, other, GREEDY).text
