"""The router's KV index from workers' events, the routing cost, and the admission estimate."""

import math
import random

import pytest

from tokenworks.config import EngineArgs
from tokenworks.engine.block_pool import BlockPool
from tokenworks.router.admission import COLD_QUEUE, FirstTokenRates
from tokenworks.router.kv_index import KVIndex
from tokenworks.router.policy import RoutingPolicy, WorkerView
from tokenworks.sampling_params import SamplingParams
from tests.test_worker_parts import tiny_engine


def _engine(host_gib: float):
    from dataclasses import replace

    from tokenworks.llm import build_random_engine

    loaded = tiny_engine("cpu")  # its shape and pool (64 blocks), with a host tier when asked
    args = replace(EngineArgs(device="cpu", dtype="float32", num_blocks=64, max_num_batched_tokens=96,
                              max_num_seqs=8), kv_host_memory_gib=host_gib)
    return build_random_engine(args, loaded.model_config, "tiny")


def _sync(index, loaded):
    tier = loaded.host_tier
    index.reset("w", loaded.pool.record_events(), loaded.pool.num_blocks, [] if tier is None else tier.hashes(),
                0 if tier is None else tier.num_blocks)


@pytest.mark.parametrize("host_gib", [0.0, 0.000025])  # no host tier; one of 13 float16 blocks (it overflows too)
def test_events_keep_the_index_equal_to_the_pool_through_stores_evictions_aborts_and_restarts(host_gib):
    """A real engine (tiny random model, a pool small enough to evict) runs a random mix of requests with shared
    prefixes, aborts and prefix-cache resets; after every step the index, fed only the drained events, holds
    exactly the pool's cached hashes (and the host tier's). A restart (a new pool) is re-synced from its Ready
    snapshot."""
    rng = random.Random(7)
    index = KVIndex()
    loaded = _engine(host_gib)
    engine, pool = loaded.engine, loaded.pool
    _sync(index, loaded)
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
            loaded = _engine(host_gib)
            engine, pool = loaded.engine, loaded.pool
            _sync(index, loaded)
        if engine.has_unfinished():
            engine.step()
        events = pool.drain_events()
        kinds.update(k for k, _ in events)
        index.apply("w", events)
        assert index.blocks["w"] == set(pool.cached_hashes()), f"step {step}"
        if loaded.host_tier is not None:
            assert index.host["w"] == set(loaded.host_tier.hashes()), f"step {step}"
    # Stores, evictions (the 64-block pool was pressed) and clears happened; with the tier, saves and drops too.
    assert kinds == ({0, 1, 2, 3, 4} if host_gib else {0, 1, 2})
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


@pytest.mark.parametrize("held,queued,weight,want,reason", [
    ({"a": 0, "b": 0}, {"a": 0, "b": 50}, 1.0, "a", "load"),  # no prefix anywhere: the shorter prefill queue
    ({"a": 0, "b": 9}, {"a": 0, "b": 0}, 1.0, "b", "prefix"),  # equal queues: the prefix holder
    ({"a": 0, "b": 9}, {"a": 0, "b": 140}, 1.0, "b", "prefix"),  # 16 + 140 queued < 160: the hit still wins
    ({"a": 0, "b": 9}, {"a": 0, "b": 150}, 1.0, "a", "load"),  # 16 + 150 > 160: a's first token comes sooner
    ({"a": 0, "b": 9}, {"a": 0, "b": 150}, 2.0, "b", "prefix"),  # unless hits weigh double (32 + 150 < 320)
    ({"a": 0, "b": 9}, {"a": 10, "b": 10}, 0.0, "a", "load"),  # weight 0: queues alone, a tie: fewer in flight
    ({"a": 3, "b": 9}, {"a": 0, "b": 100}, 1.0, "a", "prefix"),  # a: 112 + 0 < b: 16 + 100
])
def test_one_cost_weighs_prefix_hits_against_queued_prefill(held, queued, weight, want, reason):
    policy = _policy(held, PROMPT, weight)
    workers = [WorkerView(w, "both", queued_prefill_tokens=queued[w], inflight=int(w == "b")) for w in held]
    p = policy.place(workers, PROMPT)
    assert (p.decode.worker_id, p.reason) == (want, reason)
    assert p.cached_tokens == 16 * held[want] and p.uncached_tokens == 160 - 16 * held[want]
    assert p.costs[want] == min(p.costs.values())


def test_cost_is_the_predicted_wait_at_each_workers_measured_rate():
    """A slower worker (half the prefill rate) loses even with the prefix: 16 tokens at 10/s > 160 at 200/s; a
    worker with no rate measured yet is given the best measured one."""
    policy = _policy({"fast": 0, "slow": 9, "new": 0}, PROMPT)
    fast, slow, new = WorkerView("fast", "both"), WorkerView("slow", "both"), WorkerView("new", "both", inflight=1)
    for w, seconds in ((fast, 0.5), (slow, 10.0)):
        w.rates.started(0.0)
        w.rates.done(seconds, 100)
    p = policy.place([fast, slow, new], PROMPT)
    assert p.decode is fast and p.costs == {"fast": 0.8, "slow": 1.6, "new": 0.8}  # seconds; new ties, more inflight


def test_prefill_worker_chosen_by_the_same_cost_and_local_prefill_on_a_hit():
    policy = _policy({"d": 0, "p1": 0, "p2": 9}, PROMPT, threshold=16)
    workers = [WorkerView("d", "decode"), WorkerView("p1", "prefill"),
               WorkerView("p2", "prefill", queued_prefill_tokens=100)]
    p = policy.place(workers, PROMPT)
    assert p.prefill.worker_id == "p2" and p.uncached_tokens == 16  # its hit outweighs its 100 queued tokens
    policy = _policy({"d": 9, "p1": 0}, PROMPT, threshold=16)  # the decode worker holds all but 16: prefill there
    p = policy.place([WorkerView("d", "decode"), WorkerView("p1", "prefill")], PROMPT)
    assert p.prefill is None and p.uncached_tokens == 16 and p.reason == "prefix"
    with pytest.raises(LookupError):
        policy.place([WorkerView("p1", "prefill")], PROMPT)


@pytest.mark.parametrize("routing,want", [("prefix", "b"), ("least-loaded", "a"), ("round-robin", "b")])
def test_baseline_routings(routing, want):
    policy = _policy({"a": 0, "b": 9}, PROMPT)
    policy.routing = routing
    workers = [WorkerView("a", "both"), WorkerView("b", "both", queued_prefill_tokens=10**6, inflight=3)]
    assert policy.place(workers, PROMPT).decode.worker_id == want
    if routing == "round-robin":
        assert policy.place(workers, PROMPT, peek=True).decode.worker_id == "a"  # admission asking moves nothing
        assert policy.place(workers, PROMPT).decode.worker_id == "a"
        assert policy.place(workers, PROMPT).decode.worker_id == "b"
    with pytest.raises(ValueError):
        RoutingPolicy(16, 16, routing="random")


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
    for _ in range(COLD_QUEUE - 2):
        r.started(1.0)
    assert r.predicted_wait(50, 50, 2.0) == pytest.approx(1.0)  # the last one a cold worker may queue
    r.started(1.0)
    assert r.predicted_wait(50, 50, 2.0) == math.inf  # beyond: refused until a first token brings a rate
    for _ in range(COLD_QUEUE - 1):
        r.cancelled(2.0)
    r.cancelled(32.0)
    assert r.tokens.pending == 0 and r.tokens.rate == 0.0
