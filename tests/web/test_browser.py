"""The web UI in real headless Chromium (Debian's `chromium`, driven by playwright; no browser
download): key, streamed chat, a token's explanation, DESCRIBE, TRACE heat map, a patch applied
and removed — with every request outside the server refused and counted. Screenshots go to
$MODELQL_ARTIFACTS/web (default: test-artifacts/web)."""

from __future__ import annotations

import pytest

from .conftest import CHROMIUM, KEY, NO_CHROMIUM, PATCH

pytestmark = [pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM), pytest.mark.timeout(300)]


def test_web_ui_end_to_end(browser, web_srv, artifacts):
    outside: list[str] = []

    def guard(route):
        if route.request.url.startswith(web_srv.url):
            route.continue_()
        else:  # the network is "disabled": nothing may leave the server's origin
            outside.append(route.request.url)
            route.abort()

    page = browser.new_page()
    page.route("**/*", guard)
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))

    page.goto(web_srv.url + "/")
    page.wait_for_selector("#key-panel:not([hidden])")
    page.screenshot(path=str(artifacts / "01-key.png"))
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    page.wait_for_selector("body[data-ready='1']")

    # chat: streamed answer
    page.fill("#chat-input", "What is the capital of France?")
    page.click("#chat-send")
    page.wait_for_selector(".msg.assistant[data-done='1']")
    answer = page.inner_text(".msg.assistant .body")
    assert "Paris" in answer
    assert page.locator(".msg.assistant .tok").count() > 1  # arrived as several streamed tokens
    page.screenshot(path=str(artifacts / "02-chat.png"))

    # the explanation of " Paris"
    page.locator(".msg.assistant .tok", has_text="Paris").first.click()
    page.wait_for_selector("#explain-features")
    title = page.inner_text("#explain-title")
    assert "Paris" in title
    assert page.locator("#explain-features tr").count() > 1
    assert page.locator("#explain-writers tr").count() > 1
    assert page.locator("#side svg.bars rect.bar").count() > 0
    page.screenshot(path=str(artifacts / "03-explain-paris.png"))

    # a feature page from the explanation
    page.locator("#explain-features .feature-link").first.click()
    page.wait_for_selector("#feature-title")
    assert page.locator("#side svg.histogram rect").count() > 0
    page.screenshot(path=str(artifacts / "04-feature.png"))
    page.click("#side-close")

    # DESCRIBE "France": Paris under capital
    page.click("#tabs button[data-tab='browse']")
    page.fill("#entity-input", "France")
    page.click("#describe-form button")
    page.wait_for_selector(".relation[data-relation='capital']")
    assert "Paris" in page.inner_text(".relation[data-relation='capital']")
    page.screenshot(path=str(artifacts / "05-describe-france.png"), full_page=True)

    # TRACE heat map
    page.click("#tabs button[data-tab='trace']")
    page.fill("#trace-prompt", "The capital of France is")
    page.click("#trace-form button")
    page.wait_for_selector("#trace-heatmap svg")
    assert page.locator("#trace-heatmap g.cell").count() > 10
    assert page.locator("#trace-bars rect.bar").count() > 0
    page.screenshot(path=str(artifacts / "06-trace.png"), full_page=True)

    # patches: apply from the server's directory, then remove
    page.click("#tabs button[data-tab='patches']")
    page.wait_for_selector(f"#patch-file-list tr[data-file='{PATCH}']")
    page.click(f"#patch-file-list tr[data-file='{PATCH}'] button")
    page.wait_for_selector(f"#active-patches tr[data-patch='{PATCH}']")
    page.screenshot(path=str(artifacts / "07-patch-applied.png"))
    page.click(f"#active-patches tr[data-patch='{PATCH}'] button")
    page.wait_for_selector(f"#active-patches tr[data-patch='{PATCH}']", state="detached")
    assert "no patches applied" in page.inner_text("#patch-active")
    page.screenshot(path=str(artifacts / "08-patch-removed.png"))

    # INSERT a fact, INFER before / after, then discard the unsaved edit
    page.fill("#insert-entity", "Atlantis")
    page.fill("#insert-relation", "capital")
    page.fill("#insert-target", "Zorbu")
    page.click("#insert-form button")
    page.wait_for_selector("#insert-compare")
    before, after = page.locator("#insert-compare table").all_inner_texts()
    assert "Zorbu" not in before and "Zorbu" in after
    page.screenshot(path=str(artifacts / "08b-insert.png"))
    page.wait_for_selector("#active-patches tr[data-patch='(unsaved edits)']")
    page.click("#active-patches tr[data-patch='(unsaved edits)'] button")
    page.wait_for_selector("#active-patches", state="detached")

    # LQL console: completion, then a statement
    page.click("#tabs button[data-tab='lql']")
    page.fill("#lql-input", 'DESCRIBE "Fran')
    page.press("#lql-input", "Tab")
    page.wait_for_selector("#lql-completions li")
    page.locator("#lql-completions li", has_text="France").first.dispatch_event("mousedown")
    assert page.input_value("#lql-input") == 'DESCRIBE "France"'
    page.click("#lql-run")
    page.locator("#lql-out", has_text="Paris").wait_for()
    page.screenshot(path=str(artifacts / "09-lql.png"))

    assert outside == [], f"requests left the server's origin: {outside}"
    assert errors == [], errors
    page.close()
