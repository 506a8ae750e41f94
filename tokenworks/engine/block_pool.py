"""A torch-free pool of KV blocks with reference counts and a prefix cache.

Every block is in exactly one of three states:

- free:   ref_count == 0, no hash; ready to hand out;
- cached: ref_count == 0, holds the KV of a known prefix (``block_hash``);
          reusable by a later request with the same prefix, evictable;
- used:   ref_count > 0, owned by one or more running requests.

Free and cached blocks share one LRU queue: allocation takes from the head
(the block released longest ago), evicting its cached prefix if it had one,
and releasing appends to the tail. Block 0 is never handed out: the runner
uses it as the padding target for gathers, so garbage in it is harmless.

Invariant, checked by ``check_integrity``: free + cached + used == total.

KV events (once ``record_events`` is called): every change to the set of
cached hashes is appended to ``events`` in order, as ``(STORED, hash)``, ``(REMOVED, hash)`` or
``(CLEARED, 0)`` (a host tier adds ``HOST_STORED``/``HOST_REMOVED``); a worker drains them after each step and publishes them, and
the router's index of which worker holds which prefix (router/kv_index.py)
replays them, so it always equals ``cached_hashes()`` here.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

NULL_BLOCK_ID = 0
REMOVED, STORED, CLEARED = 0, 1, 2  # KV event kinds of the pool
HOST_REMOVED, HOST_STORED = 3, 4  # ... and of a host-memory tier behind it (model/host_kv_tier.py)


_BLOCK_LAYOUTS: dict[int, struct.Struct] = {}  # tokens per block -> the bytes hashed: parent, then the token ids


def hash_block(parent_hash: int | None, token_ids: Sequence[int]) -> int:
    """Chain hash of a full block: identical prefixes give identical hashes in every process. BLAKE2b (8 bytes)
    of the parent's hash (8 bytes, little-endian; 0 for the first block) followed by each token id (4 bytes,
    little-endian), packed in one call."""
    layout = _BLOCK_LAYOUTS.get(len(token_ids))
    if layout is None:
        layout = _BLOCK_LAYOUTS[len(token_ids)] = struct.Struct(f"<Q{len(token_ids)}I")
    return int.from_bytes(hashlib.blake2b(layout.pack(parent_hash or 0, *token_ids), digest_size=8).digest(), "little")


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


class BlockPool:
    """Owns ``num_blocks`` block ids (block 0 reserved) and the prefix-hash index."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_count = 1  # reserved forever
        # LRU of blocks with ref_count == 0 (free and cached), head = evicted first.
        self._idle: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks[1:])
        self._cached: dict[int, Block] = {}  # block_hash -> block (used or idle)
        self.num_evictions = 0
        # Called with (block id, hash) as a cached block is evicted, before it is reused: a host tier saves it.
        self.evict_hook: Callable[[int, int], None] | None = None
        self.events: list[tuple[int, int]] | None = None  # (kind, hash) since the last drain; None: not recorded

    # -- queries -------------------------------------------------------------------------

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_idle_blocks(self) -> int:
        """Blocks that can be handed out now (free plus evictable cached)."""
        return len(self._idle)

    @property
    def num_cached_idle_blocks(self) -> int:
        return sum(1 for b in self._idle.values() if b.block_hash is not None)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self._idle)

    def usage(self) -> float:
        return self.num_used_blocks / self.num_usable_blocks

    def cached_hashes(self) -> list[int]:
        return list(self._cached)

    def record_events(self) -> list[int]:
        """Start recording KV events (a worker that publishes them); the cached hashes now, as a snapshot."""
        self.events = []
        return self.cached_hashes()

    def drain_events(self) -> list[tuple[int, int]]:
        if self.events is None:
            return []
        events, self.events = self.events, []
        return events

    def _event(self, kind: int, block_hash: int) -> None:
        if self.events is not None:
            self.events.append((kind, block_hash))

    def lookup(self, block_hash: int) -> Block | None:
        if not self.enable_prefix_caching:
            return None
        return self._cached.get(block_hash)

    # -- changes -------------------------------------------------------------------------

    def allocate(self, n: int) -> list[Block]:
        """Take ``n`` blocks (ref_count 1), evicting the least recently released cached ones."""
        if n > len(self._idle):
            raise MemoryError(f"asked for {n} KV blocks, {len(self._idle)} available")
        out = []
        for _ in range(n):
            _, block = self._idle.popitem(last=False)
            if block.block_hash is not None:
                del self._cached[block.block_hash]
                if self.evict_hook is not None:
                    self.evict_hook(block.block_id, block.block_hash)
                self._event(REMOVED, block.block_hash)
                block.block_hash = None
                self.num_evictions += 1
            block.ref_count = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on prefix-cache hits (reviving idle ones)."""
        for block in blocks:
            if block.ref_count == 0:
                del self._idle[block.block_id]
            block.ref_count += 1

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop one reference each; blocks reaching 0 go to the LRU tail in the given order."""
        for block in blocks:
            if block.ref_count <= 0 or block.block_id == NULL_BLOCK_ID:
                raise RuntimeError(f"release of block {block.block_id} with ref_count {block.ref_count}")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._idle[block.block_id] = block

    def cache(self, block: Block, block_hash: int) -> None:
        """Publish a full, computed block under its chain hash (first writer wins)."""
        if not self.enable_prefix_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return  # another request already published the same prefix; keep ours private
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self._event(STORED, block_hash)

    def reset_prefix_cache(self) -> None:
        for block in list(self._cached.values()):
            block.block_hash = None
        self._cached.clear()
        self._event(CLEARED, 0)

    def check_integrity(self) -> None:
        """free + cached + used == total, and the hash index agrees with the blocks."""
        used = sum(1 for b in self.blocks[1:] if b.ref_count > 0)
        idle = sum(1 for b in self.blocks[1:] if b.ref_count == 0)
        if used + idle != self.num_usable_blocks or idle != len(self._idle):
            raise AssertionError(f"block accounting broken: used={used} idle={idle} lru={len(self._idle)}")
        for h, b in self._cached.items():
            if b.block_hash != h:
                raise AssertionError(f"hash index stale for block {b.block_id}")
        if any(b.ref_count < 0 for b in self.blocks):
            raise AssertionError("negative ref_count")
