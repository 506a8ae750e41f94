"""Where each phase runs: least-loaded workers, prefix overlap, conditional disaggregation.

The router keeps an approximate index of which prompt blocks each decode
worker has seen (it sent them there); the worker's own prefix cache is the
truth, the index only steers. A prompt whose part not yet on the chosen
decode worker is at most ``local_prefill_threshold`` tokens is prefilled
there; longer ones go to the least-loaded prefill worker.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from tokenworks.engine.block_pool import hash_block


@dataclass
class WorkerView:
    worker_id: str
    role: str
    inflight: int = 0  # requests the router has placed here and not seen finish
    queue_depth: int = 0  # waiting on the worker, from its last stats
    alive: bool = True
    prefixes: OrderedDict = field(default_factory=OrderedDict)  # block hash -> None, LRU

    @property
    def load(self) -> int:
        return self.inflight + self.queue_depth


@dataclass
class Placement:
    decode: WorkerView
    prefill: WorkerView | None  # None: prefill on the decode worker
    cached_tokens: int  # the router's estimate of the decode worker's prefix hit


class RoutingPolicy:
    def __init__(self, block_size: int, local_prefill_threshold: int, max_prefixes: int = 200_000) -> None:
        self.block_size = block_size
        self.local_prefill_threshold = local_prefill_threshold
        self.max_prefixes = max_prefixes

    def block_hashes(self, token_ids: list[int]) -> list[int]:
        out: list[int] = []
        bs = self.block_size
        for i in range(len(token_ids) // bs):
            out.append(hash_block(out[-1] if out else None, token_ids[i * bs : (i + 1) * bs]))
        return out

    def overlap_tokens(self, worker: WorkerView, hashes: list[int]) -> int:
        n = 0
        for h in hashes:
            if h not in worker.prefixes:
                break
            n += 1
        return n * self.block_size

    def remember(self, worker: WorkerView, hashes: list[int]) -> None:
        for h in hashes:
            worker.prefixes[h] = None
            worker.prefixes.move_to_end(h)
        while len(worker.prefixes) > self.max_prefixes:
            worker.prefixes.popitem(last=False)

    def place(self, workers: list[WorkerView], token_ids: list[int]) -> Placement:
        decoders = [w for w in workers if w.alive and w.role in ("decode", "both")]
        if not decoders:
            raise LookupError("no decode-capable worker is available")
        hashes = self.block_hashes(token_ids)
        # Fewest requests first; among equals, the one holding more of this prompt.
        best = min(decoders, key=lambda w: (w.load, -self.overlap_tokens(w, hashes), w.worker_id))
        cached = self.overlap_tokens(best, hashes)
        prefillers = [w for w in workers if w.alive and w.role == "prefill"]
        uncached = len(token_ids) - cached
        if not prefillers or uncached <= self.local_prefill_threshold:
            return Placement(best, None, cached)
        return Placement(best, min(prefillers, key=lambda w: (w.load, w.worker_id)), cached)
