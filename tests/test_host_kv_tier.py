"""The host-memory KV tier: LRU order and capacity, byte-exact round trips, and greedy tokens equal to a recompute."""

import random

import torch

from tokenworks.config import EngineArgs, ModelConfig
from tokenworks.engine.block_pool import HOST_REMOVED, HOST_STORED, BlockPool
from tokenworks.model.host_kv_tier import HostKVTier
from tokenworks.model.kv_cache import KVCache
from tokenworks.router.kv_index import KVIndex
from tokenworks.sampling_params import SamplingParams

CFG = ModelConfig(architecture="llama", vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2,
                  num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position=512, tie_word_embeddings=True)


def _kv(num_blocks=6):
    kv = KVCache(CFG, 16, num_blocks, torch.float32, "cpu")
    kv.tensor.copy_(torch.randn(kv.tensor.shape))
    return kv


def test_save_and_restore_round_trip_the_exact_bytes():
    kv = _kv()
    tier = HostKVTier(kv, 3)
    want = kv.tensor[2].clone()
    tier.save(2, 0xAB)
    kv.tensor[2].zero_()
    tier.restore(0xAB, 4)
    assert torch.equal(kv.tensor[4], want)
    assert 0xAB in tier and len(tier) == 1 and tier.num_restored == 1


def test_least_recently_used_blocks_leave_first_and_events_say_so():
    kv, pool = _kv(), BlockPool(6)
    pool.record_events()
    tier = HostKVTier(kv, 3, pool)
    for h in (1, 2, 3):
        tier.save(h, h)
    assert tier.hold(1)  # a hit makes 1 the most recent: 2 is now the oldest
    tier.save(1, 1)  # saving bytes already held changes nothing but recency
    tier.save(4, 4)
    assert sorted(tier.hashes()) == [1, 3, 4] and tier.num_dropped == 1 and len(tier) == 3
    tier.restore(3, 5)
    tier.save(5, 5)  # 1 is the oldest now (3 was restored after it)
    assert sorted(tier.hashes()) == [3, 4, 5]
    events = pool.drain_events()
    assert events == [(HOST_STORED, 1), (HOST_STORED, 2), (HOST_STORED, 3), (HOST_REMOVED, 2), (HOST_STORED, 4),
                      (HOST_REMOVED, 1), (HOST_STORED, 5)]
    assert not tier.hold(2)
    tier.clear()
    assert len(tier) == 0 and sorted(h for _, h in pool.drain_events()) == [3, 4, 5]


def _engine(host_gib: float):
    from tokenworks.llm import build_random_engine

    # 12 blocks of 16 tokens: two 80-token prompts cannot both stay in the pool.
    args = EngineArgs(device="cpu", dtype="float32", num_blocks=12, max_num_batched_tokens=128, max_num_seqs=4,
                      kv_host_memory_gib=host_gib)
    return build_random_engine(args, CFG, "tiny")


def _run(engine, rid, prompt, n=6):
    engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o
    return out


def test_evicted_prefix_comes_back_from_host_memory_with_the_same_greedy_tokens():
    rng = random.Random(1)
    a, b, c = ([rng.randrange(1, 96) for _ in range(80)] for _ in range(3))
    plain = _engine(0.0).engine
    want = [_run(plain, "a1", a).token_ids, _run(plain, "b", b).token_ids, _run(plain, "c", c).token_ids]
    again = _run(plain, "a2", a)
    assert again.num_cached_tokens == 0  # without the tier, b and c pushed a's blocks out: a is recomputed
    want.append(again.token_ids)

    loaded = _engine(0.01)
    engine, tier, pool = loaded.engine, loaded.host_tier, loaded.pool
    index = KVIndex()
    index.reset("w", pool.record_events(), pool.num_blocks, tier.hashes(), tier.num_blocks)
    got = [_run(engine, "a1", a).token_ids, _run(engine, "b", b).token_ids, _run(engine, "c", c).token_ids]
    assert tier.num_saved >= 5  # a's blocks went to host memory as b and c took the pool
    again = _run(engine, "a2", a)
    got.append(again.token_ids)
    assert got == want  # restored KV gives the tokens a recompute gives
    assert again.num_cached_tokens >= 64 and tier.num_restored >= 4
    pool.check_integrity()
    index.apply("w", pool.drain_events())
    assert index.blocks["w"] == set(pool.cached_hashes()) and index.host["w"] == set(tier.hashes())
