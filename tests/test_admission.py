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


def test_overload_gets_429_at_once_and_admitted_requests_do_not_wait_past_the_limit(server):
    # About 1.5 requests/s is what one 2-core worker serves with these lengths; 40/s for 8 s is over 25x that.
    requests = synthetic(320, "uniform:6:180", "fixed:16", seed=3)
    results, wall = asyncio.run(run_load(server.url, requests, Load(rate=40.0, seed=3), timeout=120))
    done = [r for r in results if r.ok]
    refused = [r for r in results if not r.ok]
    print(f"{len(done)} done, {len(refused)} refused; slowest first token {max((r.ttft for r in done), default=0):.1f} s")
    assert all(r.error.startswith("HTTP 429") for r in refused), {r.error[:80] for r in refused}
    assert len(done) >= 5 and len(refused) >= len(results) // 2, (len(done), len(refused))
    assert max(r.error_after for r in refused) < 1.0
    # The prediction is an estimate made as load rises: allow it half the limit again (measured: 1.16x at 30 s).
    assert max(r.ttft for r in done) < 1.5 * MAX_QUEUE_WAIT, sorted(r.ttft for r in done)[-5:]
    assert all(r.output_tokens == 16 for r in done)
    assert server.metric("tokenworks:requests_rejected_total", 'reason="predicted_wait"') >= len(refused) // 2
    server.wait_idle(60)
