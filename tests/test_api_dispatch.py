"""The HTTP API's dispatch (router/api.py ``_App``): a valid generation request goes to its handler without
FastAPI's routing and middleware; anything else (a body that does not validate, or is not JSON, and every other
route) goes through FastAPI, so that its errors keep their form; the API key and the body limit apply to both.

A real Router with no worker behind it: a valid request then ends in the handler's own error (its prompt is longer
than the context of the workers there are: none)."""

from __future__ import annotations

import asyncio
import json

import fastapi
import httpx
import pytest

from tokenworks.model.weights import load_tokenizer_files
from tokenworks.router.api import MAX_BODY_BYTES, create_app
from tokenworks.router.router import Router
from tokenworks.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    f = load_tokenizer_files(None)
    return Tokenizer(f.tokenizer_json, f.chat_template, f.bos_token, f.eos_token, f.add_bos_token)


def call(tokenizer, monkeypatch, requests, api_key=None):
    """Each (path, body, headers) POSTed to a fresh app; the responses, and which went through FastAPI."""
    through = []
    inner = fastapi.FastAPI.__call__

    async def counted(self, scope, receive, send):
        if scope["type"] == "http":
            through.append(scope["path"])
        await inner(self, scope, receive, send)

    monkeypatch.setattr(fastapi.FastAPI, "__call__", counted)

    async def main():
        router = Router(block_size=16, local_prefill_threshold=16, tokenizer=tokenizer)
        app = create_app(router, tokenizer, "m", api_key=api_key)
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                return [await client.post(path, content=body, headers=headers or {}) for path, body, headers in
                        requests]
        finally:
            router.close()

    return asyncio.run(main()), through


JSON = {"content-type": "application/json"}
COMPLETION = json.dumps({"prompt": "hello", "max_tokens": 4}).encode()
CHAT = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}).encode()


def test_valid_requests_reach_their_handler_without_fastapi(tokenizer, monkeypatch):
    (completion, chat, bad_model), through = call(tokenizer, monkeypatch, [
        ("/v1/completions", COMPLETION, JSON), ("/v1/chat/completions", CHAT, None),  # no content type: JSON
        ("/v1/completions", json.dumps({"model": "gpt-17", "prompt": "x"}).encode(), JSON)])
    assert through == []
    for r in (completion, chat):  # the handler ran: tokenized, then checked the length against no worker's context
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text
    assert bad_model.status_code == 404 and "gpt-17" in bad_model.json()["error"]["message"]  # the handler's check


def test_invalid_bodies_go_through_fastapi_and_keep_its_errors(tokenizer, monkeypatch):
    (not_json, bad_field, missing, form, get), through = call(tokenizer, monkeypatch, [
        ("/v1/completions", b"{not json", JSON),
        ("/v1/completions", json.dumps({"prompt": "x", "temperature": "hot"}).encode(), JSON),
        ("/v1/chat/completions", b"", JSON),
        ("/v1/completions", COMPLETION, {"content-type": "text/plain"}),
        ("/v1/models", b"", None)])
    assert not_json.status_code == 400 and not_json.json()["error"] == {
        "message": "request body is not valid JSON: Expecting property name enclosed in double quotes (at character 1)",
        "type": "invalid_request_error", "param": None, "code": None}
    assert bad_field.status_code == 400 and bad_field.json()["error"]["param"] == "temperature"
    assert missing.status_code == 400 and missing.json()["error"]["type"] == "invalid_request_error"
    assert form.status_code == 400  # FastAPI does not read a text/plain body as JSON
    assert get.status_code == 405  # POST on a GET route: FastAPI's routing
    assert through == ["/v1/completions", "/v1/completions", "/v1/chat/completions", "/v1/completions", "/v1/models"]


def test_the_api_key_and_the_body_limit_stand_in_front_of_the_handlers(tokenizer, monkeypatch):
    big = json.dumps({"prompt": "x" * (MAX_BODY_BYTES + 10)}).encode()
    (no_key, good_key, oversized), through = call(tokenizer, monkeypatch, [
        ("/v1/completions", COMPLETION, JSON),
        ("/v1/completions", COMPLETION, {**JSON, "authorization": "Bearer k"}),
        ("/v1/completions", big, {**JSON, "authorization": "Bearer k"})], api_key="k")
    assert no_key.status_code == 401 and no_key.json()["error"]["code"] == "invalid_api_key"
    assert good_key.json()["error"]["code"] == "context_length_exceeded"  # past the gate, to the handler
    assert oversized.status_code == 413
    assert through == []


def test_a_handler_that_fails_unexpectedly_gives_a_500_in_the_openai_form(tokenizer, monkeypatch):
    def broken(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(tokenizer, "encode", broken)
    (r,), through = call(tokenizer, monkeypatch, [("/v1/completions", COMPLETION, JSON)])
    assert r.status_code == 500 and r.json()["error"] == {"message": "internal error: RuntimeError",
                                                          "type": "server_error", "param": None, "code": None}
    assert through == []


LONE = b'"a\\udcff"'  # JSON's escape of a lone surrogate, which Python's reader lets through as a character


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", b'{"prompt": ' + LONE + b'}', "prompt"),
    ("/v1/completions", b'{"prompt": "x", "stop": ["y", ' + LONE + b']}', "stop.1"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + LONE + b'}]}', "messages.0.content"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {' + LONE + b': 1}}',
     "logit_bias"),
    ("/tokenize", b'{"prompt": ' + LONE + b'}', "prompt"),
    ("/v1/responses", b'{"input": [{"role": "user", "content": [{"type": "input_text", "text": ' + LONE + b'}]}]}',
     "input.0.content.0.text"),
])
def test_a_lone_surrogate_is_refused_naming_where_before_any_handler(tokenizer, monkeypatch, path, body, param):
    (r,), through = call(tokenizer, monkeypatch, [(path, body, JSON)])
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and "lone UTF-16 surrogate" in r.json()["error"]["message"]
    assert through == []


def test_paired_surrogates_and_escaped_backslashes_pass(tokenizer, monkeypatch):
    (pair, backslash), _ = call(tokenizer, monkeypatch, [
        ("/v1/completions", b'{"prompt": "smile \\ud83d\\ude00", "max_tokens": 4}', JSON),
        ("/v1/completions", b'{"prompt": "a \\\\udcff", "max_tokens": 4}', JSON)])  # a backslash, then "udcff"
    for r in (pair, backslash):  # on to the handler, which finds no worker to serve it
        assert r.json()["error"]["code"] == "context_length_exceeded", r.text


@pytest.mark.parametrize("body, headers, message, param", [
    (b'{"prompt": "x", "temperature": NaN}', JSON, "temperature: Input should be a finite number", "temperature"),
    (b'{"prompt": "x", "logit_bias": {"5": Infinity}}', JSON, "logit_bias.5: Input should be a finite number",
     "logit_bias.5"),
    (b'[1, 2]', JSON, "request body must be a JSON object (content-type: application/json)", None),
    (b'{"prompt": "\xff\xfe"}', JSON, "request body could not be read as JSON: it is not UTF-8, or is nested too "
     "deeply", None),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}', JSON,
     "messages.0.content: Value error, content parts of type 'image_url' are not served here, only text",
     "messages.0.content"),
])
def test_bad_bodies_get_a_message_that_names_the_problem(tokenizer, monkeypatch, body, headers, message, param):
    path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
    (r,), _ = call(tokenizer, monkeypatch, [(path, body, headers)])
    assert r.status_code == 400 and r.json()["error"]["message"] == message, r.text
    assert r.json()["error"]["param"] == param


def test_an_unknown_path_names_the_api_there_is_and_top_logprobs_asks_for_logprobs(tokenizer, monkeypatch):
    (embeddings, lone_top), _ = call(tokenizer, monkeypatch, [
        ("/v1/embeddings", b'{"input": "hi"}', JSON),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', JSON)])
    assert embeddings.status_code == 404
    assert embeddings.json()["error"]["message"].startswith("/v1/embeddings is not served here; the OpenAI API here "
                                                             "is /v1/chat/completions, /v1/completions")
    assert lone_top.status_code == 400 and lone_top.json()["error"]["param"] == "top_logprobs"
    assert "top_logprobs needs logprobs set to true" in lone_top.json()["error"]["message"]
