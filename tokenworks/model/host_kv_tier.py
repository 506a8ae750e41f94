"""A second, larger tier of KV blocks in host memory (``--kv-host-memory-gib``).

When the block pool evicts a cached prefix block to reuse it, the block's
bytes (every layer, K and V) are first copied here under its chain hash; a
later request whose prefix continues into blocks held here gets them copied
back into fresh pool blocks instead of recomputing them
(``KVCacheManager.get_computed_blocks``). On a GPU worker this is pinned host
memory beside the device pool; on a CPU worker it is simply more RAM than the
pool the scheduler works with, kept in LRU order.

Slots are reused least recently used first (a save or a restore counts as a
use). Every change is a KV event on the pool's event list
(``HOST_STORED``/``HOST_REMOVED``), so the router's index knows which worker
holds which block in which tier.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from tokenworks.engine.block_pool import HOST_REMOVED, HOST_STORED, BlockPool
from tokenworks.model.kv_cache import KVCache


def host_blocks_for_budget(kv: KVCache, gib: float) -> int:
    return int(gib * 2**30) // kv.block_nbytes


class HostKVTier:
    def __init__(self, kv: KVCache, num_blocks: int, pool: BlockPool | None = None) -> None:
        if num_blocks < 1:
            raise ValueError("the host KV tier needs room for at least one block")
        self.kv = kv
        self.pool = pool  # where KV events go (None: not recorded)
        self.num_blocks = num_blocks
        pin = kv.tensor.device.type == "cuda"
        self.tensor = torch.empty((num_blocks, *kv.tensor.shape[1:]), dtype=kv.tensor.dtype, pin_memory=pin)
        self._slots: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, least recently used first
        self.clear()
        self.num_saved = 0
        self.num_restored = 0
        self.num_dropped = 0  # blocks pushed out of this tier by newer ones

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def hashes(self) -> list[int]:
        return list(self._slots)

    def _event(self, kind: int, block_hash: int) -> None:
        if self.pool is not None:
            self.pool._event(kind, block_hash)

    def hold(self, block_hash: int) -> bool:
        """True if the block is here, made the most recently used (so saves before its restore keep it)."""
        if block_hash not in self._slots:
            return False
        self._slots.move_to_end(block_hash)
        return True

    def save(self, block_id: int, block_hash: int) -> None:
        """Copy a pool block about to be reused (its prefix evicted) into this tier."""
        if block_hash in self._slots:
            self._slots.move_to_end(block_hash)  # the same bytes are here already
            return
        if self._free:
            slot = self._free.pop()
        else:
            old, slot = self._slots.popitem(last=False)
            self.num_dropped += 1
            self._event(HOST_REMOVED, old)
        self.tensor[slot].copy_(self.kv.tensor[block_id], non_blocking=True)
        self._slots[block_hash] = slot
        self.num_saved += 1
        self._event(HOST_STORED, block_hash)

    def restore(self, block_hash: int, block_id: int) -> None:
        """Copy a block held here into pool block ``block_id`` (it stays here too)."""
        slot = self._slots[block_hash]
        self._slots.move_to_end(block_hash)
        self.kv.tensor[block_id].copy_(self.tensor[slot], non_blocking=True)
        self.num_restored += 1

    def clear(self) -> None:
        for h in list(self._slots):
            self._event(HOST_REMOVED, h)
        self._free = list(range(self.num_blocks - 1, -1, -1))
        self._slots.clear()
