"""The router's KV index from workers' events, the routing cost, and the admission estimate."""

import random

import pytest

from tokenworks.engine.block_pool import BlockPool
from tokenworks.router.admission import FirstTokenRates
from tokenworks.router.kv_index import KVIndex
from tokenworks.router.policy import RoutingPolicy, WorkerView
from tokenworks.sampling_params import SamplingParams
from tests.test_worker_parts import tiny_engine


def test_events_keep_the_index_equal_to_the_pool_through_stores_evictions_aborts_and_restarts():
    """A real engine (tiny random model, a pool small enough to evict) runs a random mix of requests with shared
    prefixes, aborts and prefix-cache resets; after every step the index, fed only the drained events, holds
    exactly the pool's cached hashes. A restart (a new pool) is re-synced from its Ready snapshot."""
    rng = random.Random(7)
    index = KVIndex()
    loaded = tiny_engine("cpu")
    engine, pool = loaded.engine, loaded.pool
    index.reset("w", pool.record_events(), pool.num_blocks)
    prefixes = [[rng.randrange(1, 96) for _ in range(rng.randrange(16, 60))] for _ in range(5)]
    n = 0
    kinds = set()
    for step in range(160):
        r = rng.random()
        if r < 0.35:
            prompt = rng.choice(prefixes) + [rng.randrange(1, 96) for _ in range(rng.randrange(1, 40))]
            engine.add_request(f"q{n}", prompt, SamplingParams(temperature=0, max_tokens=rng.randrange(1, 30),
                                                               ignore_eos=True))
            n += 1
        elif r < 0.42 and engine.scheduler.running:
            engine.abort(rng.choice(engine.scheduler.running).request_id)
        elif r < 0.44:
            pool.reset_prefix_cache()
        elif r < 0.46 and not engine.has_unfinished():  # the worker restarts: a fresh pool, re-synced from Ready
            loaded = tiny_engine("cpu")
            engine, pool = loaded.engine, loaded.pool
            index.reset("w", pool.record_events(), pool.num_blocks)
        if engine.has_unfinished():
            engine.step()
        events = pool.drain_events()
        kinds.update(k for k, _ in events)
        index.apply("w", events)
        assert index.blocks["w"] == set(pool.cached_hashes()), f"step {step}"
    assert kinds == {0, 1, 2}  # stores, evictions (the 64-block pool was pressed) and clears all happened
    assert index.num_events > 0 and index.num_overflows == 0


def test_events_are_not_recorded_unless_asked():
    pool = BlockPool(8)
    pool.cache(pool.allocate(1)[0], 123)
    assert pool.events is None and pool.drain_events() == []
    assert pool.record_events() == [123]
    pool.reset_prefix_cache()
    assert pool.drain_events() == [(2, 0)]


def test_an_index_larger_than_the_pool_is_dropped_not_trusted():
    index = KVIndex()
    index.reset("w", [], capacity=2)
    index.apply("w", [(1, 10), (1, 11), (1, 12)])
    assert index.blocks["w"] == set() and index.num_overflows == 1
    index.apply("gone", [(1, 5)])  # a worker that never said Ready: ignored
    assert "gone" not in index.blocks


def _policy(held: dict[str, int], prompt: list[int], weight: float = 1.0, threshold: int = 16) -> RoutingPolicy:
    """A policy whose index says worker w holds the first held[w] blocks of ``prompt``."""
    policy = RoutingPolicy(16, threshold, KVIndex(), weight)
    hashes = policy.block_hashes(prompt)
    for wid, blocks in held.items():
        policy.index.reset(wid, hashes[:blocks], 1000)
    return policy


PROMPT = list(range(1, 161))  # 160 tokens: 9 reusable blocks (the last token's block is never reused)


@pytest.mark.parametrize("held,active,weight,want,reason", [
    ({"a": 0, "b": 0}, {"a": 0, "b": 50}, 1.0, "a", "load"),  # no prefix anywhere: least active tokens
    ({"a": 0, "b": 9}, {"a": 0, "b": 0}, 1.0, "b", "prefix"),  # equal load: the prefix holder
    ({"a": 0, "b": 9}, {"a": 0, "b": 140}, 1.0, "b", "prefix"),  # 144 hit tokens outweigh 140 active
    ({"a": 0, "b": 9}, {"a": 0, "b": 150}, 1.0, "a", "load"),  # ... but not 150
    ({"a": 0, "b": 9}, {"a": 0, "b": 150}, 2.0, "b", "prefix"),  # unless hits weigh double
    ({"a": 0, "b": 9}, {"a": 10, "b": 0}, 0.0, "b", "prefix"),  # weight 0: load alone picks b (it holds the prefix)
    ({"a": 3, "b": 9}, {"a": 0, "b": 100}, 1.0, "a", "prefix"),  # a: 112 uncached + 0 < b: 16 uncached + 100 active
])
def test_one_cost_weighs_prefix_hits_against_load(held, active, weight, want, reason):
    policy = _policy(held, PROMPT, weight)
    workers = [WorkerView(w, "both", active_tokens=active[w]) for w in held]
    p = policy.place(workers, PROMPT)
    assert (p.decode.worker_id, p.reason) == (want, reason)
    assert p.cached_tokens == 16 * held[want] and p.uncached_tokens == 160 - 16 * held[want]
    assert p.costs[want] == min(p.costs.values())


def test_prefill_worker_chosen_by_the_same_cost_and_local_prefill_on_a_hit():
    policy = _policy({"d": 0, "p1": 0, "p2": 9}, PROMPT, threshold=16)
    workers = [WorkerView("d", "decode"), WorkerView("p1", "prefill"), WorkerView("p2", "prefill", active_tokens=100)]
    p = policy.place(workers, PROMPT)
    assert p.prefill.worker_id == "p2" and p.uncached_tokens == 16  # its hit outweighs its 100 active tokens
    policy = _policy({"d": 9, "p1": 0}, PROMPT, threshold=16)  # the decode worker holds all but 16: prefill there
    p = policy.place([WorkerView("d", "decode"), WorkerView("p1", "prefill")], PROMPT)
    assert p.prefill is None and p.uncached_tokens == 16 and p.reason == "prefix"
    with pytest.raises(LookupError):
        policy.place([WorkerView("p1", "prefill")], PROMPT)


def test_backlog_rate_measures_speed_under_load_not_arrival_rate():
    r = FirstTokenRates()
    r.tokens.tau = r.requests.tau = 1e9
    # One request every 10 s, each prefilled in 0.5 s: 200 tokens/s and 2 first tokens/s, not 100 tokens / 10 s.
    for k in range(3):
        r.started(10.0 * k)
        r.done(10.0 * k + 0.5, 100)
    assert r.tokens.rate == pytest.approx(200.0) and r.requests.rate == pytest.approx(2.0)
    assert r.predicted_wait(0, 100, 40.0) == pytest.approx(0.5)
    assert r.predicted_wait(0, 10, 40.0) == pytest.approx(0.5)  # short prompt: one request's time still
    # Four queued together and finishing in one step after 2 s: 400 tokens, 4 requests over 2 s of backlog.
    r = FirstTokenRates()
    for _ in range(4):
        r.started(0.0)
    for _ in range(4):
        r.done(2.0, 100)
    assert r.tokens.rate == pytest.approx(200.0) and r.requests.rate == pytest.approx(2.0)
    assert r.tokens.pending == 0
    assert r.predicted_wait(1000, 200, 5.0) == pytest.approx(6.0)  # tokens decide: 1200 / 200
    for _ in range(20):
        r.started(5.0)
    assert r.predicted_wait(100, 20, 5.0, copies=2) == pytest.approx(11.0)  # requests decide: (20 + 2) / 2
    # Nothing measured yet: the prediction is how long the backlog ahead has lasted.
    r = FirstTokenRates()
    assert r.predicted_wait(0, 50, 3.0) == 0.0
    r.started(1.0)
    assert r.predicted_wait(50, 50, 31.0) == pytest.approx(30.0)
    r.cancelled(32.0)
    assert r.tokens.pending == 0 and r.tokens.rate == 0.0
