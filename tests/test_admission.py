"""Overload, bounded: far more requests than the default model on this machine can serve, for a few seconds.

Every request either completes or is answered 429 (with Retry-After) at once; the completed ones waited about
--max-queue-wait at most; nothing admitted is dropped and the pool is idle afterwards.
"""

import asyncio

import pytest

from tests.serving import Server
from tokenworks.bench.loadgen import Load, run_load
from tokenworks.bench.workloads import synthetic

MAX_QUEUE_WAIT = 5.0


@pytest.fixture(scope="module")
def server():
    s = Server("--aggregated-workers", "1", "--max-queue-wait", str(MAX_QUEUE_WAIT))
    yield s
    s.stop()


def overload(server, outputs: str, rate: float, seed: int):
    """320 requests at ``rate`` a second with ``outputs`` tokens each: (done, refused, sorted first-token times,
    their 90th percentile), after checking that every refusal was a 429 at once."""
    requests = synthetic(320, "uniform:6:180", outputs, seed=seed)
    results, wall = asyncio.run(run_load(server.url, requests, Load(rate=rate, seed=seed), timeout=120))
    done = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok]
    ttfts = sorted(r.ttft for r in done)
    p90 = ttfts[int(0.9 * (len(ttfts) - 1))] if ttfts else 0.0
    print(f"{len(done)} done, {len(refused)} refused; first token p90 {p90:.1f} s, slowest {max(ttfts, default=0):.1f} s")
    assert all(r.error.startswith("HTTP 429") for r in refused), {r.error[:80] for r in refused}
    assert max((r.error_after for r in refused), default=0.0) < 1.0
    return done, refused, ttfts, p90


def test_overload_gets_429_at_once_and_admitted_requests_do_not_wait_past_the_limit(server):
    # Several times what one 2-core worker serves with these lengths: about 1.5 requests/s on an AVX2 machine
    # (2026-11-27), where 40/s was over 25x that; on an AVX-512/AMX one (prefill 4x faster, 2026-11-28) it served
    # over half of 320 at 40/s; with prompts on the native step (2026-11-29) 174 of 320 at 100/s, about 21/s over
    # the arrivals and the queue's 5 s. So they come at 200/s: about 140 can be served, the rest refused.
    done, refused, ttfts, p90 = overload(server, "fixed:16", rate=200.0, seed=3)
    assert len(done) >= 5 and len(refused) >= 120, (len(done), len(refused))
    # The prediction is an estimate made as load rises, and first tokens come a prefill step at a time (about 1.7 s
    # here). Measured on a 2-core VM (2026-11-27): with the httpx client the slowest admitted request waited
    # 1.1-1.56x the limit over 12 runs, the client's own CPU (1.5 ms a token) slowing the server it measured; with
    # aiohttp's (0.4 ms), 0.96-1.02x over 3 runs and the 90th percentile 0.94-0.98x.
    assert p90 < 1.3 * MAX_QUEUE_WAIT, ttfts[-5:]
    assert ttfts[-1] < 1.5 * MAX_QUEUE_WAIT, ttfts[-5:]
    assert all(r.output_tokens == 16 for r in done)
    assert server.metric("tokenworks:requests_rejected_total", 'reason="predicted_wait"') >= len(refused) // 2
    server.wait_idle(60)


def test_requests_behind_a_full_batch_are_refused_by_the_wait_for_a_slot(server):
    """64-token outputs: the worker's max_num_seqs (64) fill within seconds with requests that started together and
    finish together, so a request admitted behind them waits for their end, not for the first-token rate measured
    while slots were free (before the slot estimate: first token p90 13-14 s against the 5 s limit)."""
    server.wait_idle(60)
    done, refused, ttfts, p90 = overload(server, "fixed:64", rate=40.0, seed=4)
    assert len(done) >= 5 and all(r.output_tokens == 64 for r in done)
    # 1.5x, not 1.3x: on 2026-11-29 this machine's p90 read 6.59-6.91 s in 2 of 5 runs (the session's starting
    # commit as well as its last), the slots' end being predicted from steps that the busier machine slowed.
    assert p90 < 1.5 * MAX_QUEUE_WAIT, ttfts[-5:]
    assert ttfts[-1] < 1.5 * MAX_QUEUE_WAIT, ttfts[-5:]
    server.wait_idle(60)
