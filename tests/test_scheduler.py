"""Scheduler policy on tiny pools, with a deterministic token source instead of a network."""

import pytest

from tokenworks.config import SchedulerConfig
from tokenworks.engine.block_pool import BlockPool
from tokenworks.engine.kv_cache_manager import KVCacheManager
from tokenworks.engine.request import Request, RequestStatus
from tokenworks.engine.scheduler import Scheduler
from tokenworks.engine.scheduler_output import ModelRunnerOutput
from tokenworks.sampling_params import SamplingParams


def next_token(s):
    """A stand-in for the model: the next token is a function of the whole history."""
    return (sum(s.prompt_token_ids) + 7 * len(s.output_token_ids)) % 97 + 3


def run_step(sched):
    out = sched.schedule()
    result = ModelRunnerOutput(sampled_token_ids={s.request_id: next_token(s) for s in out.scheduled if s.sample})
    sched.update(out, result)
    return out


def make(num_blocks=11, block_size=4, budget=8, max_seqs=8, max_len=64, prefix=True):
    pool = BlockPool(num_blocks, prefix)
    return Scheduler(SchedulerConfig(budget, max_seqs, max_len), KVCacheManager(pool, block_size)), pool


def req(rid, n, max_tokens=4, start=0):
    return Request(rid, list(range(start, start + n)), SamplingParams(max_tokens=max_tokens, temperature=0))


def test_long_prompt_is_chunked_and_samples_once():
    sched, pool = make(budget=8)
    r = req("a", 20, max_tokens=2)
    sched.add_request(r)
    steps = [run_step(sched) for _ in range(3)]
    assert [s.scheduled[0].num_tokens for s in steps] == [8, 8, 4]
    assert [s.scheduled[0].start_position for s in steps] == [0, 8, 16]
    assert [s.scheduled[0].sample for s in steps] == [False, False, True]
    assert r.num_output_tokens == 1
    run_step(sched)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 2
    assert pool.num_used_blocks == 0
    pool.check_integrity()


def test_decode_and_prefill_chunk_share_a_step():
    sched, pool = make(budget=8)
    a = req("a", 3, max_tokens=10)
    sched.add_request(a)
    run_step(sched)  # a prefilled, has 1 output token
    sched.add_request(req("b", 30, start=50))
    out = run_step(sched)
    assert [(s.request_id, s.num_tokens) for s in out.scheduled] == [("a", 1), ("b", 7)]
    assert out.num_scheduled_tokens == 8


def test_preemption_under_pressure_finishes_everything_and_frees_all_blocks():
    # 7 usable blocks of 4 tokens = 28 slots; 3 requests each need up to 12 slots.
    sched, pool = make(num_blocks=8, block_size=4, budget=16, max_len=64, prefix=False)
    reqs = [req(f"r{i}", 6, max_tokens=6, start=10 * i) for i in range(3)]
    for r in reqs:
        sched.add_request(r)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        run_step(sched)
        pool.check_integrity()
        assert pool.num_used_blocks <= 7
    assert not sched.has_unfinished()
    assert sched.num_preemptions > 0
    assert all(r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 6 for r in reqs)
    assert pool.num_used_blocks == 0


def test_preempted_request_produces_the_same_tokens_as_an_unpressured_run():
    def outputs(num_blocks):
        sched, pool = make(num_blocks=num_blocks, block_size=4, budget=16, prefix=False)
        rs = [req(f"r{i}", 6, max_tokens=6, start=10 * i) for i in range(3)]
        for r in rs:
            sched.add_request(r)
        while sched.has_unfinished():
            run_step(sched)
        return [r.output_token_ids for r in rs], sched.num_preemptions

    tight, n_tight = outputs(8)
    roomy, n_roomy = outputs(64)
    assert n_tight > 0 and n_roomy == 0
    assert tight == roomy


def test_abort_frees_blocks_of_running_and_waiting_requests():
    sched, pool = make(budget=4)
    a, b = req("a", 10), req("b", 10, start=30)
    sched.add_request(a)
    sched.add_request(b)
    run_step(sched)
    assert pool.num_used_blocks > 0
    sched.abort("a")
    sched.abort("b")
    assert a.status == RequestStatus.FINISHED_ABORTED and b.status == RequestStatus.FINISHED_ABORTED
    assert pool.num_used_blocks == 0 and not sched.has_unfinished()
    out = sched.schedule()
    assert out.finished_request_ids == {"a", "b"}
    pool.check_integrity()


def test_prefix_hit_skips_computed_tokens():
    sched, pool = make(budget=64)
    a = req("a", 13)
    sched.add_request(a)
    while sched.has_unfinished():
        run_step(sched)
    b = Request("b", list(range(12)) + [99, 98], SamplingParams(max_tokens=1, temperature=0))
    sched.add_request(b)
    out = run_step(sched)
    assert out.scheduled[0].start_position == 12 and out.scheduled[0].num_tokens == 2
    assert b.num_cached_tokens == 12


def test_max_num_seqs_limits_admission():
    sched, _ = make(budget=64, max_seqs=2)
    for i in range(3):
        sched.add_request(req(f"r{i}", 2, start=5 * i))
    out = run_step(sched)
    assert [s.request_id for s in out.scheduled] == ["r0", "r1"]


def test_prompt_too_long_is_rejected_at_the_door():
    sched, _ = make(max_len=16)
    with pytest.raises(ValueError, match="at most 15"):
        sched.add_request(req("a", 16))
    with pytest.raises(ValueError, match="already in use"):
        sched.add_request(req("b", 2))
        sched.add_request(req("b", 2))


def test_stop_token_and_eos():
    sched, pool = make()
    probe = req("x", 3)
    eos = next_token(type("S", (), {"prompt_token_ids": probe.prompt_token_ids, "output_token_ids": []}))
    r = Request("e", list(range(3)), SamplingParams(max_tokens=10, temperature=0), eos_token_ids=(eos,))
    sched.add_request(r)
    run_step(sched)
    assert r.status == RequestStatus.FINISHED_STOPPED and r.output_token_ids == [eos]
    r2 = Request("i", list(range(3)), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True), eos_token_ids=(eos,))
    sched.add_request(r2)
    while sched.has_unfinished():
        run_step(sched)
    assert r2.status == RequestStatus.FINISHED_LENGTH and r2.num_output_tokens == 3
    assert pool.num_used_blocks == 0


def test_prefill_only_request_holds_its_blocks_until_released():
    sched, pool = make(budget=64)
    r = Request("p", list(range(10)), SamplingParams(max_tokens=50, temperature=0), prefill_only=True)
    sched.add_request(r)
    run_step(sched)
    assert r.status == RequestStatus.PREFILLED and r.num_output_tokens == 1
    assert sched.kv.block_ids("p") == [1, 2, 3] and pool.num_used_blocks == 3
    assert not sched.has_unfinished() and "p" in sched.held
    assert sched.release_held("p")
    assert pool.num_used_blocks == 0 and not sched.held
    pool.check_integrity()


def test_held_blocks_are_freed_when_the_lease_expires():
    sched, pool = make(budget=64)
    sched.lease_seconds = 5.0
    r = Request("p", list(range(10)), SamplingParams(max_tokens=50, temperature=0), prefill_only=True)
    sched.add_request(r)
    run_step(sched)
    assert sched.expire_leases(now=r.lease_deadline - 1) == []
    assert sched.expire_leases(now=r.lease_deadline + 0.01) == ["p"]
    assert pool.num_used_blocks == 0 and sched.num_expired_leases == 1
    pool.check_integrity()


def test_transferred_request_reuses_local_prefix_and_decodes():
    sched, pool = make(budget=64)
    warm = req("warm", 9)  # puts blocks for tokens 0..7 in the prefix cache
    sched.add_request(warm)
    while sched.has_unfinished():
        run_step(sched)
    r = Request("t", list(range(10)), SamplingParams(max_tokens=3, temperature=0))
    r.append_output_token(42)  # the first token, sampled by the prefill side
    first_block = sched.reserve_for_transfer(r)
    assert first_block == 2  # blocks 0 and 1 (tokens 0..7) are local hits; only block 2 is pulled
    assert r.status == RequestStatus.WAITING_FOR_KV and r.num_cached_tokens == 8
    sched.admit_transferred(r, ok=True)
    out = run_step(sched)
    assert out.scheduled[0].start_position == 10 and out.scheduled[0].token_ids == [42]
    while sched.has_unfinished():
        run_step(sched)
    assert r.num_output_tokens == 3 and pool.num_used_blocks == 0
    pool.check_integrity()


def test_failed_transfer_recomputes_and_abort_during_transfer_waits_for_it():
    sched, pool = make(budget=64, prefix=False)
    r = Request("t", list(range(10)), SamplingParams(max_tokens=2, temperature=0))
    r.append_output_token(42)
    sched.reserve_for_transfer(r)
    sched.admit_transferred(r, ok=False)
    out = run_step(sched)
    assert out.scheduled[0].start_position == 0 and out.scheduled[0].num_tokens == 11  # prompt + first token
    while sched.has_unfinished():
        run_step(sched)
    assert r.output_token_ids[0] == 42 and r.num_output_tokens == 2

    a = Request("a", list(range(10)), SamplingParams(max_tokens=2, temperature=0))
    a.append_output_token(1)
    sched.reserve_for_transfer(a)
    used = pool.num_used_blocks
    sched.abort("a")  # the pull is still writing: blocks must stay reserved
    assert pool.num_used_blocks == used > 0
    sched.admit_transferred(a, ok=True)
    assert a.status == RequestStatus.FINISHED_ABORTED and pool.num_used_blocks == 0
    pool.check_integrity()


def test_prompts_take_at_most_the_cap_while_requests_decode_and_the_whole_budget_otherwise():
    pool = BlockPool(40, True)
    sched = Scheduler(SchedulerConfig(16, 8, 128, prefill_tokens_while_decoding=4), KVCacheManager(pool, 4))
    a = req("a", 20, max_tokens=3)
    sched.add_request(a)
    first = run_step(sched)  # nobody decodes: the whole budget goes to the prompt
    assert [(s.request_id, s.num_tokens) for s in first.scheduled] == [("a", 16)]
    run_step(sched)  # a's last 4 prompt tokens; it samples its first token
    b, c = req("b", 30, max_tokens=2, start=100), req("c", 6, max_tokens=2, start=200)
    sched.add_request(b)
    sched.add_request(c)
    step = run_step(sched)  # a decodes: b's chunk is held to the cap, and c, waiting behind it, gets none
    assert [(s.request_id, s.num_tokens) for s in step.scheduled] == [("a", 1), ("b", 4)]
    step = run_step(sched)  # a's last token, and b's next chunk within the cap
    assert [(s.request_id, s.num_tokens) for s in step.scheduled] == [("a", 1), ("b", 4)]
    step = run_step(sched)  # a finished; b is mid-prompt and none decodes: the budget again (b 16 of its 22 left)
    assert [(s.request_id, s.num_tokens) for s in step.scheduled] == [("b", 16)]
    while sched.has_unfinished():
        run_step(sched)
    assert all(r.num_output_tokens == 2 for r in (b, c)) and pool.num_used_blocks == 0
    pool.check_integrity()


def test_a_chunk_held_back_by_the_cap_lets_the_decodes_behind_it_run():
    pool = BlockPool(40, True)
    sched = Scheduler(SchedulerConfig(16, 8, 128, long_prefill_token_threshold=4, prefill_tokens_while_decoding=4),
                      KVCacheManager(pool, 4))
    b, c, d = req("b", 10, max_tokens=2), req("c", 12, max_tokens=2, start=50), req("d", 2, max_tokens=3, start=90)
    for r in (b, c, d):
        sched.add_request(r)
    first = run_step(sched)  # nobody decodes: b and c 4 each (the per-request threshold), d's whole prompt
    assert [(s.request_id, s.num_tokens) for s in first.scheduled] == [("b", 4), ("c", 4), ("d", 2)]
    step = run_step(sched)  # d decodes: b's chunk fills the cap, c waits a step, d behind it still decodes
    assert [(s.request_id, s.num_tokens) for s in step.scheduled] == [("b", 4), ("d", 1)]
    while sched.has_unfinished():
        run_step(sched)
    assert [r.num_output_tokens for r in (b, c, d)] == [2, 2, 3] and pool.num_used_blocks == 0
