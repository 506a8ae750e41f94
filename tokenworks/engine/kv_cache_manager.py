"""Which blocks each request owns: prefix-cache lookups, slot allocation, release."""

from __future__ import annotations

from typing import Protocol

from tokenworks.engine.block_pool import Block, BlockPool, hash_block
from tokenworks.engine.request import Request


class HostTier(Protocol):
    """Blocks evicted from the pool, kept elsewhere by hash (model/host_kv_tier.py)."""

    def hold(self, block_hash: int) -> bool: ...

    def restore(self, block_hash: int, block_id: int) -> None: ...


class KVCacheManager:
    """Maps request ids to block lists on top of a ``BlockPool`` (and a host tier behind it, if any)."""

    def __init__(self, pool: BlockPool, block_size: int, host_tier: HostTier | None = None) -> None:
        self.pool = pool
        self.block_size = block_size
        self.host_tier = host_tier
        self.req_blocks: dict[str, list[Block]] = {}
        self.num_published: dict[str, int] = {}  # request id -> its leading blocks already offered to the cache
        self._ids: dict[str, list[int]] = {}  # request id -> its block ids, a new list whenever blocks are added

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table. Read-only: the same list is handed out until the request gets more blocks
        (then a new one), so a step's copy stays as it was scheduled."""
        return self._ids.get(request_id, [])

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        hashes = request.block_hashes
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.all_token_ids[i * bs : (i + 1) * bs]))
        return hashes[:num_full_blocks]

    def get_computed_blocks(self, request: Request) -> tuple[list[Block], int]:
        """The longest cached prefix of the request, in full blocks.

        At least one token is always left to compute, so the last position's
        logits exist; the blocks are not yet referenced (``allocate_slots``
        takes the references).
        """
        if not self.pool.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0  # (prompt logprobs need every prompt position's logits)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        hashes = self._block_hashes(request, max_blocks)
        for h in hashes:
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        if self.host_tier is not None and len(hits) < len(hashes):
            hits += self._restore(hashes[len(hits):], hits)
        return hits, len(hits) * self.block_size

    def _restore(self, hashes: list[int], hits: list[Block]) -> list[Block]:
        """Copy the prefix's continuation back from the host tier into fresh blocks, published in the prefix cache
        and left idle like any cached hit (``allocate_slots`` takes the references). The device hits are pinned
        meanwhile, so making room never evicts them."""
        pool, tier = self.pool, self.host_tier
        restored: list[Block] = []
        pool.touch(hits)
        for h in hashes:
            block = pool.lookup(h)  # the chain can resume in the pool after an evicted block
            if block is not None:
                pool.touch([block])
                restored.append(block)
                continue
            # Keep one idle block beyond what is restored: the request needs a slot for its last token.
            if not tier.hold(h) or pool.num_idle_blocks <= 1:
                break
            block = pool.allocate(1)[0]
            tier.restore(h, block.block_id)
            pool.cache(block, h)
            restored.append(block)
        pool.release(reversed(hits + restored))
        return restored

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[Block] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens; False (and no change) if the pool is short."""
        blocks = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(blocks) - len(computed_blocks)
        reviving = sum(1 for b in computed_blocks if b.ref_count == 0)
        if needed + reviving > self.pool.num_idle_blocks:
            return False
        old = len(blocks)
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks = blocks + list(computed_blocks)
        if needed > 0:
            blocks = blocks + self.pool.allocate(needed)
        rid = request.request_id
        self.req_blocks[rid] = blocks
        if len(blocks) > old:
            self._ids[rid] = self._ids.get(rid, []) + [b.block_id for b in blocks[old:]]
        return True

    def cache_blocks(self, request: Request) -> None:
        """Publish every full block whose KV is computed (each block once: those offered before are skipped)."""
        if not self.pool.enable_prefix_caching:
            return
        rid = request.request_id
        blocks = self.req_blocks.get(rid, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        done = self.num_published.get(rid, 0)
        if num_full <= done:  # most steps of a decode: no block filled since the last one
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(done, num_full):
            self.pool.cache(blocks[i], hashes[i])
        self.num_published[rid] = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its deepest prefix is evicted first."""
        self.num_published.pop(request.request_id, None)
        self._ids.pop(request.request_id, None)
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.release(reversed(blocks))
