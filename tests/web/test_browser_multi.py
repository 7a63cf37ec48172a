"""The web UI of a multi-model server (`modelql serve A B`) in headless Chromium: the page offers the
served models, and chat, DESCRIBE, TRACE, patches and the LQL console work against the one picked.
Two models: the embedded one (it knows France → Paris) and a tiny random Llama (it knows nothing).
References: each model's own answer through the official openai client (`model` = its id), and
DESCRIBE through the model's `/v1/{id}/describe/rows`. Screenshots: $MODELQL_ARTIFACTS/web/multi-*."""

from __future__ import annotations

import openai
import pytest

from .conftest import CHROMIUM, KEY, NO_CHROMIUM, network_guard

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM), pytest.mark.timeout(300)]

QUESTION = "What is the capital of France?"
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def multi_srv(kmodel_dir, kvindex, tmp_path_factory):
    from modelql.server.config import ServerConfig
    from modelql.server.multi import build_multi
    from modelql.server.serve import BackgroundServer
    from modelql.vindex import extract
    from tests.runtime.tiny_tokenizer import make_model_with_tokenizer

    root = tmp_path_factory.mktemp("web-multi")
    make_model_with_tokenizer(root / "src", "chatml", max_position=256, seed=3)
    extract(root / "src", root / "tiny.vindex", level="inference", dtype="f32", clusters=False)
    cfg = ServerConfig(host="127.0.0.1", port=0, graceful_timeout=2.0, api_key=KEY)
    app, hosted = build_multi([kmodel_dir, root / "tiny.vindex"], cfg)
    for h in hosted:
        assert h.app.state.knowledge.wait(600)
    srv = BackgroundServer(app, cfg)
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()
        for h in hosted:
            h.engine.stop()


def reference_answer(srv, model: str) -> str:
    with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120) as c:
        r = c.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTION}],
                                      temperature=0, max_tokens=MAX_TOKENS)
    return r.choices[0].message.content


def test_pick_a_model_and_work_against_it(browser, multi_srv, artifacts):
    import httpx

    page = browser.new_page()
    outside = network_guard(page, multi_srv.url)
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.url[len(multi_srv.url):]))

    page.goto(multi_srv.url + "/")
    page.wait_for_selector("#key-panel:not([hidden])")
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    page.wait_for_selector("body[data-ready='1']")
    assert page.is_visible("#model-select")
    assert page.locator("#model-select option").all_inner_texts() == ["modelql-default", "tiny"]

    def chat() -> str:
        page.fill("#chat-max", str(MAX_TOKENS))
        page.fill("#chat-input", QUESTION)
        page.click("#chat-send")
        page.wait_for_selector(".msg.assistant[data-done='1']")
        return page.inner_text(".msg.assistant .body")

    def describe(entity: str) -> str:
        page.click("#tabs button[data-tab='browse']")
        page.fill("#entity-input", entity)
        page.click("#describe-form button")
        page.locator("#browse-out h2", has_text=entity).wait_for()
        return page.inner_text("#browse-out h2")

    h = {"Authorization": f"Bearer {KEY}"}
    for model in ("modelql-default", "tiny"):
        page.click("#tabs button[data-tab='chat']")
        page.select_option("#model-select", model)
        page.wait_for_selector(f"body[data-model='{model}']")
        assert page.locator(".msg").count() == 0  # another model: another conversation
        answer = chat()
        assert answer.strip() == reference_answer(multi_srv, model).strip()
        page.screenshot(path=str(artifacts / f"multi-01-chat-{model}.png"))

        title = describe("France")
        ref = httpx.get(f"{multi_srv.url}/v1/{model}/describe/rows", headers=h, timeout=60,
                        params={"entity": "France"}).json()
        assert title.startswith(f"France — {len(ref['edges'])} edges")
        capital = page.locator(".relation[data-relation='capital']")
        if model == "modelql-default":
            assert "Paris" in capital.inner_text()
        else:  # a random model has no labelled relations
            assert capital.count() == 0
        page.screenshot(path=str(artifacts / f"multi-02-describe-{model}.png"), full_page=True)

        page.click("#tabs button[data-tab='trace']")
        page.fill("#trace-prompt", "The capital of France is")
        page.click("#trace-form button")
        page.wait_for_selector("#trace-heatmap svg")
        assert page.locator("#trace-heatmap g.cell").count() > 10

        page.click("#tabs button[data-tab='patches']")
        page.locator("#patch-files", has_text="patch directory").wait_for()  # no --patch-dir: said so in the UI
        assert "no patches applied" in page.inner_text("#patch-active")

        page.click("#tabs button[data-tab='lql']")
        page.fill("#lql-input", "STATS")
        page.click("#lql-run")
        page.locator("#lql-out", has_text="lql> STATS").wait_for()
        assert "Error" not in page.inner_text("#lql-out")
        page.screenshot(path=str(artifacts / f"multi-03-lql-{model}.png"))

    # every knowledge call went under the picked model's id; the OpenAI routes stayed shared
    knowledge = [c for c in calls if c.startswith("/v1/") and not c.startswith(("/v1/chat/", "/v1/models"))]
    assert knowledge and all(c.startswith(("/v1/modelql-default/", "/v1/tiny/")) for c in knowledge), knowledge
    assert any(c.startswith("/v1/tiny/trace") for c in knowledge)
    assert outside == [], f"requests left the server's origin: {outside}"
    assert errors == [], errors
    page.close()
