"""Block pool and KV cache manager: exact block ids on tiny pools."""

import pytest

from tokenworks.engine.block_pool import BlockPool, hash_block
from tokenworks.engine.kv_cache_manager import KVCacheManager
from tokenworks.engine.request import Request
from tokenworks.sampling_params import SamplingParams


def make_request(rid, tokens):
    return Request(rid, list(tokens), SamplingParams(max_tokens=4))


def admit(kv, req):
    blocks, n = kv.get_computed_blocks(req)
    assert kv.allocate_slots(req, req.num_tokens - n, blocks)
    req.num_computed_tokens = req.num_tokens
    kv.cache_blocks(req)
    return n


def test_allocation_order_and_release_back_to_idle():
    pool = BlockPool(11)
    kv = KVCacheManager(pool, block_size=4)
    a = make_request("a", range(10))  # 3 blocks
    admit(kv, a)
    assert kv.block_ids("a") == [1, 2, 3]
    b = make_request("b", range(100, 105))  # 2 blocks
    admit(kv, b)
    assert kv.block_ids("b") == [4, 5]
    assert pool.num_used_blocks == 5 and pool.num_idle_blocks == 5
    kv.free(a)
    # Released tail first: the idle queue now ends ... 3, 2, 1.
    assert list(pool._idle)[-3:] == [3, 2, 1]
    kv.free(b)
    assert pool.num_used_blocks == 0
    pool.check_integrity()


def test_prefix_sharing_reuses_exact_blocks_and_counts_refs():
    pool = BlockPool(11)
    kv = KVCacheManager(pool, block_size=4)
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])  # blocks 1,2 full, 3 partial
    admit(kv, a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 42, 43])
    assert admit(kv, b) == 8
    assert kv.block_ids("b") == [1, 2, 4]
    assert pool.blocks[1].ref_count == 2 and pool.blocks[2].ref_count == 2 and pool.blocks[3].ref_count == 1
    kv.free(a)
    assert pool.blocks[1].ref_count == 1 and pool.blocks[3].ref_count == 0
    kv.free(b)
    pool.check_integrity()
    # Both full prefix blocks stay cached while idle.
    assert pool.num_cached_idle_blocks == 2
    c = make_request("c", [1, 2, 3, 4, 5, 6, 7, 8, 0])
    assert admit(kv, c) == 8
    assert kv.block_ids("c")[:2] == [1, 2]
    kv.free(c)
    pool.check_integrity()


def test_last_token_is_never_served_from_cache():
    pool = BlockPool(11)
    kv = KVCacheManager(pool, block_size=4)
    a = make_request("a", range(8))
    admit(kv, a)
    kv.free(a)
    b = make_request("b", range(8))  # exactly the same 2 full blocks
    blocks, n = kv.get_computed_blocks(b)
    assert n == 4 and [x.block_id for x in blocks] == [1]  # the last block is recomputed


def test_lru_eviction_order():
    pool = BlockPool(6)  # 5 usable
    kv = KVCacheManager(pool, block_size=2)
    a = make_request("a", [1, 2, 3, 4, 5])  # blocks 1,2 full + 3 partial
    admit(kv, a)
    kv.free(a)  # idle order: 4, 5, 3, 2, 1 (3 not cached: partial)
    assert list(pool._idle) == [4, 5, 3, 2, 1]
    b = make_request("b", [9, 9, 9, 9, 9, 9, 9])  # needs 4 blocks: takes 4,5,3 then evicts 2
    admit(kv, b)
    assert kv.block_ids("b") == [4, 5, 3, 2]
    assert pool.num_evictions == 1
    assert pool.lookup(hash_block(None, [1, 2])) is pool.blocks[1]  # 1 survived
    kv.free(b)
    pool.check_integrity()


def test_allocation_failure_changes_nothing():
    pool = BlockPool(4)
    kv = KVCacheManager(pool, block_size=4)
    a = make_request("a", range(20))
    assert not kv.allocate_slots(a, 20)
    assert pool.num_used_blocks == 0 and kv.block_ids("a") == []
    pool.check_integrity()


def test_double_release_is_an_error():
    pool = BlockPool(4)
    (block,) = pool.allocate(1)
    pool.release([block])
    with pytest.raises(RuntimeError):
        pool.release([block])


def test_prefix_caching_off_never_shares():
    pool = BlockPool(11, enable_prefix_caching=False)
    kv = KVCacheManager(pool, block_size=4)
    a = make_request("a", range(9))
    admit(kv, a)
    b = make_request("b", range(9))
    assert admit(kv, b) == 0
    assert set(kv.block_ids("a")).isdisjoint(kv.block_ids("b"))


def test_hash_chain_depends_on_parent():
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])
    assert hash_block(hash_block(None, [1, 2]), [3, 4]) != hash_block(hash_block(None, [9, 9]), [3, 4])


def test_block_hash_is_blake2b_of_parent_then_token_ids_little_endian():
    # The format every process (workers, the router's KV index) must agree on, written out byte by byte.
    import hashlib

    def reference(parent, ids):
        data = (parent or 0).to_bytes(8, "little") + b"".join(t.to_bytes(4, "little") for t in ids)
        return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")

    for parent in (None, 0, 1, 2**64 - 1):
        for ids in ([0], [1, 2, 3], list(range(49_150, 49_166)), [2**32 - 1] * 16):
            assert hash_block(parent, ids) == reference(parent, ids)
    assert hash_block(None, [5, 6]) == hash_block(0, [5, 6])
