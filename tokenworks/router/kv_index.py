"""Which worker holds which prefix block: the router's exact index, built from the workers' KV events.

Each worker's block pool records every block hash it stores, evicts or
clears (engine/block_pool.py); the worker sends them after each step
(``KVEvents``) and a snapshot of its cached hashes when it (re)joins
(``Ready.cached_block_hashes``). Replaying them in order keeps this index
equal to each pool's prefix cache (and each host tier's, in ``host``), so
routing sees real hits, not guesses; a block in either tier counts as a hit
(one in host memory is copied back, not recomputed).
Its size is bounded by the workers' pools: a worker's entries never exceed its
block count (events beyond that mean a lost message; the worker is then
re-synced from zero rather than trusted).
"""

from __future__ import annotations

import sys

from tokenworks.engine.block_pool import CLEARED, HOST_REMOVED, HOST_STORED, REMOVED, STORED


class KVIndex:
    def __init__(self) -> None:
        self.blocks: dict[str, set[int]] = {}  # worker id -> hashes of the full blocks in its prefix cache
        self.host: dict[str, set[int]] = {}  # worker id -> hashes in its host-memory tier
        self.capacity: dict[str, tuple[int, int]] = {}  # worker id -> (pool blocks, host tier blocks)
        self.num_events = 0
        self.num_overflows = 0

    def reset(self, worker_id: str, hashes: list[int], capacity: int, host_hashes: list[int] = (),
              host_capacity: int = 0) -> None:
        """A worker (re)joined: its cache is exactly ``hashes`` (and its host tier ``host_hashes``)."""
        self.blocks[worker_id] = set(hashes)
        self.host[worker_id] = set(host_hashes)
        self.capacity[worker_id] = (capacity, host_capacity)

    def drop(self, worker_id: str) -> None:
        self.blocks.pop(worker_id, None)
        self.host.pop(worker_id, None)
        self.capacity.pop(worker_id, None)

    def apply(self, worker_id: str, events: list[tuple[int, int]]) -> None:
        held = self.blocks.get(worker_id)
        if held is None:
            return  # not registered (yet): its Ready snapshot will carry the state
        host = self.host[worker_id]
        for kind, h in events:
            if kind == STORED:
                held.add(h)
            elif kind == REMOVED:
                held.discard(h)
            elif kind == HOST_STORED:
                host.add(h)
            elif kind == HOST_REMOVED:
                host.discard(h)
            elif kind == CLEARED:
                held.clear()
        self.num_events += len(events)
        capacity, host_capacity = self.capacity[worker_id]
        if len(held) > capacity or len(host) > host_capacity:
            self.num_overflows += 1
            held.clear()  # cannot be right: forget rather than route on it
            host.clear()

    def overlap_blocks(self, worker_id: str, hashes: list[int]) -> int:
        """Leading blocks of the prompt (its chain hashes) that the worker holds, in its pool or its host tier."""
        held = self.blocks.get(worker_id)
        if held is None:
            return 0
        host = self.host[worker_id]
        n = 0
        for h in hashes:
            if h not in held and h not in host:
                break
            n += 1
        return n

    @property
    def num_entries(self) -> int:
        return sum(len(s) for s in self.blocks.values()) + sum(len(s) for s in self.host.values())

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the index (the sets and their int objects)."""
        sets = list(self.blocks.values()) + list(self.host.values())
        return sum(sys.getsizeof(s) + 32 * len(s) for s in sets)
