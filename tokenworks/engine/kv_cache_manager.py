"""Which blocks each request owns: prefix-cache lookups, slot allocation, release."""

from __future__ import annotations

from tokenworks.engine.block_pool import Block, BlockPool, hash_block
from tokenworks.engine.request import Request


class KVCacheManager:
    """Maps request ids to block lists on top of a ``BlockPool``."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self.req_blocks: dict[str, list[Block]] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

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
        if not self.pool.enable_prefix_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in self._block_hashes(request, max_blocks):
            block = self.pool.lookup(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[Block] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens; False (and no change) if the pool is short."""
        blocks = self.req_blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        needed = -(-(num_computed + num_new_tokens) // self.block_size) - len(blocks) - len(computed_blocks)
        reviving = sum(1 for b in computed_blocks if b.ref_count == 0)
        if needed + reviving > self.pool.num_idle_blocks:
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks = blocks + list(computed_blocks)
        if needed > 0:
            blocks = blocks + self.pool.allocate(needed)
        self.req_blocks[request.request_id] = blocks
        return True

    def cache_blocks(self, request: Request) -> None:
        """Publish every full block whose KV is computed."""
        if not self.pool.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(request.request_id, [])
        num_full = min(request.num_computed_tokens // self.block_size, len(blocks))
        for block, h in zip(blocks[:num_full], self._block_hashes(request, num_full)):
            self.pool.cache(block, h)

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first, so its deepest prefix is evicted first."""
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.release(reversed(blocks))
