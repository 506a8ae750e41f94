"""Which worker holds which prefix block: the router's exact index, built from the workers' KV events.

Each worker's block pool records every block hash it stores, evicts or
clears (engine/block_pool.py); the worker sends them after each step
(``KVEvents``) and a snapshot of its cached hashes when it (re)joins
(``Ready.cached_block_hashes``). Replaying them in order keeps this index
equal to each pool's prefix cache, so routing sees real hits, not guesses.
Its size is bounded by the workers' pools: a worker's entries never exceed its
block count (events beyond that mean a lost message; the worker is then
re-synced from zero rather than trusted).
"""

from __future__ import annotations

import sys

from tokenworks.engine.block_pool import CLEARED, REMOVED, STORED


class KVIndex:
    def __init__(self) -> None:
        self.blocks: dict[str, set[int]] = {}  # worker id -> hashes of the full blocks in its prefix cache
        self.capacity: dict[str, int] = {}  # worker id -> its pool's block count
        self.num_events = 0
        self.num_overflows = 0

    def reset(self, worker_id: str, hashes: list[int], capacity: int) -> None:
        """A worker (re)joined: its cache is exactly ``hashes``."""
        self.blocks[worker_id] = set(hashes)
        self.capacity[worker_id] = capacity

    def drop(self, worker_id: str) -> None:
        self.blocks.pop(worker_id, None)
        self.capacity.pop(worker_id, None)

    def apply(self, worker_id: str, events: list[tuple[int, int]]) -> None:
        held = self.blocks.get(worker_id)
        if held is None:
            return  # not registered (yet): its Ready snapshot will carry the state
        for kind, h in events:
            if kind == STORED:
                held.add(h)
            elif kind == REMOVED:
                held.discard(h)
            elif kind == CLEARED:
                held.clear()
        self.num_events += len(events)
        if len(held) > self.capacity.get(worker_id, len(held)):
            self.num_overflows += 1
            held.clear()  # cannot be right: forget rather than route on it

    def overlap_blocks(self, worker_id: str, hashes: list[int]) -> int:
        """Leading blocks of the prompt (its chain hashes) that the worker holds."""
        held = self.blocks.get(worker_id)
        if not held:
            return 0
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    @property
    def num_entries(self) -> int:
        return sum(len(s) for s in self.blocks.values())

    @property
    def nbytes(self) -> int:
        """Approximate memory held by the index (the sets and their int objects)."""
        return sum(sys.getsizeof(s) + 32 * len(s) for s in self.blocks.values())
