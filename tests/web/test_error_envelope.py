"""Every route of the app `modelql serve` builds (OpenAI, Responses, knowledge, editing, web, operations),
enumerated from its router rather than listed by hand: each error it answers — wrong method (405),
malformed JSON body or missing parameter (400), unknown path (404), missing key (401) — parses in the
official openai client as an OpenAI error (the envelope `{"error": {"message","type","param","code"}}`)."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import KEY


def routes(app) -> list[tuple[str, set[str]]]:
    """(path with its parameters filled, methods) of every HTTP route in the app's OpenAPI document."""
    import re

    doc = app.openapi()
    return [(re.sub(r"\{[^}]+\}", "x", path), {m.upper() for m in ops if m in ("get", "post", "delete", "put")})
            for path, ops in doc["paths"].items()]


def expect_openai_error(call, status: int | None = None):
    with pytest.raises(openai.APIStatusError) as e:
        call()
    err = e.value
    assert err.status_code >= 400 and (status is None or err.status_code == status), (err.status_code, err.body)
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}, err.body
    assert err.body["message"] and err.message == f"Error code: {err.status_code} - {err.body['message']}"
    return err


def test_every_route_error_parses_in_the_openai_client(web_srv):
    client = openai.OpenAI(base_url=web_srv.url, api_key=KEY, max_retries=0, timeout=120)
    checked = 0
    for path, methods in routes(web_srv.app):
        wrong = "DELETE" if "DELETE" not in methods and "POST" not in methods else "PUT"
        if path in ("/", "/docs", "/redoc", "/docs/oauth2-redirect") or path.startswith("/ui/"):
            continue  # pages for browsers (HTML), not API routes
        expect_openai_error(lambda: client.request(httpx.Response, openai._models.FinalRequestOptions.construct(
            method=wrong.lower(), url=path)), 405)
        checked += 1
        # walk-ffn takes a binary frame or JSON: 400 below; the expert routes answer a dense model 404
        # before reading the body, as LARQL does (tests/server/test_larql_examples.py)
        if "POST" in methods and path != "/v1/walk-ffn" and not path.startswith(("/v1/expert/", "/v1/experts/")):
            expect_openai_error(lambda: client.post(path, cast_to=httpx.Response, body="{not json",
                                                    options={"headers": {"Content-Type": "application/json"}}), 400)
    assert checked >= 30, checked
    expect_openai_error(lambda: client.get("/v1/no/such/route", cast_to=httpx.Response), 404)
    expect_openai_error(lambda: client.get("/v1/describe", cast_to=httpx.Response), 400)  # entity missing
    expect_openai_error(lambda: client.post("/v1/walk-ffn", cast_to=httpx.Response, body={}), 400)
    expect_openai_error(lambda: client.delete("/v1/patches/none.vlp", cast_to=httpx.Response), 404)
    keyless = openai.OpenAI(base_url=web_srv.url, api_key="wrong", max_retries=0, timeout=60)
    err = expect_openai_error(lambda: keyless.models.list(), 401)
    assert isinstance(err, openai.AuthenticationError)
