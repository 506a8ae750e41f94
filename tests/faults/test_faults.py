"""Faults done for real: workers killed with SIGKILL, clients that leave, floods, hostile input."""

import asyncio
import os
import random
import signal
import time

import httpx
import openai
import pytest

from tests.serving import Server
from tokenworks import SamplingParams

pytestmark = pytest.mark.slow

PROMPT = "Write a long story about a lighthouse keeper and the sea."


@pytest.fixture(scope="module")
def server():
    # float32 weights: a request that fails over is prefilled again (prompt + the tokens sent) and must go on
    # exactly as it would have. With 4-bit weights it did not (seen once: the continuation took another turn
    # after the failover), likely the bf16 kernel rounding a prefill's rows unlike a decode step's.
    s = Server("--prefill-workers", "1", "--decode-workers", "2", "--kv-transport", "tcp", "--quantization", "none",
               "--local-prefill-threshold", "32")
    yield s
    s.stop()


def wait_for(cond, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def greedy_offline(llm, prompt, n):
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]


def stream_killing_its_decode_worker(server, **sampling):
    """Stream 60 tokens of PROMPT, SIGKILL the decode worker running it once 20 characters have come; the text, the
    usage and the pid killed, after the launcher has started the worker again."""
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    stream = c.completions.create(model="default", prompt=PROMPT, max_tokens=60, stream=True,
                                  stream_options={"include_usage": True}, extra_body={"ignore_eos": True}, **sampling)
    text, usage, killed = "", None, None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage
        if killed is None and len(text) > 20:
            busy = [w for w in server.workers().values() if w["role"] == "decode" and w.get("running")]
            if busy:
                killed = busy[0]["pid"]
                os.kill(killed, signal.SIGKILL)
    assert killed is not None, "no decode worker was seen running the request"
    # The launcher restarts it and the router takes it back.
    wait_for(lambda: all(w["alive"] and w["pid"] != killed for w in server.workers().values()), 60, "restart")
    server.wait_idle(20)
    return text, usage, killed


def test_decode_worker_killed_mid_stream_the_stream_goes_on(server, llm):
    expected = greedy_offline(llm, PROMPT, 60)
    deaths = server.metric("tokenworks:worker_deaths_total")
    text, usage, _ = stream_killing_its_decode_worker(server, temperature=0)
    assert usage.completion_tokens == 60
    assert text == expected.text  # one continuous stream: nothing repeated, nothing lost
    assert server.metric("tokenworks:worker_deaths_total") >= deaths + 1
    assert server.metric("tokenworks:request_failovers_total") >= 1


def test_a_seeded_sample_goes_on_as_drawn_after_its_decode_worker_dies(server, llm):
    # A token's draw depends on the request's seed and its position only (model/race.py), so the worker that
    # continues from prompt + the tokens sent draws what the dead one would have.
    params = SamplingParams(temperature=1.0, seed=1234, max_tokens=60, ignore_eos=True)
    expected = llm.generate(PROMPT, params)[0].text
    failovers = server.metric("tokenworks:request_failovers_total")
    text, usage, _ = stream_killing_its_decode_worker(server, temperature=1.0, seed=1234)
    assert server.metric("tokenworks:request_failovers_total") >= failovers + 1
    assert usage.completion_tokens == 60
    assert text == expected


def test_prefill_worker_killed_during_prefill_request_still_finishes(server, llm):
    long_prompt = "Describe the harbour in detail. " * 120  # ~800 tokens: seconds of prefill on one core
    expected = greedy_offline(llm, long_prompt, 8)
    prefill_pid = next(w["pid"] for w in server.workers().values() if w["role"] == "prefill")

    async def main():
        async with httpx.AsyncClient(timeout=120) as client:
            task = asyncio.create_task(client.post(server.url + "/v1/completions", json={
                "prompt": long_prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True}))
            await asyncio.sleep(0.2)
            while not any(w["role"] == "prefill" and w.get("running") for w in server.workers().values()):
                await asyncio.sleep(0.05)
            os.kill(prefill_pid, signal.SIGKILL)
            return await task

    r = asyncio.run(main())
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == expected.text
    wait_for(lambda: all(w["alive"] for w in server.workers().values()) and
             any(w["role"] == "prefill" and w["pid"] != prefill_pid for w in server.workers().values()), 60, "restart")
    server.wait_idle(20)


def test_hundred_clients_leaving_at_random_moments_leak_nothing(server):
    rng = random.Random(5)

    async def one(client, i):
        body = {"prompt": f"{i} " + "tell me about the sea " * rng.randint(1, 60), "max_tokens": 64,
                "stream": True, "ignore_eos": True}
        leave_after = rng.uniform(0.0, 1.5)
        try:
            async with asyncio.timeout(leave_after):
                async with client.stream("POST", server.url + "/v1/completions", json=body) as r:
                    async for _ in r.aiter_lines():
                        pass
        except TimeoutError:
            pass

    async def main():
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=200)) as client:
            for batch in range(10):
                await asyncio.gather(*(one(client, 10 * batch + k) for k in range(10)))

    asyncio.run(main())
    workers = server.wait_idle(30)
    assert all(w["blocks_used"] == 0 and w["held"] == 0 and w["waiting_for_kv"] == 0 for w in workers.values())
    assert httpx.get(server.url + "/health").status_code == 200


def test_a_client_that_leaves_a_non_streamed_request_frees_its_workers(server):
    body = {"prompt": PROMPT, "max_tokens": 400, "ignore_eos": True}  # tens of seconds of decoding here
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=1.5)
    t0 = time.monotonic()
    server.wait_idle(8)  # aborted on its workers as soon as the connection closed, not after 400 tokens
    assert time.monotonic() - t0 < 8
    assert httpx.get(server.url + "/health").status_code == 200


def test_fuzzed_bodies_never_get_a_5xx(server):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(allow_nan=False, allow_infinity=False),
                        st.text(max_size=30))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(st.text(max_size=10), inner, max_size=4)),
                          max_leaves=8)
    fields = st.fixed_dictionaries({}, optional={
        "messages": st.one_of(values, st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                                                      "content": values}), max_size=3)),
        "prompt": st.one_of(values, st.text(max_size=50), st.lists(st.integers(-5, 60000), max_size=20)),
        "max_tokens": st.one_of(values, st.integers(-5, 10**7)), "n": st.one_of(values, st.integers(-2, 100)),
        "temperature": values, "top_p": values, "stop": values, "logprobs": values, "seed": values,
        "stream": st.booleans(), "model": st.one_of(st.none(), st.text(max_size=10)),
    })
    seen = []

    @settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
    @given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), body=fields)
    def probe(path, body):
        if "max_tokens" not in body or (isinstance(body["max_tokens"], int) and body["max_tokens"] > 8):
            body["max_tokens"] = 8  # keep the budget bounded: this probes input handling, not generation
        if body.get("n") and isinstance(body["n"], int) and body["n"] > 2:
            body["n"] = 2
        r = httpx.post(server.url + path, json=body, timeout=120)
        seen.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert "error" in r.json()

    probe()
    assert len(seen) == 120 and any(s >= 400 for s in seen)
    assert httpx.get(server.url + "/health").status_code == 200
    server.wait_idle(60)


@pytest.fixture(scope="module")
def guarded():
    s = Server("--aggregated-workers", "1", "--no-restart", "--max-inflight-requests", "2", "--api-key", "s3cret",
               "--internal-secret", "internal-s3cret")  # the router-worker plane signed
    yield s
    s.stop()


def test_api_key_is_required_on_v1(guarded):
    assert httpx.get(guarded.url + "/v1/models").status_code == 401
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).json()["error"]["code"] \
        == "invalid_api_key"
    assert httpx.get(guarded.url + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert httpx.get(guarded.url + "/health").status_code == 200


def test_flood_gets_429_with_retry_after_at_once(guarded):
    auth = {"Authorization": "Bearer s3cret"}

    async def main():
        async with httpx.AsyncClient(timeout=120, headers=auth) as client:
            body = {"prompt": "Count slowly:", "max_tokens": 40, "ignore_eos": True}
            return await asyncio.gather(*(client.post(guarded.url + "/v1/completions", json=body) for _ in range(8)))

    t = time.monotonic()
    rs = asyncio.run(main())
    codes = sorted(r.status_code for r in rs)
    assert codes.count(200) >= 2 and codes.count(429) >= 1, codes
    rejected = [r for r in rs if r.status_code == 429]
    assert all(int(r.headers["retry-after"]) >= 1 and r.json()["error"]["type"] == "rate_limit_error" for r in rejected)
    assert time.monotonic() - t < 120
    guarded.wait_idle(20)


def test_no_worker_left_gives_503_not_a_hang(guarded):
    pid = next(iter(guarded.workers().values()))["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not next(iter(guarded.workers().values()))["alive"], 10, "the router to notice")
    t = time.monotonic()
    r = httpx.post(guarded.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": "Bearer s3cret"}, timeout=30)
    assert r.status_code == 503 and r.json()["error"]["code"] == "service_unavailable"
    assert time.monotonic() - t < 5
    assert httpx.get(guarded.url + "/health").status_code == 503
