"""Profiles, catalog projection, the simulator and the planner, on hand-made profiles whose answers are known."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenworks.bench.metrics import SLO
from tokenworks.planner.catalog import load_catalog, project
from tokenworks.planner.planner import Planner, Traffic, profiles_for
from tokenworks.planner.profile import Fit, Profile, TransferModel, fit_linear3, fit_with_holdout
from tokenworks.planner.simulator import (Deployment, Pool, SimWorkload, met_slo, simulate, summarize_sim,
                                          with_kv_pool)


def make_profile(hardware="H100-SXM-80GB", *, pa=0.004, pb=2e-5, pc=1e-9, da=0.01, db=1e-4, dc=2e-8,
                 capacity=10**6, budget=2048, seqs=256, bw=25e9, units=1) -> Profile:
    return Profile(model="m", dtype="bfloat16", device="cuda", hardware=hardware, date="2026-11-27T00:00:00+00:00",
                   kv_bytes_per_token=131072, weight_bytes=16 * 10**9, prefill=Fit(pa, pb, pc, "p"),
                   decode=Fit(da, db, dc, "d"), transfer=TransferModel(1e-4, bw), max_num_batched_tokens=budget,
                   max_num_seqs=seqs, block_size=16, kv_capacity_tokens=capacity, units=units)


# --- fitting -----------------------------------------------------------------------------------------

def test_fit_recovers_coefficients_and_reports_held_out_error():
    rng = np.random.default_rng(1)
    x1 = rng.integers(1, 2048, 40).astype(float)
    x2 = x1 * rng.integers(1, 2048, 40)
    y = 0.01 + 3e-5 * x1 + 2e-9 * x2
    noisy = y * rng.normal(1.0, 0.01, 40)
    f = fit_with_holdout(list(x1), list(x2), list(noisy), "form")
    assert f.a == pytest.approx(0.01, rel=0.05)
    assert f.b == pytest.approx(3e-5, rel=0.05)
    assert f.c == pytest.approx(2e-9, rel=0.1)
    assert 0 < f.held_out_error_mean < 0.03 and f.held_out_error_max < 0.06
    assert f.num_points == 40


def test_fit_keeps_coefficients_non_negative():
    # y falls with x2: an unconstrained fit would give c < 0; the fit drops that term instead.
    f = fit_linear3([1, 2, 3, 4], [4, 3, 2, 1], [1.0, 1.1, 1.2, 1.3], "form")
    assert min(f.a, f.b, f.c) >= 0
    assert f(5, 0) == pytest.approx(1.4, rel=0.05)


def test_profile_round_trip_and_bad_files(tmp_path):
    p = make_profile()
    path = tmp_path / "p.json"
    p.save(str(path))
    assert Profile.load(str(path)) == p
    (tmp_path / "bad.json").write_text('{"model": "m"}')
    with pytest.raises(ValueError, match="not a tokenworks profile"):
        Profile.load(str(tmp_path / "bad.json"))
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ValueError, match="not JSON"):
        Profile.load(str(tmp_path / "junk.json"))


# --- catalog ------------------------------------------------------------------------------------------

def test_catalog_entries_name_their_sources():
    cat = load_catalog()
    assert {"H100-SXM-80GB", "H200-SXM-141GB", "A100-SXM-80GB", "L4-24GB", "CPU-EPYC-1core"} <= set(cat.kinds)
    for kind in cat.kinds.values():
        assert kind.memory_bandwidth_GBps > 0 and kind.price_per_hour > 0
        for key in ("peak_tflops", "memory_bandwidth_GBps", "memory_GiB", "price_per_hour"):
            assert kind.sources.get(key), f"{kind.name}: no source for {key}"
    with pytest.raises(ValueError, match="not in the catalog"):
        cat["TPU-v9"]


def test_projection_scales_compute_and_memory_terms_by_their_roofline():
    cat = load_catalog()
    h100 = make_profile("H100-SXM-80GB")
    a100 = project(h100, cat, "A100-SXM-80GB")
    compute = 989.4 / 312
    memory = 3350 / 2039
    assert a100.prefill.b == pytest.approx(h100.prefill.b * compute)
    assert a100.prefill.c == pytest.approx(h100.prefill.c * compute)
    weights_s = 16e9 / 3350e9  # reading the weights once at the H100's peak bandwidth
    overhead = h100.decode.a - weights_s  # the rest of the intercept: software, not scaled
    assert a100.decode.a == pytest.approx(overhead + weights_s * memory)
    assert a100.prefill.a == pytest.approx(0.0 + h100.prefill.a * memory)  # 4 ms < weights_s: all weight reads
    assert a100.decode.c == pytest.approx(h100.decode.c * memory)
    assert a100.decode.b == pytest.approx(h100.decode.b * compute)
    assert a100.hardware == "A100-SXM-80GB" and "projected" not in (h100.projected_from or "")
    assert a100.projected_from and "H100-SXM-80GB" in a100.projected_from
    assert a100.transfer.bytes_per_s == pytest.approx(25e9)
    two = project(h100, cat, "A100-SXM-80GB", units=2)
    assert two.decode.a == pytest.approx(overhead + weights_s * memory / 2) and two.units == 2
    tabled = Profile.from_json({**h100.to_json(), "decode": {**h100.to_json()["decode"], "a": 0, "b": 0,
                                                               "table": [[1, 0.010], [8, 0.012], [64, 0.030]]}})
    t = project(tabled, cat, "A100-SXM-80GB").decode
    g0 = 0.010 - (0.012 - 0.010) / 7  # the table's curve at 0 requests
    assert t.base(0) == pytest.approx((g0 - weights_s) + weights_s * memory)
    assert t.base(64) - t.base(8) == pytest.approx((0.030 - 0.012) * compute)


def test_projection_refuses_a_model_that_does_not_fit():
    cat = load_catalog()
    big = Profile.from_json({**make_profile().to_json(), "weight_bytes": 40 * 10**9})
    with pytest.raises(ValueError, match="does not fit"):
        project(big, cat, "L4-24GB")


def test_a_quantized_cpu_profile_projects_its_weights_by_parameters_and_to_its_own_class_by_default():
    cat = load_catalog()
    # the default model's figures: 97 MB read a step (4-bit layers), 134.5 M parameters, float32 compute on CPU
    cpu = Profile.from_json({**make_profile("CPU-EPYC-1core", units=2).to_json(), "device": "cpu", "dtype": "float32",
                             "weight_bytes": 96_576_768, "parameters": 134_515_008})
    on_l4 = project(cpu, cat, "L4-24GB")  # bfloat16 there: the parameters' bytes, not 4-bit's bytes halved
    assert on_l4.weight_bytes == 134_515_008 * 2 and on_l4.dtype == "bfloat16"
    assert project(cpu, cat, "CPU-EPYC-1core", units=4).weight_bytes == 96_576_768  # the same class keeps them
    profiles, notes = profiles_for([cpu], cat, None)
    assert sorted(profiles) == ["CPU-EPYC-1core"]
    assert len(notes) == 1 and "L4-24GB" in notes[0] and "--hardware" in notes[0]
    profiles, notes = profiles_for([cpu], cat, ["CPU-EPYC-1core", "L4-24GB"])  # named: projected, with a warning
    assert sorted(profiles) == ["CPU-EPYC-1core", "L4-24GB"] and profiles["L4-24GB"].projected_from
    assert len(notes) == 1 and notes[0].startswith("L4-24GB projected by roofline from a cpu profile")
    gpu_profiles, gpu_notes = profiles_for([make_profile("H100-SXM-80GB")], cat, None)  # GPU to GPU: all GPUs
    assert "A100-SXM-80GB" in gpu_profiles and "CPU-EPYC-1core" not in gpu_profiles and len(gpu_notes) == 1


# --- simulator ----------------------------------------------------------------------------------------

def test_single_request_latencies_are_exact():
    p = make_profile(pa=0.02, pb=0.001, pc=0.0, da=0.01, db=0.0, dc=0.0, bw=1e9)
    p = Profile.from_json({**p.to_json(), "kv_bytes_per_token": 1000})
    work = SimWorkload([0.0], [100], [10])
    local = simulate(Deployment((Pool("both", 1, p),)), work)
    assert local.ttft[0] == pytest.approx(0.02 + 0.1)  # prefill step
    assert local.e2e[0] == pytest.approx(0.12 + 9 * 0.01)  # 9 decode steps for tokens 2..10
    remote = simulate(Deployment((Pool("prefill", 1, p), Pool("decode", 1, p))), work)
    kv = 100 * 1000 / 1e9 + 1e-4  # bytes / bandwidth + fixed
    assert remote.ttft[0] == pytest.approx(0.12)
    assert remote.e2e[0] == pytest.approx(0.12 + kv + 0.09)
    assert remote.stats["remote_prefills"] == 1 and remote.stats["kv_bytes"] == 100 * 1000


def test_prefill_queue_is_fcfs_and_chunked():
    p = make_profile(pa=0.01, pb=0.001, pc=0.0, budget=64)
    work = SimWorkload([0.0, 0.0], [100, 20], [2, 2])
    r = simulate(Deployment((Pool("prefill", 1, p), Pool("decode", 1, p))), work)
    # step 1: 64 tokens of request 0; step 2: its last 36 + all 20 of request 1 (one step, 56 tokens).
    assert r.ttft[0] == pytest.approx(0.01 + 0.064 + 0.01 + 0.056)
    assert r.ttft[1] == pytest.approx(r.ttft[0])


@pytest.mark.parametrize("attention", ["sum", "padded"])
@pytest.mark.parametrize("layout", ["disaggregated", "aggregated", "mixed"])
def test_closed_form_jumps_equal_step_by_step(layout, attention):
    p = make_profile(pa=0.003, pb=2e-5, pc=3e-9, da=0.008, db=3e-4, dc=4e-7, budget=256, seqs=8, capacity=6000)
    p = Profile.from_json({**p.to_json(), "decode_attention": attention})
    pools = {"disaggregated": (Pool("prefill", 2, p), Pool("decode", 2, p)),
             "aggregated": (Pool("both", 2, p),),
             "mixed": (Pool("prefill", 1, p), Pool("both", 2, p))}[layout]
    dep = Deployment(pools, local_prefill_threshold=40)
    rng = np.random.default_rng(7)
    n = 300
    work = SimWorkload(np.cumsum(rng.exponential(0.05, n)), rng.integers(5, 600, n), rng.integers(1, 120, n))
    fast = simulate(dep, work)
    slow = simulate(dep, work, max_jump=1)
    assert slow.events > 2 * fast.events  # it really did step one at a time
    np.testing.assert_allclose(fast.ttft, slow.ttft, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast.e2e, slow.e2e, rtol=1e-9, atol=1e-9)
    assert not np.isnan(fast.e2e).any() and (fast.e2e >= fast.ttft).all()
    for i in range(n):  # no request is faster than its own prefill alone and its decode steps at batch 1
        P, O = int(work.prompt_len[i]), int(work.output_len[i])
        alone = p.prefill(P, P * P) if P <= 256 else 0.0
        assert fast.ttft[i] >= alone - 1e-12
        assert fast.e2e[i] - fast.ttft[i] >= (O - 1) * p.decode.a - 1e-9


@pytest.mark.parametrize("layout", ["disaggregated", "aggregated", "mixed"])
def test_tight_pools_with_shared_blocks_finish_every_request_and_jumps_still_equal_steps(layout):
    """Random prompts after one of 3 system prompts, pools of 40 blocks (a long prompt and its output fill most of
    one), some with host tiers: every request finishes, nothing is cached that was not stated, and the closed-form
    jumps equal stepping one decode step at a time."""
    p = make_profile(pa=0.003, pb=2e-5, pc=3e-9, da=0.008, db=3e-4, dc=4e-7, budget=256, seqs=8, capacity=640)
    pools = {"disaggregated": (Pool("prefill", 2, p), Pool("decode", 2, p, host_kv_tokens=320)),
             "aggregated": (Pool("both", 2, p, host_kv_tokens=160),),
             "mixed": (Pool("prefill", 1, p, host_kv_tokens=320), Pool("both", 2, p))}[layout]
    dep = Deployment(pools, local_prefill_threshold=40)
    rng = np.random.default_rng(11)
    n = 300
    own = rng.integers(1, 300, n)
    system = rng.integers(0, 3, n)
    plen = 128 + own
    blocks = [tuple([("s", int(k), j) for j in range(8)] + [("r", i, j) for j in range(int(own[i]) // 16)])
              for i, k in enumerate(system)]
    work = SimWorkload(np.cumsum(rng.exponential(0.03, n)), plen, rng.integers(1, 200, n), blocks, 16)
    fast = simulate(dep, work)
    slow = simulate(dep, work, max_jump=1)
    assert slow.events > 2 * fast.events
    np.testing.assert_allclose(fast.ttft, slow.ttft, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fast.e2e, slow.e2e, rtol=1e-9, atol=1e-9)
    assert not np.isnan(fast.e2e).any() and (fast.e2e >= fast.ttft).all()
    stated = sum(min(len(b) * 16, int(L) - 1) for b, L in zip(blocks, plen))
    assert 0 < fast.stats["cached_prompt_tokens"] < stated


def test_padded_decode_attention_costs_the_longest_context_for_every_request():
    p = make_profile(pa=0.0, pb=0.0, pc=0.0, da=0.01, db=0.0, dc=1e-5)
    # Request 1 arrives while request 0's prefill step runs: it is prefilled beside request 0's
    # second decode step, then both decode together for request 1's two remaining tokens.
    work = SimWorkload([0.0, 0.0], [1000, 10], [10, 3])
    times = {}
    for mode in ("sum", "padded"):
        prof = Profile.from_json({**p.to_json(), "decode_attention": mode})
        r = simulate(Deployment((Pool("both", 1, prof),), local_prefill_threshold=10**6), work)
        times[mode] = r.e2e[1] - r.ttft[1]  # two decode steps of the short request, beside the long one
    assert times["sum"] == pytest.approx(2 * 0.01 + 1e-5 * ((1003 + 11) + (1004 + 12)))
    assert times["padded"] == pytest.approx(2 * 0.01 + 1e-5 * (2 * 1003 + 2 * 1004))


def test_a_prompt_beside_decodes_is_chunked_to_the_profiles_cap():
    p = make_profile(pa=0.0, pb=0.001, pc=0.0, da=0.01, db=0.0, dc=0.0, budget=512)
    # Request 0 (10 tokens) is prefilled alone in 0.01 s and decodes; request 1 (300 tokens) joins at that step's end.
    work = SimWorkload([0.0, 0.001], [10, 300], [50, 2])
    runs = {}
    for cap in (0, 64):
        prof = Profile.from_json({**p.to_json(), "prefill_tokens_while_decoding": cap})
        runs[cap] = simulate(Deployment((Pool("both", 1, prof),), local_prefill_threshold=10**6), work)
    # no cap: one step of 300 prompt tokens + 1 decode; cap 64: 64, 64, 64, 64, 44, each with request 0's decode
    assert runs[0].ttft[1] == pytest.approx(0.01 + 0.301 - 0.001)
    assert runs[64].ttft[1] == pytest.approx(0.01 + 4 * 0.065 + 0.045 - 0.001)
    assert runs[64].e2e[0] < runs[0].e2e[0] - 3 * 0.01  # request 0 made 4 more tokens meanwhile


def _flat(pa=0.02, pb=0.001, pc=0.0, capacity=10**6, **kw) -> Profile:
    """Prefill pa + pb a token (+ pc a token x context), decode 10 ms a step: hits are visible in TTFT to the token."""
    p = make_profile(pa=pa, pb=pb, pc=pc, da=0.01, db=0.0, dc=0.0, bw=1e9, capacity=capacity, **kw)
    return Profile.from_json({**p.to_json(), "kv_bytes_per_token": 1000})


def test_a_prompts_cached_blocks_are_not_prefilled_again():
    # three 40-token prompts of 16-token blocks, far apart: the second starts as the first does, the third has the
    # first's second block id after another first block (another prefix: a chain, not a set of ids)
    work = SimWorkload([0.0, 10.0, 20.0], [40, 40, 40], [2, 2, 2], [(1, 2), (1, 2), (9, 2)], block_tokens=16)
    r = simulate(Deployment((Pool("both", 1, _flat()),)), work)
    assert r.ttft.tolist() == pytest.approx([0.02 + 0.040, 0.02 + 0.008, 0.02 + 0.040])
    assert r.stats["cached_prompt_tokens"] == 32
    plain = simulate(Deployment((Pool("both", 1, _flat()),)), SimWorkload([0.0, 10.0, 20.0], [40] * 3, [2] * 3))
    assert plain.ttft.tolist() == pytest.approx([0.06] * 3) and plain.stats["cached_prompt_tokens"] == 0
    # a whole prompt in cache still computes its last token, and so its last block: the engine looks up the whole
    # blocks before the last token (kv_cache_manager), so 16 of 32 tokens are found here, 32 of 33 below
    whole = simulate(Deployment((Pool("both", 1, _flat()),)), SimWorkload([0.0, 10.0], [32, 32], [2, 2],
                                                                             [(1, 2), (1, 2)], block_tokens=16))
    assert whole.ttft[1] == pytest.approx(0.02 + 0.016) and whole.stats["cached_prompt_tokens"] == 16
    longer = simulate(Deployment((Pool("both", 1, _flat()),)), SimWorkload([0.0, 10.0], [33, 33], [2, 2],
                                                                              [(1, 2), (1, 2)], block_tokens=16))
    assert longer.ttft[1] == pytest.approx(0.02 + 0.001) and longer.stats["cached_prompt_tokens"] == 32
    # a block id is a block only after the ids before it: (9, 2)'s second block is not (1, 2)'s
    chain = simulate(Deployment((Pool("both", 1, _flat()),)), SimWorkload([0.0, 10.0, 20.0], [40] * 3, [2] * 3,
                                                                             [(1,), (9, 2), (1, 2)], block_tokens=16))
    assert chain.stats["cached_prompt_tokens"] == 16
    # an engine measured with --no-prefix-caching: its workers reuse nothing
    off = Profile.from_json({**_flat().to_json(), "prefix_caching": False})
    r = simulate(Deployment((Pool("both", 1, off),)), work)
    assert r.stats["cached_prompt_tokens"] == 0 and r.ttft.tolist() == pytest.approx([0.06] * 3)


def test_a_prompt_finds_the_blocks_a_prompt_before_it_computed_while_it_waited():
    """As the engine looks up the cache when it admits a request: B (its first 4 blocks A's) arrives while A's
    160 tokens prefill 48 a step; B starts in A's last step and finds the 64 tokens A computed in the steps
    before, not what the cache held when B arrived (nothing)."""
    work = SimWorkload([0.0, 0.001], [160, 80], [2, 2], [tuple(range(1, 11)), (1, 2, 3, 4, 99)], block_tokens=16)
    for pools in ((Pool("both", 1, _flat(budget=48)),),
                  (Pool("prefill", 1, _flat(budget=48)), Pool("decode", 1, _flat(budget=48)))):
        r = simulate(Deployment(pools, local_prefill_threshold=4), work)
        # A: 48, 48, 48 tokens (0.068 s a step), then its last 16 beside B's 16 uncached (0.052 s)
        assert r.ttft.tolist() == pytest.approx([3 * 0.068 + 0.052, 3 * 0.068 + 0.052 - 0.001])
        assert r.stats["cached_prompt_tokens"] == 64


def test_disaggregated_hits_prefill_less_and_pull_only_what_the_decode_worker_lacks():
    work = SimWorkload([0.0, 10.0], [40, 40], [3, 3], [(1, 2), (1, 2)], block_tokens=16)
    p = _flat(pc=1e-5)  # the new tokens' attention still reads the cached context: 8 x 40
    pools = (Pool("prefill", 2, p), Pool("decode", 1, p))
    r = simulate(Deployment(pools, local_prefill_threshold=4), work)
    assert r.stats["remote_prefills"] == 2 and r.stats["cached_prompt_tokens"] == 32
    assert r.ttft[1] == pytest.approx(0.028 + 1e-5 * 8 * 40)
    assert r.stats["kv_bytes"] == 40 * 1000 + 8 * 1000  # the second pulls the 8 tokens its decode worker lacks
    # what the decode worker lacks is within the threshold: it prefills there, from its cached blocks
    r = simulate(Deployment(pools, local_prefill_threshold=8), work)
    assert r.stats["remote_prefills"] == 1 and r.stats["local_prefills"] == 1
    assert r.ttft[1] == pytest.approx(0.028 + 1e-5 * 8 * 40) and r.stats["kv_bytes"] == 40 * 1000


def test_the_prefix_cache_evicts_the_least_recently_used_blocks_within_kv_capacity():
    def hits(order):
        blocks = {"A": (1, 2), "B": (3, 4), "C": (5, 6)}
        work = SimWorkload([10.0 * i for i in range(len(order))], [40] * len(order), [2] * len(order),
                           [blocks[x] for x in order], block_tokens=16)
        r = simulate(Deployment((Pool("both", 1, _flat(capacity=80)),)), work)  # 5 blocks: 4 beside a tail
        return [round((0.06 - t) / 0.001) for t in r.ttft]  # cached tokens per request

    assert hits("ABCA") == [0, 0, 0, 0]  # C pushed out A, the oldest
    assert hits("ABACA") == [0, 0, 32, 0, 32]  # A used again is newer than B: C pushed out B
    # a prompt's blocks leave tail first, as the engine releases them: B's three and the block of its prompt's tail
    # and output push out A's last two, and A's first block, the one other prompts would share, is still there
    work = SimWorkload([0.0, 10.0, 20.0], [56] * 3, [2] * 3, [(1, 2, 3), (4, 5, 6), (1, 2, 3)], block_tokens=16)
    r = simulate(Deployment((Pool("both", 1, _flat(capacity=80)),)), work)  # room for 5 blocks
    assert r.stats["cached_prompt_tokens"] == 16 and r.ttft[2] == pytest.approx(0.02 + 0.001 * 40)


def test_a_prompt_starts_on_an_aggregated_worker_only_when_its_kv_fits_beside_the_running_ones():
    """Two 40-token prompts, 30 tokens out each (70 of KV), at once: a pool of 140 holds both; one of 100 holds
    one, so the second is prefilled when the first has finished (29 decode steps of 10 ms after its 60 ms)."""
    work = SimWorkload([0.0, 0.0], [40, 40], [30, 30])
    both = simulate(Deployment((Pool("both", 1, _flat(capacity=140)),)), work)
    one = simulate(Deployment((Pool("both", 1, _flat(capacity=100)),)), work)
    assert both.ttft[1] == pytest.approx(0.121) and both.e2e.tolist() == pytest.approx([0.401, 0.411])
    assert one.ttft.tolist() == pytest.approx([0.06, 0.35 + 0.06]) and one.e2e.tolist() == pytest.approx([0.35, 0.7])
    alone = simulate(Deployment((Pool("both", 1, _flat(capacity=50)),)), SimWorkload([0.0], [40], [30]))
    assert alone.e2e[0] == pytest.approx(0.35)  # larger than the pool: it runs alone rather than never
    ones = simulate(Deployment((Pool("both", 1, _flat(capacity=100)),)), SimWorkload([0, 1, 2, 3], [40] * 4, [1] * 4))
    assert ones.e2e.tolist() == pytest.approx([0.06] * 4)  # a request done at its first token gives its KV back


def test_blocks_a_running_request_reads_stay_cached_while_other_prompts_pass_through():
    """A pool of 10 blocks: A's prefix is cached by A0, then A reads it for 60 tokens while three other prompts
    (7 blocks) come and go: D, A's prefix again, still finds it (32 tokens, and A its 32)."""
    work = SimWorkload([0.0, 0.05, 0.1, 0.2, 0.3, 0.4], [33, 33, 33, 33, 48, 33], [2, 60, 2, 2, 2, 2],
                       [(1, 2), (1, 2), (3, 4), (5, 6), (7, 8, 9), (1, 2)], block_tokens=16)
    r = simulate(Deployment((Pool("both", 1, _flat(capacity=160)),)), work)
    assert r.stats["cached_prompt_tokens"] == 2 * 32  # D computes 1 token beside A's decode: 22 ms, after a step
    assert r.ttft[5] == pytest.approx(0.024)  # boundary 2 ms on (33 tokens from scratch would take 53 ms and more)


def test_a_host_tier_keeps_what_the_pool_evicts_and_the_router_counts_it_held():
    """serve --kv-host-memory-gib: blocks the pool evicts are saved in host memory (least recently used dropped)
    and a prompt continuing into them copies them back instead of prefilling them."""
    def hits(host_tokens):
        order = "ABCA"  # C pushes A out of a pool of 5 blocks (A's tail first, then its head)
        ids = {"A": (1, 2), "B": (3, 4), "C": (5, 6)}
        work = SimWorkload([10.0 * i for i in range(4)], [40] * 4, [2] * 4, [ids[x] for x in order], block_tokens=16)
        pool = Pool("both", 1, _flat(capacity=80), host_kv_tokens=host_tokens)
        return simulate(Deployment((pool,)), work).stats["cached_prompt_tokens"]

    assert (hits(0), hits(16), hits(64)) == (0, 16, 32)  # a host tier of 1 block kept A's head, saved last
    planner = Planner({"H100-SXM-80GB": _flat()}, load_catalog(), Traffic(1.0, np.array([40]), np.array([2])),
                      SLO(ttft=1.0), host_kv_gib=1.0)  # plan --kv-host-memory-gib: whole blocks of 16 x 1000 bytes
    (pool,) = planner.deployment([("both", 2, "H100-SXM-80GB")]).pools
    assert pool.host_kv_tokens == 2**30 // 16000 * 16
    small = with_kv_pool(_flat(), 0.01)  # --kv-cache-memory-gib: whole blocks, less the one the engine keeps back
    assert small.kv_capacity_tokens == (int(0.01 * 2**30) // 16000 - 1) * 16 and with_kv_pool(small, None) is small
    # Two workers. Y, queued on worker 0 when A comes back, makes worker 1 the less loaded; but worker 0 holds A's
    # 12 blocks in its host tier since B and C pushed them out of its pool: A goes there and prefills 8 tokens.
    a, b, c = tuple(range(1, 13)), tuple(range(21, 33)), tuple(range(41, 53))
    work = SimWorkload([0.0, 10.0, 20.0, 29.99, 30.0], [200, 200, 200, 40, 200], [2] * 5, [a, b, c, (61, 62), a],
                       block_tokens=16)
    # with the tier: Y's prefill ends 50 ms after A came, then A's 8 tokens beside Y's decode (9 tokens: 29 ms)
    for host, cached, ttft in ((0, 0, 0.22), (512, 192, 0.05 + 0.029)):
        r = simulate(Deployment((Pool("both", 2, _flat(capacity=256), host_kv_tokens=host),)), work)
        assert r.stats["cached_prompt_tokens"] == cached and r.ttft[4] == pytest.approx(ttft, abs=0.002)


def test_a_prefill_worker_holds_a_prompts_blocks_until_its_kv_has_crossed():
    """A prefill worker of 5 blocks and two 64-token prompts (4 blocks each) at once, over a slow link (64 KB in
    64 ms): the second starts when the first's KV has crossed to the decode worker, not when its prefill ended."""
    from dataclasses import replace

    work = SimWorkload([0.0, 0.0], [64, 64], [3, 3], [(1, 2, 3, 4), (5, 6, 7, 8)], block_tokens=16)
    slow = replace(_flat(), transfer=TransferModel(1e-4, 1e6))

    def ttft(capacity):
        pools = (Pool("prefill", 1, _flat(capacity=capacity)), Pool("decode", 1, slow))
        return simulate(Deployment(pools, local_prefill_threshold=0), work).ttft.tolist()

    assert ttft(10**6) == pytest.approx([0.084, 0.168])  # one after the other
    assert ttft(80) == pytest.approx([0.084, 0.084 + 0.064 + 1e-4 + 0.084])


def test_a_shared_prefix_takes_the_decode_workers_pool_once_however_many_requests_read_it():
    """Three requests of the same 65-token prompt (4 stated blocks) and 20 tokens out on a decode worker of 10
    blocks: each holds 2 blocks of its own beside the shared 4, so all three decode together (counted whole,
    85 tokens each, the second would have waited for the first to finish, the third for the second)."""
    work = SimWorkload([0.0, 0.0, 0.0], [65] * 3, [20] * 3, [(1, 2, 3, 4)] * 3, block_tokens=16)
    pools = (Pool("prefill", 1, _flat()), Pool("decode", 1, _flat(capacity=160)))
    r = simulate(Deployment(pools, local_prefill_threshold=0), work)
    assert r.e2e.tolist() == pytest.approx([0.084 + 0.19, 0.106 + 0.198, 0.106 + 0.198], abs=0.002)


def test_blocks_running_requests_hold_outside_the_cache_take_its_room_until_they_finish():
    """A pool of 8 blocks. A (2 stated blocks) runs and ends; L, sharing nothing, decodes 60 tokens in 5 blocks;
    M (2 other blocks) comes while L runs: with 3 blocks left beside L, M's push out A's, as the engine's free
    list gives A's cached blocks to M. Once L is done its blocks are the cache's again: M asked again hits."""
    def cached(capacity):
        work = SimWorkload([0.0, 1.0, 1.1, 5.0, 6.0], [33, 16, 33, 33, 33], [2, 60, 2, 2, 2],
                           [(1, 2), (), (3, 4), (1, 2), (3, 4)], block_tokens=16)
        r = simulate(Deployment((Pool("both", 1, _flat(capacity=capacity)),)), work)
        return r.stats["cached_prompt_tokens"]

    assert cached(128) == 0 + 32  # A found nothing at 5 s; M at 6 s its 2 blocks
    assert cached(256) == 32 + 32  # a pool with room for all


def test_prefix_routing_picks_what_weighing_every_worker_would_pick():
    """The simulator's --routing kv looks only at the workers holding a prompt's first block and the least-queued
    worker of each rate; over a random run of stores (evicting: 6 blocks a worker), queue and load changes, on
    workers of two rates, every pick equals the brute-force minimum of (queued + uncached) / rate, in flight,
    index."""
    import random

    from tokenworks.planner.simulator import _CacheRouting, _LeastLoaded, _Prefiller

    rng = random.Random(5)
    profiles = [make_profile(pa=0.004, capacity=96), make_profile(pa=0.002, pb=1e-5, capacity=96)]
    workers = [_Prefiller(profiles[i % 2]) for i in range(9)]
    loads = _LeastLoaded(len(workers))
    routing = _CacheRouting(workers, loads, 16)
    assert len(routing.heaps) == 2

    def chain():
        ids = [rng.randrange(3)] + [rng.randrange(4) for _ in range(rng.randrange(0, 5))]
        keys, h = [], 0
        for b in ids:
            h = hash((h, b))
            keys.append(h)
        return tuple(keys)

    picks = set()
    for _ in range(3000):
        i = rng.randrange(len(workers))
        op = rng.randrange(5)
        if op == 0:
            workers[i].cache.store(chain())
        elif op == 1:
            workers[i].queued += rng.randrange(1, 300)
            loads.add(i)
        elif op == 2 and loads.load[i]:
            loads.remove(i)
            routing.lowered(i)
        elif op == 3 and workers[i].queued:
            workers[i].queued -= rng.randrange(1, workers[i].queued + 1)
            routing.lowered(i)
        ks, length = chain(), rng.randrange(1, 120)
        ks = ks[: length // 16]
        want = min((((w.queued + length - min(w.cache.held(ks), (length - 1) // 16) * 16) / w.rate, loads.load[k], k),
                    min(w.cache.held(ks), (length - 1) // 16) * 16) for k, w in enumerate(workers))
        got = routing.pick(ks, length)
        assert got == (want[0][2], want[1])
        picks.add(got)
        for key, held_by in routing.holders.items():  # the index is what the caches hold
            assert held_by == {k for k, w in enumerate(workers) if key in w.cache.blocks}
    assert len({p[0] for p in picks}) == len(workers) and any(p[1] for p in picks)


def test_prefix_routing_keeps_a_prefix_on_the_worker_that_holds_it():
    n = 40
    ids = [(7, 8) if i % 2 else (3, 4) for i in range(n)]
    work = SimWorkload([1.0 * i for i in range(n)], [48] * n, [4] * n, ids, block_tokens=16)
    r = simulate(Deployment((Pool("both", 4, _flat()),)), work)
    assert r.stats["cached_prompt_tokens"] == (n - 2) * 32  # each prefix prefilled once, on one worker
    # idle workers, one holding the prefix: it goes there (the worker with fewer requests would be the first)
    spread = SimWorkload([0.0, 0.001, 5.0], [48] * 3, [2] * 3, [(3, 4), (7, 8), (7, 8)], block_tokens=16)
    assert simulate(Deployment((Pool("both", 2, _flat()),)), spread).stats["cached_prompt_tokens"] == 32
    # the worker holding the prefix but busy with a long prompt loses to an idle one that must prefill it all
    busy = SimWorkload([0.0, 1.0, 1.001], [48, 2000, 48], [2, 2, 2], [(3, 4), (1,), (3, 4)], block_tokens=16)
    r = simulate(Deployment((Pool("both", 2, _flat(budget=4096)),)), busy)
    assert r.ttft[2] == pytest.approx(0.068) and r.stats["cached_prompt_tokens"] == 0
    sharded = simulate(Deployment((Pool("both", 4, _flat()),)), work, shards=2)
    assert sharded.stats["shards"] == 2 and sharded.stats["cached_prompt_tokens"] == (n - 2) * 32


def test_admission_limit_rejects_and_is_reported():
    p = make_profile(da=0.05)
    work = SimWorkload(np.zeros(10), [50] * 10, [100] * 10)
    r = simulate(Deployment((Pool("both", 1, p),), max_inflight=4), work)
    assert r.rejected.sum() == 6 and np.isnan(r.ttft[r.rejected]).all()
    s = summarize_sim(r, SLO(ttft=10.0), price_per_hour=2.0)
    assert s["requests"] == 10 and s["completed"] == 4 and s["errors"] == {"HTTP 429": 6}
    assert s["slo_attainment"] == pytest.approx(0.4)
    assert s["cost_per_million_output_tokens"] == pytest.approx(2.0 * r.duration / 3600 / 400 * 1e6)
    assert set(s) >= {"ttft_s", "tpot_s", "e2e_s", "itl_s", "good_request_throughput", "duration_s"}


def test_more_decode_workers_lower_tpot_under_load():
    p = make_profile(da=0.01, db=2e-3, dc=1e-7)
    rng = np.random.default_rng(3)
    n = 2000
    work = SimWorkload(np.cumsum(rng.exponential(1 / 40, n)), rng.integers(50, 300, n), rng.integers(50, 200, n))
    tpot = [np.nanmedian(simulate(Deployment((Pool("prefill", 2, p), Pool("decode", d, p))), work).tpot)
            for d in (1, 2, 4)]
    assert tpot[0] > tpot[1] > tpot[2]


# --- planner ------------------------------------------------------------------------------------------

def _traffic(rate, prompt, output, n=4096):
    return Traffic(rate, np.asarray(prompt(n)), np.asarray(output(n)))


def _lengths(lo, hi, seed):
    return lambda n: np.random.default_rng(seed).integers(lo, hi, n)


def _plan(profiles, traffic, slo, **kw):
    planner = Planner(profiles, load_catalog(), traffic, slo, sim_requests=1500, **kw)
    return planner, planner.search(list(profiles), top=3)


def test_decode_heavy_traffic_gets_more_decode_workers():
    p = make_profile(pa=0.002, pb=2e-5, da=0.01, db=1e-4, dc=1e-8, seqs=32)
    profiles = {"H100-SXM-80GB": p}
    slo = SLO(ttft=0.5, tpot=0.02)
    decode_heavy = _traffic(60, _lengths(50, 150, 1), _lengths(400, 800, 2))
    prefill_heavy = _traffic(60, _lengths(1500, 3000, 1), _lengths(4, 12, 2))
    _, dh = _plan(profiles, decode_heavy, slo)
    _, ph = _plan(profiles, prefill_heavy, slo)
    d_pools = {r: n for r, n, _, _ in next(c for c in dh if c.layout == "disaggregated").pools}
    p_pools = {r: n for r, n, _, _ in next(c for c in ph if c.layout == "disaggregated").pools}
    assert d_pools["decode"] > d_pools["prefill"]
    assert p_pools["prefill"] > p_pools["decode"]


def test_tighter_ttft_moves_capacity_to_prefill():
    p = make_profile(pa=0.005, pb=5e-5, pc=2e-9, da=0.01, db=1e-4)
    profiles = {"H100-SXM-80GB": p}
    traffic = _traffic(40, _lengths(500, 1500, 1), _lengths(50, 150, 2))
    planner = Planner(profiles, load_catalog(), traffic, SLO(ttft=2.0, tpot=0.05), sim_requests=1500)
    loose = planner.fewest_prefill("H100-SXM-80GB")
    planner = Planner(profiles, load_catalog(), traffic, SLO(ttft=0.15, tpot=0.05), sim_requests=1500)
    tight = planner.fewest_prefill("H100-SXM-80GB")
    assert tight > loose
    assert planner.fewest_decode("H100-SXM-80GB") == Planner(
        profiles, load_catalog(), traffic, SLO(ttft=2.0, tpot=0.05), sim_requests=1500).fewest_decode("H100-SXM-80GB")


def test_cheaper_slower_kind_wins_when_the_slo_is_loose(tmp_path):
    fast = make_profile("H100-SXM-80GB")
    cat = load_catalog()
    slow = project(fast, cat, "L4-24GB")  # 3-11x slower, 4x cheaper per hour
    profiles = {"H100-SXM-80GB": fast, "L4-24GB": slow}
    traffic = _traffic(4, _lengths(100, 400, 1), _lengths(50, 150, 2))
    _, loose = _plan(profiles, traffic, SLO(ttft=5.0, tpot=0.5))
    assert {k for _, _, k, _ in loose[0].pools} == {"L4-24GB"}
    _, tight = _plan(profiles, traffic, SLO(ttft=0.1, tpot=0.015))
    assert "H100-SXM-80GB" in {k for _, _, k, _ in tight[0].pools}
    assert tight[0].price_per_hour >= loose[0].price_per_hour


def test_chosen_layout_simulated_meets_its_slos_and_costs_what_it_says():
    p = make_profile()
    traffic = _traffic(80, _lengths(100, 1200, 5), _lengths(20, 300, 6))
    slo = SLO(ttft=0.4, tpot=0.03)
    planner, best = _plan({"H100-SXM-80GB": p}, traffic, slo, budget_per_hour=500.0)
    assert best, "no layout found"
    top = best[0]
    # A fresh, longer run with another seed: the layout holds up.
    check = Traffic(80, traffic.prompt_len, traffic.output_len, seed=11).workload(4000)
    r = simulate(top.deployment, check)
    assert met_slo(r, slo, skip=800).mean() >= 0.9
    assert top.price_per_hour == pytest.approx(top.units * 2.99)
    per_hour_tokens = 80 * traffic.mean_output * 3600
    assert top.cost_per_million_output == pytest.approx(top.price_per_hour / per_hour_tokens * 1e6)
    assert top.goodput is not None and top.goodput >= 80
    assert all(c.price_per_hour <= 500 for c in best)
    assert [c.price_per_hour for c in best] == sorted(c.price_per_hour for c in best)


# --- the commands, end to end on a tiny random model --------------------------------------------------

TINY = {"model_type": "llama", "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "max_position_embeddings": 2048, "tie_word_embeddings": True, "eos_token_id": 2}


def _cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tokenworks.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def tiny_profile(tmp_path_factory):
    d = tmp_path_factory.mktemp("profile")
    (d / "config.json").write_text(json.dumps(TINY))
    out = d / "profile.json"
    r = _cli("profile", "--quick", "--random-weights", str(d / "config.json"), "--kv-transport", "tcp",
             "--threads", "1", "--hardware", "CPU-EPYC-1core", "--kv-cache-memory-gib", "0.05", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out error" in r.stdout
    return out


def test_a_decode_point_keeps_its_batch_while_the_rest_prefill_beside_decodes():
    """16 prompts of 256 tokens, 128 prompt tokens a step once some decode (the CPU default): the first ones keep
    decoding for the ~30 steps the others take to prefill, and the point is timed at batch 16."""
    from tokenworks.config import EngineArgs, ModelConfig
    from tokenworks.llm import build_random_engine
    from tokenworks.planner.profiler import _Prompts, _Recorder, measure_decode

    cfg = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position=1024, tie_word_embeddings=True)
    args = EngineArgs(device="cpu", dtype="float32", num_blocks=400, max_num_batched_tokens=512, max_num_seqs=32,
                      prefill_tokens_while_decoding=128)
    engine = build_random_engine(args, cfg, "tiny").engine
    engine.overlap = False
    rec = _Recorder(engine.runner)
    engine.runner = rec
    batch, ctx, seconds = measure_decode(engine, rec, _Prompts(cfg.vocab_size), 16, 256, 12, lambda: None)
    assert batch == 16 and ctx > 16 * 256 and seconds > 0
    assert not engine.has_unfinished()


def test_a_profile_says_whether_its_engine_caches_prefixes():
    from tokenworks.config import EngineArgs, ModelConfig
    from tokenworks.planner.profiler import Plan, profile_engine

    cfg = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=1,
                      num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                      max_position=512, tie_word_embeddings=True)
    plan = Plan(prefill=((1, 16), (1, 32), (2, 16), (1, 64), (3, 16), (1, 48)), decode=((1, 16), (2, 16), (4, 32),
                (3, 24), (1, 40), (2, 48)), decode_steps=2, reps=1, transfer_tokens=(16,))
    for caching in (True, False):
        args = EngineArgs(device="cpu", dtype="float32", num_blocks=64, max_num_batched_tokens=128, max_num_seqs=8,
                          enable_prefix_caching=caching)
        prof = profile_engine(args, plan, random_config=cfg, transport="tcp", progress=False)
        assert prof.prefix_caching is caching and ("no prefix caching" in prof.describe()) is not caching
        assert not prof.quick and prof.warning("p.json") == ""


def test_profile_command_measures_and_fits(tiny_profile):
    prof = Profile.load(str(tiny_profile))
    assert prof.hardware == "CPU-EPYC-1core" and prof.projected_from is None and prof.dtype == "float32"
    assert prof.parameters > 0 and prof.prefill_tokens_while_decoding == 128  # the engine's CPU default
    assert prof.prefix_caching is True  # the engine's default; a profile without the field (older) reads as True
    assert prof.quick is True and "--quick" in prof.warning("p.json")  # simulate and plan print it
    old = {k: v for k, v in prof.to_json().items() if k != "prefix_caching"}
    assert Profile.from_json(old).prefix_caching is True
    assert prof.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2  # layers x k/v x kv heads x head dim x 2 bytes (float16 pool)
    assert len(prof.points["prefill"]) >= 6 and len(prof.points["decode"]) >= 6
    assert prof.prefill.held_out_error_mean is not None and prof.decode.held_out_error_mean is not None
    # The fit describes what was measured: longer prompts take longer, and it is near the points.
    assert prof.prefill(700, 700 * 700) > prof.prefill(16, 256)
    errs = [abs(prof.prefill(t, a) - s) / s for t, a, s in prof.points["prefill"]]
    assert np.median(errs) < 0.5
    assert prof.transfer.bytes_per_s > 1e7 and prof.transfer.transport == "tcp"


def test_simulate_command_writes_the_bench_report(tiny_profile, tmp_path):
    out = tmp_path / "sim"
    r = _cli("simulate", "--profile", str(tiny_profile), "--workload", "mixed", "--num-requests", "30",
             "--rates", "1,4", "--slo-ttft-ms", "2000", "--slo-tpot-ms", "200", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads((out / "summary.json").read_text())
    runs = doc["runs"]["simulated"]
    assert [s["load"] for s in runs] == ["1 req/s (Poisson)", "4 req/s (Poisson)"]
    assert all(s["requests"] == 30 and s["completed"] == 30 for s in runs)
    assert runs[0]["ttft_s"]["median"] > 0 and runs[0]["cost_per_million_output_tokens"] > 0
    assert "| 1 req/s (Poisson) | 30/30 |" in (out / "report.md").read_text()
    assert (out / "latency_cdf.png").exists() and "events/s" in r.stdout
    bad = _cli("simulate", "--profile", str(tiny_profile), "--concurrency", "4", "--out", str(out), timeout=60)
    assert bad.returncode == 2 and "--rates" in bad.stderr


def test_simulate_and_plan_model_prefix_caching_from_the_workloads_blocks(tiny_profile, tmp_path):
    sample = str(Path(__file__).parent.parent / "tokenworks/bench/samples/mooncake.jsonl")
    r = _cli("simulate", "--profile", str(tiny_profile), "--workload", "mooncake", "--file", sample,
             "--out", str(tmp_path / "mc"), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    m = re.search(r"prefix cache: ([\d,]+) of ([\d,]+) prompt tokens", r.stdout)
    (run,) = json.loads((tmp_path / "mc" / "summary.json").read_text())["runs"]["simulated"]
    assert m and int(m.group(1).replace(",", "")) == run["simulated"]["cached_prompt_tokens"] > 0, r.stdout
    assert "warning: " in r.stderr and "profile --quick" in r.stderr  # the tiny profile is a quick one
    assert "prefix caching from the workload's blocks of 512 tokens" in (tmp_path / "mc" / "report.md").read_text()
    chat = _cli("simulate", "--profile", str(tiny_profile), "--workload", "multi-turn", "--num-requests", "24",
                "--turns", "4", "--num-prefixes", "2", "--prefix-len", "200", "--input-len", "uniform:10:40",
                "--output-len", "fixed:8", "--out", str(tmp_path / "chat"), timeout=120)
    assert chat.returncode == 0, chat.stderr[-3000:]
    (run,) = json.loads((tmp_path / "chat" / "summary.json").read_text())["runs"]["simulated"]
    # later turns resend their conversation and sessions share two system prompts: most of the prompt is cached
    assert run["simulated"]["cached_prompt_tokens"] > 0.6 * run["input_tokens"], chat.stdout
    assert "prefix caching from the workload's blocks of 16 tokens" in (tmp_path / "chat" / "report.md").read_text()
    off = tmp_path / "off.json"  # the same engine measured with --no-prefix-caching
    off.write_text(json.dumps({**json.loads(tiny_profile.read_text()), "prefix_caching": False}))
    r = _cli("simulate", "--profile", str(off), "--workload", "mooncake", "--file", sample,
             "--out", str(tmp_path / "off"), timeout=120)
    assert r.returncode == 0 and "prefix cache: 0 of" in r.stdout, r.stderr[-3000:]
    assert "--no-prefix-caching" in (tmp_path / "off" / "report.md").read_text()
    plain = _cli("simulate", "--profile", str(tiny_profile), "--num-requests", "5", "--rates", "1",
                 "--out", str(tmp_path / "syn"), timeout=120)
    assert plain.returncode == 0 and "prefix cache" not in plain.stdout
    assert "no prefix caching" in (tmp_path / "syn" / "report.md").read_text()
    plan = _cli("plan", "--profile", str(tiny_profile), "--workload", "mooncake", "--file", sample, "--rates", "0.5",
                "--hardware", "CPU-EPYC-1core", "--slo-ttft-ms", "60000", "--sim-requests", "100", "--json", timeout=180)
    assert plan.returncode == 0 and json.loads(plan.stdout)["prefix_caching"] is True, plan.stderr[-3000:]
    assert "[plan] warning: " in plan.stderr and "profile --quick" in plan.stderr


def test_plan_for_system_prompts_and_conversations_counts_their_cache(tiny_profile):
    """The same prompt lengths, once as questions after one of two system prompts of 400 tokens (shared-prefix:
    cached after their first prefill) and once as prompts sharing nothing: the first needs fewer workers; and so
    do conversations (multi-turn) against prompts of their lengths that share nothing."""
    def best(*workload):
        r = _cli("plan", "--profile", str(tiny_profile), "--hardware", "CPU-EPYC-1core", *workload, "--output-len",
                 "fixed:8", "--rates", "300", "--slo-ttft-ms", "20", "--sim-requests", "400", "--top", "1", "--json",
                 timeout=180)
        assert r.returncode == 0, r.stderr[-3000:]
        doc = json.loads(r.stdout)
        return doc["prefix_caching"], doc["mean_prompt_tokens"], doc["candidates"][0]

    cached, cached_len, a = best("--workload", "shared-prefix", "--num-prefixes", "2", "--prefix-len", "400",
                                 "--input-len", "uniform:10:40")
    plain, plain_len, b = best("--input-len", "uniform:412:442")
    assert cached and not plain and abs(cached_len - plain_len) < 10
    assert a["units"] < b["units"] and a["goodput_req_s"] > b["goodput_req_s"]
    assert a["cached_prompt_share"] > 0.8 and b["cached_prompt_share"] == 0  # 400 of ~430 tokens, after the first
    # conversations of 4 turns after one of two system prompts of 400: each turn resends the last one's prompt
    chat, chat_len, c = best("--workload", "multi-turn", "--turns", "4", "--num-prefixes", "2", "--prefix-len", "400",
                             "--input-len", "uniform:10:40")
    plain, plain_len, d = best("--input-len", "uniform:500:540")
    assert chat and not plain and abs(chat_len - plain_len) < 10
    assert c["units"] < d["units"] and c["goodput_req_s"] > d["goodput_req_s"]


def test_plan_says_when_no_count_of_a_worker_can_meet_the_slo_and_refuses_a_trace_kind_without_a_file(
        tiny_profile):
    r = _cli("plan", "--profile", str(tiny_profile), "--hardware", "CPU-EPYC-1core", "--input-len", "uniform:900:1000",
             "--rates", "5", "--slo-ttft-ms", "0.5", "--sim-requests", "200", timeout=180)
    assert r.returncode == 0 and "no layout meets the SLOs" in r.stdout, r.stderr[-3000:]
    m = re.search(r"CPU-EPYC-1core: one request at a time on one worker gives p90 TTFT ([\d.]+) ms.* (\d+)% meet "
                  r"the SLOs: no count of it can", r.stdout)
    assert m and float(m.group(1)) > 0.5 and int(m.group(2)) < 90, r.stdout
    bad = _cli("plan", "--profile", str(tiny_profile), "--workload", "mooncake", "--rates", "1", "--slo-ttft-ms", "9")
    assert bad.returncode != 0 and "give --file" in bad.stderr
    for command, flag in (("plan", "--sim-requests"), ("simulate", "--num-requests"), ("plan", "--num-prefixes")):
        bad = _cli(command, "--profile", str(tiny_profile), "--rates", "1", "--slo-ttft-ms", "9", flag, "0")
        assert bad.returncode == 2 and f"argument {flag}: '0' is not a whole number of at least 1" in bad.stderr
    bad = _cli("plan", "--profile", str(tiny_profile), "--file", "x.jsonl", "--rates", "1", "--slo-ttft-ms", "9")
    assert bad.returncode != 0 and "--file is a trace" in bad.stderr
    bad = _cli("simulate", "--profile", str(tiny_profile), "--rates", "1", "--kv-host-memory-gib", "-1")
    assert bad.returncode != 0 and "--kv-host-memory-gib must be >= 0" in bad.stderr
    bad = _cli("simulate", "--profile", str(tiny_profile), "--rates", "1", "--kv-cache-memory-gib", "1e-9")
    assert bad.returncode != 0 and "holds fewer than 2 blocks" in bad.stderr


def test_the_planners_traffic_shares_prefixes_within_a_pass_over_its_sample_only():
    traffic = Traffic(1.0, np.array([40, 40]), np.array([2, 2]), prefix_blocks=[(1, 2), (1, 2)], block_tokens=16)
    work = traffic.workload(4, rate=0.01)  # 100 s apart: nothing queues
    r = simulate(Deployment((Pool("both", 1, _flat()),)), work)
    assert r.stats["cached_prompt_tokens"] == 2 * 32  # the second of each pass hits; the third (a new pass) does not


def test_plan_command_prints_json(tiny_profile):
    r = _cli("plan", "--profile", str(tiny_profile), "--rates", "2", "--hardware", "CPU-EPYC-1core",
             "--input-len", "uniform:20:200", "--output-len", "uniform:8:32", "--slo-ttft-ms", "3000",
             "--slo-tpot-ms", "500", "--sim-requests", "400", "--top", "2", "--json", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)
    assert doc["rate_req_s"] == 2 and doc["candidates"]
    best = doc["candidates"][0]
    assert best["attainment"] >= 0.9 and best["price_per_hour"] > 0
    assert math.isfinite(best["cost_per_million_output_tokens"])


def test_sharded_simulation_agrees_with_one_process():
    p = make_profile()
    dep = Deployment((Pool("prefill", 20, p), Pool("decode", 40, p)))
    rng = np.random.default_rng(5)
    n = 20000
    work = SimWorkload(np.cumsum(rng.exponential(1 / 400, n)), rng.integers(50, 1000, n), rng.integers(16, 256, n))
    one = simulate(dep, work)
    two = simulate(dep, work, shards=2)
    assert two.stats["shards"] == 2 and two.stats["remote_prefills"] == n
    assert not np.isnan(two.e2e).any()
    for a, b in ((one.ttft, two.ttft), (one.tpot, two.tpot)):
        assert np.nanmedian(b) == pytest.approx(np.nanmedian(a), rel=0.1)
        assert np.nanpercentile(b, 90) == pytest.approx(np.nanpercentile(a, 90), rel=0.1)
