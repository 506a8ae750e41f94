"""End to end: the real `tokenworks serve` with the real default model, through the official openai client."""

import json
import re
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from tests.serving import Server
from tokenworks import SamplingParams

pytestmark = pytest.mark.slow

SHORT = [{"role": "user", "content": "What is the capital of France?"}]
LONG = [{"role": "user", "content": "Tell me about the history of ships and harbours. " * 25}]
THRESHOLD = 32


@pytest.fixture(scope="module", params=["nixl", "tcp"])
def server(request):
    s = Server("--prefill-workers", "1", "--decode-workers", "1", "--kv-transport", request.param,
               "--local-prefill-threshold", str(THRESHOLD))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(served_llm):
    def chat(messages, max_tokens):
        return served_llm.chat(messages, SamplingParams(temperature=0, max_tokens=max_tokens))[0].text

    return chat


def test_greedy_chat_matches_offline_for_local_and_remote_prefill(server, client, offline):
    remote_before = server.metric("tokenworks:prefills_total", 'where="remote"')
    bytes_before = server.metric("tokenworks:kv_transfer_bytes_total")
    for messages in (SHORT, LONG):
        r = client.chat.completions.create(model="default", messages=messages, max_tokens=24, temperature=0)
        assert r.choices[0].message.content == offline(messages, 24)
        assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert server.metric("tokenworks:prefills_total", 'where="remote"') >= remote_before + 1
    assert server.metric("tokenworks:kv_transfer_bytes_total") > bytes_before
    assert server.metric("tokenworks:kv_transfer_fallbacks_total") == 0
    server.wait_idle()


def test_a_stop_string_that_the_prefill_workers_first_token_completes(server, client):
    """The prefill worker's first token (a space, before the next number's digits) completes the stop string: the
    request ends there, streamed or not, with empty text, its KV neither held for a decode worker nor leaked."""
    remote_before = server.metric("tokenworks:prefills_total", 'where="remote"')
    after_before = server.metric("tokenworks:tokens_after_stop_total")
    for word, stream in (("Numbers", False), ("Values", True)):  # two prompts no cache holds: both prefill remotely
        prompt = f"{word}: " + ", ".join(str(i) for i in range(100, 140)) + ","
        kwargs = dict(model="default", prompt=prompt, max_tokens=8, temperature=0, stop=[" "])
        if stream:
            chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
            text, reasons = "".join(c.choices[0].text for c in chunks), [c.choices[0].finish_reason for c in chunks]
            assert text == "" and reasons[-1] == "stop"
        else:
            r = client.completions.create(**kwargs)
            assert (r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens) == ("", "stop", 1)
    assert server.metric("tokenworks:prefills_total", 'where="remote"') == remote_before + 2
    assert server.metric("tokenworks:tokens_after_stop_total") == after_before
    server.wait_idle()


def test_a_seeded_sample_is_the_offline_text_for_local_and_remote_prefill(server, client, served_llm):
    """Sampling at temperature 1 with a seed: the served text equals the offline engine's, whether one worker drew
    every token or the prefill worker drew the first and the decode worker the rest (the draws follow the seed and
    the token's position, not a generator that each worker would start again from the seed)."""
    # Prompts neither this server nor the offline engine has seen (the server's port in them): both compute them
    # whole. A prompt computed whole on one side and mostly from the prefix cache on the other may differ in its
    # logits' last bits (a product of many rows takes other arithmetic than one of a few on some CPUs).
    port = server.url.rsplit(":", 1)[1]
    short = [{"role": "user", "content": f"What is the capital of France? (ask {port})"}]
    unseen = [{"role": "user", "content": f"Tell me about the history of trains and stations, {port}. " * 25}]
    remote_before = server.metric("tokenworks:prefills_total", 'where="remote"')
    for messages in (short, unseen):
        r = client.chat.completions.create(model="default", messages=messages, max_tokens=24, temperature=1.0, seed=11)
        want = served_llm.chat(messages, SamplingParams(temperature=1.0, seed=11, max_tokens=24))[0]
        assert r.choices[0].message.content == want.text and r.usage.completion_tokens == len(want.token_ids)
    assert server.metric("tokenworks:prefills_total", 'where="remote"') >= remote_before + 1
    server.wait_idle()


def test_stream_matches_non_stream_and_reports_usage(server, client):
    kwargs = dict(model="default", messages=LONG[:1], max_tokens=16, temperature=0)
    count, tokens = (server.metric("tokenworks:request_prompt_tokens_count"),
                     server.metric("tokenworks:request_prompt_tokens_sum"))
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    usage = chunks[-1].usage
    assert usage is not None and 1 <= usage.completion_tokens <= 16 and usage.prompt_tokens > 100
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons in (["length"], ["stop"])
    # The gaps between streamed tokens, as /metrics reports them, are gaps (well under seconds), not clock readings.
    gaps, total = server.metric("tokenworks:inter_token_latency_seconds_count"), \
        server.metric("tokenworks:inter_token_latency_seconds_sum")
    assert gaps >= usage.completion_tokens - 1 and 0 < total / gaps < 5
    # Per request, the traffic's shape (as vLLM's request_* histograms): the two requests' prompts and lengths.
    assert server.metric("tokenworks:request_prompt_tokens_count") == count + 2
    assert server.metric("tokenworks:request_prompt_tokens_sum") == tokens + 2 * usage.prompt_tokens
    assert server.metric("tokenworks:request_generation_tokens_bucket", 'le="20.0"') >= 2
    tpot = server.metric("tokenworks:request_time_per_output_token_seconds_sum") / \
        server.metric("tokenworks:request_time_per_output_token_seconds_count")
    assert 0 < tpot < 1.0
    server.wait_idle()


def test_stop_seed_n_and_length(server, client):
    base = dict(model="default", messages=SHORT, temperature=0)
    free = client.chat.completions.create(**base, max_tokens=20).choices[0].message.content
    stop_word = free.split()[2]
    after_before = server.metric("tokenworks:tokens_after_stop_total")
    cut = client.chat.completions.create(**base, max_tokens=20, stop=[stop_word]).choices[0]
    assert stop_word not in cut.message.content and cut.finish_reason == "stop"
    assert free.startswith(cut.message.content)  # ends exactly where the stop string begins
    # Streamed, the stop string is found on the token lane (router/stream.py), past the first token.
    streamed = [c for c in client.chat.completions.create(**base, max_tokens=20, stop=[stop_word], stream=True)
                if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == cut.message.content
    assert [c.choices[0].finish_reason for c in streamed if c.choices[0].finish_reason] == ["stop"]
    server.wait_idle()  # the worker freed the stopped requests' KV
    # The worker ends a request at the token that completes its stop string (Engine.stop_tokenizer) and the router
    # cuts the text there: no token is computed after it, however late the router would have sent its abort.
    assert server.metric("tokenworks:tokens_after_stop_total") - after_before == 0
    length = client.chat.completions.create(**base, max_tokens=3).choices[0]
    assert length.finish_reason == "length"
    sampled = dict(model="default", messages=SHORT, temperature=1.0, max_tokens=12, seed=7)
    a = client.chat.completions.create(**sampled).choices[0].message.content
    b = client.chat.completions.create(**sampled).choices[0].message.content
    assert a == b
    many = client.chat.completions.create(**sampled, n=3)
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert many.choices[0].message.content == a  # choice 0 keeps the seed; the others get seed + i
    assert len({c.message.content for c in many.choices}) > 1
    server.wait_idle()


def test_cached_tokens_reported_after_a_repeated_prompt(server, client):
    messages = [{"role": "user", "content": "Name three rivers of Europe and say where each one flows. " * 4}]
    first = client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0)
    again = client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16 * (again.usage.prompt_tokens // 16 - 1)
    assert first.usage.prompt_tokens_details.cached_tokens <= again.usage.prompt_tokens_details.cached_tokens
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=2, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens_details.cached_tokens
    server.wait_idle()


def test_completions_and_logprobs(server, client):
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=5, temperature=0,
                                  logprobs=2)
    c = r.choices[0]
    assert len(c.logprobs.tokens) == r.usage.completion_tokens == 5
    assert all(len(t) == 2 for t in c.logprobs.top_logprobs)
    chat = client.chat.completions.create(model="default", messages=SHORT, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    entries = chat.choices[0].logprobs.content
    assert len(entries) == chat.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in entries)
    models = client.models.list()
    assert len(models.data) == 1


def test_what_the_server_does_not_do_is_refused_not_ignored(server, client):
    """Insertion and best_of would silently give other answers than asked: 400. (Tool calling: test_tools.py.)"""
    def refused(call, param):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_parameter"

    tool = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object", "properties": {}}}}
    chat = client.chat.completions.create
    refused(lambda: client.completions.create(model="default", prompt="def f(", suffix="return 1", max_tokens=2),
            "suffix")
    refused(lambda: client.completions.create(model="default", prompt="Hi", best_of=3, max_tokens=2), "best_of")
    # what changes nothing is served
    ok = chat(model="default", messages=SHORT, max_tokens=2, temperature=0, response_format={"type": "text"},
              tools=[tool], tool_choice="none")  # (greedy: two sampled tokens may decode to no text)
    assert ok.choices[0].message.content
    assert client.completions.create(model="default", prompt="Hi", best_of=2, n=2, max_tokens=2).choices


def test_structured_output_through_the_openai_client(server, client):
    """response_format json_schema with a prompt long enough to be prefilled on the prefill worker (its first
    token chosen there, the rest on the decode worker under the same grammar), streamed json_object, vLLM's
    guided_choice and guided_regex; bad schemas and regexes answered 400 naming the field."""
    schema = {"type": "object", "properties": {"city": {"type": "string"}, "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    remote_before = server.metric("tokenworks:prefills_total", 'where="remote"')
    r = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Cities grow around their harbours and markets. " * 20
                                    + "Name a harbour city and its population."}],  # uncached: prefilled remotely
        max_tokens=60, temperature=0.7, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"city", "population"} and type(value["population"]) is int
    assert r.choices[0].finish_reason == "stop"
    assert server.metric("tokenworks:prefills_total", 'where="remote"') > remote_before
    stream = client.chat.completions.create(model="default", messages=SHORT, max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    assert isinstance(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), dict)
    choice = client.chat.completions.create(model="default", messages=SHORT, max_tokens=8, temperature=0,
                                            extra_body={"guided_choice": ["Paris", "Lyon", "Nice"]})
    assert choice.choices[0].message.content in ("Paris", "Lyon", "Nice")
    code = client.completions.create(model="default", prompt="A product code:", max_tokens=12, temperature=1.0,
                                     extra_body={"guided_regex": "[A-Z]{2}[0-9]{3}"})
    assert re.fullmatch("[A-Z]{2}[0-9]{3}", code.choices[0].text)
    for body, param in ((dict(response_format={"type": "json_schema", "json_schema": {"schema": {"$ref": "#/x"}}}),
                         "response_format"), (dict(extra_body={"guided_regex": "(unclosed"}), "guided_regex"),
                        (dict(response_format={"type": "json_object"}, extra_body={"guided_choice": ["a"]}),
                         "response_format")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="default", messages=SHORT, max_tokens=4, **body)
        assert e.value.body["param"] == param, e.value.body


def test_batched_completion_prompts(server, client):
    """A list of prompts (text or token ids) is answered with n choices each, choice j of prompt i at index i n + j,
    streamed or not, each first token as the prompt alone gets it; usage counts every prompt once. (First tokens
    only: on an AMX CPU a decode step's arithmetic depends on how many rows it has, alone 1, batched 6; prompts of
    4+ tokens are prefilled on the same tiles either way.)"""
    prompts = ["The capital of France is", "1, 2, 3, 4, 5,", "Once upon a time there"]
    alone = [client.completions.create(model="default", prompt=p, max_tokens=1, temperature=0) for p in prompts]
    r = client.completions.create(model="default", prompt=prompts, n=2, max_tokens=1, temperature=0)
    assert sorted(c.index for c in r.choices) == list(range(6))
    by_index = {c.index: c.text for c in r.choices}
    for i, a in enumerate(alone):
        assert by_index[2 * i] == by_index[2 * i + 1] == a.choices[0].text
    assert len({a.choices[0].text for a in alone}) == 3  # distinct answers: the indices are checked
    assert r.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone) and r.usage.completion_tokens == 6
    ids = [[504, 3458, 314, 1812], [28, 29, 30, 31]]
    by_ids = client.completions.create(model="default", prompt=ids, max_tokens=1, temperature=0)
    assert [c.text for c in sorted(by_ids.choices, key=lambda c: c.index)] == [
        client.completions.create(model="default", prompt=p, max_tokens=1, temperature=0).choices[0].text for p in ids]
    streamed: dict[int, str] = {}
    finished = set()
    for chunk in client.completions.create(model="default", prompt=prompts, max_tokens=6, temperature=0, stream=True,
                                           stream_options={"include_usage": True}):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1, 2} and all(streamed[i].startswith(a.choices[0].text) for i, a in enumerate(alone))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=["x"] * 65, max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=["fine", ""], max_tokens=1)


def test_echo_with_prompt_logprobs_for_scoring(server, client, served_llm):
    """echo + logprobs (how lm-eval scores a continuation): the prompt's text before the completion, and its tokens'
    log-probabilities, the first null, as the offline engine computes them; a prompt short enough to be prefilled
    on the decode worker and one long enough for the prefill worker. Streamed echo gives the prompt's text first."""
    short = "The capital of France is Paris"
    long = "Ships carried grain, wool and salt between the harbours of the old coast. " * 6  # uncached: remote
    remote_before = server.metric("tokenworks:prefills_total", 'where="remote"')
    for text in (short, long):
        r = client.completions.create(model="default", prompt=text, max_tokens=1, temperature=0, logprobs=2,
                                      echo=True)
        c = r.choices[0]
        ids = served_llm.tokenizer.encode(text)
        want = served_llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2))[0]
        assert c.text.startswith(text) and len(c.text) > len(text)
        assert len(c.logprobs.tokens) == len(ids) + 1 and c.logprobs.token_logprobs[0] is None
        assert c.logprobs.top_logprobs[0] is None and len(c.logprobs.top_logprobs[1]) == 2
        for got, lp in zip(c.logprobs.token_logprobs[1:len(ids)], want.prompt_logprobs[1:]):
            assert abs(got - lp.logprob) < 1e-3
    assert server.metric("tokenworks:prefills_total", 'where="remote"') > remote_before
    scored = client.completions.create(model="default", prompt=[short, long], max_tokens=0, logprobs=0, echo=True)
    for c, text in zip(sorted(scored.choices, key=lambda c: c.index), (short, long)):
        assert c.text == text and len(c.logprobs.tokens) == len(served_llm.tokenizer.encode(text))
        assert c.logprobs.token_logprobs[0] is None and all(v <= 0 for v in c.logprobs.token_logprobs[1:])
    assert scored.usage.completion_tokens == 0
    for bad in (dict(echo=False), dict(echo=True, stream=True)):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="default", prompt=short, max_tokens=0, **bad)
    streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
        model="default", prompt=short, max_tokens=3, temperature=0, echo=True, stream=True) if chunk.choices)
    assert streamed.startswith(short) and len(streamed) > len(short)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=short, max_tokens=1, logprobs=1, echo=True, stream=True)


def test_logit_bias_through_the_openai_client(server, client, served_llm):
    token = served_llm.tokenizer.encode(" harbour")[0]
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logit_bias={str(token): 100})
    assert r.choices[0].text == " harbour" * 4
    chat = client.chat.completions.create(model="default", messages=SHORT, max_tokens=3, temperature=0.7, seed=1,
                                          logit_bias={str(token): 100}, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == " harbour" * 3


@pytest.mark.parametrize("body, status", [
    (b"{not json", 400),
    (json.dumps({"messages": []}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 10**6}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}).encode(), 400),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}]}).encode(), 400),
    (json.dumps({"model": "gpt-17", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404),
    (json.dumps({"messages": [{"role": "user", "content": "word " * 9000}]}).encode(), 400),
    (b"\xff\xfe\x00garbage", 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"word": 5}}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"10": 500}}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {str(10**9): 1}}).encode(), 400),
    (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logit_bias": [1, 2]}).encode(), 400),
    (b'{"messages": [{"role": "user", "content": "a\\udcff"}]}', 400),  # a lone surrogate
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400),
])
def test_bad_input_gets_openai_error_and_server_stays_up(server, body, status):
    r = httpx.post(server.url + "/v1/chat/completions", content=body, headers={"content-type": "application/json"},
                   timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_oversized_body_is_refused(server):
    r = httpx.post(server.url + "/v1/completions", content=b"x" * (9 * 2**20), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()

    def chunks():  # no content-length: the limit must hold for chunked bodies too
        for _ in range(10):
            yield b"x" * 2**20

    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "error" in r.json()
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200


def test_router_index_is_exact(server, client):
    """The router's KV index (built from the workers' events) predicts the prefix hit the worker then reports, and
    holds as many blocks for each worker as the worker's own pool has cached."""
    messages = [{"role": "user", "content": "List four mountains of Asia and the country of each one. " * 4}]
    client.chat.completions.create(model="default", messages=messages, max_tokens=3, temperature=0)
    again = client.chat.completions.create(model="default", messages=messages, max_tokens=3, temperature=0)
    routing = httpx.get(server.url + "/debug/routing", timeout=5).json()
    last = routing["decisions"][-1]
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert last["reason"] == "prefix" and last["prompt_tokens"] == again.usage.prompt_tokens
    assert last["hit_tokens"] == cached > 0
    workers = server.wait_idle()
    time.sleep(0.6)  # one more stats message after the last events
    routing = httpx.get(server.url + "/debug/routing", timeout=5).json()
    workers = server.workers()
    assert routing["kv_index"]["per_worker"] == {w: v["blocks_cached"] for w, v in workers.items()}
    assert routing["kv_index"]["blocks"] > 0 and routing["kv_index"]["overflows"] == 0


def test_pools_back_to_idle_after_everything(server):
    workers = server.wait_idle()
    assert all(w["blocks_used"] == 0 and w["held"] == 0 for w in workers.values())


def test_conditional_disaggregation(server, client):
    """Long uncached prompts go to the prefill worker; the same prompt again is mostly cached on the decode
    worker, so its uncached part is short and it is prefilled there."""
    prompt = [{"role": "user", "content": "Summarize the rules of chess in detail, please. " * 12}]
    local0 = server.metric("tokenworks:prefills_total", 'where="local"')
    remote0 = server.metric("tokenworks:prefills_total", 'where="remote"')
    first = client.chat.completions.create(model="default", messages=prompt, max_tokens=8, temperature=0)
    assert server.metric("tokenworks:prefills_total", 'where="remote"') == remote0 + 1
    again = client.chat.completions.create(model="default", messages=prompt, max_tokens=8, temperature=0)
    assert server.metric("tokenworks:prefills_total", 'where="local"') == local0 + 1
    assert again.choices[0].message.content == first.choices[0].message.content
    server.wait_idle()


def test_aggregated_worker_gives_the_same_greedy_output_and_reports_cost(offline, tmp_path):
    s = Server("--aggregated-workers", "1", "--price-per-worker-hour", "3.6")
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        generated = 0
        for messages in (SHORT, LONG):
            r = c.chat.completions.create(model="default", messages=messages, max_tokens=24, temperature=0)
            assert r.choices[0].message.content == offline(messages, 24)
            generated += r.usage.completion_tokens
        assert s.metric("tokenworks:prefills_total", 'where="remote"') == 0
        s.wait_idle()
        # Cost per token: one worker at $3.6/h costs $0.001 a second.
        assert s.metric("tokenworks:fleet_price_per_hour") == 3.6
        tokens = s.metric("tokenworks:generation_tokens_total")
        dollars = s.metric("tokenworks:cost_dollars")
        per_million = s.metric("tokenworks:cost_per_million_output_tokens")
        assert tokens == generated and 0 < dollars < 0.001 * 600
        assert per_million == pytest.approx(dollars / tokens * 1e6, rel=0.05)
        # tokenworks bench reads the price from the server and reports cost per million tokens.
        out = tmp_path / "bench"
        r = subprocess.run([sys.executable, "-m", "tokenworks.cli", "bench", "--url", s.url, "--num-requests", "2",
                            "--input-len", "fixed:20", "--output-len", "fixed:8", "--rates", "4", "--out", str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]
        run = json.loads((out / "summary.json").read_text())["runs"]["server"][0]
        assert run["price_per_hour"] == 3.6
        assert run["cost_per_million_output_tokens"] == pytest.approx(3.6 * run["duration_s"] / 3600 / 16 * 1e6)
        assert "/M tokens" in r.stdout
    finally:
        s.stop()


def test_sigterm_stops_every_worker_and_says_so():
    s = Server("--aggregated-workers", "1")
    try:
        pids = [w["pid"] for w in s.workers().values()]
        assert pids and all(pids)
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=15) == 0
        out = s.output()
        assert "[tokenworks] shutting down: stopping the workers" in out and out.rstrip().endswith("[tokenworks] stopped")

        def alive(pid: int) -> bool:  # a zombie not yet reaped counts as stopped
            try:
                with open(f"/proc/{pid}/status") as f:
                    return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
            except FileNotFoundError:
                return False

        deadline = time.monotonic() + 5
        while any(alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in pids), pids
    finally:
        s.stop()


def test_bench_tool_against_the_real_server(server, tmp_path):
    from tokenworks.bench import workloads as W
    from tokenworks.bench.loadgen import Load, run_load
    from tokenworks.bench.metrics import SLO, summarize
    import asyncio

    reqs = W.mixed(6, seed=3, long_fraction=0.3, long_input="uniform:200:300", output_len="fixed:8")
    results, wall = asyncio.run(run_load(server.url, reqs, Load(rate=2.0, seed=1)))
    s = summarize(results, wall, SLO(ttft=60.0))
    assert s["completed"] == 6, s["errors"]
    assert s["output_tokens"] == 6 * 8  # ignore_eos is honoured: exact output lengths
    assert s["ttft_s"]["median"] > 0 and s["itl_s"]["median"] > 0
    server.wait_idle()


def test_tokenize_and_detokenize_agree_with_what_requests_are_charged(server, client):
    """/tokenize gives the ids a completion's prompt and a chat's messages become (their counts are the usage the
    same requests report), /detokenize gives the text back; bad input gets a 400 in the OpenAI error form."""
    def post(path: str, body: dict) -> httpx.Response:
        return httpx.post(server.url + path, json=body, timeout=30)

    text = "The harbour at dawn, with seven ships"
    plain = post("/tokenize", {"model": "default", "prompt": text, "return_token_strs": True}).json()
    charged = client.completions.create(model="default", prompt=text, max_tokens=1, temperature=0).usage.prompt_tokens
    assert plain["count"] == len(plain["tokens"]) == charged == len(plain["token_strs"]) > 3
    assert plain["max_model_len"] > plain["count"]
    assert post("/detokenize", {"tokens": plain["tokens"]}).json()["prompt"] == text

    chat = post("/tokenize", {"messages": SHORT}).json()
    charged = client.chat.completions.create(model="default", messages=SHORT, max_tokens=1).usage.prompt_tokens
    assert chat["count"] == charged
    rendered = post("/detokenize", {"tokens": chat["tokens"]}).json()["prompt"]
    assert SHORT[0]["content"] in rendered and rendered.rstrip().endswith("assistant")  # the reply's turn opened
    bare = post("/tokenize", {"messages": SHORT, "add_generation_prompt": False}).json()
    assert bare["count"] < chat["count"] and chat["tokens"][: bare["count"]] == bare["tokens"]

    for path, body, param in [("/tokenize", {"prompt": "a", "messages": SHORT}, None),
                              ("/tokenize", {}, None),
                              ("/detokenize", {"tokens": [0, 10**9]}, "tokens"),
                              ("/detokenize", {"tokens": [-1]}, "tokens")]:
        r = post(path, body)
        assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", (path, body, r.text)
        assert param is None or r.json()["error"]["param"] == param
    r = post("/tokenize", {"model": "nope", "prompt": "a"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(server.url + "/health", timeout=5).status_code == 200
